"""The tune: section (validation, errors, schema), the objective, and the no-peeking rule."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import optuna
import pytest
from conftest import MINIMAL, REPO, cli

from generator import tune, tune_space
from generator.render import load_spec

TUNED = MINIMAL.replace("[baseline, fixed]", "[baseline, fixed, full]")
SPACE = """\
tune:
  arms: [full]
  space:
    phase_detector.thresholds.tau1: {low: 0.2, high: 0.9}
    perturbation.eps.exploration: {low: 1.0e-4, high: 1.0e-2, log: true, zero: true}
    phase_detector.patience: {low: 1, high: 5}
    perturbation.apply_to: {choices: [all, weights]}
"""


def errors_of(write_spec, text: str) -> list[str]:
    """The tune errors of TUNED + text, each without the spec's file name."""
    path = write_spec(TUNED + text)
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if ": tune" in line]
    assert all(line.startswith(f"{path}:") for line in lines), lines
    return [line.removeprefix(str(path)) for line in lines]


def test_a_valid_space_becomes_optuna_distributions(write_spec):
    path = write_spec(TUNED + SPACE)
    assert cli("validate", path).exit_code == 0
    spec, doc = load_spec(path)
    s = tune_space.for_arm(tune_space.settings(spec, doc, path, [], None, 1, None, None, None), "full", {})
    space = tune_space.distributions(s)
    assert space["perturbation.eps.exploration:zero"].choices == (False, True)
    assert space["phase_detector.thresholds.tau1"] == optuna.distributions.FloatDistribution(
        0.2, 0.9
    )
    assert space["perturbation.eps.exploration"].log
    assert space["phase_detector.patience"] == optuna.distributions.IntDistribution(1, 5)
    assert space["perturbation.apply_to"].choices == ("all", "weights")
    assert (s.tune.trials, s.epochs, s.seeds, s.direction) == (20, 2, [0], "maximize")
    assert s.out == Path("tune/tiny") and s.study_name == "tiny-full"
    assert s.fresh_seeds == [1, 2, 3, 4, 5]  # after the tuning seeds: never one of them


def test_each_bad_dimension_is_named_with_its_line(write_spec):
    bad = """\
tune:
  arms: [full]
  space:
    phase_detector.thresholds.tau1: {low: 0, high: 0.9}
    phase_detector.thresholds.tau9: {low: 0.1, high: 0.9}
    perturbation.fixed: {low: 1.0e-4, high: 1.0e-2}
    perturbation.apply_to: {choices: [all, some]}
    phase_detector.patience: {low: 1, high: 5.5}
    optimizer.name: {choices: [sgd, adam]}
    model.hidden: {low: 1, high: 3}
    optimizer.lr: {low: 0.5, high: 0.1}
    optimizer.momentum.x: {low: 0.1, high: 0.5}
    perturbation.eps.convergence: {low: 1.0e-4, high: 1.0e-2, log: true, step: 1.0e-4}
    perturbation.scale: {low: 0, high: 1}
    seed: {low: 0, high: 9}
"""
    got = errors_of(write_spec, bad)
    expected = [
        ":10: tune.space.phase_detector.thresholds.tau1.low: must be > 0 (got 0)",
        ":11: tune.space.phase_detector.thresholds.tau9: phase_detector.thresholds has no field"
        " 'tau9'; did you mean 'tau4'?",
        ":12: tune.space.perturbation.fixed: no arm of tune.arms uses perturbation.fixed",
        ":13: tune.space.perturbation.apply_to.choices[1]: must be one of 'all' or 'weights' "
        "(got 'some')",
        ":14: tune.space.phase_detector.patience.high: patience is an integer field (got 5.5)",
        ":15: tune.space.optimizer.name: chooses the kind of its section; tune that kind's "
        "fields",
        ":16: tune.space.model.hidden: is neither a number nor a choice field: it cannot be tuned",
        ":17: tune.space.optimizer.lr.high: must be > low (0.5) (got 0.1)",
        ":18: tune.space.optimizer.momentum.x: optimizer.momentum is not a section",
        ":19: tune.space.perturbation.eps.convergence.step: log and step cannot be combined",
        ":20: tune.space.perturbation.scale: scale is a choice field: give choices, e.g. "
        "{choices: [...]}",
        ":21: tune.space.seed: tuning the seed picks luck, not settings",
    ]
    assert got == expected


