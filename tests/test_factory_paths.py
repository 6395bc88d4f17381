"""A spec's own factories are found next to the spec and next to the specs it extends, by
every command that runs or checks it (ablate, tune, validate --import; local and Slurm), and
a factory that does not import is refused before any run starts or task is submitted."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from conftest import cli
from test_custom import FACTORIES, SPEC

from generator import ablate, factories, slurm, tune, tune_space
from generator.render import load_spec

TUNE = """\
tune:
  arms: [baseline]
  trials: 1
  fresh_seeds: 0
  epochs: 1
  pruner: none
  space:
    optimizer.lr: {low: 0.01, high: 0.1, log: true}
"""


def lay_out(root: Path) -> tuple[Path, str]:
    """root/spec/spec.yaml with its factories' module beside it, under a name of its own
    (a module an earlier test imported must not stand in for this one's)."""
    module = f"factories_{uuid.uuid4().hex[:8]}"
    folder = root / "spec"
    folder.mkdir(parents=True)
    (folder / f"{module}.py").write_text(FACTORIES)
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.replace("user_code", module) + TUNE)
    return spec, module


def child_elsewhere(root: Path, spec: Path) -> Path:
    """A spec in another folder that extends `spec`, as every tuned.yaml does."""
    child = root / "elsewhere" / "child.yaml"
    child.parent.mkdir(parents=True)
    child.write_text(f"extends: {os.path.relpath(spec, child.parent)}\nname: child\n")
    return child


def test_spec_folders_are_the_spec_s_then_those_it_extends(tmp_path):
    spec, _ = lay_out(tmp_path)
    child = child_elsewhere(tmp_path, spec)
    _, doc = load_spec(child, ["optimizer.lr=0.05"])
    assert factories.spec_folders(doc) == [str(child.parent.resolve()), str(spec.parent.resolve())]


def test_validate_import_finds_factories_next_to_the_spec_it_extends(tmp_path):
    spec, _ = lay_out(tmp_path)
    child = child_elsewhere(tmp_path, spec)
    result = cli("validate", "--import", child, cwd=tmp_path)
    assert result.exit_code == 0, result.output


def test_ablate_runs_a_spec_whose_factories_sit_next_to_the_spec_it_extends(tmp_path):
    spec, _ = lay_out(tmp_path)
    child = child_elsewhere(tmp_path, spec)
    result = cli(
        "ablate", child, "--seeds", "1", "--arms", "baseline", "--epochs", "1", "--no-fork",
        "-o", tmp_path / "abl", cwd=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "abl" / "baseline" / "seed0" / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_tune_runs_trials_with_the_spec_s_factories_and_its_tuned_spec_runs_too(tmp_path):
    spec, _ = lay_out(tmp_path)
    out = tmp_path / "tuned"
    result = cli("tune", spec, "-o", out, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "tune.json").read_text())["arms"]["baseline"]
    assert info["counts"]["complete"] == 1, info["trials"]
    # tuned.yaml sits in another folder and extends the spec: its factories are found
    result = cli("validate", "--import", out / "tuned" / "baseline.yaml", cwd=tmp_path)
    assert result.exit_code == 0, result.output


def test_a_factory_that_does_not_import_is_refused_before_anything_starts(tmp_path):
    spec, module = lay_out(tmp_path)
    (spec.parent / f"{module}.py").unlink()
    for command in (["tune", spec, "-o", tmp_path / "t"], ["ablate", spec, "-o", tmp_path / "a"]):
        result = cli(*command, cwd=tmp_path)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert lines[0].startswith(f"{spec}:2: model.factory: {module}:net: cannot import")
        assert f"{spec}:5: data.factory: {module}:two_splits: cannot import" in lines[1]
    assert not (tmp_path / "t").exists() and not (tmp_path / "a").exists()


def test_slurm_tasks_of_ablate_and_tune_get_the_spec_folders_on_their_pythonpath(
    tmp_path, monkeypatch
):
    """What is submitted (the real submission is tests/test_slurm.py's)."""
    spec, _ = lay_out(tmp_path)
    child = child_elsewhere(tmp_path, spec)
    loaded, doc = load_spec(child)
    folders = [str(child.parent.resolve()), str(spec.parent.resolve())]
    submitted = []
    monkeypatch.setattr(slurm.Launcher, "submit", lambda self, tasks: submitted.extend(tasks))
    monkeypatch.setattr(slurm.Launcher, "states", lambda self: {})
    jobs = ablate.make_jobs(tmp_path / "abl", ["baseline"], [0], factories.spec_folders(doc))
    launcher = slurm.Launcher(tmp_path / "abl", slurm.Resources())
    slurm.run_ablation(jobs, launcher, [], 1, lambda *a: None, wait=False)
    s = tune_space.settings(
        loaded, doc, child, [], None, 1, None, None, tmp_path / "t", slurm.Resources()
    )
    tuner = tune.Tuner.__new__(tune.Tuner)
    tuner.s = s
    tuner.start(0, tmp_path / "t", tmp_path / "t" / "train_baseline.py", [tmp_path / "t" / "r"])
    assert len(submitted) == 2
    for task in submitted:
        assert task.env["PYTHONPATH"].split(os.pathsep)[:2] == folders, task
