"""A tune folder's outputs from its studies: tune.json (each arm's trials, best values and
budget curve, the ranking across budgets), tuned/ARM.yaml, and through tune_report_md the
markdown report and the plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from generator import stats
from generator.loading import Located, merge, parse_override
from generator.output import atomic_write
from generator.tune_report_md import budget_plot, fmt, report_markdown, study_plots
from generator.tune_space import Settings, arm_overrides, edges, prune_from, values
from generator.tune_storage import exclusive


def counts(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    states = [t.state for t in trials]
    return {
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL),
        "running": states.count(TrialState.RUNNING),
    }


def trial_score(row: dict[str, Any], direction: str, epochs: int) -> float | None:
    """A finished trial's score on its budget curve: a completed trial's value; a pruned one's
    last reported value (where it was stopped), or, with none (an invalid sample or a
    divergence), the worst value there is; None for a trial that does not count."""
    if row["state"] == "complete":
        return row["value"]
    if row["state"] != "pruned":
        return None
    reported = row["intermediate"]
    if reported:
        return reported[max(reported, key=int)]
    return 0.0 if direction == "maximize" else float(epochs + 1)


def summarize(s: Settings, study: optuna.Study) -> dict[str, Any]:
    """One arm's study: counts, best trial, every trial, and its budget curve's scores."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    rows = []
    for t in trials:
        end = t.datetime_complete
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "outcome": t.user_attrs.get("outcome", t.state.name.lower()),
                "reason": t.user_attrs.get("reason", ""),
                "value": t.value,
                "params": values(t.params),
                "epochs": max(t.intermediate_values, default=0),
                "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "duration_s": (end - t.datetime_start).total_seconds() if end else None,
                "folder": t.user_attrs.get("folder"),
            }
        )
    ended = [t for t in trials if t.datetime_start and t.datetime_complete]
    span = (
        (max(t.datetime_complete for t in ended) - min(t.datetime_start for t in ended))
        if ended
        else None
    )
    scores = [trial_score(r, s.direction, s.epochs) for r in rows]
    chosen = values(best.params) if best else {}
    return {
        "arm": s.arm,
        "study": s.study_name,
        "space": {k: v.model_dump(exclude_none=True) for k, v in s.space.items()},
        "fixed": s.fixed,
        "counts": counts(trials),
        "trial_seconds": sum(r["duration_s"] or 0.0 for r in rows),
        "span_seconds": span.total_seconds() if span else None,
        "best": ({"number": best.number, "value": best.value, "params": chosen} if best else None),
        "edges": edges(s.space, chosen),
        "importances": _importances(study, len(complete)),
        "scores": [x for x in scores if x is not None],
        "trials": rows,
    }


def _importances(study: optuna.Study, complete: int) -> dict[str, float] | None:
    if complete < 2 or len(study.best_trial.params) < 1:
        return None
    try:
        found = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
    return {k: float(v) for k, v in found.items()}


def budget_curves(arms: dict[str, dict[str, Any]], direction: str) -> dict[str, Any]:
    """Per arm with scores: the expected best value after k = 1..N trials and its 95 %
    bootstrap band (for a minimized objective, the expected lowest)."""
    sign = 1.0 if direction == "maximize" else -1.0
    out = {}
    for arm, info in arms.items():
        scores = [sign * x for x in info["scores"]]
        if not scores:
            continue
        low, high = stats.expected_max_band(scores)
        out[arm] = {
            "n": len(scores),
            "expected": [sign * x for x in stats.expected_max(scores)],
            "low": [sign * x for x in (low if sign > 0 else high)],
            "high": [sign * x for x in (high if sign > 0 else low)],
        }
    return out


