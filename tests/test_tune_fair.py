"""perturbgen tune as one fair comparison: every arm its own study with the same budget, the
two questions, spaces that reach the null, budget curves, no test metric in tuning, then
fresh seeds and the paired report. Trials are real runs of a tiny synthetic spec."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from conftest import cli

from generator import tune_report, tune_space
from generator.render import load_spec
from generator.checks import arm_space
from generator.spec import SearchDim

TINY = """\
name: tiny
data: {dataset: synthetic, shape: [8], num_classes: 3, train_size: 128, val_size: 64,
       batch_size: 32}
model: {arch: mlp, hidden: [16]}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
train: {epochs: 1, stability_window: 2}
variants: [baseline, fixed]
baselines:
  adam: {optimizer: {name: adam, lr: 1.0e-3}}
"""
TUNE = """\
tune:
  arms: ARMS
  question: QUESTION
  trials: 2
  fresh_seeds: FRESH
  pruner: none
  space:
    optimizer.lr: {low: 1.0e-2, high: 0.5, log: true}
    optimizer.momentum: {low: 0.5, high: 0.95}
    perturbation.fixed: {low: 1.0e-4, high: 1.0e-2, log: true, zero: true}
  arm_space:
    baseline_adam: {optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}
"""


def spec_text(arms: str, question: str = "same_budget", fresh: int = 0) -> str:
    tune_text = TUNE.replace("ARMS", arms).replace("QUESTION", question)
    if "baseline_adam" not in arms:
        tune_text = tune_text.split("  arm_space:")[0]
    return TINY + tune_text.replace("FRESH", str(fresh))


def errors_of(write_spec, text: str) -> list[str]:
    path = write_spec(text)
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    return [
        line.removeprefix(f"{path}:") for line in result.output.splitlines() if ": tune" in line
    ]


def test_a_noise_magnitude_must_reach_zero(write_spec):
    """No noise (eps = 0) is the method's null: a space that cannot reach it is refused."""
    log_only = spec_text("[baseline, fixed]").replace(", zero: true", "")
    assert errors_of(write_spec, log_only) == [
        "19: tune.space.perturbation.fixed: a noise magnitude must be able to reach 0 (no "
        "noise): add zero: true, low: 0 or a 0 choice"
    ]
    choices = log_only.replace(
        "{low: 1.0e-4, high: 1.0e-2, log: true}", "{choices: [0, 1.0e-3], zero: true}"
    )
    assert errors_of(write_spec, choices) == [
        "19: tune.space.perturbation.fixed.zero: goes with a range; add 0 to the choices"
    ]
    fine = choices.replace(", zero: true", "")
    assert cli("validate", write_spec(fine)).exit_code == 0


def test_arms_questions_and_per_arm_spaces_are_checked(write_spec):
    text = spec_text("[fixed, baseline_adam]", "added_to_tuned_baseline")
    text = text.replace("baseline_adam: {", "baseline: {perturbation.decay: {low: 0, high: 1}, ")
    assert errors_of(write_spec, text) == [
        "11: tune.arms: must list baseline: the method is added to the tuned baseline",
        "21: tune.arm_space.baseline: is not one of tune.arms",
    ]
    text = spec_text("[baseline, fixed, baseline_adam]").replace(
        "baseline_adam: {", "baseline_adam: {perturbation.decay: {low: 0, high: 1}, "
    )
    assert errors_of(write_spec, text) == [
        "21: tune.arm_space.baseline_adam.perturbation.decay: the baseline arm does not use "
        "perturbation"
    ]


def test_each_arm_searches_the_knobs_its_script_reads(write_spec):
    spec, _ = load_spec(write_spec(spec_text("[baseline, fixed, baseline_adam]")))
    assert list(arm_space(spec, "baseline")) == ["optimizer.lr", "optimizer.momentum"]
    assert list(arm_space(spec, "fixed")) == [
        "optimizer.lr",
        "optimizer.momentum",
        "perturbation.fixed",
    ]
    adam = arm_space(spec, "baseline_adam")  # Adam has no momentum; its lr range is its own
    assert list(adam) == ["optimizer.lr"] and adam["optimizer.lr"].high == 1.0e-2
    spec, _ = load_spec(
        write_spec(spec_text("[baseline, fixed]", "added_to_tuned_baseline"), "b.yaml")
    )
    assert list(arm_space(spec, "fixed")) == ["perturbation.fixed"]  # its own knobs only


