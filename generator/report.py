"""The ablation report, rebuilt from run folders alone: tables, statistics and plots.

A run folder is any folder holding a config.json written by an emitted script; its
metrics.jsonl and summary.json say how far it got. An ablation folder's ablation.json names
the runs it expected, so a run that never wrote anything is counted as missing. Runs are
grouped by a fingerprint of their resolved settings and never pooled across fingerprints.
Only completed runs enter the averages; diverged, stopped and missing ones are counted in
every table, and time to target treats runs that never reached it as censored. A run whose
metrics.jsonl is not one history (epochs 1, 2, ... each once: two processes wrote it) is
corrupt: it is listed, and counted in no statistic.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from generator.spec import NAME_PATTERN

PHASES = ("exploration", "convergence", "fine_tuning")
ARM_ORDER = ("baseline", "fixed", "phase_only", "schedule_only", "full")
ALPHA = 0.05
# config.json keys that do not make two runs different experiments: the run seed (SEED is only
# --seed's default) and where the run was written
NOT_SETTINGS = ("seed", "out")
# settings that may differ between the arms of one comparison: the arm itself and what it
# brings (its constants, its noise kernel, an extra baseline's batch size)
ARM_SETTINGS = ("arm", "kernel", "batch_size", "constants")


class NoRuns(Exception):
    """The folder holds no run folder: there is nothing to report."""


@dataclass
class Run:
    """One run folder as found on disk (or, with absent=True, one an ablation expected)."""

    path: Path
    spec: str
    arm: str
    seed: int
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)  # config.json's, as written
    config: dict[str, Any] = field(default_factory=dict)
    ablation: dict[str, Any] | None = None  # the record of the ablation folder holding it
    absent: bool = False
    corrupt: bool = False  # metrics.jsonl is not one history: no statistic may use the run

    @property
    def status(self) -> str:
        if self.absent:
            return "missing (no run folder)"
        if self.corrupt:
            return "corrupt (metrics.jsonl is not one history)"
        if self.summary is None:
            return "incomplete (no summary.json)"
        status = str(self.summary.get("status"))
        return "incomplete (stopped)" if status == "stopped" else status

    @property
    def complete(self) -> bool:
        return self.status == "completed" and not self.problems

    @property
    def outcome(self) -> str:
        """completed, diverged, stopped, missing (no folder or no summary) or damaged (which
        a corrupt run is, whatever its summary says)."""
        if self.corrupt:
            return "damaged"
        if self.absent or self.summary is None:
            return "missing"
        if self.summary.get("status") in ("diverged", "stopped"):
            return self.summary["status"]
        return "completed" if self.complete else "damaged"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config)


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that make a run the experiment it is: config.json without the seed and
    the output folder (and without the SEED constant, which only supplies --seed's default,
    and the device's index)."""
    out = {k: v for k, v in config.items() if k not in NOT_SETTINGS}
    if isinstance(out.get("device"), str):  # cuda:1 is the same experiment as cuda:0
        out["device"] = out["device"].split(":")[0]
    if isinstance(out.get("constants"), dict):
        out["constants"] = {k: v for k, v in out["constants"].items() if k != "SEED"}
    return out


def fingerprint(config: dict[str, Any]) -> str:
    text = json.dumps(identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"splits": {"val": 500}} -> {"splits.val": 500}."""
    if isinstance(value, dict) and (value or not prefix):
        out: dict[str, Any] = {}
        for key in sorted(value, key=str):
            out.update(flatten(value[key], f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def differing(settings: list[dict[str, Any]]) -> list[str]:
    """The dotted keys whose values are not the same in every one of the flat settings."""
    keys = sorted({k for s in settings for k in s})
    return [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]


def shared_settings(run: Run) -> dict[str, Any]:
    """What every arm of one comparison must share (flat): the run settings without the
    arm's own, and the ablation's spec hash and --set overrides when it ran under ablate."""
    out = flatten({k: v for k, v in identity(run.config).items() if k not in ARM_SETTINGS})
    if run.ablation is not None:
        out["ablation.spec_sha256"] = run.ablation.get("spec_sha256")
        out["ablation.overrides"] = run.ablation.get("overrides")
    return out


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable ({exc.__class__.__name__})"


REQUIRED = ("epoch", "val_acc", "val_loss", "elapsed_s")  # in every metrics.jsonl record
PHASE_KEYS = tuple(f"phase_{p}" for p in PHASES)
NUMBERS = ("eps", "lr", "train_loss", "train_s")  # optional, but numbers where present
# summary.json's test metrics (absent in run folders from before the val/test split)
SUMMARY_ACCS = ("test_acc", "test_acc_at_best_val")
SUMMARY_NUMBERS = ("test_loss", "test_loss_at_best_val", "seconds_to_target")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _record_problem(record: Any, phases: bool) -> str | None:
    """Why one metrics.jsonl record cannot be used, or None."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, value in record.items():
        if key == "val_loss" and value is None:  # a non-finite loss is written as null
            continue
        checked = key in REQUIRED or key in PHASE_KEYS or key in NUMBERS
        if checked and not _is_number(value):
            return f"{key} is {value!r}, not a finite number"
    if not isinstance(record["epoch"], int) or not 0 <= record["val_acc"] <= 1:
        return "epoch is not an integer or val_acc not in [0, 1]"
    if phases != all(k in record for k in PHASE_KEYS):
        return "has phase fractions unlike the run's first record"
    return None


