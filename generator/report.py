"""The ablation report, rebuilt from run folders alone: tables, statistics and plots.

A run folder is any folder holding a config.json written by an emitted script; its
metrics.jsonl and summary.json say how far it got. Only completed runs enter the averages;
incomplete and diverged ones are counted and listed.
"""

from __future__ import annotations

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


class NoRuns(Exception):
    """The folder holds no run folder: there is nothing to report."""


@dataclass
class Run:
    """One run folder as found on disk."""

    path: Path
    spec: str
    arm: str
    seed: int
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)  # config.json's, as written

    @property
    def status(self) -> str:
        if self.summary is None:
            return "incomplete (no summary.json)"
        status = str(self.summary.get("status"))
        return "incomplete (stopped early)" if status == "stopped" else status

    @property
    def complete(self) -> bool:
        return self.status == "completed" and not self.problems


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable ({exc.__class__.__name__})"


REQUIRED = ("epoch", "val_acc", "val_loss", "elapsed_s")  # in every metrics.jsonl record
PHASE_KEYS = tuple(f"phase_{p}" for p in PHASES)


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
        if key in REQUIRED or key in PHASE_KEYS or key in ("eps", "lr", "train_loss"):
            if not _is_number(value):
                return f"{key} is {value!r}, not a finite number"
    if not isinstance(record["epoch"], int) or not 0 <= record["val_acc"] <= 1:
        return "epoch is not an integer or val_acc not in [0, 1]"
    if phases != all(k in record for k in PHASE_KEYS):
        return "has phase fractions unlike the run's first record"
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
    phases = None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line, parse_constant=lambda name: name)  # NaN: a string
        except ValueError:  # a run killed while writing leaves a torn last line
            problems.append(f"metrics.jsonl line {number} is truncated")
            continue
        if phases is None and isinstance(record, dict):
            phases = all(k in record for k in PHASE_KEYS)
        why = _record_problem(record, bool(phases))
        if why:
            problems.append(f"metrics.jsonl line {number} {why}")
        else:
            metrics.append(record)
    summary, problem = _read_json(folder / "summary.json")
    if problem:
        problems.append(problem)
    elif summary is not None and not isinstance(summary, dict):
        problems.append("summary.json is not a JSON object")
        summary = None
    if isinstance(summary, dict) and summary.get("status") == "completed" and not metrics:
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
    )


def find_runs(root: Path) -> list[Run]:
    """Every run folder under root (root itself included), in a stable order."""
    folders = sorted(
        {p.parent for p in root.rglob("config.json")}
        | ({root} if (root / "config.json").exists() else set())
    )
    runs = [load_run(folder) for folder in folders]
    return sorted(runs, key=lambda r: (r.spec, arm_rank(r.arm), r.seed, str(r.path)))


def arm_rank(arm: str) -> tuple[int, str]:
    return (ARM_ORDER.index(arm), "") if arm in ARM_ORDER else (len(ARM_ORDER), arm)


