"""`tune --launcher slurm` against a real single-node Slurm (the `slurm_cluster` fixture):
each trial's runs are Slurm tasks, a pruned trial's task is cancelled on the cluster, and
the study ends with tuned/baseline.yaml as locally."""

from __future__ import annotations

import json
import signal

import optuna
import pytest
from conftest import cli
from test_tune_run import BASELINE, trials, tune_process, wait_for_epoch, write

from generator import slurm

# one worker runs every test of the one test Slurm (the session fixture)
pytestmark = pytest.mark.xdist_group("slurm")


def test_trials_run_as_slurm_tasks_and_a_pruned_one_is_cancelled(slurm_cluster, tmp_path):
    tune = BASELINE.replace("PRUNER", "median").replace("fresh_seeds: 0", "fresh_seeds: 1")
    spec = write(tmp_path, tune, epochs=40, train=2048)
    out = tmp_path / "t"
    out.mkdir()
    study = optuna.create_study(
        study_name="tiny-baseline", storage=f"sqlite:///{out / 'study.db'}", direction="maximize"
    )
    study.enqueue_trial({"optimizer.lr": 0.1})  # learns: the reference at every epoch
    study.enqueue_trial({"optimizer.lr": 1.0e-6})  # learns nothing: pruned early
    result = cli("tune", spec, "-o", out, "--launcher", "slurm")
    assert result.exit_code == 0, result.output
    good, bad = trials(out, "tiny-baseline")
    assert good.state == optuna.trial.TrialState.COMPLETE and good.value > 0.8
    assert bad.state == optuna.trial.TrialState.PRUNED and bad.user_attrs["outcome"] == "pruned"
    assert (out / "tuned" / "baseline.yaml").is_file()

    folder = out / "trials" / "tiny-baseline"
    ids = {}
    for number in (0, 1):  # each trial: its own job array, recorded beside its runs
        record = json.loads((folder / f"{number:04d}" / slurm.RECORD).read_text())
        (key,) = record["tasks"]
        assert key == f"trial{number}/seed0"
        ids[number] = record["tasks"][key]
        log = (folder / f"{number:04d}" / "seed0" / "train.log").read_text()
        assert f"# slurm task {ids[number]} on " in log and "--resume auto" in log
    states = slurm.squeue(sorted(i.split("_")[0] for i in ids.values()))
    assert states[ids[0]] == "COMPLETED"
    assert states[ids[1]] == "CANCELLED"  # the pruned trial's task, scancelled
    summary = json.loads((folder / "0001" / "seed0" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["epochs"] < 40

    # the tuned values on the fresh seed: a Slurm task too, then the report
    runs = out / "runs"
    (key,) = json.loads((runs / slurm.RECORD).read_text())["tasks"]
    (fresh,) = (runs / "baseline").iterdir()
    assert key == f"baseline/{fresh.name}"
    assert "# slurm task " in (fresh / "train.log").read_text()
    assert json.loads((fresh / "summary.json").read_text())["status"] == "completed"
    assert (out / "report" / "report.md").is_file()


def test_ctrl_c_cancels_the_running_trials_tasks_and_a_rerun_continues(slurm_cluster, tmp_path):
    spec = write(tmp_path, BASELINE.replace("PRUNER", "none"), epochs=30, train=2048)
    out, folder = tmp_path / "t", tmp_path / "t" / "trials" / "tiny-baseline"
    tuner = tune_process(spec, out, "--launcher", "slurm", "--trials", "1")
    wait_for_epoch(folder / "0000" / "seed0", tuner)
    tuner.send_signal(signal.SIGINT)
    _, stderr = tuner.communicate(timeout=60)
    assert tuner.returncode == 130, stderr
    assert "their Slurm tasks are cancelled" in stderr
    (task,) = json.loads((folder / "0000" / slurm.RECORD).read_text())["tasks"].values()
    assert slurm.squeue([task.split("_")[0]])[task] == "CANCELLED"
    assert trials(out, "tiny-baseline")[0].user_attrs["outcome"] == "interrupted"

    # the rerun continues the study: the interrupted trial does not count, a new one runs
    again = cli("tune", spec, "-o", out, "--launcher", "slurm", "--trials", "1")
    assert again.exit_code == 0, again.output
    got = trials(out, "tiny-baseline")
    assert [(t.state.name, t.user_attrs["outcome"]) for t in got] == [
        ("FAIL", "interrupted"),
        ("COMPLETE", "completed"),
    ]
