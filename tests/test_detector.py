"""Adaptive perturbation: the phase detector and the eps(t) policies, tested directly as
the Python they are (generator/method/), then eps(t) of every arm, the noise actually
applied and exact resume of the detector, taken from emitted scripts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import GENERATED, MINIMAL, cli, generate, run_inprocess, without_timing

from generator.method import eps_fixed, eps_full, eps_phase, eps_schedule
from generator.method.detector import CONVERGENCE, EXPLORATION, FINE_TUNING, PhaseDetector
from generator.scriptload import load_script

# absolute thresholds over a window of 4, a vote adopted at once
ABSOLUTE_SETTINGS = dict(
    every=1,
    window=4,
    threshold_mode="absolute",
    tau1=1.0,
    tau2=1.0,
    tau3=0.1,
    tau4=0.1,
    tau_smooth=None,
    patience=1,
    monotonic=False,
)


def detector_with(**changes):
    return PhaseDetector(**{**ABSOLUTE_SETTINGS, **changes})


def namespace(tmp_path, arm, *overrides, spec=MINIMAL):
    text = spec.replace("[baseline, fixed]", "[baseline, fixed, phase_only, schedule_only, full]")
    folder = generate(tmp_path, text, *overrides)
    return load_script(str(folder / f"train_{arm}.py"), run_name="perturbgen_test")


def feed(detector, samples, start=0):
    """Observe (g, d, loss) samples at steps start, start + 1, ...; return the changes."""
    changes = []
    for i, (g, d, loss) in enumerate(samples):
        change = detector.observe(start + i, g, d, loss)
        if change is not None:
            changes.append(change)
    return changes


def noisy_g(n, spread):
    """Gradient norms alternating around 1: population variance spread**2."""
    return [1 + spread * (-1) ** i for i in range(n)]


# --- the decision tree -----------------------------------------------------------------


def test_each_branch_of_the_tree(tmp_path):
    detector = detector_with()
    vote = detector.vote
    assert vote(2.0, 0.0, 2.0) == EXPLORATION  # both above tau1, tau2
    assert vote(2.0, 0.0, 0.5) == CONVERGENCE  # high variance alone is not exploration
    assert vote(1.0, 0.0, 2.0) == CONVERGENCE  # the bounds are strict
    assert vote(0.05, 0.0, 0.05) == FINE_TUNING
    assert vote(0.05, 0.0, 0.1) == CONVERGENCE
    assert vote(0.5, 0.0, 0.5) == CONVERGENCE


def test_loss_smoothness_votes_only_with_a_threshold(tmp_path):
    without = detector_with()
    assert without.vote(2.0, 100.0, 2.0) == EXPLORATION
    with_tau = detector_with(tau_smooth=0.5)
    assert with_tau.vote(2.0, 0.1, 2.0) == CONVERGENCE  # smooth loss: not exploration
    assert with_tau.vote(2.0, 0.9, 2.0) == EXPLORATION
    assert with_tau.vote(0.05, 0.9, 0.05) == CONVERGENCE  # rough loss: not fine-tuning
    assert with_tau.vote(0.05, 0.1, 0.05) == FINE_TUNING


def test_statistics_of_the_window(tmp_path):
    detector = detector_with()
    feed(detector, [(1.0, 0.5, 4.0), (3.0, 1.5, 1.0), (1.0, 0.5, 2.0), (3.0, 1.5, 0.0)])
    grad_var, loss_smooth, param_delta = detector.statistics()
    assert grad_var == pytest.approx(1.0)  # g = 1, 3, 1, 3: population variance 1
    assert param_delta == pytest.approx(1.0)
    # second differences: 2 - 2*1 + 4 = 4, 0 - 2*2 + 1 = -3: mean |.| = 3.5
    assert loss_smooth == pytest.approx(3.5)


def test_warm_up_stays_in_exploration(tmp_path):
    detector = detector_with()
    assert feed(detector, [(1.0, 0.01, 1.0)] * 3) == []  # would vote fine-tuning
    assert detector.phase == EXPLORATION and len(detector.samples) == 3
    (change,) = feed(detector, [(1.0, 0.01, 1.0)], start=3)  # the window is full
    assert (change["from"], change["to"], change["step"]) == ("exploration", "fine_tuning", 3)
    assert detector.phase == FINE_TUNING and detector.phase_start == 3


def scripted(detector, votes):
    """Make the detector's tree vote `votes` in turn, to test what it does with votes."""
    votes = iter(votes)
    detector.vote = lambda *stats: next(votes)
    return detector