def ranking(curves: dict[str, Any], direction: str) -> dict[str, Any] | None:
    """The arms ranked by expected best at the largest budget all of them reached, and the
    budgets k at which the ranking of the point estimates is another one."""
    if len(curves) < 2:
        return None
    top = min(c["n"] for c in curves.values())

    def ranked(k: int) -> list[str]:
        return sorted(
            curves, key=lambda a: curves[a]["expected"][k - 1], reverse=direction == "maximize"
        )

    final = ranked(top)
    leads = [k for k in range(1, top + 1) if ranked(k)[0] != final[0]]
    return {
        "k": top,
        "order": final,
        "differs_at": [k for k in range(1, top) if ranked(k) != final],
        "leader_from": max(leads, default=0) + 1,
    }


def tuned_yaml(s: Settings, info: dict[str, Any], path: Path) -> str:
    """A spec that extends the tuned one and sets every --set given to tune, the values fixed
    for this arm (the tuned baseline's, when the method is added to it) and its best ones."""
    best = info["best"]
    doc = Located({})
    chosen = {**s.fixed, **best["params"]}
    for text in [*s.overrides, *arm_overrides(s, chosen)]:
        doc = merge(doc, parse_override(text))
    if "tune" in doc.data:  # a tune: of a child replaces its parent's: the whole one, as run
        doc.data["tune"] = s.doc.data["tune"]
    spec_file, folder = s.spec_path.resolve(), path.parent.resolve()
    related = os.path.commonpath([spec_file, folder]) != os.path.sep  # else the absolute path
    parent = os.path.relpath(spec_file, folder) if related else str(spec_file)
    seeds = ", ".join(map(str, s.seeds))
    header = (
        f"# Made by `perturbgen tune` (study {s.study_name}): arm {s.arm}, the best of "
        f"{info['counts']['complete']} completed trials,\n"
        f"# trial {best['number']}: {s.tune.objective} {fmt(best['value'])} ({s.direction}d), "
        f"the mean over seeds {seeds} at {s.epochs} epochs.\n"
        "# Tuning picked these values on those seeds: compare arms on fresh ones (tune does).\n"
    )
    body = yaml.safe_dump({"extends": parent, **doc.data}, sort_keys=False)
    return header + body


def write_outputs(
    s: Settings, studies: dict[str, tuple[Settings, optuna.Study]], storage: str | None
) -> dict[str, Any]:
    """DIR/tune.json, DIR/tune_report.md, DIR/plots/ and, per arm with a completed trial,
    DIR/tuned/ARM.yaml.

    Under a lock in DIR: processes that share the studies write them one at a time, each from
    the storage as it is then, so that the last writer leaves the latest state."""
    from generator.render import load_spec

    out = s.out
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".outputs.lock"):
        arms = {}
        for arm, (arm_settings, study) in studies.items():
            info = arms[arm] = summarize(arm_settings, study)
            info["tuned"] = None
            if info["best"] is not None:
                path = out / "tuned" / f"{arm}.yaml"
                path.parent.mkdir(exist_ok=True)
                atomic_write(path, tuned_yaml(arm_settings, info, path))
                load_spec(path)  # it must be a valid spec: a failure here is a bug
                info["tuned"] = f"tuned/{arm}.yaml"
            complete = info["counts"]["complete"]
            info["plots"] = study_plots(study, out / "plots" / arm, complete)
        curves = budget_curves(arms, s.direction)
        combined = {
            "spec": str(s.spec_path),
            "spec_name": s.spec.name,
            "question": s.tune.question,
            "storage": storage,
            "objective": s.tune.objective,
            "direction": s.direction,
            "budget": {
                "trials": s.tune.trials,
                "seeds": s.seeds,
                "epochs": s.epochs,
                "fresh_seeds": s.fresh_seeds,
            },
            "pruner": s.tune.pruner,
            "prune_from": prune_from(s) if s.tune.pruner != "none" else None,
            "arms": arms,
            "curves": curves,
            "ranking": ranking(curves, s.direction),
            "budget_plot": None,
        }
        if curves:
            budget_plot(combined, out / "plots" / "budget_curves.png")
            combined["budget_plot"] = "plots/budget_curves.png"
        atomic_write(out / "tune.json", json.dumps(combined, indent=2) + "\n")
        atomic_write(out / "tune_report.md", report_markdown(combined))
    return combined