def test_extends_with_a_new_tune_section_replaces_the_parent_s_search(write_spec):
    parent = write_spec(spec_text("[baseline, fixed]"), "parent.yaml")
    child = write_spec(
        "extends: parent.yaml\ntune:\n  arms: [baseline]\n  space:\n"
        "    optimizer.weight_decay: {low: 1.0e-6, high: 1.0e-2, log: true}\n",
        "child.yaml",
    )
    spec, _ = load_spec(child)
    assert list(spec.tune.space) == ["optimizer.weight_decay"]  # not merged with the parent's
    assert spec.tune.trials == 20  # nothing of the parent's tune: section stays
    assert load_spec(parent)[0].tune.trials == 2


def test_edges_scores_and_ranking():
    space = {
        "a": SearchDim(low=1e-4, high=1e-2, log=True),
        "b": SearchDim(low=0.0, high=1.0),
        "c": SearchDim(low=1e-4, high=1e-2, log=True, zero=True),
        "d": SearchDim(choices=[1, 2]),
    }
    chosen = {"a": 1.05e-4, "b": 0.99, "c": 0.0, "d": 2}
    assert tune_space.edges(space, chosen) == {"a": "low", "b": "high"}
    assert tune_space.edges(space, {"a": 1e-3, "b": 0.5}) == {}
    row = {"state": "pruned", "value": None, "intermediate": {"2": 0.4, "10": 0.6}}
    assert tune_report.trial_score(row, "maximize", 20) == 0.6  # where it was stopped
    assert tune_report.trial_score({**row, "intermediate": {}}, "maximize", 20) == 0.0
    assert tune_report.trial_score({**row, "state": "fail"}, "maximize", 20) is None
    curves = {
        "x": {"n": 3, "expected": [0.5, 0.8, 0.9]},
        "y": {"n": 4, "expected": [0.6, 0.7, 0.8, 0.95]},
    }
    assert tune_report.ranking(curves, "maximize") == {
        "k": 3,
        "order": ["x", "y"],
        "differs_at": [1],
        "leader_from": 2,
    }


def named_test_keys(value, path=()):
    """Every (path, key) of the JSON value whose key names a test quantity."""
    if isinstance(value, dict):
        for key, item in value.items():
            if "test" in str(key).lower():
                yield ".".join(map(str, path + (key,)))
            yield from named_test_keys(item, path + (key,))
    elif isinstance(value, list):
        for item in value:
            yield from named_test_keys(item, path)


def json_test_keys(folder: Path) -> set[str]:
    """The test-named keys of every JSON and JSON-lines file under folder, by file name."""
    found = set()
    for path in folder.rglob("*.json*"):
        for line in (
            path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        ):
            found |= {f"{path.name}:{key}" for key in named_test_keys(json.loads(line))}
    return found


