"""Noise kernels: the Triton ones under the interpreter (in a subprocess, since
TRITON_INTERPRET must be set before triton is imported), and the torch path here."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import MINIMAL, check_step_semantics, generate, run_inprocess

from generator.method import eps_fixed, eps_schedule, noise
from generator.scriptload import load_script

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
    ns = load_script(str(folder / "train_fixed.py"), run_name="perturbgen_test")
    model = torch.nn.Linear(n, 1, bias=False)
    p = ns["make_perturbation"](model, 0, torch.device("cpu"), "torch")
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


def test_triton_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert noise.pick_kernel("auto", cpu) == noise.pick_kernel("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="--kernel triton needs the triton package and a CUDA"):
        noise.pick_kernel("triton", cpu)


def test_a_script_refuses_triton_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    folder = generate(tmp_path, MINIMAL)
    result = run_inprocess(
        folder / "train_fixed.py", "--smoke", "--kernel", "triton", "--out", tmp_path / "run"
    )
    assert result.returncode == 2 and "--kernel triton needs" in result.stderr


def test_the_kernel_launches_on_the_parameters_device(monkeypatch):
    """One process with --device cuda:1 never calls set_device: the current device stays 0.
    torch's own device guard runs for a tensor that says it lives on cuda:1 (only the
    driver's device switch is replaced, by a recorder), and the launch must see device 1."""
    pytest.importorskip("triton", reason="the triton package is a test dependency")
    current, launched = [0], []

    def exchange(index):  # torch.cuda's device switch: make `index` current, return the old
        previous = current[0]
        if index >= 0:
            current[0] = index
        return previous

    class Kernel:  # noise_add_kernel[grid](...): records the device current at launch
        def __getitem__(self, grid):
            return lambda flat, *args, **kwargs: launched.append((current[0], flat))

    monkeypatch.setattr(torch.cuda, "_exchange_device", exchange)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", exchange)
    monkeypatch.setattr(noise, "noise_add_kernel", Kernel())
    on_cuda_1 = types.SimpleNamespace(is_cuda=True, get_device=lambda: 1)
    noise.noise_add(on_cuda_1, 10, 0.1, 7)
    assert launched == [(1, on_cuda_1)] and current == [0]  # launched on 1, then restored


def flat_linear(n):
    """A Linear(n, 1) whose parameters are views into one flat buffer, as the scripts'
    flatten_parameters makes them."""
    model = torch.nn.Linear(n, 1)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    for (name, p), v in zip(
        model.named_parameters(), flat.split([p.numel() for p in model.parameters()])
    ):
        setattr(model, name, torch.nn.Parameter(v.view_as(p)))
    return model


def test_two_perturbations_with_different_settings_in_one_process():
    """The method's classes take their settings as arguments: a fixed-eps and a schedule
    Perturbation live side by side, each with its own eps(t), scale and apply_to."""
    cpu = torch.device("cpu")
    a = noise.Perturbation(flat_linear(8), 0, cpu, "torch", eps_fixed.Epsilon(0.5), None, "all")
    schedule = eps_schedule.Epsilon(1.0, 0.5)
    b = noise.Perturbation(flat_linear(8), 0, cpu, "torch", schedule, None, "weights", lr_0=0.1)
    assert a.epsilon(3, 0.05) == 0.5  # absolute: the learning rate plays no part
    assert b.epsilon(2, 0.05) == pytest.approx(math.exp(-1.0) * 0.5)  # lr 0.05 / lr_0 0.1
    assert (a.n_noise, b.n_noise) == (9, 8)  # b leaves the bias alone
    assert a.epsilon(3, 0.05) == 0.5  # a is not changed by b


def test_the_noise_takes_the_eps_decided_after_the_sample(tmp_path):
    check_step_semantics(tmp_path, "torch")