def test_objective_and_budget_are_checked(write_spec):
    got = errors_of(
        write_spec, "tune: {arms: [full], objective: best_acc, trials: 0, space: {}}\n"
    )
    assert [line.split(": ", 1)[1] for line in got] == [
        "tune.objective: must be one of 'best_val_acc', 'final_val_acc' or 'epochs_to_target' "
        "(got 'best_acc'); did you mean 'best_val_acc'?",
        "tune.space: dictionary should have at least 1 item after validation, not 0",
        "tune.trials: must be > 0 (got 0)",
    ]


def test_the_tuned_arms_must_be_emitted(write_spec):
    text = "tune:\n  arms: [full, schedule_only, full]\n  space:\n    perturbation.base: {low: 0, high: 1}\n"
    assert errors_of(write_spec, text) == [
        ":8: tune.arms[1]: 'schedule_only' is not an arm of this spec (baseline, fixed, full)",
        ":8: tune.arms[2]: 'full' is listed twice",
        ":10: tune.space.perturbation.base: no arm of tune.arms uses perturbation.base",
    ]


def test_baseline_knobs_can_be_tuned_and_perturbation_ones_cannot(write_spec):
    text = "tune:\n  arms: [baseline]\n  space:\n    optimizer.lr: {low: 1.0e-3, high: 1, log: true}\n"
    assert cli("validate", write_spec(TUNED + text)).exit_code == 0
    got = errors_of(write_spec, text + "    perturbation.decay: {low: 0, high: 1}\n")
    assert got == [
        ":11: tune.space.perturbation.decay: no arm of tune.arms uses perturbation.decay"
    ]


def test_set_reaches_the_tune_section_and_it_leaves_the_scripts_alone(write_spec, tmp_path):
    path = write_spec(TUNED + SPACE)
    spec, _ = load_spec(path, ["tune.trials=7"])
    assert spec.tune.trials == 7
    result = cli("validate", path, "--set", "tune.arms=[baseline]")
    assert "no arm of tune.arms uses" in result.output  # its checks run on the override
    # tune: is not part of the scripts: the same bytes with and without it
    plain = tmp_path / "plain.yaml"
    plain.write_text(TUNED)
    for spec_path, out in ((path, "a"), (plain, "b")):
        assert cli("generate", spec_path, "-o", tmp_path / out).exit_code == 0
    for name in ("train_full.py", "manifest.json"):
        a, b = (tmp_path / o / "tiny" / name for o in "ab")
        assert a.read_bytes() == b.read_bytes()


def test_the_committed_schema_describes_tune():
    schema = json.loads((REPO / "specs" / "spec.schema.json").read_text())
    assert "tune" in schema["properties"]
    assert set(schema["$defs"]["Tune"]["properties"]) >= {
        "arms",
        "question",
        "space",
        "arm_space",
        "fresh_seeds",
        "prune_after",
    }


def test_the_example_tune_specs_validate():
    specs = sorted((REPO / "specs" / "tune").glob("*.yaml"))
    assert [p.name for p in specs] == ["mnist1d_cnn_fair.yaml"]
    result = cli("validate", *specs)
    assert result.exit_code == 0, result.output
    spec = load_spec(specs[0])[0]
    assert set(spec.tune.arms) == {*spec.variants, "baseline_adam"}  # every arm, tuned


# --- the objective ---------------------------------------------------------------------------


HISTORY = [
    {"epoch": 1, "val_acc": 0.5},
    {"epoch": 2, "val_acc": 0.8},
    {"epoch": 3, "val_acc": 0.7},
]


@pytest.mark.parametrize(
    "objective, epochs, expected",
    [
        ("best_val_acc", 3, 0.8),
        ("final_val_acc", 3, 0.7),
        ("final_val_acc", 1, 0.5),
        ("epochs_to_target", 3, 2.0),  # reached 0.75 in epoch 2
        ("epochs_to_target", 1, 2.0),  # not yet by epoch 1: at least 2
    ],
)
def test_score(objective, epochs, expected):
    assert tune.score(HISTORY[:epochs], objective, 0.75) == expected