def test_patience_needs_consecutive_votes(tmp_path):
    C, E = CONVERGENCE, EXPLORATION
    detector = scripted(detector_with(patience=3), [C, C, E, C, C, C])
    sample = (1.0, 1.0, 1.0)
    assert feed(detector, [sample] * 8) == []  # 3 warm-up samples, then C, C, E, C, C
    assert (detector.candidate, detector.votes) == (C, 2)
    (change,) = feed(detector, [sample], start=8)  # the third consecutive C
    assert (change["step"], change["to"]) == (8, "convergence")
    assert detector.phase_start == 8 and (detector.candidate, detector.votes) == (None, 0)


@pytest.mark.parametrize("monotonic", [False, True])
def test_monotonic_phases_only_advance(tmp_path, monotonic):
    detector = detector_with(monotonic=monotonic)
    scripted(detector, [CONVERGENCE, EXPLORATION, FINE_TUNING, CONVERGENCE])
    changes = feed(detector, [(1.0, 1.0, 1.0)] * 7)
    expected = ["convergence", "exploration", "fine_tuning", "convergence"]
    assert [c["to"] for c in changes] == (
        ["convergence", "fine_tuning"] if monotonic else expected
    )


def test_relative_thresholds_are_calibrated_on_the_first_window(tmp_path):
    detector = detector_with(threshold_mode="relative", tau1=0.5, tau2=0.5, tau3=0.1, tau4=0.2)
    first = list(zip(noisy_g(4, 0.2), [0.01] * 4, [1.0] * 4, strict=True))  # var 0.04, delta 0.01
    assert feed(detector, first) == []  # ratios 1, 1: exploration, as it should be
    assert detector.reference == pytest.approx([0.04, 0.0, 0.01])
    # the same shape at a hundredth of the scale: ratios 0.01 -> fine-tuning
    small = list(zip(noisy_g(4, 0.02), [1e-4] * 4, [1.0] * 4, strict=True))
    changes = feed(detector, small, start=4)
    assert changes[-1]["to"] == "fine_tuning"
    assert changes[-1]["compared"]["param_delta"] == pytest.approx(0.01)


def test_non_finite_samples_are_dropped(tmp_path):
    detector = detector_with()
    for bad in [(math.nan, 1.0, 1.0), (1.0, math.inf, 1.0), (1.0, 1.0, -math.inf)]:
        assert detector.observe(0, *bad) is None
    assert detector.samples == []


def test_detector_state_round_trips(tmp_path):
    a, b = detector_with(patience=2), detector_with(patience=2)
    stream = list(zip(noisy_g(6, 2.0), [2.0] * 6, [1.0] * 6, strict=True)) + [(1.0, 0.05, 1.0)] * 5
    feed(a, stream[:7])
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert feed(a, stream[7:], start=7) == feed(b, stream[7:], start=7)
    assert a.state_dict() == b.state_dict()


def test_two_detectors_with_different_settings_live_side_by_side():
    """No module-global settings: each detector decides with its own."""
    strict, loose = detector_with(), detector_with(tau3=10.0, tau4=10.0)
    assert strict.vote(0.5, 0.0, 0.5) == CONVERGENCE
    assert loose.vote(0.5, 0.0, 0.5) == FINE_TUNING
    assert strict.vote(0.5, 0.0, 0.5) == CONVERGENCE  # unchanged by the other one


def test_sample_steps_come_every_n_steps():
    detector = detector_with(every=3)
    assert [t for t in range(10) if detector.due(t)] == [0, 3, 6, 9]


