"""The method's peers as arms: annealed gradient noise (Neelakantan et al. 2015) and
anticorrelated perturbation (Orvieto et al. 2022). Their classes are tested directly as the
Python they are (generator/method/) against closed forms, then as emitted scripts: no noise
is the baseline bit for bit. Exact resume mid-epoch: tests/test_scripts.py; DDP identity:
tests/test_ddp.py; the export: tests/test_export.py; the arm diff: tests/test_static.py."""

from __future__ import annotations

import pytest
import torch
from conftest import MINIMAL, generate, run_inprocess
from test_method_mutants import draws

from generator.method import eps_anti_pgd, eps_gradient_noise
from generator.method.anti_pgd import AntiPGD
from generator.method.gradient_noise import GradientNoise

# Sample statistics below are over N coordinates, each an independent draw; a tolerance of
# about 5 standard errors keeps a correct implementation from failing by chance (two-sided
# p < 1e-6) while a wrong rule (another gamma, a missing or doubled xi) misses by far more.
N = 100_000


def flat_model(n):
    """A model whose one parameter is its whole flat buffer (what flatten_parameters makes)."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(n))
    return model


def build(cls, policy, n=N, seed=0):
    model = flat_model(n)
    return model, cls(model, seed, torch.device("cpu"), "torch", policy, None, "all")


def test_gradient_noise_variance_follows_the_annealing_schedule():
    """Var(noise at step t) = eta / (1 + t)^gamma. Relative SE of a sample variance over N
    normals: sqrt(2 / N) = 0.0045; tolerance 2.5 % (5.6 SE). At t = 4 the schedule is 0.41x
    its start, so a constant std, or gamma off by 0.1 (0.85x or 1.17x there), fails."""
    eta, gamma = 0.3, 0.55
    model, p = build(GradientNoise, eps_gradient_noise.Epsilon(eta, gamma))
    for t in range(5):
        model.w.grad = torch.zeros(N)
        eps, change = p.step(lambda: None, t, lr=0.1)
        assert change is None and eps == pytest.approx((eta / (1 + t) ** gamma) ** 0.5)
        var = model.w.grad.var().item()
        assert var == pytest.approx(eta / (1 + t) ** gamma, rel=0.025), t
        assert torch.count_nonzero(model.w.detach()) == 0  # the parameters get none of it


def test_a_skipped_step_takes_its_gradient_noise_back():
    """A step the grad scaler skips is no step: the generators are where they were, and the
    next real step draws what a run without the skipped step draws."""
    policy = eps_gradient_noise.Epsilon(0.01, 0.55)
    model, p = build(GradientNoise, policy, n=1000)
    before = [g.get_state() for g in p.generators]
    model.w.grad = torch.zeros(1000)
    assert p.step(lambda: False, 0, 0.1) == (None, None)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(p.generators, before))
    model.w.grad = torch.zeros(1000)
    p.step(lambda: None, 0, 0.1)
    twin_model, twin = build(GradientNoise, policy, n=1000)
    twin_model.w.grad = torch.zeros(1000)
    twin.step(lambda: None, 0, 0.1)
    assert torch.equal(model.w.grad, twin_model.w.grad)


def test_gradient_noise_goes_to_the_chosen_parameters_in_the_flat_layout():
    """apply_to 'weights': the noise buffer's first slice is the weight's gradient (the flat
    layout puts tensors with ndim >= 2 first), the bias gets none."""
    model = torch.nn.Linear(50, 40)
    flat = torch.zeros(50 * 40 + 40)
    model.weight.data = flat[:2000].view(40, 50)
    model.bias.data = flat[2000:]
    p = GradientNoise(
        model,
        0,
        torch.device("cpu"),
        "torch",
        eps_gradient_noise.Epsilon(1.0, 0.0),
        None,
        "weights",
    )
    model.weight.grad, model.bias.grad = torch.zeros(40, 50), torch.zeros(40)
    p.step(lambda: None, 0, 0.1)
    assert torch.equal(model.weight.grad.reshape(-1), p.flat)
    assert torch.count_nonzero(model.bias.grad) == 0
    assert model.weight.grad.std().item() == pytest.approx(1.0, rel=0.1)  # 2000 values


def test_gradient_noise_follows_the_learning_rate_under_scale_lr():
    """scale lr: eps = eps(t) * lr_t / lr_0, and the gradient receives eps times the draws of
    the noise streams (two slices of 5, as every arm draws them)."""
    policy = eps_gradient_noise.Epsilon(0.25, 0.5)
    model = flat_model(10)
    p = GradientNoise(model, 3, torch.device("cpu"), "torch", policy, None, "all", lr_0=0.2)
    model.w.grad = torch.zeros(10)
    eps, change = p.step(lambda: None, 3, lr=0.05)
    assert change is None and eps == pytest.approx((0.25 / 4**0.5) ** 0.5 * 0.05 / 0.2)
    assert torch.allclose(model.w.grad, eps * draws(3, (5, 5)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("apply_to", ["all", "weights"])
def test_gradient_noise_pairs_follow_the_flat_layout_not_the_models_order(apply_to):
    """A vector registered before a matrix: the flat layout puts the matrix first, so the
    matrix's gradient receives the buffer's first 20 values, the vector the next 3 (or none)."""
    flat = torch.zeros(20 + 3)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(flat[20:])
    model.w = torch.nn.Parameter(flat[:20].view(4, 5))
    policy = eps_gradient_noise.Epsilon(1.0, 0.0)
    p = GradientNoise(model, 0, torch.device("cpu"), "torch", policy, None, apply_to)
    model.a.grad, model.w.grad = torch.zeros(3), torch.zeros(4, 5)
    p.step(lambda: None, 0, 0.1)
    assert torch.equal(model.w.grad.reshape(-1), p.flat[:20])
    assert torch.equal(model.a.grad, p.flat[20:] if apply_to == "all" else torch.zeros(3))
    assert torch.count_nonzero(p.flat) == p.n_noise


def test_anti_pgd_perturbations_are_anticorrelated_and_do_not_accumulate():
    """theta receives d_t = xi_(t+1) - xi_t: Var(d_t) = 2 sigma^2 (t >= 1), Cov(d_t, d_(t+1))
    = -sigma^2, Cov(d_t, d_(t+2)) = 0, and after T steps theta - theta_0 = xi_T, of variance
    sigma^2, not T sigma^2. Per-coordinate products over N: SE of a lag-1 estimate
    sqrt(5 / N) sigma^2 = 0.007 sigma^2, of a lag-2 one sqrt(4 / N) sigma^2 = 0.0063 sigma^2;
    tolerance 0.04 sigma^2 (over 5.6 SE)."""
    sigma, steps = 0.5, 6
    model, p = build(AntiPGD, eps_anti_pgd.Epsilon(sigma))
    thetas = [model.w.detach().clone()]
    for t in range(steps):
        assert p.step(lambda: None, t, lr=0.1) == (sigma, None)
        thetas.append(model.w.detach().clone())
    d = [(b - a) / sigma for a, b in zip(thetas, thetas[1:])]
    assert (d[0] ** 2).mean().item() == pytest.approx(1.0, abs=0.04)  # xi_0 = 0: d_0 = xi_1
    for t in range(1, steps):
        assert (d[t] ** 2).mean().item() == pytest.approx(2.0, abs=0.06), t
    for t in range(steps - 1):
        assert (d[t] * d[t + 1]).mean().item() == pytest.approx(-1.0, abs=0.04), t
    for t in range(steps - 2):
        assert (d[t] * d[t + 2]).mean().item() == pytest.approx(0.0, abs=0.04), t
    drift = (thetas[-1] - thetas[0]) / sigma
    assert (drift**2).mean().item() == pytest.approx(1.0, abs=0.04)
    assert torch.allclose(thetas[-1] - thetas[0], p.flat, atol=1e-6)  # theta - theta_0 = xi_T


def test_anti_pgd_state_holds_xi_and_resumes_exactly():
    policy = eps_anti_pgd.Epsilon(0.1)
    model, p = build(AntiPGD, policy, n=1000)
    for t in range(3):
        p.step(lambda: None, t, 0.1)
    state = p.state_dict()
    twin_model, twin = build(AntiPGD, policy, n=1000)
    twin_model.w.data.copy_(model.w.detach())
    twin.load_state_dict(state)
    for t in range(3, 6):
        p.step(lambda: None, t, 0.1)
        twin.step(lambda: None, t, 0.1)
    assert torch.equal(model.w.detach(), twin_model.w.detach())


# -- the emitted scripts ------------------------------------------------------------------

PEERS_SPEC = MINIMAL.replace("[baseline, fixed]", "[baseline, gradient_noise, anti_pgd]")


def params(run):
    return torch.load(run / "last.pt", weights_only=True)["model"]


def test_no_noise_is_the_baseline_bit_for_bit(tmp_path):
    """eta = 0 and sigma = 0: the peers train what the baseline trains, bit for bit."""
    folder = generate(
        tmp_path, PEERS_SPEC, "perturbation.gradient_noise.eta=0", "perturbation.anti_pgd.sigma=0"
    )
    runs = {}
    for arm in ("baseline", "gradient_noise", "anti_pgd"):
        runs[arm] = tmp_path / arm
        result = run_inprocess(folder / f"train_{arm}.py", "--smoke", "--out", runs[arm])
        assert result.returncode == 0, result.stderr
    base = params(runs["baseline"])
    for arm in ("gradient_noise", "anti_pgd"):
        mine = params(runs[arm])
        assert all(torch.equal(base[k], mine[k]) for k in base), arm
