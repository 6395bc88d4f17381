"""DDP: emitted scripts under torchrun with 2 CPU processes (gloo). Each run has a timeout,
so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    GENERATED,
    MINIMAL,
    evaluate_on_test,
    generate,
    wait_inside_epoch_2,
    without_timing,
)
from robustness import TALLY

TIMEOUT_S = 120


def torchrun(script, *args, cwd):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            *map(str, args),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={
            "OMP_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",  # no bytecode beside generated/'s support module
        },
    )


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


# phase_only and schedule_only run code the full arm holds too (the detector, the decay); the
# peers add their noise elsewhere (the gradient after the all-reduce; xi_(t+1) - xi_t)
@pytest.mark.parametrize("arm", ["baseline", "fixed", "full", "gradient_noise", "anti_pgd"])
def test_replicas_stay_bit_identical(arm, tmp_path):
    run = tmp_path / "run"
    result = torchrun(
        GENERATED / "mnist1d_cnn" / f"train_{arm}.py", "--smoke", "--out", run, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    s = summary(run)
    assert s["status"] == "completed" and len(s["replicas"]) == 2
    assert s["replicas"][0] == s["replicas"][1]  # parameter hash (and phase) of each rank
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    # written once, by rank 0: one line per epoch, one progress line per epoch
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert result.stdout.count("epoch 1/2") == 1


@pytest.fixture(scope="module")
def busy_detector(tmp_path_factory):
    """The full arm on small data with a detector that samples every step."""
    root = tmp_path_factory.mktemp("ddp")
    spec = MINIMAL.replace("train_size: 64", "train_size: 256").replace(
        "[baseline, fixed]", "[full]"
    )
    return (
        generate(
            root,
            spec,
            "data.batch_size=16",
            "train.epochs=3",
            "phase_detector={every: 1, window: 3, patience: 1, "
            "thresholds: {tau1: 0.9, tau2: 0.9, tau3: 0.5, tau4: 0.8}}",
        )
        / "train_full.py"
    )


def test_phase_decisions_are_shared(busy_detector, tmp_path):
    result = torchrun(busy_detector, "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = summary(tmp_path / "run")["replicas"]
    assert a == b and a["step"] == 48
    changes = (tmp_path / "run" / "phases.jsonl").read_text().splitlines()
    assert changes, "the detector never changed phase: the test would prove nothing"
    assert json.loads(changes[-1])["step"] == a["phase_start"]
    # test is split across the ranks and summed; rank 0's best.pt reaches every rank
    s = summary(tmp_path / "run")
    for key, checkpoint in (("test_acc", "last.pt"), ("test_acc_at_best_val", "best.pt")):
        _, acc = evaluate_on_test(busy_detector, tmp_path / "run" / checkpoint, tmp_path)
        assert s[key] == acc, key


def test_resume_under_two_ranks_continues_exactly(busy_detector, tmp_path):
    straight = torchrun(busy_detector, "--out", tmp_path / "a", cwd=tmp_path)
    first = torchrun(busy_detector, "--out", tmp_path / "b", "--max-steps", "20", cwd=tmp_path)
    assert straight.returncode == 0 and first.returncode == 0, first.stderr[-3000:]
    assert summary(tmp_path / "b")["status"] == "stopped"
    second = torchrun(busy_detector, "--out", tmp_path / "b", "--resume", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert summary(tmp_path / "a")["replicas"] == summary(tmp_path / "b")["replicas"]
    for name in ("phases.jsonl", "metrics.jsonl"):
        strip = [without_timing(tmp_path / run / name) for run in "ab"]
        assert strip[0] == strip[1], name


def test_divergence_stops_both_ranks(tmp_path):
    folder = generate(tmp_path, MINIMAL, "optimizer.lr=1.0e+30")
    result = torchrun(
        folder / "train_fixed.py", "--smoke", "--out", tmp_path / "run", cwd=tmp_path
    )
    assert result.returncode != 0
    assert result.stderr.count("error: the training loss is nan in steps 0..") == 2  # both ranks
    assert "exitcode  : 3" in result.stderr
    assert summary(tmp_path / "run")["status"] == "diverged"


def test_a_signal_to_one_rank_stops_both_at_one_step_and_resume_is_exact(tmp_path):
    """SIGTERM reaches rank 1 alone: the flag rides the per-step all-reduce, so both ranks
    stop after the same step with one checkpoint, and a 2-rank resume finishes the run with
    the replicas still bit-identical."""
    spec = MINIMAL.replace("train_size: 64", "train_size: 4000").replace(
        "[baseline, fixed]", "[full]"
    )
    script = generate(tmp_path, spec, "data.batch_size=4", "train.epochs=2") / "train_full.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(script), "--out", str(tmp_path / "run")]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_inside_epoch_2(proc, tmp_path / "run", TIMEOUT_S)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    traceback = 'train_full.py", line' in stderr
    TALLY.record("signals", "one DDP rank signalled, both stopped", traceback=traceback)
    assert "stopped by a signal after" in stdout, stderr[-3000:]  # rank 0, not signalled
    assert "exitcode  : 143" in stderr
    assert 'train_full.py", line' not in stderr  # no traceback from the script (torchrun
    # itself reports a worker's exit 143 as a failure, with its own traceback)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state"]
    assert state["epoch"] == 1 and state["batch"] > 0
    assert summary(tmp_path / "run")["status"] == "stopped"
    resumed = torchrun(script, "--out", tmp_path / "run", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = summary(tmp_path / "run")["replicas"]
    assert a == b and a["step"] == 2000  # (exactness of resume: the single-process tests)


@pytest.fixture(scope="module")
def dropout_full(tmp_path_factory):
    """The full arm of EfficientNet-B0 (dropout 0.2, drop-path 0.2) on small synthetic images."""
    spec = (
        MINIMAL.replace("shape: [8]", "shape: [3, 32, 32]")
        .replace("model: {arch: mlp, hidden: [16]}", "model: {arch: efficientnet_b0}")
        .replace("[baseline, fixed]", "[full]")
    )
    root = tmp_path_factory.mktemp("dropout")
    return generate(root, spec, "data.batch_size=16", "phase_detector.every=1") / "train_full.py"


def test_dropout_differs_by_rank_and_resume_restores_each_ranks_stream(dropout_full, tmp_path):
    """Each rank draws dropout from its own stream while the noise stays shared (the
    replicas stay bit-identical), and each rank's random state rides in the checkpoint: a
    2-rank run stopped after 3 steps and resumed ends bit for bit as the straight run. If
    every rank resumed rank 0's state, rank 1's dropout masks would change and so would the
    all-reduced gradients and the parameters."""
    straight = torchrun(dropout_full, "--out", tmp_path / "a", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = torchrun(dropout_full, "--out", tmp_path / "b", "--max-steps", "3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rng = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    second = torchrun(dropout_full, "--out", tmp_path / "b", "--resume", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = summary(tmp_path / "a"), summary(tmp_path / "b")
    assert a["replicas"][0] == a["replicas"][1] and a["steps"] == 8
    assert a["replicas"] == b["replicas"]
    assert without_timing(tmp_path / "a" / "metrics.jsonl") == without_timing(
        tmp_path / "b" / "metrics.jsonl"
    )
