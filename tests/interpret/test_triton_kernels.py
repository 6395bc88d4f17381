"""The emitted Triton kernels, run on the CPU by Triton's interpreter.

Collected only with TRITON_INTERPRET=1 set before triton is imported; tests/test_kernels.py
runs this folder in a subprocess that way, inside the README's test command.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import MINIMAL, check_step_semantics, generate, run_inprocess

from generator.method import noise as method
from generator.scriptload import load_script

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels.py"

SIZES = [1, 1031, 5000]  # one element, a prime, not a multiple of the 1024 block


@pytest.fixture(scope="module")
def ns(tmp_path_factory):
    folder = generate(tmp_path_factory.mktemp("k"), MINIMAL, "perturbation.kernel=triton")
    namespace = load_script(str(folder / "train_fixed.py"), run_name="perturbgen_test")
    assert namespace["kernel_for"].__globals__["triton"] is not None  # the support module's
    return namespace


def key(seed, step):
    return ((seed + 1) << 32) | step


def noise(ns, n, eps, k):
    """The kernel itself, imported from the method's one source (the scripts emit it)."""
    p = torch.zeros(n)
    method.noise_add(p, n, eps, k)
    return p


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


def test_the_noise_takes_the_eps_decided_after_the_sample(tmp_path):
    check_step_semantics(tmp_path, "triton")


@pytest.mark.parametrize("arm", ["fixed", "full", "gradient_noise", "anti_pgd"])
def test_resume_continues_the_same_stream(arm, tmp_path):
    text = MINIMAL.replace("[baseline, fixed]", "[fixed, full, gradient_noise, anti_pgd]")
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
    assert a["optimizer"]["state"] and all(
        torch.equal(a["optimizer"]["state"][i]["momentum_buffer"], m["momentum_buffer"])
        for i, m in b["optimizer"]["state"].items()
    )