def test_epochs_to_target_never_reached_costs_one_epoch_more():
    assert tune.score(HISTORY, "epochs_to_target", 0.99) == 4.0


# --- no peeking ------------------------------------------------------------------------------


def peeking_run(folder: Path) -> Path:
    """A run folder as a post-#12 script writes it: test values that would win if read."""
    folder.mkdir(parents=True)
    lines = [
        {"epoch": e, "val_acc": v, "val_loss": 1 - v, "test_acc": 1.0, "test_loss": 0.0}
        for e, v in ((1, 0.5), (2, 0.6))
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {
        "status": "completed",
        "best_val_acc": 0.6,
        "test_acc": 1.0,
        "test_loss": 0.0,
        "test_acc_at_best_val": 1.0,
        "test_loss_at_best_val": 0.0,
        "nested": {"test_acc": 1.0, "val_acc": 0.6},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_test_values_never_reach_the_objective(tmp_path):
    run = peeking_run(tmp_path / "seed0")
    history = tune.val_history(run)
    assert history == [
        {"epoch": 1, "val_acc": 0.5, "val_loss": 0.5},
        {"epoch": 2, "val_acc": 0.6, "val_loss": 0.4},
    ]
    assert tune.score(history, "best_val_acc", 0.9) == 0.6  # 1.0 had it read test_acc
    assert tune.run_status(run) == "completed"
    read = tune.read_json((run / "summary.json").read_text())
    assert not [k for k in json.dumps(read).split('"') if k.startswith("test")]


def test_the_tuner_names_no_test_key():
    """Every string in the tuner's modules (generator/tune*.py) that starts with "test" is
    the one HELD_OUT constant, which only removes such keys: the code cannot ask for a test
    metric."""
    source = (REPO / "generator" / "tune.py").read_text()
    literals = [
        (path.name, node.value, node.lineno)
        for path in sorted((REPO / "generator").glob("tune*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.lower().startswith("test")
    ]
    assert literals == [
        ("tune.py", "test", source[: source.index('HELD_OUT = "test"')].count("\n") + 1)
    ]
    assert source.count("HELD_OUT") == 2  # defined, and used once: in read_json's filter


# --- storage and refusals (no trial runs) ----------------------------------------------------


def test_journal_and_bad_storages(write_spec, tmp_path):
    path = write_spec(TUNED + SPACE)
    spec, doc = load_spec(path)
    journal = f"journal:{tmp_path / 'j' / 'study.log'}"
    s = tune_space.settings(spec, doc, path, [], 3, 1, journal, "shared", tmp_path / "t")
    s = tune_space.for_arm(s, "full", {})
    tuner = tune.Tuner(s, print)
    assert tuner.local == tmp_path / "j" / "study.log" and tuner.study.study_name == "shared-full"
    assert tuner.study.user_attrs["fingerprint"] == s.fingerprint()
    tune.Tuner(s, print)  # a second process opens the same study
    (tmp_path / "file").write_text("")
    for bad in ("nonsense", f"sqlite:///{tmp_path / 'file' / 'study.db'}"):
        result = cli("tune", path, "-o", tmp_path / "t", "--storage", bad)
        assert result.exit_code == 2 and "--storage: cannot open" in result.output, bad


def test_a_spec_without_tune_section_is_refused(write_spec):
    result = cli("tune", write_spec(TUNED))
    assert result.exit_code == 2
    assert "tune: the spec has no tune section to run" in result.output


def test_a_serial_tune_samples_the_same_values_again(write_spec):
    """The sampler is seeded from the spec seed and the trial number: the same results
    give the same next samples, and another spec seed gives others."""
    path = write_spec(TUNED + SPACE)

    def samples(seed: int) -> list[dict]:
        spec, doc = load_spec(path, [f"seed={seed}"])
        s = tune_space.settings(spec, doc, path, [], None, 1, None, None, None)
        s = tune_space.for_arm(s, "full", {})
        study = optuna.create_study(direction="maximize")
        out = []
        for n in range(4):
            study.sampler = tune_space.sampler(s, n)
            trial = study.ask(tune_space.distributions(s))
            study.tell(trial, trial.params["phase_detector.thresholds.tau1"])  # any result
            out.append(trial.params)
        return out

    assert samples(0) == samples(0)
    assert samples(0) != samples(1)
