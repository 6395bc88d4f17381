"""The method's modules called directly (no script rendered) against closed forms: the
detector's change records, logs and boundaries, the kernel choice, the torch path's noise
stream and its checkpoint, the detector's samples around the step, the summary measures.
With the method's direct tests in tests/test_detector.py and tests/test_kernels.py, these
are the tests `python benchmarks/mutation.py method` runs mutmut's mutants against
(docs/mutation.md)."""

from __future__ import annotations

import math

import pytest
import torch
from test_kernels import flat_linear

from generator.method import eps_fixed, eps_full, eps_phase, eps_schedule, noise, sampling, summary
from generator.method.detector import CONVERGENCE, EXPLORATION, FINE_TUNING, PhaseDetector
from generator.method.seeds import derived_seed

CPU = torch.device("cpu")
# four distinct thresholds (tau3 < tau1, tau4 < tau2), a loss threshold, a window of 4
SETTINGS = {
    "every": 1,
    "window": 4,
    "threshold_mode": "absolute",
    "tau1": 4.0,
    "tau2": 4.0,
    "tau3": 2.0,
    "tau4": 0.75,
    "tau_smooth": 5.0,
    "patience": 1,
    "monotonic": False,
}
# a window with statistics exact in binary: g = 1, 3, 1, 3 (population variance 1),
# loss 4, 1, 2, 0 (second differences 4 and -3: mean |.| 3.5), d = 0.25, 0.75 (mean 0.5)
WINDOW = [(1.0, 0.25, 4.0), (3.0, 0.75, 1.0), (1.0, 0.25, 2.0), (3.0, 0.75, 0.0)]
EPS_PHASE = (2e-3, 1e-3, 2.5e-4)


def detector(**changes):
    return PhaseDetector(**{**SETTINGS, **changes})


def scripted(d, votes):
    """The detector's tree votes `votes` in turn."""
    votes = iter(votes)
    d.vote = lambda *stats: next(votes)
    return d


# --- the detector ---------------------------------------------------------------------------


def test_a_phase_change_records_the_window_the_vote_and_the_thresholds():
    d = detector()
    changes = [d.observe(step, *sample) for step, sample in enumerate(WINDOW, start=10)]
    assert changes[:3] == [None] * 3
    assert changes[3] == {
        "step": 13,
        "from": "exploration",
        "to": "fine_tuning",  # 1.0 < tau3, 0.5 < tau4, 3.5 < tau_smooth; not above tau1
        "grad_var": 1.0,
        "loss_smooth": 3.5,
        "param_delta": 0.5,
        "compared": {"grad_var": 1.0, "loss_smooth": 3.5, "param_delta": 0.5},
        "thresholds": {
            "mode": "absolute",
            "tau1": 4.0,
            "tau2": 4.0,
            "tau3": 2.0,
            "tau4": 0.75,
            "tau_smooth": 5.0,
        },
    }
    assert (d.phase, d.phase_start) == (FINE_TUNING, 13)


def test_a_fresh_detector_is_in_exploration_since_step_0_with_no_candidate():
    fresh = detector().state_dict()
    assert fresh == {
        "samples": [],
        "reference": None,
        "phase": EXPLORATION,
        "phase_start": 0,
        "candidate": None,
        "votes": 0,
    }
    # the full arm's t_p counts from step 0 until the first change
    assert eps_full.Epsilon(EPS_PHASE, decay=0.5)(4, detector()) == EPS_PHASE[0] * math.exp(-2)


def test_each_strict_comparison_at_its_threshold():
    vote = detector().vote
    assert vote(4.5, 5.5, 4.5) == EXPLORATION
    assert vote(4.5, 5.5, 4.0) == CONVERGENCE  # param_delta at tau2 is not above it
    assert vote(4.5, 5.0, 4.5) == CONVERGENCE  # loss_smooth at tau_smooth is not above it
    assert vote(1.0, 1.0, 0.5) == FINE_TUNING
    assert vote(2.0, 1.0, 0.5) == CONVERGENCE  # grad_var at tau3 is not below it
    assert vote(1.0, 5.0, 0.5) == CONVERGENCE  # loss_smooth at tau_smooth is not below it


