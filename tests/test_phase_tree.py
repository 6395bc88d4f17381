"""The seed paper's decision tree at its boundaries, with four distinct thresholds.

tau1..tau4 all differ (tau3 < tau1, tau4 < tau2), so a tree that swaps two of them, or
compares with <= where the paper's tree says <, votes differently on some row of the table.
Every vote goes through PhaseDetector.observe of an emitted script, with the window's
statistics scripted: in relative mode the first full window's statistics are the reference
the later ones are divided by, as in a run.
"""

from __future__ import annotations

import functools

import pytest
from conftest import MINIMAL, generate

from generator.scriptload import load_script

EXPLORATION, CONVERGENCE, FINE_TUNING = 0, 1, 2
TAU1, TAU2, TAU3, TAU4, TAU_SMOOTH = 0.8, 0.6, 0.3, 0.2, 0.4
WINDOW = 3
D = 1e-6  # "just inside" and "just outside" a threshold
# relative mode: the first window's (grad_var, loss_smooth, param_delta). Powers of two, so
# that ratio * reference / reference is the ratio exactly and a threshold is hit exactly.
REFERENCE = (4.0, 2.0, 0.5)

GRAD_VAR, LOSS_SMOOTH, PARAM_DELTA = 0, 1, 2
NAMES = ("grad_var", "loss_smooth", "param_delta")
PHASES = ("exploration", "convergence", "fine_tuning")


@pytest.fixture(scope="module")
def detector_class(tmp_path_factory):
    """PhaseDetector of the `full` arm of a spec with the thresholds above, generated once
    per setting, built from the emitted script's constants."""
    return functools.cache(functools.partial(_detector_class, tmp_path_factory))


def _detector_class(tmp_path_factory, mode, tau_smooth=None, patience=1, monotonic=False):
    smooth = f", tau_smooth: {tau_smooth}" if tau_smooth is not None else ""
    setting = (
        f"phase_detector={{window: {WINDOW}, patience: {patience}, "
        f"monotonic: {str(monotonic).lower()}, thresholds: {{mode: {mode}, tau1: {TAU1}, "
        f"tau2: {TAU2}, tau3: {TAU3}, tau4: {TAU4}{smooth}}}}}"
    )
    root = tmp_path_factory.mktemp(f"{mode}_{tau_smooth}_{patience}_{monotonic}")
    folder = generate(root, MINIMAL.replace("[baseline, fixed]", "[full]"), setting)
    script = load_script(str(folder / "train_full.py"), run_name="perturbgen_test")
    names = ("every", "window", "threshold_mode", "tau1", "tau2", "tau3", "tau4")
    names += ("tau_smooth", "patience", "monotonic")
    settings = {name: script[name.upper()] for name in names}  # the script's constants
    return functools.partial(script["PhaseDetector"], **settings)


def observe_scripted(detector, windows, relative):
    """Feed the detector samples whose windows have the statistics `windows` in turn (as
    ratios; in relative mode a calibration window comes first); return the phase after each
    of them."""
    script = list(windows)
    if relative:
        script = [REFERENCE] + [tuple(v * r for v, r in zip(w, REFERENCE)) for w in script]
    calls = iter(script)
    detector.statistics = lambda: next(calls)
    for step in range(WINDOW - 1):  # warm-up: no statistics until the window is full
        detector.observe(step, 1.0, 1.0, 1.0)
    phases = []
    for step in range(WINDOW - 1, WINDOW - 1 + len(script)):
        detector.observe(step, 1.0, 1.0, 1.0)
        phases.append(detector.phase)
    assert next(calls, None) is None, "a scripted window was not used"
    if relative:
        assert detector.reference == list(REFERENCE)
        return phases[1:]
    return phases


