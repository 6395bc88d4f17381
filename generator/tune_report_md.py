"""tune_report.md and the plots of a tune folder, rendered from tune.json's data (and, for
Optuna's own plots, from each arm's study)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna

from generator.plots import save_png


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def budget_plot(info: dict[str, Any], path: Path) -> None:
    """The budget curves of every arm in one plot, each with its bootstrap band."""
    from generator.plots import pyplot

    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, c in info["curves"].items():
        ks = range(1, c["n"] + 1)
        (line,) = ax.plot(ks, c["expected"], marker=".", label=f"{arm} (N={c['n']})")
        ax.fill_between(ks, c["low"], c["high"], alpha=0.15, color=line.get_color())
    label = info["objective"].replace("_", " ")
    ax.set(
        xlabel="trials k (finished, per arm)",
        ylabel=f"expected best {label}",
        title=f"{info['spec_name']}: expected best after k trials, 95 % bootstrap band",
    )
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def study_plots(study: optuna.Study, folder: Path, complete: int) -> dict[str, str]:
    """Optuna's matplotlib plots, by file name; each one that cannot be drawn is skipped."""
    if complete < 1:
        return {}
    from optuna.visualization import matplotlib as ovm

    from generator.plots import pyplot

    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    plots = {
        "optimization_history.png": ("optimization history", ovm.plot_optimization_history),
        "slice.png": ("each parameter against the objective", ovm.plot_slice),
        "parallel_coordinate.png": ("parallel coordinates", ovm.plot_parallel_coordinate),
    }  # the importances are a table in the report; each plot costs about a second
    made = {}
    for name, (title, draw) in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        if hasattr(axes, "flat"):  # one panel per parameter: room for each one's labels
            _spread(figure, list(axes.flat))
        elif name == "parallel_coordinate.png":
            _untangle(figure, axes, study)
        save_png(figure, folder / name, dpi=100)
        plt.close(figure)
        made[name] = title
    return made


def _spread(figure: Any, panels: list[Any]) -> None:
    """Optuna's slice plot puts a panel per parameter side by side in a fixed width, so that
    the dotted names and tick labels overprint: give each panel 3.2 inches, wrap the names
    at their dots and label the major ticks only."""
    from matplotlib.ticker import NullFormatter

    figure.set_size_inches(3.2 * len(panels) + 2.0, 4.5)
    for ax in panels:
        ax.set_xlabel(ax.get_xlabel().replace(".", ".\n"), fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=7)


def _untangle(figure: Any, ax: Any, study: optuna.Study) -> None:
    """Optuna's parallel-coordinate plot puts an axis per parameter in a fixed width and cuts
    names at 17 characters, so that scales overprint and names are lost: give each axis 1.4
    inches, write the names whole (wrapped at their dots), the scales small and gridless."""
    from matplotlib.ticker import NullFormatter

    # the axes follow the objective in the order of the sorted parameter names
    names = ["Objective Value", *sorted({k for t in study.trials for k in t.params})]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    same = len(names) == len(labels) and all(
        n == label or (label.endswith("...") and n.startswith(label[:-3]))
        for n, label in zip(names, labels)
    )
    whole = names if same else labels
    figure.set_size_inches(1.4 * len(labels) + 2.5, 5.5)
    ax.set_xticks(range(len(labels)), [w.replace(".", ".\n") for w in whole])
    ax.tick_params(axis="x", labelrotation=0, labelsize=7, pad=8)  # below the scales' ends
    for twin in figure.axes:
        if twin is not ax and twin.get_xlim() == ax.get_xlim():  # a parameter's scale
            twin.yaxis.set_minor_formatter(NullFormatter())
            twin.grid(False)  # the objective's grid only: a grid per scale fills the panel
            twin.tick_params(axis="y", labelsize=7)


QUESTION_TEXT = {
    "same_budget": "(a) each arm tuned with the same budget (the benchmark view): every arm "
    "searched the shared knobs and its own",
    "added_to_tuned_baseline": "(b) the method added to a tuned baseline (the ablation view): "
    "baseline tuned first; each method arm searched its own knobs only, on the baseline's "
    "tuned values, with the same budget",
}


