"""perturbgen tune end to end on a tiny synthetic spec: outputs, resume, shared storage,
pruning, Ctrl-C and killed trials. Every trial is a real run of a generated script."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from conftest import cli

from generator.render import load_spec

TINY = """\
name: tiny
data: {dataset: synthetic, shape: [8], num_classes: 3, train_size: TRAIN, val_size: 64,
       batch_size: 32}
model: {arch: mlp, hidden: [16]}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
train: {epochs: EPOCHS, stability_window: 2}
variants: [baseline, full]
"""
FULL = """\
tune:
  arms: [full]
  trials: 3
  fresh_seeds: 0
  pruner: none
  space:
    perturbation.eps.exploration: {low: 0, high: 1.0e-1}  # a noise range reaches 0
    phase_detector.patience: {low: 1, high: 4}
"""
BASELINE = """\
tune:
  arms: [baseline]
  trials: 2
  fresh_seeds: 0
  pruner: PRUNER
  startup_trials: 1
  prune_after: 0
  space:
    optimizer.lr: {low: 1.0e-6, high: 1.0, log: true}
"""


def write(tmp_path: Path, tune: str, epochs: int = 2, train: int = 256) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(TINY.replace("EPOCHS", str(epochs)).replace("TRAIN", str(train)) + tune)
    return path


def trials(out: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
    return sorted(study.get_trials(), key=lambda t: t.number)


def tune_process(spec: Path, out: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "generator", "tune", str(spec), "-o", str(out), *args]
    return subprocess.Popen(
        command, cwd=spec.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_epoch(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics, deadline = run / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"no epoch of {run} while the tuner ran: {proc.communicate()}")


def test_tune_end_to_end_then_continue(tmp_path):
    spec, out = write(tmp_path, FULL), tmp_path / "t"
    result = cli("tune", spec, "-o", out, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert result.output.count(": start (") == 3
    first = trials(out, "tiny-full")
    assert [t.state for t in first] == [optuna.trial.TrialState.COMPLETE] * 3
    info = json.loads((out / "tune.json").read_text())["arms"]["full"]
    assert info["counts"] == {"complete": 3, "pruned": 0, "failed": 0, "running": 0}
    best = max(first, key=lambda t: t.value)
    assert info["best"]["value"] == best.value and info["best"]["number"] == best.number
    for t in first:  # each trial ran its own generated script, at the tuned epochs
        run = out / "trials" / "tiny-full" / f"{t.number:04d}"
        assert (run / "scripts" / "train_full.py").is_file()
        assert json.loads((run / "seed0" / "summary.json").read_text())["epochs"] == 2

    # tuned/full.yaml: a valid spec that extends the original and sets the best values
    tuned = out / "tuned" / "full.yaml"
    assert "extends: ../../spec.yaml" in tuned.read_text()
    assert cli("validate", tuned).exit_code == 0
    loaded, _ = load_spec(tuned)
    assert loaded.perturbation.eps.exploration == best.params["perturbation.eps.exploration"]
    assert loaded.phase_detector.patience == best.params["phase_detector.patience"]
    generated = cli("generate", tuned, "-o", tmp_path / "gen")
    assert generated.exit_code == 0, generated.output
    manifest = json.loads((tmp_path / "gen" / "tiny" / "manifest.json").read_text())
    assert (
        manifest["resolved_spec"]["phase_detector"]["patience"] == loaded.phase_detector.patience
    )

    report = (out / "tune_report.md").read_text()
    for heading in ("### Best trial", "### Parameter importances", "### Plots", "### Trials"):
        assert heading in report
    plots = {p.name for p in (out / "plots" / "full").iterdir()}
    assert {"optimization_history.png", "slice.png"} <= plots
    assert (out / "plots" / "budget_curves.png").is_file()

    # the same command, with a bigger budget, continues the study: one more trial
    again = cli("tune", spec, "-o", out, "--trials", "4")
    assert again.exit_code == 0, again.output
    assert again.output.count(": start (") == 1
    now = trials(out, "tiny-full")
    assert [t.number for t in now] == [0, 1, 2, 3]
    assert [(t.params, t.value) for t in now[:3]] == [(t.params, t.value) for t in first]
    # and once the budget is reached, it runs nothing
    assert cli("tune", spec, "-o", out, "--trials", "4").output.count(": start (") == 0

    # another search space is another study: refused, not mixed in
    changed = cli("tune", spec, "-o", out, "--set", "tune.objective=best_val_acc")
    assert changed.exit_code == 2 and (
        "was made from another spec or search space "
        "(tune.objective: 'final_val_acc' -> 'best_val_acc'); use another --study or -o"
    ) in " ".join(changed.output.split())


def test_two_processes_on_one_storage_share_the_budget(tmp_path):
    spec, out = write(tmp_path, FULL.replace("trials: 3", "trials: 4")), tmp_path / "t"
    procs = [tune_process(spec, out) for _ in range(2)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    got = trials(out, "tiny-full")
    assert [t.number for t in got] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in got)
    assert len({t.user_attrs["owner"] for t in got}) == 2  # both processes ran trials
    folders = sorted(p.name for p in (out / "trials" / "tiny-full").iterdir())
    assert folders == ["0000", "0001", "0002", "0003"]
    for folder in folders:  # each trial ran once: one run, one set of metrics
        run = out / "trials" / "tiny-full" / folder / "seed0"
        assert (run / "train.log").read_text().count("$ ") == 1
    assert json.loads((out / "tune.json").read_text())["arms"]["full"]["counts"]["complete"] == 4


def test_pruning_stops_a_trial_whose_validation_value_is_bad(tmp_path):
    spec = write(tmp_path, BASELINE.replace("PRUNER", "median"), epochs=10, train=4096)
    out = tmp_path / "t"
    out.mkdir()
    study = optuna.create_study(
        study_name="tiny-baseline", storage=f"sqlite:///{out / 'study.db'}", direction="maximize"
    )
    study.enqueue_trial({"optimizer.lr": 0.1})  # learns: the reference at every epoch
    study.enqueue_trial({"optimizer.lr": 1.0e-6})  # learns nothing: below it from epoch 1
    result = cli("tune", spec, "-o", out)
    assert result.exit_code == 0, result.output
    good, bad = trials(out, "tiny-baseline")
    assert good.state == optuna.trial.TrialState.COMPLETE and good.value > 0.8
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert bad.user_attrs["outcome"] == "pruned"
    # the pruned trial's process was stopped early (SIGTERM), not run to the end
    run = out / "trials" / "tiny-baseline" / "0001" / "seed0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["epochs"] < 10
    assert max(bad.intermediate_values) < 10
    assert f"trial 1: pruned at epoch {max(bad.intermediate_values)}" in result.output


def test_interrupted_and_killed_trials_do_not_count(tmp_path):
    spec = write(tmp_path, BASELINE.replace("PRUNER", "none"), epochs=30, train=512)
    out, folder = tmp_path / "t", tmp_path / "t" / "trials" / "tiny-baseline"

    ctrl_c = tune_process(spec, out)
    wait_for_epoch(folder / "0000" / "seed0", ctrl_c)
    ctrl_c.send_signal(signal.SIGINT)
    _, stderr = ctrl_c.communicate(timeout=60)
    assert ctrl_c.returncode == 130, stderr
    assert "rerun the same command to continue" in stderr
    status = json.loads((folder / "0000" / "seed0" / "summary.json").read_text())["status"]
    assert status == "stopped"  # the run was stopped cleanly, with its checkpoint

    killed = tune_process(spec, out)
    wait_for_epoch(folder / "0001" / "seed0", killed)
    killed.kill()  # SIGKILL: trial 1 stays 'running' in the storage
    killed.communicate(timeout=60)
    summary = folder / "0001" / "seed0" / "summary.json"
    deadline = time.time() + 60
    while time.time() < deadline and not summary.exists():  # its run dies with it
        time.sleep(0.1)
    assert json.loads(summary.read_text())["status"] == "stopped"
    assert trials(out, "tiny-baseline")[1].state == optuna.trial.TrialState.RUNNING

    result = cli("tune", spec, "-o", out, "--trials", "1")  # the budget: one trial that counts
    assert result.exit_code == 0, result.output
    got = trials(out, "tiny-baseline")
    assert [(t.state.name, t.user_attrs["outcome"]) for t in got] == [
        ("FAIL", "interrupted"),
        ("FAIL", "lost"),
        ("COMPLETE", "completed"),
    ]
    info = json.loads((out / "tune.json").read_text())["arms"]["baseline"]
    assert info["counts"] == {"complete": 1, "pruned": 0, "failed": 2, "running": 0}
    assert info["best"]["number"] == 2
    assert "2 failed or interrupted (not counted)" in (out / "tune_report.md").read_text()