def _summary_problem(summary: dict[str, Any]) -> str | None:
    """Why summary.json's test metrics cannot be used, or None (absent ones are fine)."""
    for key in SUMMARY_ACCS + SUMMARY_NUMBERS + ("best_val_epoch",):
        value = summary.get(key)
        if value is None:
            continue
        if key == "best_val_epoch":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"summary.json {key} is {value!r}, not an epoch number"
        elif not _is_number(value) or (key in SUMMARY_ACCS and not 0 <= value <= 1):
            return f"summary.json {key} is {value!r}, not a finite number" + (
                " in [0, 1]" if key in SUMMARY_ACCS else ""
            )
    return None


def load_run(folder: Path) -> Run:
    """A run folder as found; whatever cannot be used is named in `problems`."""
    config, problem = _read_json(folder / "config.json")
    problems = [problem] if problem else []
    if not problems and not (
        isinstance(config, dict)
        and isinstance(config.get("arm"), str)
        and re.fullmatch(NAME_PATTERN, str(config.get("spec")))  # it names the plot files
        and isinstance(config.get("seed"), int)
    ):
        problems.append("config.json lacks a spec name, an arm or a seed")
    if problems:
        return Run(folder, "(unreadable)", folder.parent.name, -1, [], None, problems)
    metrics = []
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    phases, epochs = None, []  # epochs: of every record that names one, usable or not
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line, parse_constant=lambda name: name)  # NaN: a string
        except ValueError:  # a run killed while writing leaves a torn last line
            problems.append(f"metrics.jsonl line {number} is truncated")
            continue
        if phases is None and isinstance(record, dict):
            phases = all(k in record for k in PHASE_KEYS)
        if isinstance(record, dict) and type(record.get("epoch")) is int:
            epochs.append(record["epoch"])
        why = _record_problem(record, bool(phases))
        if why:
            problems.append(f"metrics.jsonl line {number} {why}")
        else:
            metrics.append(record)
    corrupt = epochs != list(range(1, len(epochs) + 1))
    if corrupt:
        at = next(i for i, epoch in enumerate(epochs) if epoch != i + 1)
        problems.append(
            f"metrics.jsonl is not one history: epoch {epochs[at]} where {at + 1} belongs "
            f"({len(epochs)} records)"
        )
    summary, problem = _read_json(folder / "summary.json")
    if problem:
        problems.append(problem)
    elif summary is not None and not isinstance(summary, dict):
        problems.append("summary.json is not a JSON object")
        summary = None
    if isinstance(summary, dict):
        problem = _summary_problem(summary)
        if problem:
            problems.append(problem)
        if summary.get("status") == "completed" and not metrics:
            problems.append("metrics.jsonl holds no epoch")
    constants = config.get("constants")
    constants = constants if isinstance(constants, dict) else {}
    return Run(
        folder,
        config["spec"],
        config["arm"],
        config["seed"],
        metrics,
        summary,
        problems,
        constants,
        config,
        _ablation(folder.parent.parent),
        corrupt=corrupt,
    )


def _ablation(folder: Path) -> dict[str, Any] | None:
    """The ablation.json that `perturbgen ablate` left in folder, if readable."""
    record, _ = _read_json(folder / "ablation.json")
    return record if isinstance(record, dict) and isinstance(record.get("spec"), str) else None


def _expected(record: dict[str, Any]) -> list[tuple[str, int]]:
    """(arm, seed) of every run the ablation record expects in its folder."""
    expected = record.get("expected")
    return [
        (pair[0], pair[1])
        for pair in (expected if isinstance(expected, list) else [])
        if isinstance(pair, list)
        and len(pair) == 2
        and isinstance(pair[0], str)
        and re.fullmatch(NAME_PATTERN, pair[0])
        and isinstance(pair[1], int)
        and not isinstance(pair[1], bool)
    ]


def find_runs(root: Path) -> list[Run]:
    """Every run folder under root (root itself included), in a stable order, and every run
    that an ablation.json under root expected but that has no run folder."""
    folders = sorted(
        {p.parent for p in root.rglob("config.json")}
        | ({root} if (root / "config.json").exists() else set())
    )
    runs = [load_run(folder) for folder in folders]
    for stamp in sorted(root.rglob("ablation.json")):
        record = _ablation(stamp.parent)
        if record is None or not re.fullmatch(NAME_PATTERN, record["spec"]):
            continue
        for arm, seed in _expected(record):
            folder = stamp.parent / arm / f"seed{seed}"
            if folder not in folders:
                runs.append(
                    Run(folder, record["spec"], arm, seed, [], None, ablation=record, absent=True)
                )
    return sorted(runs, key=lambda r: (r.spec, arm_rank(r.arm), r.seed, str(r.path)))


def arm_rank(arm: str) -> tuple[int, str]:
    arm = arm.split(" [")[0]  # "full [fingerprint]": a split arm keeps its place
    return (ARM_ORDER.index(arm), "") if arm in ARM_ORDER else (len(ARM_ORDER), arm)