def test_a_vote_for_a_third_phase_restarts_the_count():
    C, F = CONVERGENCE, FINE_TUNING
    d = scripted(detector(patience=2), [C, F, C, C])  # votes from step 3, the window full
    assert [d.observe(step, *WINDOW[step % 4]) for step in range(6)] == [None] * 6
    assert (d.candidate, d.votes) == (C, 1)
    change = d.observe(6, *WINDOW[2])
    assert (change["to"], change["step"]) == ("convergence", 6)


def test_a_vote_for_the_current_phase_clears_the_candidate():
    d = scripted(detector(patience=3), [CONVERGENCE, CONVERGENCE, EXPLORATION])
    for step in range(5):
        d.observe(step, *WINDOW[step % 4])
    assert (d.candidate, d.votes) == (CONVERGENCE, 2)
    d.observe(5, *WINDOW[1])
    assert (d.phase, d.candidate, d.votes) == (EXPLORATION, None, 0)


def test_scalars_log_the_phase_the_latest_sample_and_a_full_windows_statistics():
    d = detector()
    assert d.scalars() == {"train/phase": EXPLORATION}
    for step, sample in enumerate(WINDOW[:3]):
        d.observe(step, *sample)
    assert d.scalars() == {
        "train/phase": EXPLORATION,
        "detector/grad_norm": 1.0,  # the third sample's, not the second's
        "detector/update_norm": 0.25,
    }
    d.observe(3, *WINDOW[3])
    assert d.scalars() == {
        "train/phase": FINE_TUNING,
        "detector/grad_norm": 3.0,
        "detector/update_norm": 0.75,
        "detector/grad_var": 1.0,
        "detector/loss_smooth": 3.5,
        "detector/param_delta": 0.5,
    }


# --- the kernel choice ----------------------------------------------------------------------


def test_pick_kernel_uses_triton_where_it_can_run(monkeypatch):
    pytest.importorskip("triton", reason="the triton package is a test dependency")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert [noise.pick_kernel(k, cuda) for k in ("auto", "triton", "torch")] == [
        "triton",
        "triton",
        "torch",
    ]
    with pytest.raises(ValueError) as refused:
        noise.pick_kernel("triton", CPU)
    assert str(refused.value) == (
        "--kernel triton needs the triton package and a CUDA device (triton present, device cpu)"
    )
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert noise.pick_kernel("auto", CPU) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's CPU interpreter, for tests
    assert [noise.pick_kernel(k, CPU) for k in ("auto", "triton", "torch")] == [
        "triton",
        "triton",
        "torch",
    ]