# --- eps(t) of each arm ------------------------------------------------------------------


def test_each_policy_follows_its_formula():
    detector = detector_with()
    assert eps_fixed.Epsilon(1e-3)(5000, None) == 1e-3
    schedule = eps_schedule.Epsilon(eps_base=2e-3, decay=1e-3)
    assert schedule(700, None) == pytest.approx(2e-3 * math.exp(-0.7))
    phases = (2e-3, 1e-3, 2.5e-4)
    detector.phase, detector.phase_start = FINE_TUNING, 300
    assert eps_phase.Epsilon(phases)(900, detector) == 2.5e-4  # no decay inside a phase
    assert eps_full.Epsilon(phases, decay=1e-3)(900, detector) == pytest.approx(
        2.5e-4 * math.exp(-0.6)  # t_p = 900 - 300
    )
    assert [eps_fixed.Epsilon.needs_detector, eps_phase.Epsilon.needs_detector] == [False, True]
    assert [eps_schedule.Epsilon.needs_detector, eps_full.Epsilon.needs_detector] == [False, True]


def perturbation(ns):
    model = torch.nn.Linear(400, 250)  # 100,250 parameters
    ns["flatten_parameters"](model)
    return model, ns["make_perturbation"](model, 0, torch.device("cpu"), "torch")


def test_eps_of_each_arm_follows_its_formula(tmp_path):
    lr = 0.1  # MINIMAL's lr
    p = perturbation(namespace(tmp_path / "f", "fixed"))[1]
    assert p.epsilon(0, lr) == p.epsilon(5000, lr) == 1e-3
    p = perturbation(namespace(tmp_path / "s", "schedule_only"))[1]
    for t in (0, 1, 700, 5000):
        assert p.epsilon(t, lr) == pytest.approx(2e-3 * math.exp(-1e-3 * t))
    p = perturbation(namespace(tmp_path / "p", "phase_only"))[1]
    for phase, eps in enumerate((2e-3, 1e-3, 2.5e-4)):
        p.detector.phase, p.detector.phase_start = phase, 300
        assert p.epsilon(900, lr) == eps  # no decay inside a phase
    p = perturbation(namespace(tmp_path / "u", "full"))[1]
    assert p.epsilon(200, lr) == pytest.approx(2e-3 * math.exp(-0.2))  # t_p = t before a change
    p.detector.phase, p.detector.phase_start = CONVERGENCE, 1000  # a change at step 1000
    assert p.epsilon(1000, lr) == pytest.approx(1e-3)  # t_p restarts at 0
    assert p.epsilon(1500, lr) == pytest.approx(1e-3 * math.exp(-0.5))


def test_scale_lr_follows_the_learning_rate(tmp_path):
    p = perturbation(namespace(tmp_path, "schedule_only", "perturbation.scale=lr"))[1]
    assert p.epsilon(0, 0.05) == pytest.approx(2e-3 * 0.05 / 0.1)


@pytest.mark.parametrize("arm", ["fixed", "phase_only", "schedule_only", "full"])
def test_applied_noise_has_std_eps(arm, tmp_path):
    """The parameter change of one apply() is measured: n = 100,250 draws per step.

    Sample std of n normals: relative s.e. 1/sqrt(2n) = 0.22 %, so a 2 % band is 9 s.e.;
    sample mean: s.e. eps/sqrt(n), bound 5 s.e.; correlation of two steps' draws: s.e.
    1/sqrt(n) = 0.0032, bound 0.02 (6 s.e.).
    """
    model, p = perturbation(namespace(tmp_path, arm))
    steps = {}
    for step in (0, 400):
        before = torch.cat([q.detach().flatten().clone() for q in model.parameters()])
        eps = p.apply(step, 0.1)
        after = torch.cat([q.detach().flatten() for q in model.parameters()])
        delta = (after - before).double()
        n = delta.numel()
        assert eps == p.epsilon(step, 0.1) > 0
        assert abs(delta.std().item() / eps - 1) < 0.02
        assert abs(delta.mean().item()) < 5 * eps / math.sqrt(n)
        steps[step] = delta / eps
    corr = torch.corrcoef(torch.stack([steps[0], steps[400]]))[0, 1].item()
    assert abs(corr) < 0.02


