"""The ablation report as numbers: run folders -> report.json (no words; report_md.py and
plots.py render it).

Runs are grouped into sections of one spec and one set of shared settings and never pooled
across fingerprints (see runs.py). Within a section every arm is compared with baseline on
the primary endpoint, final test accuracy, in one confirmatory Holm family together with the
2x2 of the method's ingredients and `full` against each of its peers (gradient_noise,
anti_pgd); time to target, the loss CVs and divergence are exploratory,
a Holm family each. Arms pair with baseline by seed (same seed: same init and data order)
when their batch size is the same; otherwise the comparison is Welch's, and says so. A
diverged run enters the primary endpoint at chance accuracy, 1 / NUM_CLASSES.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from generator import stats
from generator.method.summary import first_at_target
from generator.output import atomic_write
from generator.runs import (
    PHASES,
    NoRuns,
    Refused,
    Run,
    arm_rank,
    differing,
    find_runs,
    flatten,
    identity,
    is_number,
    shared_settings,
)

__all__ = ["NoRuns", "Refused", "aggregate", "build", "find_runs", "sections"]
# the 2x2 of the method's ingredients: (detector, in-phase decay) -> arm
CELLS = {"00": "fixed", "10": "phase_only", "01": "schedule_only", "11": "full"}
CONTRASTS = {"first": "detector", "second": "decay", "interaction": "interaction"}
# the method's peers (noise methods a researcher would otherwise use): `full` against each
PEERS = ("gradient_noise", "anti_pgd")
# the exploratory endpoints, a Holm family each: paired values of completed runs
SECONDARY = ("cv_detrended_pct", "cv_pct")


def reach(run: Run, target: float) -> tuple[int, bool]:
    """(epoch, True) of the first epoch at the target validation accuracy; else (the planned
    epochs, False): censored at the end of follow-up, also when the
    run diverged earlier, so that a divergence never shortens an arm's time to target."""
    reached = first_at_target(run.metrics, target)  # the scripts' definition
    if reached:
        return reached["epoch"], True
    planned = run.config.get("epochs")
    planned = planned if isinstance(planned, int) and not isinstance(planned, bool) else 0
    return max(planned, len(run.metrics)), False


