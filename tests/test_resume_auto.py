"""`--resume auto`, what both launchers pass: start fresh where there is no last.pt, continue
exactly where there is one (here after SIGUSR1, Slurm's warning before a time limit), and
refuse one made with other settings; and the GPU assignment of the local launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import (
    MINIMAL,
    cli,
    generate,
    run_inprocess,
    run_script,
    wait_inside_epoch_2,
    without_timing,
)

from generator.ablate import Job, free_slot, gpu_slots, thread_env, visible_gpus

ONE = thread_env(1)


def model_of(run):
    return torch.load(run / "last.pt", weights_only=True)["model"]


def metrics_of(run):
    return without_timing(run / "metrics.jsonl")


def test_sigusr1_checkpoints_and_resume_auto_continues_exactly(tmp_path):
    spec = MINIMAL.replace("train_size: 64", "train_size: 12000")
    script = generate(tmp_path, spec, "data.batch_size=4", "train.epochs=3") / "train_fixed.py"
    run = tmp_path / "run"
    proc = subprocess.Popen(  # no last.pt yet: --resume auto starts fresh
        [sys.executable, script, "--out", run, "--resume", "auto"],
        env={**os.environ, **ONE},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_inside_epoch_2(proc, run)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 138 and "Traceback" not in stderr, stderr
    assert "stopped by a signal after" in stdout
    state = torch.load(run / "last.pt", weights_only=True)["state"]
    assert state["epoch"] == 1 and state["batch"] > 0  # saved mid-epoch 2
    # processes of one thread each: tiny steps on threads of a busy machine crawl in-process
    resumed = run_script(script, "--out", run, "--resume", "auto", cwd=tmp_path, env=ONE)
    assert resumed.returncode == 0, resumed.stderr
    straight = run_script(script, "--out", "straight", "--resume", "auto", cwd=tmp_path, env=ONE)
    assert straight.returncode == 0, straight.stderr
    a, b = model_of(run), model_of(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_of(run) == metrics_of(tmp_path / "straight") and len(metrics_of(run)) == 3


def test_resume_auto_refuses_a_checkpoint_of_other_settings(tmp_path):
    script = generate(tmp_path) / "train_fixed.py"
    run = tmp_path / "run"
    assert run_inprocess(script, "--out", run, "--max-steps", "1").returncode == 0
    before = (run / "last.pt").read_bytes()
    other = run_inprocess(script, "--out", run, "--resume", "auto", "--epochs", "5")
    assert other.returncode == 2, other.stderr
    assert other.stderr.strip().splitlines() == [
        f"error: {run / 'last.pt'} was made with other settings (epochs: 2 -> 5); resume with "
        "the same ones"
    ]
    assert (run / "last.pt").read_bytes() == before  # nothing lost


def test_resume_takes_auto_or_nothing(tmp_path):
    script = generate(tmp_path) / "train_baseline.py"
    result = run_inprocess(script, "--out", tmp_path / "r", "--resume", "later")
    assert result.returncode == 2
    assert "argument --resume: must be auto, or nothing (got 'later')" in result.stderr


# --- GPU assignment of the local launcher --------------------------------------------------


@pytest.mark.parametrize(
    "gpus, per_run, slots",
    [
        (["0", "1", "2", "3"], 1, ["0", "1", "2", "3"]),
        (["0", "1", "2", "3", "4", "5", "6", "7"], 2, ["0,1", "2,3", "4,5", "6,7"]),
        (["0", "1", "2"], 2, ["0,1"]),  # the third GPU cannot hold a run of two: idle
        (["1"], 2, []),  # too few for one run: no slots, runs see what ablate sees
        ([], 1, []),  # a CPU-only machine: nothing changes
    ],
)
def test_gpu_slots(gpus, per_run, slots):
    assert gpu_slots(gpus, per_run) == slots


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}, count=8) == ["3", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, count=8) == []
    assert visible_gpus({}, count=2) == ["0", "1"]
    assert visible_gpus({}, count=0) == []


def test_ablate_runs_one_run_per_visible_gpu_unless_told_jobs(tmp_path, monkeypatch):
    """With GPUs visible the default --jobs is one run per GPU slot, an explicit --jobs is
    kept, and each run sees only its slot's GPU (the scripts fall back to the CPU here)."""
    (tmp_path / "spec.yaml").write_text(MINIMAL)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    args = ("ablate", tmp_path / "spec.yaml", "--smoke", "--seeds", "1")
    default = cli(*args, "-o", tmp_path / "default")
    assert default.exit_code == 0, default.output
    assert "2 at a time" in default.output and "GPUs 4 | 7" in default.output
    configs = [tmp_path / "default" / a / "seed0" / "config.json" for a in ("baseline", "fixed")]
    assert all(json.loads(c.read_text())["device"] == "cpu" for c in configs)
    told = cli(*args, "--jobs", "1", "-o", tmp_path / "told")
    assert told.exit_code == 0 and "1 at a time" in told.output and "GPUs 4" in told.output


def test_each_concurrent_run_gets_a_slot_no_other_running_run_holds(tmp_path):
    jobs = [Job("fixed", s, tmp_path / "x.py", tmp_path / str(s)) for s in range(3)]
    slots = gpu_slots(["0", "1", "2", "3"], 2)
    jobs[0].outcome, jobs[0].gpus = "running", free_slot(slots, jobs)
    jobs[1].outcome, jobs[1].gpus = "running", free_slot(slots, jobs)
    assert (jobs[0].gpus, jobs[1].gpus) == ("0,1", "2,3")
    assert free_slot(slots, jobs) is None  # both slots taken
    jobs[0].outcome = "completed"  # a finished run frees its GPUs
    assert free_slot(slots, jobs) == "0,1"
    assert free_slot([], jobs) is None  # no GPUs: CUDA_VISIBLE_DEVICES is left alone