def report_markdown(info: dict[str, Any]) -> str:
    budget, arms = info["budget"], info["arms"]
    pruning = (
        "no pruner"
        if info["prune_from"] is None
        else f"{info['pruner']} pruner, no trial pruned before epoch {info['prune_from']}"
    )
    lines = [
        f"# Tuning `{info['spec_name']}`: {', '.join(f'`{a}`' for a in arms)}",
        "",
        f"Question: {QUESTION_TEXT[info['question']]}.",
        "",
        f"From `{info['spec']}`, studies in `{info['storage']}`. Objective: "
        f"`{info['objective']}` ({info['direction']}d) on the validation split, the mean over "
        f"seeds {budget['seeds']} at {budget['epochs']} epochs per run; TPE sampler, "
        f"{pruning}. Budget: {budget['trials']} finished trials per arm, a pruned trial "
        "counted as finished for every arm alike. Trials' runs evaluate no test metric "
        "(`--no-test`) and the tuner reads validation metrics only.",
        "",
        "| arm | finished | completed | pruned | failed | best trial | "
        f"`{info['objective']}` | at an edge of its range |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in arms.items():
        c, best = a["counts"], a["best"]
        flagged = ", ".join(f"`{k}` ({v}): widen the range" for k, v in a["edges"].items())
        lines.append(
            f"| `{arm}` | {c['complete'] + c['pruned']} | {c['complete']} | {c['pruned']} | "
            f"{c['failed']} | {'-' if best is None else best['number']} | "
            f"{'-' if best is None else fmt(best['value'])} | {flagged or '-'} |"
        )
    lines += ["", "## Budget curves", ""]
    if info["budget_plot"]:
        lines += [
            "The expected best validation value after k finished trials, from each arm's "
            "trials (Dodge et al. 2019; a pruned trial scores the value it was stopped at), "
            "with a 95 % bootstrap band over the trials.",
            "",
            f"![budget curves]({info['budget_plot']})",
            "",
        ]
        lines.append(_ranking_text(info["ranking"]))
    else:
        lines.append("No trial has finished yet.")
    fresh = budget["fresh_seeds"]
    lines += ["", "## Fresh seeds", ""]
    lines.append(
        f"Each arm's best values ran on seeds {fresh}, none of them a tuning seed, each run "
        "evaluating the test split once: [report/report.md](report/report.md)."
        if fresh
        else "None: tune.fresh_seeds is 0 (tuning only)."
    )
    for arm, a in arms.items():
        lines += _arm_markdown(arm, a, info["objective"])
    return "\n".join(lines) + "\n"


def _ranking_text(rank: dict[str, Any] | None) -> str:
    if rank is None:
        return "One arm: no ranking."
    order = " > ".join(f"`{a}`" for a in rank["order"])
    if not rank["differs_at"]:
        return f"Ranking at k = {rank['k']}: {order}; it holds at every budget k = 1..{rank['k']}."
    ks = ", ".join(map(str, rank["differs_at"]))
    return (
        f"Ranking at k = {rank['k']}: {order}; it does not hold across budgets: at k = {ks} the "
        f"ranking is another one. `{rank['order'][0]}` leads from k = {rank['leader_from']} on "
        "(point estimates; see the bands)."
    )


def _arm_markdown(arm: str, info: dict[str, Any], objective: str) -> list[str]:
    counts, best = info["counts"], info["best"]
    params = list(info["space"])
    lines = [
        "",
        f"## Arm `{arm}` (study `{info['study']}`)",
        "",
        f"Trials: {counts['complete'] + counts['pruned']} finished ({counts['complete']} "
        f"completed, {counts['pruned']} pruned), {counts['failed']} failed or interrupted "
        f"(not counted), {counts['running']} running. Time in trials: "
        f"{info['trial_seconds']:.0f} s"
        + (
            f"; first start to last end: {info['span_seconds']:.0f} s."
            if info["span_seconds"] is not None
            else "."
        ),
    ]
    if info["fixed"]:
        fixed = ", ".join(f"`{k}` = {fmt(v)}" for k, v in info["fixed"].items())
        lines += ["", f"Fixed at the tuned baseline's values: {fixed}."]
    lines += ["", "### Best trial", ""]
    if best is None:
        lines.append("No trial has completed yet.")
    else:
        lines += [
            f"Trial {best['number']}: `{objective}` = {fmt(best['value'])}. "
            f"`{info['tuned']}` is the spec with these values:",
            "",
            "| parameter | value | range |",
            "|---|---|---|",
        ]
        for k, v in best["params"].items():
            edge = info["edges"].get(k)
            note = f"at its {edge} edge: widen the range" if edge else ""
            lines.append(f"| `{k}` | {fmt(v)} | {note} |")
    lines += ["", "### Parameter importances", ""]
    if info["importances"] is None:
        lines.append("Not computed: it needs at least two completed trials.")
    else:
        lines += [
            "PED-ANOVA over the completed trials (Optuna's default); they sum to 1.",
            "",
            "| parameter | importance |",
            "|---|---|",
            *(f"| `{k}` | {v:.3f} |" for k, v in info["importances"].items()),
        ]
    if info.get("plots"):
        lines += ["", "### Plots", ""]
        lines += [f"![{title}](plots/{arm}/{name})" for name, title in info["plots"].items()]
    lines += [
        "",
        "### Trials",
        "",
        "| # | state | value | epochs | seconds | "
        + " | ".join(f"`{p}`" for p in params)
        + " | note |",
        "|---" * (len(params) + 6) + "|",
    ]
    for row in info["trials"]:
        cells = [
            str(row["number"]),
            row["outcome"],
            "-" if row["value"] is None else fmt(row["value"]),
            str(row["epochs"]),
            "-" if row["duration_s"] is None else f"{row['duration_s']:.0f}",
            *(fmt(row["params"][p]) if p in row["params"] else "-" for p in params),
            row["reason"].replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