# --- statistics --------------------------------------------------------------------------


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1) and n; std is None below two values."""
    values = _finite(values)
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def welch(a: list[float | None], b: list[float | None]) -> dict[str, Any]:
    """Welch's t-test of a against b, the 95 % Welch (t-based) confidence interval of
    mean(a) - mean(b), and Hedges' g (the difference over the pooled sd, bias-corrected)."""
    a, b = _finite(a), _finite(b)
    none = {"p": None, "t": None, "g": None, "diff": None, "ci": None}
    if not a or not b:
        return {**none, "note": "no values to compare"}
    if len(a) < 2 or len(b) < 2:
        return {**none, "note": "n < 2: no test"}
    from scipy import stats

    va, vb = statistics.variance(a), statistics.variance(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va == 0 and vb == 0:  # t would be infinite: no p-value describes that honestly
        note = "not testable (zero variance)" if diff else "identical values: no test"
        return {**none, "diff": diff, "note": note}
    with warnings.catch_warnings():  # near-identical samples: scipy warns, the p stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    sa, sb = va / len(a), vb / len(b)
    dof = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))  # Welch-Satterthwaite
    half = float(stats.t.ppf(0.975, dof)) * math.sqrt(sa + sb)
    pooled = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
    correction = 1 - 3 / (4 * (len(a) + len(b)) - 9)
    return {
        "p": float(result.pvalue),
        "t": float(result.statistic),
        "g": diff / pooled * correction if pooled > 0 else None,
        "diff": diff,
        "ci": [diff - half, diff + half],
        "note": "",
    }


def fisher(diverged_a: int, n_a: int, diverged_b: int, n_b: int) -> dict[str, Any]:
    """Fisher's exact test (two-sided) of the divergence rates diverged_a/n_a and
    diverged_b/n_b."""
    if not n_a or not n_b:
        return {"p": None, "note": "no finished run: no test"}
    from scipy import stats

    table = [[diverged_a, n_a - diverged_a], [diverged_b, n_b - diverged_b]]
    return {"p": float(stats.fisher_exact(table).pvalue), "note": ""}


def logrank(a: list[tuple[float, bool]], b: list[tuple[float, bool]]) -> dict[str, Any]:
    """The log-rank test of two samples of (time, reached): a run that did not reach the
    target is censored at its time. O - E is a's observed minus expected reaches; positive
    means a reaches the target sooner."""
    times = sorted({t for t, reached in a + b if reached})
    o_minus_e = variance = 0.0
    for t in times:
        n1 = sum(s >= t for s, _ in a)  # at risk: not yet reached, not yet censored
        n = n1 + sum(s >= t for s, _ in b)
        d1 = sum(s == t and r for s, r in a)
        d = d1 + sum(s == t and r for s, r in b)
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            variance += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    if variance == 0:
        note = (
            "not testable (no run reached the target)" if not times else "identical times: no test"
        )
        return {"p": None, "chi2": None, "o_minus_e": o_minus_e, "note": note}
    from scipy import stats

    chi2 = o_minus_e**2 / variance
    return {"p": float(stats.chi2.sf(chi2, 1)), "chi2": chi2, "o_minus_e": o_minus_e, "note": ""}


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni adjusted p-values over one family (the keys with a p)."""
    ranked = sorted((p, k) for k, p in pvalues.items() if p is not None)
    adjusted: dict[str, float | None] = {k: None for k in pvalues}
    running = 0.0
    for i, (p, k) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - i) * p))
        adjusted[k] = running
    return adjusted


def cv_pct(losses: list[float | None]) -> float | None:
    """Coefficient of variation, sample std / mean * 100 (None if a loss is missing)."""
    if len(losses) < 2 or any(v is None or not math.isfinite(v) for v in losses):
        return None
    mean = statistics.fmean(losses)
    return 100 * statistics.stdev(losses) / mean if mean > 0 else None


# --- aggregation ---------------------------------------------------------------------------


def reach(run: Run, target: float) -> tuple[int, bool, float | None]:
    """(epoch, True, training seconds) of the first epoch at the target validation accuracy;
    else (the planned epochs, False, None): censored at the end of follow-up, also when the
    run diverged earlier, so that a divergence never shortens an arm's time to target."""
    reached = next((m for m in run.metrics if m["val_acc"] >= target), None)
    if reached:
        return reached["epoch"], True, reached.get("train_s")
    planned = run.config.get("epochs")
    planned = planned if isinstance(planned, int) and not isinstance(planned, bool) else 0
    return max(planned, len(run.metrics)), False, None


def run_values(run: Run, target: float, window: int) -> dict[str, Any]:
    """The per-run numbers the tables average: validation numbers recomputed from
    metrics.jsonl, test numbers from summary.json (None in older run folders)."""
    accs = [m["val_acc"] for m in run.metrics]
    summary = run.summary or {}
    epoch, reached, seconds = reach(run, target)
    return {
        "test_acc": summary.get("test_acc"),
        "test_acc_at_best_val": summary.get("test_acc_at_best_val"),
        "final_acc": accs[-1] if accs else None,
        "best_acc": max(accs, default=None),
        "epochs_to_target": epoch if reached else None,
        "seconds_to_target": seconds,
        "cv_pct": cv_pct([m.get("val_loss") for m in run.metrics[-window:]]),
        "seconds": run.metrics[-1].get("elapsed_s") if run.metrics else None,
    }


