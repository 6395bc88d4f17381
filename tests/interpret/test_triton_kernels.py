"""The emitted Triton kernels, run on the CPU by Triton's interpreter.

Collected only with TRITON_INTERPRET=1 set before triton is imported; tests/test_kernels.py
runs this folder in a subprocess that way, inside the README's test command.
"""

from __future__ import annotations

import json
import math
import os
import runpy

import pytest
import torch
from conftest import MINIMAL, generate, run_inprocess

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels.py"

SIZES = [1, 1031, 5000]  # one element, a prime, not a multiple of the 1024 block


@pytest.fixture(scope="module")
def ns(tmp_path_factory):
    folder = generate(tmp_path_factory.mktemp("k"), MINIMAL, "perturbation.kernel=triton")
    namespace = runpy.run_path(str(folder / "train_fixed.py"), run_name="perturbgen_test")
    assert namespace["triton"] is not None
    return namespace


def key(seed, step):
    return ((seed + 1) << 32) | step


def noise(ns, n, eps, k):
    p = torch.zeros(n)
    grid = (ns["triton"].cdiv(n, ns["BLOCK"]),)
    ns["noise_add_kernel"][grid](p, n, eps, k, BLOCK=ns["BLOCK"])
    return p


OPTIONS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=1e-2),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=5e-4),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=5e-4),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("n", SIZES)
def test_sgd_kernel_at_eps_zero_is_torch_sgd(ns, opts, n):
    """10 steps against torch.optim.SGD. Both compute in fp32 with the same formulas; they
    may round differently (operation order, fused multiply-add), by about one ulp of |p| ~ 1
    (1.2e-7) per operation and step: 10 steps of a few operations stay below 1e-5."""
    torch.manual_seed(n)
    p_ref = torch.randn(n, requires_grad=True)
    sgd = torch.optim.SGD([p_ref], lr=0.05, **opts)
    p, m, stats = p_ref.detach().clone(), torch.zeros(n), torch.zeros(2)
    grid = (ns["triton"].cdiv(n, ns["BLOCK"]),)
    for step in range(10):
        g = torch.randn(n)
        p_ref.grad = g.clone()
        sgd.step()
        stats.zero_()
        ns["sgd_noise_kernel"][grid](
            p,
            g,
            m,
            stats,
            n,
            n,
            0.05,
            opts["momentum"],
            opts["dampening"],
            opts["weight_decay"],
            0.0,
            key(0, step),
            int(step == 0),
            NESTEROV=opts["nesterov"],
            MOMENTUM=opts["momentum"] != 0,
            STATS=True,
            BLOCK=ns["BLOCK"],
        )
        assert torch.allclose(p, p_ref.detach(), rtol=0, atol=1e-5), step


@pytest.mark.parametrize("n", SIZES)
def test_in_kernel_statistics_are_the_torch_norms(ns, n):
    torch.manual_seed(1)
    p, g, m = torch.randn(n), torch.randn(n), torch.randn(n)
    stats = torch.zeros(2)
    p_ref, m_ref = p.clone(), m.clone()
    grid = (ns["triton"].cdiv(n, ns["BLOCK"]),)
    ns["sgd_noise_kernel"][grid](
        p,
        g,
        m,
        stats,
        n,
        n,
        0.1,
        0.9,
        0.0,
        1e-3,
        0.0,
        key(0, 3),
        0,
        NESTEROV=False,
        MOMENTUM=True,
        STATS=True,
        BLOCK=ns["BLOCK"],
    )
    g2, d2 = ns["sgd_noise_reference"](p_ref, g, m_ref, 0.1, 0.9, 0.0, 1e-3, False, False)
    # fp32 sums of n terms in another order: relative error below n * 2^-24 < 1e-3
    assert stats[0].item() == pytest.approx(g2.item(), rel=1e-3)
    assert stats[1].item() == pytest.approx(d2.item(), rel=1e-3)
    assert torch.allclose(p, p_ref, rtol=0, atol=1e-6)


def test_noise_statistics(ns):
    """n = 5000 draws at eps = 0.5: mean s.e. eps/sqrt(n) = 0.0071 (bound 5 s.e.); the
    relative s.e. of the sample std is 1/sqrt(2n) = 1 % (bound 5 %); correlations of
    neighbours and of two steps have s.e. 1/sqrt(n) = 0.014 (bound 0.07, 5 s.e.)."""
    n, eps = 5000, 0.5
    a = noise(ns, n, eps, key(7, 0)).double()
    b = noise(ns, n, eps, key(7, 1)).double()
    assert abs(a.mean().item()) < 5 * eps / math.sqrt(n)
    assert abs(a.std().item() / eps - 1) < 0.05
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < 0.07
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.07


@pytest.mark.parametrize("n", SIZES)
def test_noise_is_a_function_of_seed_and_step(ns, n):
    a = noise(ns, n, 1.0, key(3, 10))
    assert torch.equal(a, noise(ns, n, 1.0, key(3, 10)))  # same (seed, step): same noise
    assert not torch.equal(a, noise(ns, n, 1.0, key(3, 11)))  # another step
    assert not torch.equal(a, noise(ns, n, 1.0, key(4, 10)))  # another seed
    assert torch.isfinite(a).all()


def test_fused_noise_is_the_noise_add_stream(ns):
    n = 1031
    p, g, m = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    grid = (ns["triton"].cdiv(n, ns["BLOCK"]),)
    ns["sgd_noise_kernel"][grid](
        p,
        g,
        m,
        torch.zeros(2),
        n,
        1000,
        0.1,
        0.0,
        0.0,
        0.0,
        0.25,
        key(5, 2),
        1,
        NESTEROV=False,
        MOMENTUM=False,
        STATS=False,
        BLOCK=ns["BLOCK"],
    )
    expected = noise(ns, 1000, 0.25, key(5, 2))
    assert torch.equal(p[:1000], expected) and torch.equal(p[1000:], torch.zeros(31))


@pytest.mark.parametrize("arm", ["fixed", "full"])
def test_resume_continues_the_same_stream(arm, tmp_path):
    text = MINIMAL.replace("[baseline, fixed]", "[fixed, full]")
    folder = generate(
        tmp_path,
        text,
        "perturbation.kernel=triton",
        "phase_detector.every=1",
        "phase_detector.window=3",
    )
    script = folder / f"train_{arm}.py"
    assert run_inprocess(script, "--smoke", "--out", tmp_path / "a").returncode == 0
    assert (
        run_inprocess(script, "--smoke", "--out", tmp_path / "b", "--max-steps", "3").returncode
        == 0
    )
    assert run_inprocess(script, "--smoke", "--out", tmp_path / "b", "--resume").returncode == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["kernel"] == "triton"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["perturbation"]["momentum_buffer"], b["perturbation"]["momentum_buffer"])
