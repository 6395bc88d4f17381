"""perturbgen ablate: end to end on MNIST-1D (smoke), resume after an interrupt, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli, without_timing

from generator.ablate import deferred_interrupts

SPEC = REPO / "specs" / "mnist1d_cnn.yaml"
ARMS = "baseline,fixed,full"


def test_ablate_smoke_end_to_end(tmp_path):
    out = tmp_path / "ab"
    result = cli(
        "ablate", SPEC, "--smoke", "--seeds", "2", "--arms", ARMS, "--jobs", "2", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert "6 runs (3 arms x 2 seeds)" in result.output
    for arm in ARMS.split(","):
        for seed in (0, 1):
            summary = json.loads((out / arm / f"seed{seed}" / "summary.json").read_text())
            assert summary["status"] == "completed"
    text = (out / "report" / "report.md").read_text()
    for heading in ("Table I", "Table II", "Table III", "Primary endpoint:", "Phase distribution"):
        assert heading in text
    assert {p.name for p in (out / "report").glob("*.png")} == {
        "mnist1d_cnn_accuracy.png",
        "mnist1d_cnn_eps_phases.png",
    }
    assert sorted(p.name for p in (out / "scripts").glob("train_*.py")) == [
        "train_anti_pgd.py",
        "train_baseline.py",
        "train_baseline_adam.py",
        "train_baseline_sgd_constant.py",
        "train_fixed.py",
        "train_full.py",
        "train_gradient_noise.py",
        "train_phase_only.py",
        "train_schedule_only.py",
    ]
    # a second invocation has nothing left to do
    again = cli("ablate", SPEC, "--smoke", "--seeds", "2", "--arms", ARMS, "-o", out)
    assert again.exit_code == 0
    assert again.output.count("start ") == 0 and "report:" in again.output


def test_interrupted_ablate_reruns_only_unfinished_runs(tmp_path):
    out = tmp_path / "ab"
    command = [
        sys.executable,
        "-m",
        "generator",
        "ablate",
        str(SPEC),
        "--smoke",
        "--seeds",
        "2",
        "--arms",
        "baseline,full",
        "--jobs",
        "1",
        "-o",
        str(out),
    ]
    proc = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first = out / "baseline" / "seed0" / "summary.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        first.exists() and (out / "baseline" / "seed1").exists()
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C, while the second run is going
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "rerun the same command to continue" in stderr
    finished_before = {
        p.parent.relative_to(out).as_posix(): p.stat().st_mtime_ns
        for p in out.glob("*/seed*/summary.json")
        if json.loads(p.read_text())["status"] == "completed"
    }
    assert "baseline/seed0" in finished_before and len(finished_before) < 4
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    started = {line.split("start ")[1] for line in rerun.stdout.splitlines() if " start " in line}
    assert started == {"baseline/seed0", "baseline/seed1", "full/seed0", "full/seed1"} - set(
        finished_before
    )
    for name, mtime in finished_before.items():  # finished results were not touched
        assert (out / name / "summary.json").stat().st_mtime_ns == mtime
    assert all(
        json.loads(p.read_text())["status"] == "completed"
        for p in out.glob("*/seed*/summary.json")
    )
    assert len(list(out.glob("*/seed*/summary.json"))) == 4


def test_ablate_refuses_runs_made_with_other_settings(tmp_path):
    out = tmp_path / "ab"
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps({"epochs": 7}))
    result = cli("ablate", SPEC, "--smoke", "-o", out)
    assert result.exit_code == 2
    assert "holds runs made with other settings (epochs: 7 -> None; " in result.output
    assert not (out / "scripts").exists()


def test_ablate_unknown_arm(tmp_path):
    result = cli("ablate", SPEC, "--arms", "baseline,nope", "-o", tmp_path / "ab")
    assert result.exit_code == 2
    assert "no arm named 'nope'" in result.output


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path):
    out = tmp_path / "ab"
    broken = out / "fixed" / "seed0"
    broken.mkdir(parents=True)
    (broken / "last.pt").write_bytes(b"not a checkpoint")  # ablate resumes it, which fails
    result = cli("ablate", SPEC, "--smoke", "--seeds", "1", "--arms", "baseline,fixed", "-o", out)
    assert result.exit_code == 1
    assert f"failed: fixed/seed0 exited 2; log: {broken / 'train.log'}" in result.output
    assert "cannot load checkpoint" in (broken / "train.log").read_text()
    summary = json.loads((out / "baseline" / "seed0" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert "| baseline | 1 | 1 |" in (out / "report" / "report.md").read_text()


def test_no_report_without_any_run_output(tmp_path):
    out = tmp_path / "ab"
    (tmp_path / "blocker").write_text("")  # the data root is a file: every run fails early
    result = cli(
        "ablate",
        SPEC,
        "--seeds",
        "1",
        "--arms",
        "baseline",
        "--epochs",
        "1",
        "--set",
        f"data.root={tmp_path / 'blocker'}",
        "-o",
        out,
    )
    assert result.exit_code == 1
    assert "failed: baseline/seed0 exited" in result.output
    assert "no run wrote any output: no report" in result.output


def test_ablate_runs_each_arm_under_torchrun(tmp_path):
    out = tmp_path / "ab"
    result = cli(
        "ablate",
        SPEC,
        "--smoke",
        "--seeds",
        "1",
        "--arms",
        "full",
        "--nproc",
        "2",
        "--jobs",
        "1",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "full" / "seed0" / "summary.json").read_text())
    assert len(summary["replicas"]) == 2 and summary["replicas"][0] == summary["replicas"][1]
    assert "torch.distributed.run" in (out / "full" / "seed0" / "train.log").read_text()


def test_forked_runs_are_bit_identical_to_the_scripts_run_alone(tmp_path):
    """ablate forks its runs from a server that imported torch once; each run must end
    exactly as `python train_<arm>.py` with the same flags and threads does."""
    import os

    import torch

    out = tmp_path / "ab"
    arms = "fixed,full"  # noise from its own generators; the detector's state
    result = cli(
        "ablate", SPEC, "--smoke", "--seeds", "1", "--arms", arms, "--jobs", "1", "-o", out
    )
    assert result.exit_code == 0, result.output
    threads = max(1, os.cpu_count() or 1)  # --jobs 1: every core
    for arm in arms.split(","):
        run, alone = out / arm / "seed0", tmp_path / f"alone-{arm}"
        assert "$ " in (run / "train.log").read_text().splitlines()[0]
        subprocess.run(
            [
                sys.executable,
                out / "scripts" / f"train_{arm}.py",
                "--seed",
                "0",
                "--out",
                alone,
                "--smoke",
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        )
        a = torch.load(run / "last.pt", weights_only=True)
        b = torch.load(alone / "last.pt", weights_only=True)
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), arm
        noise = zip(a["perturbation"]["generators"], b["perturbation"]["generators"], strict=True)
        assert all(torch.equal(x, y) for x, y in noise)  # the same noise drawn

        ours = without_timing(run / "metrics.jsonl")
        assert ours == without_timing(alone / "metrics.jsonl") and ours
        assert (run / "phases.jsonl").read_text() == (alone / "phases.jsonl").read_text()


def test_ctrl_c_while_a_run_starts_acts_once_it_is_recorded():
    """A Ctrl-C that lands inside a run's start is held until the start has returned, so
    that the run is recorded as running and stop() stops it instead of leaving it orphaned."""
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now: it only recorded the signal
            reached.append("end of start")
    assert reached == ["end of start"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_the_fork_server_refuses_to_fork_beside_a_thread():
    """fork() copies only the calling thread, so a lock another thread holds stays locked in
    the run forever: the server checks it has no other thread before every fork."""
    code = (
        "import threading, time\n"
        "from generator import forkserver\n"
        "forkserver._check_single_threaded()\n"  # a fresh server passes
        "threading.Thread(target=time.sleep, args=(5,), name='tracker', daemon=True).start()\n"
        "forkserver._check_single_threaded()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "must stay single-threaded; it runs: MainThread, tracker" in result.stderr
