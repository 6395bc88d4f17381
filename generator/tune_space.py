"""What a tune searches and how: one invocation's settings, each arm's study (its knobs, the
values fixed for it, the order of the question), the search space as Optuna distributions,
the sampler and the pruner, and a chosen value at an edge of its range."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from generator import slurm
from generator.checks import arm_space, field_kind, tune_field
from generator.errors import SpecError, SpecErrors
from generator.loading import Located
from generator.plan import spec_hash
from generator.spec import OBJECTIVES, SearchDim, Spec, Tune, arm_spec

ZERO = ":zero"  # the on/off switch of a range with zero: true; its value True means 0
EDGE = 0.02  # a best value within this share of its range (log range: in log space) of a bound


@dataclass
class Settings:
    """One `perturbgen tune` invocation, resolved."""

    spec_path: Path
    spec: Spec
    doc: Located
    overrides: list[str]
    tune: Tune
    out: Path
    study_name: str
    storage: str | None  # None: DIR/study.db
    workers: int
    resources: slurm.Resources | None = None  # None: local processes; else Slurm tasks
    arm: str = ""  # the arm this study tunes ("" for the whole invocation)
    space: dict[str, SearchDim] = field(default_factory=dict)  # that arm's knobs
    fixed: dict[str, Any] = field(default_factory=dict)  # values another study chose for it

    @property
    def epochs(self) -> int:
        return self.tune.epochs or self.spec.train.epochs

    @property
    def seeds(self) -> list[int]:
        return [self.spec.seed + k for k in range(self.tune.seeds)]

    @property
    def fresh_seeds(self) -> list[int]:
        """The seeds of the final comparison: after the tuning seeds, so never one of them."""
        start = self.spec.seed + self.tune.seeds
        return [start + k for k in range(self.tune.fresh_seeds)]

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.tune.objective]

    def fingerprint(self) -> str:
        """What must match for a rerun to continue a study: all but the budget and the
        arms and fresh seeds of the whole comparison."""
        text = json.dumps({**self.compared(), "spec": spec_hash(self.spec)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def compared(self) -> dict[str, Any]:
        """What the fingerprint covers, as values: a refusal shows what differs."""
        return {
            "spec": self.spec.model_dump(mode="json", exclude={"extends"}),
            "tune": self.tune.model_dump(
                mode="json", exclude={"trials", "arms", "fresh_seeds", "arm_space", "space"}
            ),
            "arm": self.arm,
            "space": {k: v.model_dump(mode="json") for k, v in self.space.items()},
            "fixed": self.fixed,
        }


def settings(
    spec: Spec,
    doc: Located,
    spec_path: Path,
    overrides: list[str],
    trials: int | None,
    workers: int,
    storage: str | None,
    study: str | None,
    out: Path | None,
    resources: slurm.Resources | None = None,
) -> Settings:
    if spec.tune is None:
        raise SpecErrors(
            [SpecError(str(spec_path), None, "tune", "the spec has no tune section to run")]
        )
    tune = spec.tune if trials is None else spec.tune.model_copy(update={"trials": trials})
    name = study or spec.name
    folder = out or Path("tune") / spec.name
    return Settings(
        spec_path, spec, doc, list(overrides), tune, folder, name, storage, workers, resources
    )


def for_arm(s: Settings, arm: str, fixed: dict[str, Any]) -> Settings:
    """One arm's study: its knobs, the values fixed for it, and the study NAME-ARM."""
    space = arm_space(s.spec, arm)
    name = f"{s.study_name}-{arm}"
    return dataclasses.replace(s, arm=arm, space=space, fixed=fixed, study_name=name)


def order(tune: Tune) -> list[str]:
    """The arms in the order they are tuned: baseline first when the others build on it."""
    if tune.question == "added_to_tuned_baseline":
        return ["baseline", *(a for a in tune.arms if a != "baseline")]
    return list(tune.arms)


def values(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters as spec values: a range whose zero switch is on is 0."""
    out = {k: v for k, v in params.items() if not k.endswith(ZERO)}
    out.update({k.removesuffix(ZERO): 0.0 for k, v in params.items() if k.endswith(ZERO) and v})
    return dict(sorted(out.items()))


def arm_overrides(s: Settings, chosen: dict[str, Any]) -> list[str]:
    """--set texts that give the arm these values: an extra baseline's go to its override."""
    prefix = "" if s.arm in s.spec.variants else f"baselines.{s.arm.removeprefix('baseline_')}."
    return [f"{prefix}{key}={json.dumps(value)}" for key, value in sorted(chosen.items())]


def distributions(s: Settings) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space as Optuna distributions, in a fixed order; a range with zero: true
    gets an on/off switch KEY:zero beside it."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    spec = arm_spec(s.spec, s.arm)
    for key, dim in sorted(s.space.items()):
        section, name = tune_field(spec, key)
        if dim.zero:
            out[key + ZERO] = optuna.distributions.CategoricalDistribution([False, True])
        if dim.choices is not None:
            out[key] = optuna.distributions.CategoricalDistribution(dim.choices)
        elif field_kind(type(section).model_fields[name].annotation) == "int":
            out[key] = optuna.distributions.IntDistribution(
                dim.low, dim.high, log=dim.log, step=dim.step or 1
            )
        else:
            out[key] = optuna.distributions.FloatDistribution(
                float(dim.low), float(dim.high), log=dim.log, step=dim.step
            )
    return out


def prune_from(s: Settings) -> int:
    """The first epoch at which a trial may be pruned: none before tune.prune_after of them."""
    return max(1, math.ceil(s.tune.prune_after * s.epochs))


def make_pruner(s: Settings) -> optuna.pruners.BasePruner:
    if s.tune.pruner == "median":  # Optuna prunes from step n_warmup_steps on
        return optuna.pruners.MedianPruner(
            n_startup_trials=s.tune.startup_trials, n_warmup_steps=prune_from(s)
        )
    if s.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=prune_from(s), max_resource=s.epochs)
    return optuna.pruners.NopPruner()


def sampler(s: Settings, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """TPE seeded from the spec seed and the trial's number: a serial tune is reproducible,
    and a resumed or second process does not replay the first one's random start."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=(s.spec.seed * 1_000_003 + trials_so_far) % 2**32, constant_liar=True
        )


def edges(space: dict[str, SearchDim], chosen: dict[str, Any]) -> dict[str, str]:
    """The chosen values at an edge of their range ("low" or "high"): within EDGE of the
    range from a bound (in log space for a log range); 0 from a zero switch is no edge."""
    out = {}
    for key, dim in sorted(space.items()):
        value = chosen.get(key)
        if dim.choices is not None or value is None or (dim.zero and value == 0):
            continue
        scale = math.log if dim.log else float
        low, high, x = scale(dim.low), scale(dim.high), scale(value)
        share = (x - low) / (high - low)
        if share <= EDGE:
            out[key] = "low"
        elif share >= 1 - EDGE:
            out[key] = "high"
    return out