# --- statistics --------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1) and n; std is None below two values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def welch(a: list[float], b: list[float]) -> dict[str, Any]:
    """Welch's t-test of a against b, and Hedges' g (a - b over the pooled sd, bias-corrected)."""
    a = [v for v in a if v is not None and math.isfinite(v)]
    b = [v for v in b if v is not None and math.isfinite(v)]
    if len(a) < 2 or len(b) < 2:
        return {"p": None, "t": None, "g": None, "note": "n < 2: no test"}
    from scipy import stats

    va, vb = statistics.variance(a), statistics.variance(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va == 0 and vb == 0:
        return {
            "p": None if diff == 0 else 0.0,
            "t": None,
            "g": None,
            "note": "no variance within either arm",
        }
    with warnings.catch_warnings():  # near-identical samples: scipy warns, the p stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    pooled = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
    correction = 1 - 3 / (4 * (len(a) + len(b)) - 9)
    return {
        "p": float(result.pvalue),
        "t": float(result.statistic),
        "g": diff / pooled * correction if pooled > 0 else None,
        "note": "",
    }


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni adjusted p-values (family: the arms compared with baseline)."""
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


def run_values(run: Run, target: float, window: int) -> dict[str, Any]:
    """The per-run numbers the tables average, recomputed from metrics.jsonl."""
    accs = [m.get("val_acc") for m in run.metrics]
    reached = next((m for m in run.metrics if (m.get("val_acc") or 0) >= target), None)
    return {
        "final_acc": accs[-1] if accs else None,
        "best_acc": max((a for a in accs if a is not None), default=None),
        "epochs_to_target": reached["epoch"] if reached else None,
        "seconds_to_target": reached.get("elapsed_s") if reached else None,
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


def aggregate(runs: list[Run]) -> dict[str, Any]:
    """report.json: per spec, per arm: the four tables' cells, the tests and the phases."""
    out: dict[str, Any] = {"specs": {}}
    for spec in sorted({r.spec for r in runs}):
        spec_runs = [r for r in runs if r.spec == spec]
        constants = _constants(spec_runs)
        target = constants.get("TARGET_ACCURACY", 1.0)
        window = constants.get("STABILITY_WINDOW", 20)
        arms: dict[str, Any] = {}
        values: dict[str, list[dict[str, Any]]] = {}
        for arm in sorted({r.arm for r in spec_runs}, key=arm_rank):
            arm_runs = [r for r in spec_runs if r.arm == arm]
            done = [r for r in arm_runs if r.complete]
            values[arm] = [run_values(r, target, window) for r in done]
            v = values[arm]
            arms[arm] = {
                "runs": len(arm_runs),
                "completed": len(done),
                "seeds": [r.seed for r in done],
                "not_completed": [
                    {"path": str(r.path), "status": r.status, "problems": r.problems}
                    for r in arm_runs
                    if not r.complete
                ],
                "reached_target": sum(x["epochs_to_target"] is not None for x in v),
                "epochs_to_target": mean_std([x["epochs_to_target"] for x in v]),
                "seconds_to_target": mean_std([x["seconds_to_target"] for x in v]),
                "cv_pct": mean_std([x["cv_pct"] for x in v]),
                "final_acc": mean_std([x["final_acc"] for x in v]),
                "best_acc": mean_std([x["best_acc"] for x in v]),
                "seconds": mean_std([x["seconds"] for x in v]),
                "phases_by_third": phase_thirds(done),
            }
        if "baseline" in values:
            base = values["baseline"]
            for metric in ("final_acc", "best_acc", "cv_pct", "epochs_to_target"):
                tests = {
                    arm: welch([x[metric] for x in v], [x[metric] for x in base])
                    for arm, v in values.items()
                    if arm != "baseline"
                }
                adjusted = holm({arm: t["p"] for arm, t in tests.items()})
                for arm, test in tests.items():
                    test["p_holm"] = adjusted[arm]
                    arms[arm].setdefault("vs_baseline", {})[metric] = test
        out["specs"][spec] = {"target_accuracy": target, "stability_window": window, "arms": arms}
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


def _cell(stat: dict[str, Any], fmt: str, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "—"
    mean = format(stat["mean"] * scale, fmt)
    std = "" if stat["std"] is None else f" ± {format(stat['std'] * scale, fmt)}"
    return f"{mean}{std} (n={stat['n']})"


def _p(test: dict[str, Any] | None) -> str:
    if not test or test["p"] is None:
        return (test or {}).get("note") or "—"
    words = "" if test["p"] < ALPHA else ", not significant"
    g = "" if test["g"] is None else f", g = {test['g']:+.2f}"
    return f"p = {test['p']:.3g}{g}{words}"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Ablation report", ""]
    lines += [
        "Every cell is mean ± sample standard deviation over the completed runs (seeds), with",
        "n. Each arm is compared with `baseline` by Welch's t-test (two-sided; p) and Hedges'",
        'g (the difference in pooled standard deviations); "not significant" marks p ≥ 0.05.',
        "p-values are per comparison; Table IV also gives Holm-adjusted ones over the arms.",
        "With few seeds only large differences can reach significance: read n.",
        "",
    ]
    for spec, data in report["specs"].items():
        arms = data["arms"]
        lines += [f"## {spec}", ""]
        lines += ["| arm | runs | completed | not completed |", "|---|---|---|---|"]
        for arm, a in arms.items():
            missing = (
                "; ".join(
                    f"{Path(x['path']).name}: {x['status']}"
                    + (f" ({', '.join(x['problems'])})" if x["problems"] else "")
                    for x in a["not_completed"]
                )
                or "—"
            )
            lines.append(f"| {arm} | {a['runs']} | {a['completed']} | {missing} |")
        target = data["target_accuracy"]
        lines += [
            "",
            f"### Table I — time to {target:.0%} validation accuracy",
            "",
            "Epochs (and seconds) until validation accuracy first reached the spec's "
            "target, over the runs that reached it.",
            "",
            "| arm | reached | epochs | seconds | epochs vs baseline |",
            "|---|---|---|---|---|",
        ]
        for arm, a in arms.items():
            test = a.get("vs_baseline", {}).get("epochs_to_target")
            if a["reached_target"] == 0:
                test = {"p": None, "note": "never reached"}
            lines.append(
                f"| {arm} | {a['reached_target']}/{a['completed']} | "
                f"{_cell(a['epochs_to_target'], '.1f')} | "
                f"{_cell(a['seconds_to_target'], '.1f')} | {_p(test) if test else '—'} |"
            )
        lines += [
            "",
            "### Table II — stability: CV of validation loss (%)",
            "",
            "Sample std / mean × 100 of the validation loss over the last "
            f"{data['stability_window']} epochs (all epochs if fewer); lower is steadier.",
            "",
            "| arm | CV (%) | vs baseline |",
            "|---|---|---|",
        ]
        for arm, a in arms.items():
            test = a.get("vs_baseline", {}).get("cv_pct")
            lines.append(f"| {arm} | {_cell(a['cv_pct'], '.2f')} | {_p(test) if test else '—'} |")
        lines += [
            "",
            "### Table III — validation accuracy (%)",
            "",
            "| arm | final | best | final vs baseline |",
            "|---|---|---|---|",
        ]
        for arm, a in arms.items():
            test = a.get("vs_baseline", {}).get("final_acc")
            lines.append(
                f"| {arm} | {_cell(a['final_acc'], '.2f', 100)} | "
                f"{_cell(a['best_acc'], '.2f', 100)} | {_p(test) if test else '—'} |"
            )
        lines += [
            "",
            "### Table IV — ablation (final validation accuracy against baseline)",
            "",
            "| arm | final acc (%) | Δ vs baseline (points) | p | p (Holm) | verdict |",
            "|---|---|---|---|---|---|",
        ]
        base = arms.get("baseline", {}).get("final_acc", {}).get("mean")
        for arm, a in arms.items():
            mean = a["final_acc"]["mean"]
            delta = "—" if base is None or mean is None else f"{100 * (mean - base):+.2f}"
            test = a.get("vs_baseline", {}).get("final_acc")
            if arm == "baseline":
                p = holm_p = verdict = "—"
            elif not test or test["p"] is None:
                p, holm_p, verdict = "—", "—", (test or {}).get("note") or "no test"
            else:
                p, holm_p = f"{test['p']:.3g}", f"{test['p_holm']:.3g}"
                verdict = (
                    ("better" if mean > base else "worse")
                    if test["p_holm"] < ALPHA
                    else "not significant"
                )
            lines.append(
                f"| {arm} | {_cell(a['final_acc'], '.2f', 100)} | {delta} | {p} | "
                f"{holm_p} | {verdict} |"
            )
        phase_arms = {arm: a["phases_by_third"] for arm, a in arms.items() if a["phases_by_third"]}
        if phase_arms:
            lines += [
                "",
                "### Phase distribution by thirds of training (% of steps)",
                "",
                "| arm | epochs | exploration | convergence | fine-tuning |",
                "|---|---|---|---|---|",
            ]
            for arm, thirds in phase_arms.items():
                for name, third in zip(
                    ("first third", "middle third", "last third"), thirds, strict=True
                ):
                    cells = (
                        ["—"] * 3 if third is None else [f"{100 * third[p]:.0f}" for p in PHASES]
                    )
                    lines.append(f"| {arm} | {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"![validation accuracy]({spec}_accuracy.png)",
            "",
            f"![noise and phases]({spec}_eps_phases.png)",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


# --- plots ---------------------------------------------------------------------------------


def plots(runs: list[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"exploration": "#f4a582", "convergence": "#92c5de", "fine_tuning": "#b8e186"}
    for spec in sorted({r.spec for r in runs}):
        done = [r for r in runs if r.spec == spec and r.complete]
        if not done:  # nothing to draw (and "(unreadable)" is no file name)
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for arm in sorted({r.arm for r in done}, key=arm_rank):
            curves = [[m["val_acc"] for m in r.metrics] for r in done if r.arm == arm]
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
        path = out / f"{spec}_accuracy.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
        )
        for arm in sorted({r.arm for r in done if not r.arm.startswith("baseline")}, key=arm_rank):
            arm_runs = [r for r in done if r.arm == arm]
            if not arm_runs or "eps" not in arm_runs[0].metrics[0]:
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
        phased = [r for r in done if r.arm == "full" and "phase_exploration" in r.metrics[0]]
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
        path = out / f"{spec}_eps_phases.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def build(root: Path, out: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write report.md, report.json and the plots for the runs under root."""
    runs = find_runs(root)
    if not runs:
        raise NoRuns(f"no run folders (with config.json) under {root}")
    out = out or root / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = aggregate(runs)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    plots(runs, out)
    (out / "report.md").write_text(markdown(report))
    return out, report