def test_apply_to_weights_leaves_biases_and_norms_alone(tmp_path):
    spec = (GENERATED.parent / "specs" / "cifar10_resnet18.yaml").read_text()
    ns = namespace(tmp_path, "fixed", "perturbation.apply_to=weights", spec=spec)
    model = ns["build_model"]()
    ns["flatten_parameters"](model)
    p = ns["make_perturbation"](model, 0, torch.device("cpu"), "torch")
    before = {k: v.clone() for k, v in model.named_parameters()}
    p.apply(0, 0.1)
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed is (param.ndim >= 2), name
    assert any("bn" in name for name, q in model.named_parameters() if q.ndim == 1)


# --- in a real run -------------------------------------------------------------------------


def test_resume_restores_the_detector_and_schedule_exactly(tmp_path):
    spec = MINIMAL.replace("train_size: 64", "train_size: 96")
    folder = generate(
        tmp_path,
        spec.replace("[baseline, fixed]", "[full]"),
        "data.batch_size=8",
        "train.epochs=4",
        "phase_detector={every: 2, window: 3, patience: 1, "
        "thresholds: {tau1: 0.9, tau2: 0.9, tau3: 0.5, tau4: 0.8}}",
    )
    script = folder / "train_full.py"
    assert run_inprocess(script, "--out", tmp_path / "a").returncode == 0
    assert run_inprocess(script, "--out", tmp_path / "b", "--max-steps", "19").returncode == 0
    assert run_inprocess(script, "--out", tmp_path / "b", "--resume").returncode == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["perturbation"]["detector"] == b["perturbation"]["detector"]
    for name in ("phases.jsonl", "metrics.jsonl"):
        strip = [without_timing(tmp_path / run / name) for run in "ab"]
        assert strip[0] == strip[1], name
    assert (tmp_path / "a" / "phases.jsonl").read_text(), "the detector never changed phase"


def test_mnist1d_full_arm_moves_through_the_three_phases(tmp_path):
    """The example spec's thresholds give the seed paper's order on real MNIST-1D."""
    script = GENERATED / "mnist1d_cnn" / "train_full.py"
    result = run_inprocess(script, "--out", tmp_path / "run", "--data-root", tmp_path / "data")
    assert result.returncode == 0, result.stderr
    changes = [json.loads(x) for x in (tmp_path / "run" / "phases.jsonl").read_text().splitlines()]
    phases = [c["to"] for c in changes]
    # it may step back into exploration mid-training, but it leaves exploration first for
    # convergence and ends in fine-tuning, which it never leaves
    assert phases[0] == "convergence" and phases[-1] == "fine_tuning"
    assert phases.count("fine_tuning") == 1
    metrics = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    first, last = metrics[:20], metrics[40:]
    assert sum(m["phase_exploration"] for m in first) > 10  # exploration dominates early
    assert all(m["phase_fine_tuning"] == 1.0 for m in last)
    assert all(
        abs(sum(m[f"phase_{p}"] for p in ("exploration", "convergence", "fine_tuning")) - 1) < 1e-9
        for m in metrics
    )


def test_diff_prints_the_ablation():
    result = cli("diff", GENERATED.parent / "specs" / "mnist1d_cnn.yaml", "fixed", "full")
    assert result.exit_code == 0
    assert result.output.startswith("--- train_fixed.py\n+++ train_full.py\n")
    assert "+class PhaseDetector:" in result.output
    assert "-        return self.eps_fixed" in result.output


def test_perturbation_refuses_parameters_outside_one_buffer(tmp_path):
    ns = namespace(tmp_path, "fixed")
    with pytest.raises(ValueError, match="flatten_parameters"):
        ns["make_perturbation"](torch.nn.Linear(4, 3), 0, torch.device("cpu"), "torch")