def test_pick_kernel_without_the_triton_package(monkeypatch):
    monkeypatch.setattr(noise, "triton", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cuda = torch.device("cuda")
    assert noise.pick_kernel("auto", cuda) == noise.pick_kernel("auto", CPU) == "torch"
    with pytest.raises(ValueError) as refused:
        noise.pick_kernel("triton", cuda)
    assert str(refused.value).endswith("(triton missing, device cuda)")


# --- the torch path -------------------------------------------------------------------------


def draws(seed, sizes):
    """xi of one step of the torch path: slice i from a fresh generator of stream
    ("noise", i), as the Perturbation's docstring promises."""
    return torch.cat(
        [
            torch.empty(n).normal_(
                generator=torch.Generator().manual_seed(derived_seed(seed, "noise", i))
            )
            for i, n in enumerate(sizes)
        ]
    )


def fixed(model, apply_to="all"):
    """The fixed arm's Perturbation at eps 0.5, run seed 3, on the torch path."""
    return noise.Perturbation(model, 3, CPU, "torch", eps_fixed.Epsilon(0.5), None, apply_to)


def test_add_noise_adds_eps_times_the_slices_draw():
    generator = torch.Generator().manual_seed(7)
    target = torch.ones(5)
    noise.add_noise((generator, torch.empty(5), target), 0.5)
    xi = torch.empty(5).normal_(generator=torch.Generator().manual_seed(7))
    assert torch.equal(target, torch.ones(5).add_(xi, alpha=0.5))


@pytest.mark.parametrize("apply_to, sizes", [("all", (5, 5)), ("weights", (5, 4))])
def test_the_torch_path_adds_eps_times_its_own_streams(apply_to, sizes):
    """Linear(9, 1): 9 weights and a bias, one flat buffer; xi in NOISE_STREAMS slices."""
    model = flat_linear(9)
    p = fixed(model, apply_to=apply_to)
    flat = torch.cat([q.detach().flatten() for q in model.parameters()])
    assert torch.equal(p.flat, flat) and p.flat.data_ptr() == model.weight.data_ptr()
    assert [g.initial_seed() for g in p.generators] == [
        derived_seed(3, "noise", i) for i in (0, 1)
    ]
    before = p.flat.clone()
    assert p.apply(0, 0.1) == 0.5
    expected = before.clone()
    expected[: sum(sizes)].add_(draws(3, sizes), alpha=0.5)
    assert torch.equal(p.flat, expected)


def test_a_model_of_one_parameter_tensor():
    model = torch.nn.Linear(6, 1, bias=False)
    p = fixed(model)  # one tensor is one buffer already
    assert p.n_noise == 6 and torch.equal(p.flat, model.weight.detach().flatten())


def test_parameters_outside_one_buffer_are_refused():
    with pytest.raises(ValueError) as refused:
        fixed(torch.nn.Linear(4, 3))
    assert str(refused.value) == "Perturbation needs flatten_parameters(model) first"


def test_threads_from_a_million_values_on_the_cpu_draw_the_same_stream():
    n = 2**20
    small = fixed(torch.nn.Linear(n - 1, 1, bias=False))
    big, unthreaded = (fixed(torch.nn.Linear(n, 1, bias=False)) for _ in range(2))
    assert small.pool is None and big.pool is not None
    unthreaded.flat.copy_(big.flat)
    unthreaded.pool = None
    big.apply(0, 0.1)
    unthreaded.apply(0, 0.1)
    assert torch.equal(big.flat, unthreaded.flat)


def test_the_triton_path_keys_philox_with_the_noise_seed_and_the_step():
    """key = (noise seed + 1) << 32 | step: the step in the low 32 bits, the noise seed's low
    31 bits above it, so the key fits an int64 and is never 0 for the seed part."""
    model = flat_linear(4)
    p = noise.Perturbation(model, 3, CPU, "triton", eps_fixed.Epsilon(0.5), None, "all")
    assert p.generators == [] and p.key_base % 2**32 == 0
    assert p.key_base >> 32 == (derived_seed(3, "noise") & 0x7FFFFFFF) + 1
    assert p.state_dict() == {"kernel": "triton", "generators": []}


def test_eps_reads_the_detector_and_follows_the_learning_rate():
    d = detector()
    d.phase = FINE_TUNING
    p = noise.Perturbation(flat_linear(4), 0, CPU, "torch", eps_phase.Epsilon(EPS_PHASE), d, "all")
    assert p.epsilon(10, 0.1) == EPS_PHASE[FINE_TUNING]
    p.lr_0 = 0.2
    assert p.epsilon(10, 0.1) == EPS_PHASE[FINE_TUNING] * 0.1 / 0.2


def test_a_skipped_step_adds_no_noise_and_a_real_one_does():
    p = fixed(flat_linear(9))
    before = p.flat.clone()
    assert p.step(lambda: False, 0, 0.1) == (None, None)
    assert torch.equal(p.flat, before)
    assert p.step(lambda: None, 0, 0.1) == (0.5, None)
    assert torch.equal(p.flat, before + 0.5 * draws(3, (5, 5)))


def test_a_checkpoint_restores_the_noise_stream():
    a = fixed(flat_linear(9))
    a.apply(0, 0.1)
    state = a.state_dict()
    assert set(state) == {"kernel", "generators"}
    b = fixed(flat_linear(9))
    b.flat.copy_(a.flat)
    b.load_state_dict(state)
    a.apply(1, 0.1)
    b.apply(1, 0.1)
    assert torch.equal(a.flat, b.flat)
    with pytest.raises(ValueError) as refused:
        b.load_state_dict({**state, "kernel": "triton"})
    assert str(refused.value) == "the checkpoint was made with --kernel triton; resume with it"
    with pytest.raises(ValueError):  # a state of another number of streams
        b.load_state_dict({**state, "generators": state["generators"][:1]})


def test_a_parameter_moved_out_of_the_buffer_is_caught_every_storage_check_steps():
    """Without a detector the storage is checked on every STORAGE_CHECK_EVERY-th step (0
    included) and on no other, with a message that says what to do."""
    model = flat_linear(9)
    p = fixed(model)
    model.weight.data = model.weight.data.clone()  # what model.half() does to the storage
    every = noise.STORAGE_CHECK_EVERY
    for step in (1, every - 1, every + 1):
        assert p.step(lambda: None, step, 0.1) == (0.5, None), step
    for step in (0, every, 3 * every):
        with pytest.raises(noise.StorageReplaced) as caught:
            p.step(lambda: None, step, 0.1)
        assert str(caught.value) == (
            "the parameters no longer lie in the flat buffer that the noise acts on: "
            "convert the model (dtype, memory format) before flatten_parameters, not after"
        )


# --- the detector's samples around the step ---------------------------------------------------


def sampled(d, rank=0, world=1, lr_0=None):
    """SampledPerturbation of the full arm over Linear(15, 1): 16 values in one buffer."""
    model = flat_linear(15)
    policy = eps_full.Epsilon(EPS_PHASE, decay=0.0)
    args = (model, 3, CPU, "torch", policy, d, "all", lr_0)
    ranks = {} if (rank, world) == (0, 1) else {"rank": rank, "world": world}  # the defaults
    return model, sampling.SampledPerturbation(*args, **ranks)


def test_a_sample_is_the_gradient_norm_the_update_norm_and_the_loss():
    d = detector()
    model, p = sampled(d)  # rank 0 of 1 by default
    model.weight.grad = torch.zeros_like(model.weight)  # the bias has no gradient
    model.weight.grad[0, :4] = 1.0  # norm 2
    grad_norm, snapshot = p.before_step()
    assert grad_norm.item() == 2.0 and torch.equal(snapshot, p.flat)
    p.flat.sub_(0.25)  # the optimizer's update: 16 values of 0.25, norm 1
    assert p.observe(0, (grad_norm, snapshot), torch.tensor(2.5)) is None
    assert d.samples == [[2.0, 1.0, 2.5]]
    # clipping's measured norm, when given, is the sample's gradient norm
    assert p.before_step(torch.tensor(7.0))[0].item() == 7.0


def test_only_rank_0_samples_and_decides():
    d = detector()
    model, p = sampled(d, rank=1)
    model.weight.grad = torch.ones_like(model.weight)
    assert p.before_step() is None
    assert p.observe(0, None, 1.0) is None and d.samples == []


def test_other_ranks_take_the_phase_rank_0_broadcasts(monkeypatch):
    sent = []

    def broadcast(tensor, src):
        sent.append((tensor.tolist(), src))
        tensor.fill_(FINE_TUNING)  # what rank 0 decided

    monkeypatch.setattr(sampling.dist, "broadcast", broadcast)
    d = detector()
    _, p = sampled(d, rank=1, world=2)
    assert p.decide(7, None, None, None) is None
    assert sent == [([EXPLORATION], 0)] and (d.phase, d.phase_start) == (FINE_TUNING, 7)
    p.decide(9, None, None, None)  # the same phase again: t_p keeps counting from step 7
    assert (d.phase, d.phase_start) == (FINE_TUNING, 7)


def test_under_ddp_the_loss_sampled_is_the_mean_of_the_ranks(monkeypatch):
    """Two ranks with losses 1 and 3: the detector samples 2, and the caller's tensor stays 1."""
    monkeypatch.setattr(sampling.dist, "all_reduce", lambda t: t.add_(3.0))  # the other rank's
    monkeypatch.setattr(sampling.dist, "broadcast", lambda t, src: None)
    d = detector()
    _, p = sampled(d, rank=0, world=2)
    loss = torch.tensor(1.0)
    assert p.observe(0, (torch.tensor(2.0), p.flat.clone()), loss) is None
    assert d.samples == [[2.0, 0.0, 2.0]] and loss.item() == 1.0


def test_the_step_samples_every_n_steps_and_noises_with_the_eps_decided_after():
    d = detector(every=2, window=3, tau3=100.0, tau4=100.0, tau_smooth=None)
    model, p = sampled(d)
    results = []
    for step in range(7):
        model.weight.grad = torch.ones_like(model.weight)
        results.append(p.step(lambda: None, step, 0.1, torch.tensor(1.0)))
    assert len(d.samples) == 3  # steps 0, 2, 4
    eps = [r[0] for r in results]
    assert eps == [EPS_PHASE[EXPLORATION]] * 4 + [EPS_PHASE[FINE_TUNING]] * 3
    assert [r[1]["to"] if r[1] else None for r in results] == [None] * 4 + ["fine_tuning"] + [
        None
    ] * 2
    before = p.flat.clone()
    assert p.step(lambda: False, 8, 0.1, torch.tensor(1.0)) == (None, None)
    assert len(d.samples) == 3 and torch.equal(p.flat, before)  # a skipped step: no sample


def test_the_step_samples_clippings_norm_and_scales_eps_with_the_learning_rate():
    """Only sample steps look at the gradients (no host sync in between); a gradient norm
    handed in is what the detector samples; eps follows lr_t / lr_0."""
    d = detector(every=2)
    _, p = sampled(d, lr_0=0.1)
    looked, before_step = [], p.before_step

    def counted(grad_norm):
        looked.append(grad_norm)
        return before_step(grad_norm)

    p.before_step = counted
    for step in range(5):
        eps, _ = p.step(lambda: None, step, 0.05, torch.tensor(1.0), torch.tensor(3.0))
        assert eps == EPS_PHASE[EXPLORATION] * 0.05 / 0.1
    assert len(looked) == 3 and [s[0] for s in d.samples] == [3.0] * 3  # steps 0, 2, 4


def test_the_step_takes_eps_at_its_step_and_learning_rate():
    policy = eps_schedule.Epsilon(1.0, 0.5)
    p = noise.Perturbation(flat_linear(9), 3, CPU, "torch", policy, None, "all", lr_0=0.1)
    assert p.step(lambda: None, 2, 0.05) == (math.exp(-1) * 0.05 / 0.1, None)


def test_a_checkpoint_holds_the_detector():
    d = detector()
    _, a = sampled(d)
    for step, sample in enumerate(WINDOW):
        d.observe(step, *sample)
    e = detector()
    _, b = sampled(e)
    b.load_state_dict(a.state_dict())
    assert e.state_dict() == d.state_dict() and e.phase == FINE_TUNING


# --- the summary measures -------------------------------------------------------------------


def test_time_to_target_is_the_first_epoch_at_or_above_it():
    history = [{"val_acc": 0.5}, {"val_acc": 0.9}, {"val_acc": 0.95}]
    assert summary.first_at_target(history, 0.9) is history[1]
    assert summary.first_at_target(history, 0.99) is None


def test_cv_is_the_sample_std_over_a_positive_mean():
    assert summary.cv_pct([1.0, 3.0]) == pytest.approx(100 * math.sqrt(2) / 2)
    assert summary.cv_pct([2.0, 3.0, 4.0]) == pytest.approx(100 / 3)
    assert summary.cv_pct([0.5, 1.0]) == pytest.approx(100 * math.sqrt(0.125) / 0.75)
    for losses in ([1.0], [1.0, None], [1.0, math.nan], [1.0, math.inf], [0.0, 0.0], [-1.0, -2.0]):
        assert summary.cv_pct(losses) is None, losses
