"""`ablate --launcher slurm` against a real single-node Slurm (the `slurm_cluster` fixture):
the report equals the local launcher's, a failed task is reported and alone resubmitted,
--no-wait then a collecting rerun, --cancel, and a requeue mid-epoch that resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import MINIMAL, REPO, cli

from generator import slurm
from generator.ablate import thread_env

# one worker runs every test of the one test Slurm (the session fixture)
pytestmark = pytest.mark.xdist_group("slurm")

TWO_BY_TWO = MINIMAL  # 2 arms (baseline, fixed), 2 epochs; with --seeds 2, four runs
def numbers(folder):
    """report.json without its wall-clock entries (each arm's "seconds"): the only numbers
    that may differ between the same runs on Slurm and locally."""
    report = json.loads((folder / "report" / "report.json").read_text())
    for section in report["specs"]["tiny"]["sections"]:
        for arm in section["arms"].values():
            arm.pop("seconds")
    return report


def states(folder):
    record = json.loads((folder / slurm.RECORD).read_text())
    return record, slurm.squeue(sorted({t.split("_")[0] for t in record["tasks"].values()}))


def test_no_wait_failure_resubmit_and_report_equal_to_local(slurm_cluster, tmp_path):
    (tmp_path / "spec.yaml").write_text(TWO_BY_TWO)
    out = tmp_path / "slurm"
    broken = out / "fixed" / "seed1"
    broken.mkdir(parents=True)
    (broken / "last.pt").write_bytes(b"not a checkpoint")  # this run fails on the cluster
    args = ("ablate", tmp_path / "spec.yaml", "--seeds", "2", "--launcher", "slurm")

    submitted = cli(*args, "-o", out, "--no-wait")
    assert submitted.exit_code == 0, submitted.output
    assert (
        "submitted job array" in submitted.output and "rerun the same command" in submitted.output
    )
    assert not (out / "report").exists()  # nothing waited for, nothing reported
    first, _ = states(out)
    assert sorted(first["tasks"]) == [
        "baseline/seed0",
        "baseline/seed1",
        "fixed/seed0",
        "fixed/seed1",
    ]
    assert len({t.split("_")[0] for t in first["tasks"].values()}) == 1  # one array

    collected = cli(*args, "-o", out)  # attaches to the submitted array, does not resubmit
    assert collected.exit_code == 1, collected.output
    record, _ = states(out)
    assert record["tasks"] == first["tasks"]
    failure = next(line for line in collected.output.splitlines() if "failed:" in line)
    assert "fixed/seed1" in failure and f"log: {broken / 'train.log'}" in failure, failure
    assert "exited 2" in failure  # the script's exit code: a damaged checkpoint
    assert "error: cannot load checkpoint" in (broken / "train.log").read_text()

    (broken / "last.pt").unlink()  # mend it; the rerun resubmits this run alone
    mended = cli(*args, "-o", out)
    assert mended.exit_code == 0, mended.output
    record, _ = states(out)
    changed = {k for k in record["tasks"] if record["tasks"][k] != first["tasks"][k]}
    assert changed == {"fixed/seed1"} and len(record["arrays"]) == 2

    local = cli(*args[:-2], "-o", tmp_path / "local", "--jobs", "2")
    assert local.exit_code == 0, local.output
    assert numbers(out) == numbers(tmp_path / "local")


LONG = (
    MINIMAL.replace("train_size: 64", "train_size: 12000")
    .replace("epochs: 2", "epochs: 3")
    .replace("variants: [baseline, fixed]", "variants: [fixed]")
)


@pytest.mark.parametrize(
    "interrupt, code",
    [
        (["scontrol", "requeue"], 143),  # pre-emption: Slurm sends SIGTERM and requeues
        # the warning before a time limit (--signal=USR1@120), sent now: submitit waits for
        # the script's checkpoint, then requeues the task itself
        (["scancel", "--signal=USR1"], 138),
    ],
    ids=["requeue", "usr1"],
)
def test_interrupted_task_resumes_bit_identical(slurm_cluster, tmp_path, interrupt, code):
    """A running task is interrupted in its second epoch: the script checkpoints, the task
    runs again with --resume auto, and the final parameters equal those of an uninterrupted
    run bit for bit, while the waiting ablate sees one run that completed."""
    (tmp_path / "spec.yaml").write_text(LONG)
    out = tmp_path / "runs"
    ablate = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "generator",
            "ablate",
            tmp_path / "spec.yaml",
            "--seeds",
            "1",
            "--launcher",
            "slurm",
            "-o",
            out,
            "--set",
            "data.batch_size=4",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = out / "fixed" / "seed0"
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") == 1):
        assert time.time() < deadline and ablate.poll() is None, "epoch 1 never ended"
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    task = json.loads((out / slurm.RECORD).read_text())["tasks"]["fixed/seed0"]
    subprocess.run([*interrupt, task], check=True)
    restarted, pending = False, None
    # Slurm delays a requeued job's start by two minutes; the test starts it sooner, but not
    # in the second slurmd revoked the old start's credential (it would refuse to launch it)
    while not restarted:
        if ablate.poll() is not None or time.time() > deadline + 60:
            ablate.kill()
            output = ablate.communicate()[0]
            log = (run / "train.log").read_text()
            pytest.fail(f"never restarted (ablate exit {ablate.returncode}):\n{output}\n{log}")
        state = slurm.squeue([task.split("_")[0]]).get(task, "")
        pending = (pending or time.time()) if state == "PENDING" else None
        if pending and time.time() - pending > 2:
            subprocess.run(["scontrol", "update", f"jobid={task}", "StartTime=now"])
        restarted = (run / "train.log").read_text().count("# slurm task") == 2
        time.sleep(0.5)
    output, _ = ablate.communicate(timeout=180)
    assert ablate.returncode == 0, output
    log = (run / "train.log").read_text()
    assert "stopped by a signal" in log and f"# exit {code}" in log, log
    assert log.rstrip().endswith("# exit 0")
    straight = subprocess.run(  # in a process of its own with one thread, as on the cluster
        [sys.executable, out / "scripts" / "train_fixed.py", "--out", tmp_path / "straight"],
        capture_output=True,
        text=True,
        env={**os.environ, **thread_env(1)},
    )
    assert straight.returncode == 0, straight.stderr
    a = torch.load(run / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_cancels_the_queued_and_running_tasks(slurm_cluster, tmp_path):
    (tmp_path / "spec.yaml").write_text(LONG)
    out = tmp_path / "runs"
    args = ("ablate", tmp_path / "spec.yaml", "--seeds", "2", "--launcher", "slurm", "-o", out)
    assert cli(*args, "--no-wait").exit_code == 0
    local = cli(*args[:-4], "-o", out)  # the tasks own their run folders: no local runs
    assert local.exit_code == 2 and "2 run(s) are queued or running on Slurm" in local.output
    cancelled = cli(*args, "--cancel")
    assert cancelled.exit_code == 0 and "cancelled 2 task(s)" in cancelled.output
    deadline = time.time() + 60
    while True:
        record, seen = states(out)
        if all(seen.get(t) not in slurm.ACTIVE for t in record["tasks"].values()):
            break
        assert time.time() < deadline, seen
        time.sleep(0.5)
    assert {seen.get(t, "") for t in record["tasks"].values()} <= {"CANCELLED", ""}


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sbatch", "constraint"], "expected KEY=VALUE"),
        (["--launcher", "lsf"], "local or slurm"),
    ],
)
def test_bad_slurm_options_are_one_line_errors(tmp_path, options, message):
    (tmp_path / "spec.yaml").write_text(TWO_BY_TWO)
    result = cli(
        "ablate", tmp_path / "spec.yaml", "--launcher", "slurm", *options, "-o", tmp_path / "o"
    )
    assert result.exit_code == 2 and message in result.output, result.output


def test_resources_become_these_sbatch_lines():
    """What submitit writes for our resources (no cluster needed): requeue, USR1 before the
    time limit (the scripts checkpoint on it; submitit's default USR2 would kill them)."""
    from submitit.slurm.slurm import _make_sbatch_string

    resources = slurm.Resources(
        partition="gpu",
        time_min=90,
        gpus_per_run=2,
        cpus_per_run=8,
        mem="32G",
        account="proj",
        qos="high",
        sbatch=slurm.parse_sbatch(["constraint=a100"]),
    )
    text = _make_sbatch_string("python -u -m x", "/tmp/f", **resources.executor_parameters())
    for line in [
        "--requeue",
        "--signal=USR1@120",
        "--gpus-per-node=2",
        "--partition=gpu",
        "--time=90",
        "--cpus-per-task=8",
        "--mem=32G",
        "--account=proj",
        "--qos=high",
        "--constraint=a100",
        "--ntasks-per-node=1",
    ]:
        assert f"#SBATCH {line}\n" in text, line


def test_a_refused_submission_is_a_one_line_error(slurm_cluster, tmp_path):
    (tmp_path / "spec.yaml").write_text(TWO_BY_TWO)
    result = cli(
        "ablate",
        tmp_path / "spec.yaml",
        "--launcher",
        "slurm",
        "--partition",
        "nosuch",
        "-o",
        tmp_path / "o",
    )
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert "sbatch failed" in line and "invalid partition" in line.lower(), line
    assert not (tmp_path / "o" / slurm.RECORD).exists()  # nothing recorded as submitted


def test_tasks_find_factories_next_to_the_spec_and_the_spec_it_extends(slurm_cluster, tmp_path):
    """What each task gets on its PYTHONPATH is unit-tested in test_factory_paths.py; this
    is the real run: a spec that extends one in another folder, beside its factories."""
    from test_factory_paths import child_elsewhere, lay_out

    spec, _ = lay_out(tmp_path)
    child = child_elsewhere(tmp_path, spec)
    out = tmp_path / "slurm"
    args = ("ablate", child, "--seeds", "1", "--arms", "baseline", "--epochs", "1")
    result = cli(*args, "--launcher", "slurm", "-o", out, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "baseline" / "seed0" / "summary.json").read_text())
    assert summary["status"] == "completed"
