"""Noise kernels: the Triton ones under the interpreter (in a subprocess, since
TRITON_INTERPRET must be set before triton is imported), and the torch path here."""

from __future__ import annotations

import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MINIMAL, check_step_semantics, generate

HERE = Path(__file__).parent


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton", reason="the triton package is a test dependency")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interpret")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=HERE.parent,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.parametrize("n", [1, 1031, 20000])
def test_torch_path_noise_statistics(n, tmp_path):
    """The torch path under the same checks as the kernels, at n = 20000 draws: mean bound
    5 eps/sqrt(n), std within 5/sqrt(2n), correlations below 5/sqrt(n)."""
    folder = generate(tmp_path, MINIMAL, "perturbation.fixed=0.5")
    ns = runpy.run_path(str(folder / "train_fixed.py"), run_name="perturbgen_test")
    model = torch.nn.Linear(n, 1, bias=False)
    p = ns["Perturbation"](model, 0, torch.device("cpu"), "torch")
    draws = []
    for step in range(2):
        before = model.weight.detach().clone()
        p.apply(step, 0.1)
        draws.append((model.weight.detach() - before).flatten().double())
    a, b = draws
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    if n > 1:
        bound = 5 / math.sqrt(n)
        assert abs(a.mean().item()) < 0.5 * bound
        assert abs(a.std().item() / 0.5 - 1) < 5 / math.sqrt(2 * n)
        assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < bound
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < bound


def test_triton_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    folder = generate(tmp_path, MINIMAL)
    ns = runpy.run_path(str(folder / "train_fixed.py"), run_name="perturbgen_test")
    assert ns["pick_kernel"]("auto", torch.device("cpu")) == "torch"
    assert ns["pick_kernel"]("torch", torch.device("cpu")) == "torch"
    with pytest.raises(SystemExit) as info:
        ns["pick_kernel"]("triton", torch.device("cpu"))
    assert info.value.code == 2


def test_the_noise_takes_the_eps_decided_after_the_sample(tmp_path):
    check_step_semantics(tmp_path, "torch")