def run_values(run: Run, target: float, window: int) -> dict[str, Any]:
    """The per-run numbers the tables average: validation numbers recomputed from
    metrics.jsonl, test numbers from summary.json (None in older run folders)."""
    accs = [m["val_acc"] for m in run.metrics]
    losses = [m.get("val_loss") for m in run.metrics[-window:]]
    summary = run.summary or {}
    return {
        "test_acc": summary.get("test_acc"),
        "test_acc_at_best_val": summary.get("test_acc_at_best_val"),
        "final_acc": accs[-1] if accs else None,
        "best_acc": max(accs, default=None),
        "cv_pct": stats.cv_pct(losses),
        "cv_detrended_pct": stats.detrended_cv_pct(losses),
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


def primary(run: Run, chance: float | None) -> float | None:
    """A run's value on the primary endpoint: a completed run's final test accuracy, a
    diverged run's chance accuracy (the stated rule); None for every other run."""
    if run.complete:
        return (run.summary or {}).get("test_acc")
    return chance if run.outcome == "diverged" else None


def _arm(runs: list[Run], target: float, window: int, chance: float | None) -> dict[str, Any]:
    """One arm's numbers; `per_seed` holds what its comparisons pair (seed -> value)."""
    done = [r for r in runs if r.complete]
    values = {r.seed: run_values(r, target, window) for r in done}
    outcomes = ("completed", "diverged", "stopped", "missing", "damaged", "corrupt")
    counts = {k: sum(r.outcome == k for r in runs) for k in outcomes}
    timed = [reach(r, target) for r in runs if r.complete or r.outcome == "diverged"]
    scored = {r.seed: primary(r, chance) for r in runs}
    per_seed = {"primary": {s: v for s, v in scored.items() if v is not None}}
    for key in SECONDARY:
        per_seed[key] = {s: x[key] for s, x in values.items() if x[key] is not None}
    return {
        "runs": len(runs),
        "counts": counts,
        # finished training (completed or diverged): the denominator of the divergence rate
        "finished": sum(
            (r.summary or {}).get("status") in ("completed", "diverged") and not r.corrupt
            for r in runs
        ),
        # completed runs that train.early_stop ended: completed like the others
        "stopped_early": sum((r.summary or {}).get("stopped_early") is True for r in done),
        "seeds": sorted(values),
        "not_completed": [
            {"path": str(r.path), "outcome": r.outcome, "status": r.status, "problems": r.problems}
            for r in runs
            if not r.complete
        ],
        "batch_sizes": sorted({str(r.config.get("batch_size")) for r in runs if not r.absent}),
        "timed": len(timed),
        "reached_target": sum(t[1] for t in timed),
        "time_to_target": stats.km_median(timed),
        "times": [list(t) for t in timed],
        "primary": stats.mean_std(list(per_seed["primary"].values())),
        "diverged_at_chance": sum(r.outcome == "diverged" for r in runs) if chance else 0,
        "without_test_acc": sum(x["test_acc"] is None for x in values.values()),
        **{
            key: stats.mean_std([x[key] for x in values.values()])
            for key in ("test_acc", "test_acc_at_best_val", "final_acc", "best_acc", "seconds")
            + SECONDARY
        },
        "phases_by_third": phase_thirds(done),
        "per_seed": per_seed,
    }


def compare(a: dict[int, float], b: dict[int, float], pair: bool) -> dict[str, Any]:
    """a - b: paired over the seeds both hold when the runs pair, else Welch's test."""
    if not pair:
        return stats.welch(list(a.values()), list(b.values()))
    seeds = sorted(set(a) & set(b))
    test = stats.paired([a[s] for s in seeds], [b[s] for s in seeds])
    return {**test, "seeds": seeds}


def _family(tests: dict[str, dict[str, Any]], role: str) -> dict[str, Any]:
    """One Holm family; paired tests also get the minimum detectable difference at 80 %
    power, at level 0.05 and at Holm's first (strictest) level 0.05 / m."""
    adjusted = stats.holm({k: t["p"] for k, t in tests.items()})
    m = max(1, sum(t["p"] is not None for t in tests.values()))
    for key, test in tests.items():
        test["p_holm"] = adjusted[key]
        if test["design"] == "paired":
            test["mdd"] = stats.min_detectable(test["sd"], test["n"])
            test["mdd_holm"] = stats.min_detectable(test["sd"], test["n"], stats.ALPHA / m)
    return {"role": role, "size": m, "tests": tests}


def _pairs(arms: dict[str, Any], x: str, y: str) -> bool:
    """Runs of arms x and y pair (same seed: same init and data order) when both were made
    with one batch size, the same for both (the section already shares every other setting)."""
    sizes = set(arms[x]["batch_sizes"]) | set(arms[y]["batch_sizes"])
    return len(sizes) == 1


def _factorial(arms: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The 2x2 contrasts of fixed/phase_only/schedule_only/full on the primary endpoint, per
    seed (seeds where all four cells have a value), and full against each component."""
    if not all(arm in arms for arm in CELLS.values()):
        return {}
    if len({size for arm in CELLS.values() for size in arms[arm]["batch_sizes"]}) != 1:
        return {}
    cells = {k: arms[arm]["per_seed"]["primary"] for k, arm in CELLS.items()}
    seeds = sorted(set.intersection(*(set(c) for c in cells.values())))
    contrasts = stats.factorial({k: [c[s] for s in seeds] for k, c in cells.items()})
    tests = {
        CONTRASTS[k]: {**stats.paired(d, [0.0] * len(d)), "seeds": seeds}
        for k, d in contrasts.items()
    }
    full = arms["full"]["per_seed"]["primary"]
    for part in ("phase_only", "schedule_only"):
        tests[f"full vs {part}"] = compare(full, arms[part]["per_seed"]["primary"], True)
    return tests


def _against_peers(arms: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`full` against each of the method's peers the section holds, on the primary endpoint:
    does the method beat the noise methods one would otherwise use?"""
    if "full" not in arms:
        return {}
    full = arms["full"]["per_seed"]["primary"]
    return {
        f"full vs {peer}": compare(
            full, arms[peer]["per_seed"]["primary"], _pairs(arms, "full", peer)
        )
        for peer in PEERS
        if peer in arms
    }


def _comparisons(arms: dict[str, Any], base: str) -> dict[str, Any]:
    others = [label for label in arms if label != base]
    b = arms[base]
    pair = {label: _pairs(arms, label, base) for label in others}
    acc = {
        label: compare(arms[label]["per_seed"]["primary"], b["per_seed"]["primary"], pair[label])
        for label in others
    }
    acc.update(_factorial(arms))
    acc.update(_against_peers(arms))
    out = {"primary": _family(acc, "confirmatory")}
    for key in SECONDARY:
        tests = {
            label: compare(arms[label]["per_seed"][key], b["per_seed"][key], pair[label])
            for label in others
        }
        out[key] = _family(tests, "exploratory")
    times = {label: stats.logrank(arms[label]["times"], b["times"]) for label in others}
    for label, test in times.items():
        mine, theirs = arms[label]["time_to_target"]["median"], b["time_to_target"]["median"]
        test.update(design="censored", diff=None if None in (mine, theirs) else mine - theirs)
    out["time_to_target"] = _family(times, "exploratory")
    def rate(row: dict[str, Any]) -> float | None:
        return row["counts"]["diverged"] / row["finished"] if row["finished"] else None

    rates = {
        label: {
            "design": "rates",
            "diff": None if None in (rate(arms[label]), rate(b)) else rate(arms[label]) - rate(b),
            **stats.fisher(
                arms[label]["counts"]["diverged"],
                arms[label]["finished"],
                b["counts"]["diverged"],
                b["finished"],
            ),
        }
        for label in others
    }
    out["divergence"] = _family(rates, "exploratory")
    return out


def curves(members: list[Run]) -> dict[str, Any] | None:
    """What the plots draw of one arm: validation accuracy (mean, min, max over its completed
    runs, up to the shortest), the mean eps per epoch and the phases' shares."""
    done = [r for r in members if r.complete]
    if not done:
        return None
    length = min(len(r.metrics) for r in done)
    columns = [[r.metrics[i] for r in done] for i in range(length)]
    accs = [[m["val_acc"] for m in col] for col in columns]
    out: dict[str, Any] = {
        "n": len(done),
        "val_acc": [statistics.fmean(c) for c in accs],
        "val_acc_low": [min(c) for c in accs],
        "val_acc_high": [max(c) for c in accs],
        "eps": None,
        "phases": None,
    }
    if all("eps" in m for col in columns for m in col):
        out["eps"] = [statistics.fmean(m["eps"] for m in col) for col in columns]
    if all("phase_exploration" in m for col in columns for m in col):
        out["phases"] = {
            p: [statistics.fmean(m[f"phase_{p}"] for m in col) for col in columns] for p in PHASES
        }
    return out


def _section(group: dict[str, Any]) -> dict[str, Any]:
    members = [r for runs in group["arms"].values() for r in runs]
    constants = _constants(members)
    target = constants.get("TARGET_ACCURACY", 1.0)
    window = constants.get("STABILITY_WINDOW", 20)
    classes = constants.get("NUM_CLASSES")
    chance = 1 / classes if classes else None
    arms = {
        label: _arm(runs, target, window, chance) for label, runs in group["arms"].items()
    }
    base = "baseline" if "baseline" in arms else None
    split_base = sorted(label for label in group["split"] if _base_arm(label) == "baseline")
    refused = None
    if split_base:
        refused = {"baseline_rows": len(split_base), "settings": sorted(group["split"][split_base[0]])}
    return {
        "name": group["name"],
        "differs": group["differs"],
        "split": group["split"],
        "refused": refused,
        "baseline": base,
        "target_accuracy": target,
        "stability_window": window,
        "chance": chance,
        "arms": arms,
        "comparisons": _comparisons(arms, base) if base else {},
        "curves": {label: curves(runs) for label, runs in group["arms"].items()},
    }


def aggregate(runs: list[Run]) -> dict[str, Any]:
    """report.json: per spec, per section of one configuration: per arm its numbers, the
    comparisons in their Holm families, and what the plots draw."""
    out: dict[str, Any] = {"alpha": stats.ALPHA, "power": stats.POWER, "specs": {}}
    for group in sections(runs):
        spec = out["specs"].setdefault(group["spec"], {"sections": []})
        spec["sections"].append(_section(group))
    return out


def _constants(runs: list[Run]) -> dict[str, Any]:
    """TARGET_ACCURACY, STABILITY_WINDOW and NUM_CLASSES from the first config that has the
    first two (NUM_CLASSES: where that config holds it, as an integer >= 2)."""
    for run in runs:
        target = run.constants.get("TARGET_ACCURACY")
        window = run.constants.get("STABILITY_WINDOW")
        if is_number(target) and 0 < target <= 1 and isinstance(window, int) and window >= 2:
            classes = run.constants.get("NUM_CLASSES")
            out = {"TARGET_ACCURACY": target, "STABILITY_WINDOW": window}
            if isinstance(classes, int) and not isinstance(classes, bool) and classes >= 2:
                out["NUM_CLASSES"] = classes
            return out
    return {}


def stein_seeds(root: Path, spec: str, pilot: list[int], half_width: float) -> dict[str, Any]:
    """Stein's second stage for `ablate --precision`: from the pilot seeds' paired primary
    differences alone (whatever later seeds hold), the total seeds N that make every arm's
    95 % interval against baseline at most half_width wide on each side. s is the largest
    sd of those differences over the comparisons."""
    sds = []
    for group in sections([r for r in find_runs(root) if r.spec == spec and r.seed in pilot]):
        section = _section(group)
        for test in section["comparisons"].get("primary", {}).get("tests", {}).values():
            if test["design"] == "paired" and test["sd"] is not None and test["n"] == len(pilot):
                sds.append(test["sd"])
    if not sds:
        raise Refused(
            f"{root}: no comparison with baseline has all {len(pilot)} pilot seeds paired: "
            "no variance to size the second stage from"
        )
    return {"sd": max(sds), "n": stats.stein_n(max(sds), len(pilot), half_width)}


def write(report: dict[str, Any], out: Path) -> None:
    """report.json, then report.md and the plots rendered from it alone."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    atomic_write(out / "report.json", text)
    render(json.loads(text), out)


def render(report: dict[str, Any], out: Path) -> None:
    from generator import plots, report_md

    plots.plots(report, out)
    atomic_write(out / "report.md", report_md.markdown(report))


def rerender(report_json: Path, out: Path) -> None:
    """report.md and the plots in `out` from a report.json alone."""
    data = json.loads(report_json.read_text())
    out.mkdir(parents=True, exist_ok=True)
    render(data, out)


def preload() -> None:
    """Import what build() needs (scipy.stats, matplotlib: seconds of start-up) ahead of
    time, e.g. in a thread while the runs train, so that the report follows their end."""
    from scipy import stats as _  # noqa: F401

    from generator import plots

    plots.pyplot()


def build(
    root: Path, out: Path | None = None, tuning: dict[str, Any] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Write report.json, report.md and the plots for the runs under root; `tuning` (from
    perturbgen tune: the question asked, trials per arm, tuning seeds) is stored beside."""
    runs = find_runs(root)
    if all(run.absent for run in runs):  # expected runs alone: nothing ran, nothing to report
        raise NoRuns(f"no run folders (with config.json) under {root}")
    out = out or root / "report"
    report = aggregate(runs)
    if tuning is not None:
        report["tuning"] = tuning
    write(report, out)
    return out, report