def phase_thirds(runs: list[Run]) -> list[dict[str, float] | None] | None:
    """Mean fraction of steps in each phase over the first, middle and last third of the
    epochs (epoch i of n belongs to third floor(3 i / n)); None for a third with no epoch."""
    thirds: list[list[list[float]]] = [[], [], []]
    for run in runs:
        n = len(run.metrics)
        if not n or "phase_exploration" not in run.metrics[0]:
            continue
        for k in range(3):
            part = [m for i, m in enumerate(run.metrics) if 3 * i // n == k]
            if part:
                thirds[k].append([statistics.fmean(m[f"phase_{p}"] for m in part) for p in PHASES])
    if not any(thirds):
        return None
    return [
        {p: statistics.fmean(r[i] for r in rows) for i, p in enumerate(PHASES)} if rows else None
        for rows in thirds
    ]


def _base_arm(label: str) -> str:
    return label.split(" [")[0]


def _split_arms(runs: list[Run]) -> tuple[dict[str, list[Run]], dict[str, dict[str, Any]]]:
    """Runs by arm; an arm whose runs have several fingerprints becomes one row per
    fingerprint, "arm [fingerprint]", with the settings in which those rows differ."""
    by_arm: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        by_arm.setdefault(run.arm, {}).setdefault(run.fingerprint, []).append(run)
    arms: dict[str, list[Run]] = {}
    split: dict[str, dict[str, Any]] = {}
    for arm, groups in by_arm.items():
        if len(groups) == 1:
            arms[arm] = next(iter(groups.values()))
            continue
        flat = {fp: flatten(identity(members[0].config)) for fp, members in groups.items()}
        keys = differing(list(flat.values()))
        for fp in sorted(groups):
            arms[f"{arm} [{fp[:8]}]"] = groups[fp]
            split[f"{arm} [{fp[:8]}]"] = {k: flat[fp].get(k) for k in keys}
    return arms, split


def _place(groups: list[dict[str, Any]], run: Run) -> None:
    """Put a run that the ablation record expected but that never wrote anything into the
    section of the runs of its ablation folder (its arm's, where there is one)."""
    home = run.path.parent.parent

    def from_home(group: dict[str, Any], arm: str | None) -> bool:
        return any(
            r.path.parent.parent == home and (arm is None or _base_arm(label) == arm)
            for label, members in group["arms"].items()
            for r in members
        )

    mine = [g for g in groups if g["spec"] == run.spec]
    group = next((g for g in mine if from_home(g, run.arm)), None)
    group = group or next((g for g in mine if from_home(g, None)), None) or next(iter(mine), None)
    if group is None:
        group = {"spec": run.spec, "name": run.spec, "differs": {}, "split": {}, "arms": {}}
        groups.append(group)
    label = next((x for x in group["arms"] if _base_arm(x) == run.arm), run.arm)
    group["arms"].setdefault(label, []).append(run)


def sections(runs: list[Run]) -> list[dict[str, Any]]:
    """One comparison per spec and shared settings; never two fingerprints in one row."""
    out: list[dict[str, Any]] = []
    for spec in sorted({r.spec for r in runs}):
        keyed: dict[str, list[Run]] = {}
        for run in (r for r in runs if r.spec == spec and not r.absent):
            key = json.dumps(shared_settings(run), sort_keys=True, default=str)
            keyed.setdefault(key, []).append(run)
        shared = [json.loads(key) for key in sorted(keyed)]
        varying = differing(shared)
        groups = []
        for k, (key, settings) in enumerate(zip(sorted(keyed), shared, strict=True), 1):
            arms, split = _split_arms(keyed[key])
            name = spec if len(keyed) == 1 else f"{spec}_{k}"
            differs = {d: settings.get(d) for d in varying}
            groups.append(
                {"spec": spec, "name": name, "differs": differs, "split": split, "arms": arms}
            )
        for run in (r for r in runs if r.spec == spec and r.absent):
            _place(groups, run)
        for group in groups:
            order = sorted(group["arms"], key=lambda label: (arm_rank(label), label))
            group["arms"] = {
                label: sorted(group["arms"][label], key=lambda r: (r.seed, str(r.path)))
                for label in order
            }
        out += groups
    return out


def _arm(runs: list[Run], target: float, window: int) -> tuple[dict[str, Any], dict]:
    """One row's numbers, and what its comparisons need (per-run values, times)."""
    done = [r for r in runs if r.complete]
    values = [run_values(r, target, window) for r in done]
    counts = {
        k: sum(r.outcome == k for r in runs)
        for k in ("completed", "diverged", "stopped", "missing", "damaged")
    }
    timed = [reach(r, target) for r in runs if r.outcome in ("completed", "diverged")]
    reached = [t for t in timed if t[1]]
    row = {
        "runs": len(runs),
        "counts": counts,
        "completed": counts["completed"],
        "diverged": counts["diverged"],
        # finished training (completed or diverged): the denominator of the divergence rate
        "finished": sum(
            (r.summary or {}).get("status") in ("completed", "diverged") and not r.corrupt
            for r in runs
        ),
        # completed runs that train.early_stop ended: completed like the others
        "stopped_early": sum((r.summary or {}).get("stopped_early") is True for r in done),
        "seeds": [r.seed for r in done],
        "not_completed": [
            {"path": str(r.path), "status": r.status, "problems": r.problems}
            for r in runs
            if not r.complete
        ],
        "timed": len(timed),
        "reached_target": len(reached),
        "epochs_to_target": mean_std([t[0] for t in reached]),
        "seconds_to_target": mean_std([t[2] for t in reached]),
        "reached_without_train_s": sum(t[2] is None for t in reached),
        "cv_pct": mean_std([x["cv_pct"] for x in values]),
        "test_acc": mean_std([x["test_acc"] for x in values]),
        "test_acc_at_best_val": mean_std([x["test_acc_at_best_val"] for x in values]),
        "without_test_acc": sum(x["test_acc"] is None for x in values),
        "final_acc": mean_std([x["final_acc"] for x in values]),
        "best_acc": mean_std([x["best_acc"] for x in values]),
        "seconds": mean_std([x["seconds"] for x in values]),
        "phases_by_third": phase_thirds(done),
    }
    return row, {"values": values, "times": [t[:2] for t in timed]}


def _word(family: str, test: dict[str, Any], row: dict, base: dict) -> str:
    """The verdict of one comparison: a direction only when its Holm-adjusted p < ALPHA."""
    if test["p"] is None:
        return test["note"]
    if test["p_holm"] >= ALPHA:
        return "not significant"
    if family == "divergence":
        more = row["diverged"] / row["finished"] > base["diverged"] / base["finished"]
        return "diverges more often" if more else "diverges less often"
    if family == "time_to_target":
        return "faster" if test["o_minus_e"] > 0 else "slower"
    if family == "cv_pct":
        return "steadier" if test["diff"] < 0 else "less steady"
    return "better" if test["diff"] > 0 else "worse"


FAMILIES = ("divergence", "time_to_target", "cv_pct", "test_acc")


def _section(group: dict[str, Any]) -> dict[str, Any]:
    constants = _constants([r for members in group["arms"].values() for r in members])
    target = constants.get("TARGET_ACCURACY", 1.0)
    window = constants.get("STABILITY_WINDOW", 20)
    arms, data = {}, {}
    for label, members in group["arms"].items():
        arms[label], data[label] = _arm(members, target, window)
    base = "baseline" if "baseline" in arms else None
    refused = None
    split_base = [label for label in group["split"] if _base_arm(label) == "baseline"]
    if split_base:
        refused = (
            f"baseline runs were made with {len(split_base)} different settings "
            f"({', '.join(sorted(group['split'][split_base[0]]))}): nothing is compared "
            "with baseline here"
        )
    for family in FAMILIES if base else ():
        b = data[base]
        tests = {}
        for label in (x for x in arms if x != base):
            a = data[label]
            if family == "divergence":
                r, s = arms[label], arms[base]
                tests[label] = fisher(r["diverged"], r["finished"], s["diverged"], s["finished"])
            elif family == "time_to_target":
                tests[label] = logrank(a["times"], b["times"])
            else:
                tests[label] = welch(
                    [x[family] for x in a["values"]], [x[family] for x in b["values"]]
                )
        adjusted = holm({label: t["p"] for label, t in tests.items()})
        for label, test in tests.items():
            test["p_holm"] = adjusted[label]
            test["verdict"] = _word(family, test, arms[label], arms[base])
            arms[label].setdefault("vs_baseline", {})[family] = test
    return {
        "name": group["name"],
        "differs": group["differs"],
        "split": group["split"],
        "refused": refused,
        "baseline": base,
        "target_accuracy": target,
        "stability_window": window,
        "arms": arms,
    }


def aggregate(runs: list[Run]) -> dict[str, Any]:
    """report.json: per spec, per section of one configuration, per arm: the tables' cells,
    the tests with their Holm-adjusted p and verdict, and the phase distribution."""
    out: dict[str, Any] = {"specs": {}}
    for group in sections(runs):
        spec = out["specs"].setdefault(group["spec"], {"sections": []})
        spec["sections"].append(_section(group))
    return out


def _constants(runs: list[Run]) -> dict[str, Any]:
    """TARGET_ACCURACY and STABILITY_WINDOW of the spec, from the first config that has them."""
    for run in runs:
        target = run.constants.get("TARGET_ACCURACY")
        window = run.constants.get("STABILITY_WINDOW")
        if _is_number(target) and 0 < target <= 1 and isinstance(window, int) and window >= 2:
            return {"TARGET_ACCURACY": target, "STABILITY_WINDOW": window}
    return {}


# --- markdown ------------------------------------------------------------------------------

PROTOCOL = """\
**Primary endpoint: final test accuracy**, the accuracy of each run's final model on the
test split, which a run evaluates once, after training. Everything else is secondary. The
validation split (carved from the training data, the same examples for every arm and seed)
is the one that picks the best checkpoint and that time to target and the loss CV are
measured on; "test, best-val checkpoint" is the test accuracy of that checkpoint.

- A cell is mean ± sample standard deviation (n) over the **completed** runs. Every table
  counts each arm's runs as done/div/stop/miss: completed, diverged (a non-finite loss),
  stopped (by a signal or `--max-steps`: resumable), and missing (expected by the ablation's record, but without a run folder or
  a summary.json). Diverged runs are in no mean; an arm with any says so in its verdict.
  A run whose metrics.jsonl is not one history (each epoch once, in order: two processes
  wrote its folder) is corrupt: listed under "not completed", counted in no statistic.
- Divergence rates are compared with baseline's by Fisher's exact test (two-sided).
- Time to target: epochs until validation accuracy first reached the spec's target. A run
  that diverged or never reached it is censored at its planned epochs, not dropped; arms are
  compared with baseline by the log-rank test (χ², 1 df) over completed and diverged runs, and
  "reached k/n" counts them. Seconds are training compute (no evaluation, checkpoint I/O or
  start-up) of the runs that reached it; runs that ran in parallel shared the machine.
- Accuracy and CV differences: Welch's two-sided t-test; the 95 % confidence interval of a
  difference is Welch's t-based one (Welch-Satterthwaite degrees of freedom).
- Multiple comparisons: a direction word (better/worse, faster/slower, steadier, diverges
  more/less often) needs a Holm-adjusted p < 0.05. The Holm family is one table of one
  section: its comparisons with baseline, one per arm. The raw p is shown beside it.
- Two arms whose values have zero variance and different means are "not testable (zero
  variance)": no p-value is given for them.
- Runs are grouped by a fingerprint of their resolved settings (config.json without the
  seed and the output folder, the arm's constants included) and never pooled across
  fingerprints: different run settings get separate sections, and an arm whose runs differ
  in its own settings is split into rows named `arm [fingerprint]`.
"""


def _cell(stat: dict[str, Any], fmt: str, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "—"
    mean = format(stat["mean"] * scale, fmt)
    std = "" if stat["std"] is None else f" ± {format(stat['std'] * scale, fmt)}"
    return f"{mean}{std} (n={stat['n']})"


def _table(title: str, intro: list[str], columns: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table under its heading, with the lines that say how to read it."""
    lines = ["", f"### {title}", ""] + (intro + [""] if intro else [])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _note(count: int, text: str) -> list[str]:
    return ["", f"{count} {text}"] if count else []


def _counts(row: dict[str, Any]) -> str:
    c = row["counts"]
    return f"{c['completed']}/{c['diverged']}/{c['stopped']}/{c['missing']}"


def _value(value: Any) -> str:
    return "`" + json.dumps(value, default=str) + "`"


def _tested(test: dict[str, Any] | None) -> list[str]:
    """The cells p, p (Holm) and verdict of one comparison ('—' for baseline)."""
    if test is None:
        return ["—"] * 3
    p = "—" if test["p"] is None else f"{test['p']:.3g}"
    holm_p = "—" if test["p_holm"] is None else f"{test['p_holm']:.3g}"
    return [p, holm_p, test["verdict"]]


def _diverged(row: dict[str, Any]) -> str:
    return f"; {row['diverged']} of {row['finished']} runs diverged" if row["diverged"] else ""


def _test(row: dict[str, Any], family: str) -> dict[str, Any] | None:
    return row.get("vs_baseline", {}).get(family)


COUNTS = "done/div/stop/miss"
HOLM = "Family for Holm: this table's comparisons with baseline, one per arm."


def _runs_table(arms: dict[str, Any]) -> list[str]:
    rows = []
    for label, a in arms.items():
        c = a["counts"]
        listed = "; ".join(
            f"{Path(x['path']).name}: {x['status']}"
            + (f" ({', '.join(x['problems'])})" if x["problems"] else "")
            for x in a["not_completed"]
        )
        rows.append(
            [label, str(a["runs"]), str(c["completed"]), f"{c['diverged']}/{a['finished']}"]
            + [str(c["stopped"]), str(c["missing"]), *_tested(_test(a, "divergence"))]
            + [listed or "—"]
        )
    columns = ["arm", "runs", "completed", "diverged", "stopped", "missing"]
    columns += ["divergence vs baseline: Fisher p", "p (Holm)", "verdict", "not completed"]
    early = {label: a["stopped_early"] for label, a in arms.items() if a["stopped_early"]}
    by_arm = ", ".join(f"{label} {n}" for label, n in early.items())
    return _table("Runs", [], columns, rows) + _note(
        sum(early.values()),
        f"completed run(s) stopped early ({by_arm}): `train.early_stop` ended them when "
        "validation accuracy stalled; they count as completed, and time to target censors "
        "them at their planned epochs.",
    )


def _time_table(data: dict[str, Any]) -> list[str]:
    rows = []
    for label, a in data["arms"].items():
        test = _test(a, "time_to_target")
        chi2 = "—" if not test or test["chi2"] is None else f"{test['chi2']:.3g}"
        rows.append(
            [label, _counts(a), f"{a['reached_target']}/{a['timed']}"]
            + [_cell(a["epochs_to_target"], ".1f"), _cell(a["seconds_to_target"], ".1f")]
            + [chi2, *_tested(test)]
        )
    intro = [
        "Epochs and training seconds over the runs that reached the target; the log-rank",
        f"test also counts the censored runs. {HOLM}",
    ]
    columns = ["arm", COUNTS, "reached", "epochs", "train seconds", "log-rank χ²"]
    title = f"Table I: time to {data['target_accuracy']:.0%} validation accuracy"
    untimed = sum(a["reached_without_train_s"] for a in data["arms"].values())
    return _table(title, intro, columns + ["p", "p (Holm)", "verdict"], rows) + _note(
        untimed,
        "run(s) that reached the target record no training seconds (run folders from "
        "before `train_s` was logged): they have no seconds cell.",
    )


def _cv_table(data: dict[str, Any]) -> list[str]:
    rows = []
    for label, a in data["arms"].items():
        test = _test(a, "cv_pct")
        g = "—" if not test or test["g"] is None else f"{test['g']:+.2f}"
        rows.append([label, _counts(a), _cell(a["cv_pct"], ".2f"), g, *_tested(test)])
    window = data["stability_window"]
    intro = [
        f"Sample std / mean × 100 of the validation loss over the last {window} epochs (all",
        f"epochs if fewer); lower is steadier. Welch's t-test, Hedges' g. {HOLM}",
    ]
    columns = ["arm", COUNTS, "CV (%)", "g", "p", "p (Holm)", "verdict"]
    return _table("Table II: stability, CV of the validation loss (%)", intro, columns, rows)


def _accuracy_table(arms: dict[str, Any]) -> list[str]:
    keys = ("test_acc", "test_acc_at_best_val", "final_acc", "best_acc")
    rows = [
        [label, _counts(a)] + [_cell(a[k], ".2f", 100) for k in keys] for label, a in arms.items()
    ]
    columns = ["arm", COUNTS, "test, final model (primary)", "test, best-val checkpoint"]
    untested = sum(a["without_test_acc"] for a in arms.values())
    return _table("Table III: accuracy (%)", [], columns + ["val, final", "val, best"], rows) + (
        _note(
            untested,
            "completed run(s) record no test accuracy (run folders from before the val/test "
            "split): they are in no test column and not in Table IV.",
        )
    )


def _ablation_table(data: dict[str, Any]) -> list[str]:
    rows = []
    for label, a in data["arms"].items():
        test = _test(a, "test_acc")
        delta = "—" if not test or test["diff"] is None else f"{100 * test['diff']:+.2f}"
        ci = "—"
        if test and test["ci"] is not None:
            ci = f"[{100 * test['ci'][0]:+.2f}, {100 * test['ci'][1]:+.2f}]"
        *p, verdict = _tested(test)
        if not test:
            verdict = "reference" if label == data["baseline"] else "—"
        rows.append(
            [label, _counts(a), _cell(a["test_acc"], ".2f", 100), delta, ci, *p]
            + [verdict + _diverged(a)]
        )
    intro = [
        "Δ = arm − baseline in points, with its 95 % Welch t-based confidence interval;",
        f"Welch's t-test. {HOLM}",
    ]
    columns = ["arm", COUNTS, "test acc (%)", "Δ (points)", "95 % CI", "p", "p (Holm)"]
    title = "Table IV: ablation, final test accuracy (primary endpoint) against baseline"
    return _table(title, intro, columns + ["verdict"], rows)


def _phase_table(arms: dict[str, Any]) -> list[str]:
    rows = []
    for label, a in ((label, a) for label, a in arms.items() if a["phases_by_third"]):
        for name, third in zip(("first", "middle", "last"), a["phases_by_third"], strict=True):
            cells = ["—"] * 3 if third is None else [f"{100 * third[p]:.0f}" for p in PHASES]
            rows.append([label, f"{name} third", *cells])
    if not rows:
        return []
    columns = ["arm", "epochs", "exploration", "convergence", "fine-tuning"]
    return _table("Phase distribution by thirds of training (% of steps)", [], columns, rows)


def _section_md(spec: str, k: int, count: int, data: dict[str, Any]) -> list[str]:
    title = spec if count == 1 else f"{spec}: configuration {k} of {count}"
    lines = [f"## {title}"]
    if data["differs"]:
        differs = ", ".join(f"{key} = {_value(v)}" for key, v in data["differs"].items())
        text = f"This spec's runs were made with {count} different settings, never pooled"
        lines += ["", f"{text}; this section's: {differs}."]
    for arm in sorted({_base_arm(label) for label in data["split"]}, key=arm_rank):
        rows = [(label, s) for label, s in data["split"].items() if _base_arm(label) == arm]
        kept = "; ".join(
            f"`{label}` has " + ", ".join(f"{key} = {_value(v)}" for key, v in s.items())
            for label, s in rows
        )
        text = f"Runs of arm `{arm}` were made with {len(rows)} different settings"
        lines += ["", f"{text} and are kept apart: {kept}."]
    if data["refused"]:
        lines += ["", f"**Not compared:** {data['refused']}."]
    lines += _runs_table(data["arms"]) + _time_table(data) + _cv_table(data)
    lines += _accuracy_table(data["arms"]) + _ablation_table(data) + _phase_table(data["arms"])
    return lines + [
        "",
        f"![validation accuracy]({data['name']}_accuracy.png)",
        "",
        f"![noise and phases]({data['name']}_eps_phases.png)",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Ablation report", "", PROTOCOL]
    for spec, data in report["specs"].items():
        count = len(data["sections"])
        for k, section in enumerate(data["sections"], 1):
            lines += _section_md(spec, k, count, section)
    return "\n".join(lines).rstrip() + "\n"


def headline(report: dict[str, Any], spec: str) -> list[str]:
    """One line per arm: its final test accuracy (the primary endpoint) and its verdict."""
    lines = []
    for data in report["specs"].get(spec, {}).get("sections", []):
        for label, a in data["arms"].items():
            test = a.get("vs_baseline", {}).get("test_acc")
            verdict = test["verdict"] if test else ""
            lines.append(
                f"  {label:24s} final test acc {_cell(a['test_acc'], '.2f', 100)} "
                f"{verdict}{_diverged(a)}".rstrip()
            )
    return lines


# --- plots ---------------------------------------------------------------------------------


def preload() -> None:
    """Import what build() needs (scipy.stats, matplotlib: seconds of start-up) ahead of
    time, e.g. in a thread while the runs train, so that the report follows their end."""
    import matplotlib
    from scipy import stats  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def plots(runs: list[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"exploration": "#f4a582", "convergence": "#92c5de", "fine_tuning": "#b8e186"}
    for group in sections(runs):
        spec = group["spec"]
        arms = {
            label: [r for r in members if r.complete] for label, members in group["arms"].items()
        }
        arms = {label: done for label, done in arms.items() if done}
        done = [r for members in arms.values() for r in members]
        if not done:  # nothing to draw (and "(unreadable)" is no file name)
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for arm, members in arms.items():
            curves = [[m["val_acc"] for m in r.metrics] for r in members]
            length = min(len(c) for c in curves)
            rows = [c[:length] for c in curves]
            mean = [statistics.fmean(col) for col in zip(*rows, strict=True)]
            low = [min(col) for col in zip(*rows, strict=True)]
            high = [max(col) for col in zip(*rows, strict=True)]
            epochs = range(1, length + 1)
            (line,) = ax.plot(epochs, mean, label=f"{arm} (n={len(rows)})")
            ax.fill_between(epochs, low, high, alpha=0.15, color=line.get_color())
        ax.set(
            xlabel="epoch",
            ylabel="validation accuracy",
            title=f"{spec}: mean over seeds, band = min-max",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        best = max((m["val_acc"] for r in done for m in r.metrics), default=1.0)
        ax.set_ylim(max(0.0, best - 0.3), min(1.0, best + 0.02))
        path = out / f"{group['name']}_accuracy.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
        )
        for arm, arm_runs in arms.items():
            if arm.startswith("baseline") or "eps" not in arm_runs[0].metrics[0]:
                continue
            length = min(len(r.metrics) for r in arm_runs)
            eps = [statistics.fmean(r.metrics[i]["eps"] for r in arm_runs) for i in range(length)]
            top.plot(range(1, length + 1), eps, label=arm)
        top.set(ylabel="mean eps per step", title=f"{spec}: noise std eps(t), mean over seeds")
        top.grid(alpha=0.3)
        if top.lines:
            top.legend(fontsize=8)
        else:
            top.text(0.5, 0.5, "no perturbing arm", ha="center", transform=top.transAxes)
        full = arms.get("full", [])  # one fingerprint of the full arm, or none
        phased = [r for r in full if "phase_exploration" in r.metrics[0]]
        if phased:
            length = min(len(r.metrics) for r in phased)
            bottom_edge = [0.0] * length
            for phase in PHASES:
                share = [
                    statistics.fmean(r.metrics[i][f"phase_{phase}"] for r in phased)
                    for i in range(length)
                ]
                bottom.bar(
                    range(1, length + 1),
                    share,
                    bottom=bottom_edge,
                    width=1.0,
                    color=colors[phase],
                    label=phase,
                )
                bottom_edge = [b + s for b, s in zip(bottom_edge, share, strict=True)]
            bottom.set(
                ylabel="share of steps",
                ylim=(0, 1),
                title=f"phases of the full arm (n={len(phased)})",
            )
            bottom.legend(fontsize=8, loc="lower right")
        else:
            bottom.text(
                0.5,
                0.5,
                "no full arm with a phase detector",
                ha="center",
                transform=bottom.transAxes,
            )
        bottom.set(xlabel="epoch")
        path = out / f"{group['name']}_eps_phases.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def build(root: Path, out: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write report.md, report.json and the plots for the runs under root."""
    runs = find_runs(root)
    if all(run.absent for run in runs):  # expected runs alone: nothing ran, nothing to report
        raise NoRuns(f"no run folders (with config.json) under {root}")
    out = out or root / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = aggregate(runs)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    plots(runs, out)
    (out / "report.md").write_text(markdown(report))
    return out, report