def test_every_arm_gets_the_same_budget_then_fresh_seeds_and_the_paired_report(
    write_spec, tmp_path
):
    spec, out = write_spec(spec_text("[baseline, fixed, baseline_adam]", fresh=1)), tmp_path / "t"
    result = cli("tune", spec, "-o", out, "--set", "seed=3")
    assert result.exit_code == 0, result.output
    info = json.loads((out / "tune.json").read_text())
    storage = f"sqlite:///{out / 'study.db'}"
    for arm in ("baseline", "fixed", "baseline_adam"):
        study = optuna.load_study(study_name=f"tiny-{arm}", storage=storage)
        finished = [t for t in study.get_trials() if t.state.is_finished()]
        assert len(finished) == 2 and info["arms"][arm]["counts"]["complete"] == 2
        assert info["curves"][arm]["n"] == 2
        tuned, _ = load_spec(out / "tuned" / f"{arm}.yaml")
        assert tuned.seed == 3  # every --set given to tune
    assert {k for t in study.get_trials() for k in t.params} == {"optimizer.lr"}  # adam's
    lr = study.best_trial.params["optimizer.lr"]
    assert 1e-4 <= lr <= 1e-2 and tuned.baselines["adam"].optimizer["lr"] == lr
    fixed = optuna.load_study(study_name="tiny-fixed", storage=storage).trials[0].params
    assert set(fixed) == {
        "optimizer.lr", "optimizer.momentum", "perturbation.fixed", "perturbation.fixed:zero"
    }  # fmt: skip
    assert info["budget"]["seeds"] == [3] and info["budget"]["fresh_seeds"] == [4]
    assert (out / "plots" / "budget_curves.png").is_file()
    assert (
        "Question: (a) each arm tuned with the same budget" in (out / "tune_report.md").read_text()
    )

    # no test metric anywhere in tuning; the split sizes name the test split, nothing else
    assert json_test_keys(out / "trials") == {
        "config.json:splits.test",
        "config.json:constants.TEST_SIZE",
        "manifest.json:resolved_spec.data.test_size",
    }
    # the fresh seeds evaluate it once, and the paired report compares the tuned arms
    for arm in ("baseline", "fixed", "baseline_adam"):
        for seed in (4,):
            summary = json.loads((out / "runs" / arm / f"seed{seed}" / "summary.json").read_text())
            assert summary["status"] == "completed" and summary["test_acc"] is not None
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["tuning"]["question"] == "same_budget"
    (section,) = report["specs"]["tiny"]["sections"]
    tests = section["comparisons"]["primary"]["tests"]
    assert {k: (t["design"], t["seeds"]) for k, t in tests.items()} == {
        "fixed": ("paired", [4]),
        "baseline_adam": ("paired", [4]),
    }
    assert (
        "question (a) each arm tuned with the same budget"
        in (out / "report" / "report.md").read_text()
    )


def test_the_method_added_to_a_tuned_baseline(write_spec, tmp_path):
    spec, out = (
        write_spec(spec_text("[fixed, baseline]", "added_to_tuned_baseline")),
        tmp_path / "t",
    )
    result = cli("tune", spec, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.output.index("trials of baseline") < result.output.index("trials of fixed")
    info = json.loads((out / "tune.json").read_text())
    base = info["arms"]["baseline"]["best"]["params"]
    assert info["arms"]["fixed"]["fixed"] == base  # the baseline's tuned optimizer
    storage = f"sqlite:///{out / 'study.db'}"
    trials = optuna.load_study(study_name="tiny-fixed", storage=storage).trials
    own = {"perturbation.fixed", "perturbation.fixed:zero"}  # no optimizer knob
    assert len(trials) == 2 and all(set(t.params) == own for t in trials)
    tuned, _ = load_spec(out / "tuned" / "fixed.yaml")
    assert tuned.optimizer.lr == base["optimizer.lr"]
    assert tuned.optimizer.momentum == base["optimizer.momentum"]
    assert (
        "Question: (b) the method added to a tuned baseline"
        in (out / "tune_report.md").read_text()
    )
    assert not (out / "runs").exists()  # fresh_seeds: 0, tuning only


def test_no_trial_is_pruned_before_the_stated_share_of_the_epochs(write_spec):
    """prune_after 0.5 of 60 epochs: a trial far below the median is kept at epoch 29 and
    pruned at epoch 30, by both pruners' rules (median: 5 finished trials before it)."""
    text = spec_text("[baseline, fixed]").replace(
        "pruner: none", "pruner: median\n  prune_after: 0.5"
    )
    spec, doc = load_spec(write_spec(text.replace("epochs: 1,", "epochs: 60,")))
    s = tune_space.for_arm(
        tune_space.settings(spec, doc, Path("x"), [], None, 1, None, None, None), "baseline", {}
    )
    assert tune_space.prune_from(s) == 30
    study = optuna.create_study(direction="maximize", pruner=tune_space.make_pruner(s))
    for _ in range(5):
        trial = study.ask()
        for epoch in range(1, 61):
            trial.report(0.9, epoch)
        study.tell(trial, 0.9)
    low = study.ask()
    for epoch in range(1, 30):
        low.report(0.1, epoch)
        assert not low.should_prune(), epoch
    low.report(0.1, 30)
    assert low.should_prune()
