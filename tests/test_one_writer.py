"""One writer per run folder: the run's lock and its refusal, runs that stop when their
launcher dies, reruns and concurrent launchers that never double a run, and summaries whose
elapsed time adds up over sessions. Real processes throughout, on a tiny synthetic spec."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import MINIMAL, generate, run_inprocess, run_script, without_timing

from generator.launch import thread_env
from generator.runs import LOCK, lock_holder
from generator.scriptload import load_script

ONE = thread_env(1)
EPOCHS = 5
# 500 steps an epoch: a run trains for a few seconds, long enough to be killed mid-run
SPEC = (
    MINIMAL.replace("train_size: 64", "train_size: 4000")
    .replace("val_size: 32}", "val_size: 32, batch_size: 8}")
    .replace("{epochs: 2,", f"{{epochs: {EPOCHS},")
)
RUNS = ("baseline/seed0", "fixed/seed0")


def ablate_command(spec: Path, out: Path) -> list[str]:
    # --jobs 2 on every machine: the same threads per run in every ablate of these tests
    args = ["ablate", spec, "--seeds", "1", "--jobs", "2", "-o", out]
    return [sys.executable, "-m", "generator", *map(str, args)]


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def epochs_of(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def mid_run(out: Path) -> bool:
    """Every run has finished its first epoch and none has finished its last."""
    try:
        return all(0 < len(epochs_of(out / r)) < EPOCHS - 1 for r in RUNS)
    except (OSError, ValueError):
        return False


def same_weights(a: Path, b: Path) -> bool:
    x = torch.load(a / "last.pt", weights_only=True)["model"]
    y = torch.load(b / "last.pt", weights_only=True)["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def assert_one_history_each(out: Path, reference: Path) -> None:
    """Every run completed once, its metrics one epoch sequence, its weights and metrics
    those of the same run never interrupted."""
    for name in RUNS:
        run = out / name
        assert epochs_of(run) == list(range(1, EPOCHS + 1)), name
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        assert (run / "train.log").read_text().count("\ndone: ") == 1, name
        assert same_weights(run, reference / name), name
        assert without_timing(run / "metrics.jsonl") == without_timing(
            reference / name / "metrics.jsonl"
        )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The spec file, and its ablation run once without interruption (the reference)."""
    root = tmp_path_factory.mktemp("one_writer")
    spec = root / "tiny.yaml"
    spec.write_text(SPEC)
    reference = root / "reference"
    done = subprocess.run(ablate_command(spec, reference), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return spec, reference


def test_kill_9_of_ablate_then_an_immediate_rerun_doubles_nothing(study, tmp_path):
    spec, reference = study
    out = tmp_path / "ab"
    proc = subprocess.Popen(ablate_command(spec, out), stdout=subprocess.DEVNULL)
    wait_for(lambda: mid_run(out), "both runs mid-way")
    proc.kill()  # what the OOM killer does: no handler runs
    proc.wait()
    rerun = subprocess.run(ablate_command(spec, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_one_history_each(out, reference)
    for name in RUNS:  # the runs stopped when their launcher died, and were resumed
        assert "stopped by a signal" in (out / name / "train.log").read_text()


def test_two_concurrent_ablates_finish_every_run_once(study, tmp_path):
    """The second ablate starts while the first one's runs are held mid-way (SIGSTOP), so
    that it meets them however fast the runs are: it must wait for them, not run them."""
    spec, reference = study
    out, said = tmp_path / "ab", tmp_path / "second.out"
    first = subprocess.Popen(ablate_command(spec, out), stdout=subprocess.PIPE, text=True)
    wait_for(lambda: mid_run(out), "both runs mid-way")
    pids = [int(lock_holder(out / r).split()[1]) for r in RUNS]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        with said.open("w") as sink:
            second = subprocess.Popen(ablate_command(spec, out), stdout=sink, text=True)
            wait_for(lambda: "running elsewhere" in said.read_text(), "the second to wait")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    outputs = [first.communicate(timeout=180)[0]]
    second.wait(timeout=180)
    outputs.append(said.read_text())
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert_one_history_each(out, reference)


def test_sighup_of_ablate_leaves_resumable_runs(study, tmp_path):
    spec, reference = study
    out = tmp_path / "ab"
    proc = subprocess.Popen(ablate_command(spec, out), stdout=subprocess.DEVNULL, text=True)
    wait_for(lambda: mid_run(out), "both runs mid-way")
    proc.send_signal(signal.SIGHUP)  # the terminal hung up
    assert proc.wait(timeout=60) == 130
    for name in RUNS:
        summary = json.loads((out / name / "summary.json").read_text())
        state = torch.load(out / name / "last.pt", weights_only=True)["state"]
        assert summary["status"] == "stopped" and lock_holder(out / name) is None
        assert summary["elapsed_s"] >= state["train_s"] > 0  # a stopped run's time counts
    rerun = subprocess.run(ablate_command(spec, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_one_history_each(out, reference)


def test_a_second_writer_is_refused_in_one_line_and_touches_nothing(tmp_path):
    script = generate(tmp_path) / "train_fixed.py"
    run = tmp_path / "run"
    assert run_inprocess(script, "--out", run, "--max-steps", "3").returncode == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with open(run / LOCK, "r+") as held:  # this process holds the folder, as a run would
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": "yesterday"}
        held.write(json.dumps(holder))
        held.truncate()
        held.flush()
        held.seek(0)
        before[LOCK] = held.read().encode()  # not by opening it again: that drops our lock
        who = f"pid {os.getpid()} on {socket.gethostname()} since yesterday"
        second = run_script(script, "--out", run, "--resume", "auto", cwd=tmp_path, env=ONE)
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            f"error: {run} is in use by {who}: one process writes a run folder; wait for it "
            "to end, or stop it (it checkpoints on SIGTERM) and resume"
        ]
        # what the launchers read, from another process, as a launcher would
        code = (
            "import sys, pathlib, generator.ablate as a;"
            "print(a.lock_holder(pathlib.Path(sys.argv[1])))"
        )
        reader = subprocess.run(
            [sys.executable, "-c", code, str(run)], capture_output=True, text=True
        )
        assert reader.stdout.strip() == who, reader.stderr
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched
    assert lock_holder(run) is None  # released: the folder is free again
    resumed = run_inprocess(script, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr


def test_a_run_killed_at_random_points_resumes_to_the_uninterrupted_run(tmp_path):
    """Chaos: SIGKILL (no handler, no checkpoint of its own) at seeded random moments, each
    followed by --resume auto from whatever last.pt the run had written."""
    script = generate(tmp_path, SPEC) / "train_fixed.py"
    run, straight = tmp_path / "run", tmp_path / "straight"
    flags = ["--checkpoint-every", "0", "--resume", "auto"]  # last.pt after every epoch
    rng = random.Random(28)
    reference = subprocess.Popen(  # meanwhile, the same run never interrupted
        [sys.executable, script, "--out", straight, *flags],
        env={**os.environ, **ONE},
        stdout=subprocess.DEVNULL,
    )
    for delay in [rng.uniform(0.2, 1.5) for _ in range(3)]:
        proc = subprocess.Popen(
            [sys.executable, script, "--out", run, *flags],
            env={**os.environ, **ONE},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: lock_holder(run) is not None or proc.poll() is not None, "the run")
        time.sleep(delay)
        proc.kill()
        proc.wait()
        assert lock_holder(run) is None  # the kernel released the lock with the process
    done = run_script(script, "--out", run, *flags, cwd=tmp_path, env=ONE)
    assert done.returncode == 0 and reference.wait(timeout=120) == 0, done.stderr
    assert same_weights(run, straight)
    assert epochs_of(run) == list(range(1, EPOCHS + 1))
    assert without_timing(run / "metrics.jsonl") == without_timing(straight / "metrics.jsonl")


def test_metrics_only_grow_by_the_next_epoch(tmp_path):

    ns = load_script(str(generate(tmp_path) / "train_baseline.py"), run_name="test", support=True)
    path = tmp_path / "metrics.jsonl"
    log = ns["MetricsLog"](path, [{"epoch": 1}, {"epoch": 2}])
    for epoch in (2, 1, 4):
        with pytest.raises(SystemExit) as refused:
            log.append({"epoch": epoch})
        assert refused.value.code == 2
    log.append({"epoch": 3})
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only parent"])
def test_an_out_that_cannot_be_made_is_one_line_and_exit_2(tmp_path, where):
    script = generate(tmp_path) / "train_baseline.py"
    (tmp_path / "file").write_text("kept")
    if where == "a file":
        out = tmp_path / "file"
    elif where == "under a file":
        out = tmp_path / "file" / "run"
    elif os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "run"
    else:  # root writes through permissions: a file system that refuses new folders
        out = Path("/sys/perturbgen-run")
    result = run_inprocess(script, "--out", out, "--epochs", "1")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot make the run folder {out}: ")
    assert (tmp_path / "file").read_text() == "kept"


def test_elapsed_time_adds_up_over_sessions(tmp_path):
    """A run stopped inside its first epoch records the time it ran; resumed, its elapsed
    time is that plus the new session's, never less than its training time."""
    script = generate(tmp_path, SPEC.replace(f"epochs: {EPOCHS}", "epochs: 1")) / "train_fixed.py"
    run = tmp_path / "run"
    stopped = run_inprocess(script, "--out", run, "--max-steps", "499")  # of 500
    assert stopped.returncode == 0, stopped.stderr
    summary = json.loads((run / "summary.json").read_text())
    state = torch.load(run / "last.pt", weights_only=True)["state"]
    train_s = state["train_s"]
    assert summary["status"] == "stopped" and summary["elapsed_s"] >= train_s > 0
    assert run_inprocess(script, "--out", run, "--resume").returncode == 0
    final = json.loads((run / "summary.json").read_text())
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert final["elapsed_s"] >= record["elapsed_s"] >= record["train_s"] > train_s
    assert record["elapsed_s"] > state["elapsed_s"] > 0  # the first session's time is kept


def test_resuming_a_completed_run_touches_nothing(tmp_path):
    """A second launcher may start a run that the first has just finished (it got the lock
    once the first let go): the script sees a completed run and leaves it as it is."""
    script = generate(tmp_path, SPEC.replace(f"epochs: {EPOCHS}", "epochs: 1")) / "train_fixed.py"
    run = tmp_path / "run"
    assert run_inprocess(script, "--out", run).returncode == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK}
    again = run_inprocess(script, "--out", run, "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert "is complete already: nothing to do" in again.stdout + again.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK} == before
