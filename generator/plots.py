"""The report's plots, drawn from report.json alone (its sections' `curves`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from generator.output import atomic_write
from generator.runs import PHASES

COLORS = {"exploration": "#f4a582", "convergence": "#92c5de", "fine_tuning": "#b8e186"}


def save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG file, written through atomic_write."""
    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write(path, data.getvalue())


def pyplot() -> Any:
    """matplotlib's pyplot (Agg), in its default style with a line for every arm told apart:
    Optuna's plots switch the whole process to ggplot, whose 7 colours repeat at an 8th arm,
    so each of our plots starts from the default and cycles ten colours solid, then dashed,
    then dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    plt.style.use("default")
    colours = plt.rcParams["axes.prop_cycle"]
    plt.rcParams["axes.prop_cycle"] = cycler(linestyle=["-", "--", ":"]) * colours
    return plt


def plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Per section: validation accuracy per arm (mean, band min-max over completed runs) and
    eps(t) per perturbing arm above the full arm's phases."""
    written = []
    for spec, data in report["specs"].items():
        for section in data["sections"]:
            drawn = {k: c for k, c in section["curves"].items() if c is not None}
            if drawn:  # nothing to draw (and "(unreadable)" is no file name)
                written += [_accuracy(spec, section["name"], drawn, out)]
                written += [_eps_phases(spec, section["name"], drawn, out)]
    return written


def _accuracy(spec: str, name: str, drawn: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, c in drawn.items():
        epochs = range(1, len(c["val_acc"]) + 1)
        (line,) = ax.plot(epochs, c["val_acc"], label=f"{arm} (n={c['n']})")
        ax.fill_between(epochs, c["val_acc_low"], c["val_acc_high"], alpha=0.15, color=line.get_color())
    ax.set(
        xlabel="epoch", ylabel="validation accuracy", title=f"{spec}: mean over seeds, band = min-max"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    best = max((v for c in drawn.values() for v in c["val_acc_high"]), default=1.0)
    ax.set_ylim(max(0.0, best - 0.3), min(1.0, best + 0.02))
    path = out / f"{name}_accuracy.png"
    save_png(fig, path)
    plt.close(fig)
    return path


# the arms whose eps is not a parameter-noise std, and the line styles that keep arms with
# the same eps (anti_pgd's sigma and fixed's eps, by default) both visible
UNITS = {
    "gradient_noise": "gradient_noise (std in the gradient)",
    "anti_pgd": "anti_pgd (std of xi_t)",
}
LINES = {"anti_pgd": "--"}


def _eps_phases(spec: str, name: str, drawn: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for arm, c in drawn.items():
        if not arm.startswith("baseline") and c["eps"] is not None:
            style = {"label": UNITS.get(arm, arm), "linestyle": LINES.get(arm, "-")}
            top.plot(range(1, len(c["eps"]) + 1), c["eps"], **style)
    top.set(ylabel="mean eps per step", title=f"{spec}: noise std eps(t), mean over seeds")
    top.grid(alpha=0.3)
    if top.lines:
        top.legend(fontsize=8)
    else:
        top.text(0.5, 0.5, "no perturbing arm", ha="center", transform=top.transAxes)
    full = drawn.get("full")  # one fingerprint of the full arm, or none
    if full and full["phases"]:
        length = len(full["val_acc"])
        edge = [0.0] * length
        for phase in PHASES:
            share = full["phases"][phase]
            bottom.bar(
                range(1, length + 1), share, bottom=edge, width=1.0, color=COLORS[phase], label=phase
            )
            edge = [b + s for b, s in zip(edge, share, strict=True)]
        title = f"phases of the full arm (n={full['n']})"
        bottom.set(ylabel="share of steps", ylim=(0, 1), title=title)
        bottom.legend(fontsize=8, loc="lower right")
    else:
        text = "no full arm with a phase detector"
        bottom.text(0.5, 0.5, text, ha="center", transform=bottom.transAxes)
    bottom.set(xlabel="epoch")
    path = out / f"{name}_eps_phases.png"
    save_png(fig, path)
    plt.close(fig)
    return path