def boundary_table(smooth_votes):
    """(label, (grad_var, loss_smooth, param_delta), expected vote) rows: each branch's
    statistics just inside all its comparisons, then each comparison in turn exactly at its
    threshold and just outside it. smooth_votes: whether loss_smooth has a threshold."""
    branches = [
        # phase, the comparisons (statistic, threshold, +1: must be above, -1: below)
        (EXPLORATION, [(GRAD_VAR, TAU1, 1), (PARAM_DELTA, TAU2, 1), (LOSS_SMOOTH, TAU_SMOOTH, 1)]),
        (
            FINE_TUNING,
            [(GRAD_VAR, TAU3, -1), (PARAM_DELTA, TAU4, -1), (LOSS_SMOOTH, TAU_SMOOTH, -1)],
        ),
    ]
    rows = []
    for phase, comparisons in branches:
        inside = [0.0, 0.0, 0.0]
        for index, tau, side in comparisons:
            inside[index] = tau + side * D
        rows.append((f"{PHASES[phase]}, all inside", tuple(inside), phase))
        for index, tau, side in comparisons:
            # outside one comparison: the other branch's are not met either (tau3 < tau1,
            # tau4 < tau2), so the vote is convergence, unless loss_smooth has no say
            counts = index != LOSS_SMOOTH or smooth_votes
            for where, value in (("at", tau), ("outside", tau - side * D)):
                stats = list(inside)
                stats[index] = value
                label = f"{PHASES[phase]}, {NAMES[index]} {where} {value}"
                rows.append((label, tuple(stats), CONVERGENCE if counts else phase))
    # neither branch: high variance with small updates, and the reverse
    rows.append(("mixed high/low", (TAU1 + D, TAU_SMOOTH, TAU4 - D), CONVERGENCE))
    rows.append(("mixed low/high", (TAU3 - D, TAU_SMOOTH, TAU2 + D), CONVERGENCE))
    return rows


@pytest.mark.parametrize("tau_smooth", [None, TAU_SMOOTH], ids=["no_tau_smooth", "tau_smooth"])
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_each_comparison_of_the_tree_at_its_threshold(detector_class, mode, tau_smooth):
    detector = detector_class(mode, tau_smooth)
    rows = boundary_table(smooth_votes=tau_smooth is not None)
    assert len(rows) == 2 * (1 + 3 * 2) + 2
    wrong = []
    for label, stats, expected in rows:
        (vote,) = observe_scripted(detector(), [stats], relative=mode == "relative")
        if vote != expected:
            wrong.append(f"{label}: voted {PHASES[vote]}, the tree says {PHASES[expected]}")
    assert wrong == []


def test_the_tree_compares_each_statistic_with_its_own_threshold(detector_class):
    """The rows that tell each threshold from the others, spelled out."""
    detector = detector_class("absolute")
    vote = detector().vote
    # grad_var between tau4 and tau3: fine-tuning, so grad_var is compared with tau3, not tau4
    assert vote(0.25, 0.0, 0.1) == FINE_TUNING
    # param_delta between tau4 and tau3: not fine-tuning, so param_delta is compared with tau4
    assert vote(0.1, 0.0, 0.25) == CONVERGENCE
    # grad_var between tau2 and tau1: not exploration, so grad_var is compared with tau1
    assert vote(0.7, 0.0, 1.0) == CONVERGENCE
    # param_delta between tau2 and tau1: exploration, so param_delta is compared with tau2
    assert vote(1.0, 0.0, 0.7) == EXPLORATION


E, C, F = EXPLORATION, CONVERGENCE, FINE_TUNING
# statistics that vote each phase (absolute mode, no tau_smooth)
VOTING = {E: (1.0, 0.0, 1.0), C: (0.5, 0.0, 0.5), F: (0.1, 0.0, 0.1)}


@pytest.mark.parametrize(
    "votes, free, monotonic",
    [
        # a candidate needs `patience` consecutive votes: a vote for another phase restarts it
        ([C, F, F, E, C, C], [E, E, F, F, F, C], [E, E, F, F, F, F]),
        ([C, C, E, E, F, F, C, C], [E, C, C, E, E, F, F, C], [E, C, C, C, C, F, F, F]),
        # monotonic: a vote for an earlier phase counts as a vote for the current one
        ([C, C, F, E, F, F], [E, C, C, C, C, F], [E, C, C, C, C, F]),
    ],
)
def test_patience_and_monotonic_on_scripted_windows(detector_class, votes, free, monotonic):
    """patience 2: the phase after each window, with monotonic off and on."""
    for is_monotonic, expected in ((False, free), (True, monotonic)):
        cls = detector_class("absolute", patience=2, monotonic=is_monotonic)
        windows = [VOTING[v] for v in votes]
        assert observe_scripted(cls(), windows, relative=False) == expected, is_monotonic
