"""Optuna's plots of a study, as tune writes them: whole parameter names, no label printed
over another."""

import itertools
import warnings

import optuna
import pytest

from generator.plots import pyplot
from generator.tune_report_md import _spread, _untangle

# names as long and as alike as a real search space's (mnist1d_fair has these)
NAMES = [
    "optimizer.lr",
    "optimizer.weight_decay",
    "perturbation.decay",
    "perturbation.eps.convergence",
    "perturbation.eps.exploration",
    "perturbation.eps.fine_tuning",
    "phase_detector.thresholds.tau1",
    "phase_detector.thresholds.tau2",
    "phase_detector.thresholds.tau3",
    "phase_detector.thresholds.tau4",
]


@pytest.fixture(scope="module")
def study():
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))

    def objective(trial):
        values = [trial.suggest_float(n, 1e-5, 1e-1, log="lr" in n or "eps" in n) for n in NAMES]
        return sum(values)

    study.optimize(objective, n_trials=12)
    return study


def shown(axis):
    """The tick labels matplotlib draws: those of ticks inside the axis' view."""
    low, high = sorted(axis.get_view_interval())
    along = 1 if axis is axis.axes.yaxis else 0
    return [t for t in axis.get_ticklabels() if low <= t.get_position()[along] <= high]


def overlapping(texts):
    boxes = [t.get_window_extent() for t in texts if t.get_visible() and t.get_text()]
    return [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


def drawn(draw, study):
    pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return draw(study)


def test_parallel_coordinates_name_every_axis_whole_and_nothing_overprints(study):
    from optuna.visualization import matplotlib as ovm

    ax = drawn(ovm.plot_parallel_coordinate, study)
    _untangle(ax.figure, ax, study)
    ax.figure.canvas.draw()
    names = [t.get_text().replace("\n", "") for t in ax.get_xticklabels()]
    assert names == ["Objective Value", *sorted(NAMES)]
    assert not overlapping(ax.get_xticklabels())
    scales = [label for a in ax.figure.axes if a is not ax for label in shown(a.yaxis)]
    assert not overlapping(ax.get_xticklabels() + scales)


def test_slice_panels_leave_room_for_their_names(study):
    from optuna.visualization import matplotlib as ovm

    axes = drawn(ovm.plot_slice, study)
    panels = list(axes.flat)
    _spread(panels[0].figure, panels)
    panels[0].figure.canvas.draw()
    labels = [p.xaxis.label for p in panels]
    ticks = [t for p in panels for t in shown(p.xaxis)]
    assert not overlapping(labels + ticks)


def test_every_arm_of_a_budget_plot_has_a_line_of_its_own(study, tmp_path):
    # after Optuna's plots (which switch the process to ggplot's 7 colours), 12 arms: 12
    # distinct (colour, line style) pairs; the 8th arm repeated the 1st's colour before
    from optuna.visualization import matplotlib as ovm

    from generator.tune_report_md import budget_plot

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's "experimental" warning
        ovm.plot_optimization_history(study)
    curve = {"n": 3, "expected": [0.5, 0.6, 0.7], "low": [0.4] * 3, "high": [0.8] * 3}
    info = {"curves": {f"arm{i}": curve for i in range(12)}, "objective": "final_val_acc"}
    info["spec_name"] = "s"
    plt = pyplot()
    shown = []
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        shown.extend((line.get_color(), line.get_linestyle()) for line in fig.axes[0].lines)
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        budget_plot(info, tmp_path / "budget.png")
    finally:
        plt.Figure.savefig = original
    assert len(shown) == 12 and len(set(shown)) == 12
