"""Layer 1: loading and validating specs, and the exact error each mistake gets."""

from __future__ import annotations

import math

import pytest
from conftest import MINIMAL, SPECS

from generator.errors import SpecErrors
from generator.loading import parse_yaml
from generator.render import load_spec


def errors_of(path, overrides=()):
    with pytest.raises(SpecErrors) as info:
        load_spec(path, list(overrides))
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_specs_are_valid(path):
    spec, _ = load_spec(path)
    assert spec.name == path.stem


def test_minimal_spec_gets_defaults(write_spec):
    spec, _ = load_spec(write_spec())
    assert spec.schedule.name == "constant"
    assert spec.perturbation.fixed == 1e-3
    assert spec.phase_detector.window == 20


# Each case: a change to MINIMAL, and the one error it must produce (file:line: path: msg).
CASES = {
    "typo'd key": (
        ("model: {arch: mlp, hidden: [16]}", "model: {arch: mlp, hiden: [16]}"),
        "3: model.hiden: unknown key; did you mean 'hidden'?",
    ),
    "negative learning rate": (
        ("lr: 0.1", "lr: -0.1"),
        "4: optimizer.lr: must be > 0 (got -0.1)",
    ),
    "unknown top-level key": (
        ("train:", "trian:"),
        "5: trian: unknown key; did you mean 'train'?",
    ),
    "missing required key": (
        ("optimizer: {name: sgd, lr: 0.1, momentum: 0.9}", "optimizer: {name: sgd}"),
        "4: optimizer.lr: required key is missing",
    ),
    "unknown optimizer": (
        ("name: sgd", "name: sgdd"),
        "4: optimizer.name: must be one of 'sgd', 'adam', 'adamw' (got 'sgdd'); did you mean 'sgd'?",
    ),
    "unknown arm": (
        ("[baseline, fixed]", "[baseline, fixd]"),
        "6: variants[1]: must be one of 'baseline', 'fixed', 'phase_only', 'schedule_only', "
        "'full', 'gradient_noise' or 'anti_pgd' (got 'fixd'); did you mean 'fixed'?",
    ),
    "duplicate arm": (
        ("[baseline, fixed]", "[baseline, fixed, fixed]"),
        "6: variants[2]: 'fixed' is listed twice",
    ),
    "no arm": (
        ("[baseline, fixed]", "[]"),
        "6: variants: list should have at least 1 item after validation, not 0",
    ),
    "infinite number": (
        ("lr: 0.1", "lr: .inf"),
        "4: optimizer.lr: must be a finite number (got inf)",
    ),
    "string for a number": (
        ("lr: 0.1", "lr: '0.1'"),
        "4: optimizer.lr: input should be a valid number (got '0.1')",
    ),
    "bad spec name": (
        ("name: tiny", "name: Tiny-1"),
        "1: name: must be a lowercase ASCII identifier matching ^[a-z][a-z0-9_]*$ "
        "(got 'Tiny-1')",
    ),
    "nesterov without momentum": (
        ("momentum: 0.9}", "momentum: 0.0, nesterov: true}"),
        "4: optimizer.nesterov: nesterov needs momentum > 0 and dampening 0",
    ),
    "window too small": (
        ("variants:", "phase_detector: {window: 2}\nvariants:"),
        "6: phase_detector.window: must be >= 3 (got 2)",
    ),
    "tau3 above tau1": (
        ("variants:", "phase_detector:\n  thresholds: {tau1: 0.2, tau3: 0.3}\nvariants:"),
        "7: phase_detector.thresholds.tau3: must be <= tau1 (0.2) (got 0.3)",
    ),
    "tau4 above tau2": (
        ("variants:", "phase_detector:\n  thresholds: {tau2: 0.2, tau4: 0.3}\nvariants:"),
        "7: phase_detector.thresholds.tau4: must be <= tau2 (0.2) (got 0.3)",
    ),
    "description with a docstring breaker": (
        ("name: tiny", 'name: tiny\ndescription: \'a """ b\''),
        '2: description: must be one printable line without backslashes or """ (got \'a """ b\')',
    ),
    "image model on flat data": (
        ("model: {arch: mlp, hidden: [16]}", "model: {arch: resnet18}"),
        "2: data.shape: resnet18 needs images of shape [channels, height, width] with height "
        "and width >= 32 (got [8])",
    ),
    "cnn1d on flat data": (
        ("model: {arch: mlp, hidden: [16]}", "model: {arch: cnn1d}"),
        "2: data.shape: cnn1d needs data of shape [channels, length] with length >= 3 "
        "(got [8])",
    ),
    "augmentation on mnist1d": (
        (
            "data: {dataset: synthetic, shape: [8], num_classes: 3, train_size: 64, val_size: 32}",
            "data: {dataset: mnist1d, augment: true}",
        ),
        "2: data.augment: no augmentation is defined for mnist1d",
    ),
    "unclosed flow mapping": (
        ("model: {arch: mlp, hidden: [16]}", "model: {arch: mlp, hidden: [16]"),
        "3: YAML syntax error: while parsing a flow mapping opened here: "
        "expected ',' or '}', but got '<scalar>' on line 4",
    ),
    "unclosed flow sequence": (
        ("variants: [baseline, fixed]", "variants: [baseline,\n  fixed\nseed: 3"),
        "6: YAML syntax error: while parsing a flow sequence opened here: "
        "expected ',' or ']', but got ':' on line 8",
    ),
    "unclosed quote": (
        ("name: tiny", "name: 'tiny"),
        "1: YAML syntax error: while scanning a quoted scalar opened here: "
        "found unexpected end of stream on line 7",
    ),
    "a bad indent names both lines": (
        ("train:", "extra:\n  a: 2\n b: 1\ntrain:"),
        "7: YAML syntax error: while parsing a block mapping (line 1): "
        "expected <block end>, but found '<block mapping start>'",
    ),
    "onecycle with a warm-up of its own": (
        ("variants:", "schedule: {name: onecycle, warmup_epochs: 2}\nvariants:"),
        "6: schedule.warmup_epochs: must be 0 with onecycle, which warms up by itself: "
        "pct_start is the share of training spent rising to lr (got 2)",
    ),
    "duplicate key": (
        ("train:", "seed: 1\nseed: 2\ntrain:"),
        "6: seed: duplicate key (first given on line 5)",
    ),
    "negative gradient noise": (
        ("variants:", "perturbation:\n  gradient_noise: {eta: -0.01}\nvariants:"),
        "7: perturbation.gradient_noise.eta: must be >= 0 (got -0.01)",
    ),
    "anti-PGD key misspelt": (
        ("variants:", "perturbation:\n  anti_pgd: {sigme: 0.01}\nvariants:"),
        "7: perturbation.anti_pgd.sigme: unknown key; did you mean 'sigma'?",
    ),
    "python tag": (
        ("name: tiny", "name: !!python/name:os.system tiny"),
        "1: name: YAML tag 'tag:yaml.org,2002:python/name:os.system' is not allowed",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_invalid_spec_message(case, write_spec):
    (old, new), expected = CASES[case]
    assert old in MINIMAL
    path = write_spec(MINIMAL.replace(old, new, 1))
    assert errors_of(path) == [f"{path}:{expected}"]


def test_all_errors_are_reported_together(write_spec):
    text = MINIMAL.replace("lr: 0.1", "lr: -1").replace("hidden", "hiden")
    path = write_spec(text)
    assert errors_of(path) == [
        f"{path}:3: model.hiden: unknown key; did you mean 'hidden'?",
        f"{path}:4: optimizer.lr: must be > 0 (got -1)",
    ]


def test_yaml_1_2_scalars():
    doc = parse_yaml(
        "a: 1e-3\nb: no\nc: 010\nd: 0x1F\ne: on\nf: 1_000\ng: 2026-01-01\nh: ~\n", "x"
    )
    assert doc.data == {
        "a": 1e-3,
        "b": "no",
        "c": 10,
        "d": 31,
        "e": "on",
        "f": "1_000",
        "g": "2026-01-01",
        "h": None,
    }
    assert isinstance(doc.data["a"], float)
    nan = parse_yaml("a: .nan", "x").data["a"]
    assert math.isnan(nan)


def test_lines_are_kept_for_every_node():
    doc = parse_yaml("a:\n  b: 1\n  c:\n    - 2\n    - 3\n", "x")
    assert doc.origins[("a", "b")] == ("x", 2)
    assert doc.origins[("a", "c", 1)] == ("x", 5)


def test_alias_bomb_is_refused_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(10))}]" for i in range(1, 9)]
    with pytest.raises(SpecErrors) as info:
        parse_yaml("\n".join(lines), "bomb.yaml")
    assert "more than 100000 nodes" in str(info.value)


def test_empty_and_non_mapping_documents(write_spec):
    assert errors_of(write_spec("")) == [f"{write_spec('')}:1: the document is empty"]
    path = write_spec("- a\n- b\n")
    assert errors_of(path) == [f"{path}:1: a spec must be a mapping of sections"]


def test_extends_merges_deeply_and_the_child_wins(write_spec, tmp_path):
    write_spec(MINIMAL, "parent.yaml")
    child = write_spec("extends: parent.yaml\nname: child\noptimizer: {lr: 0.5}\n", "child.yaml")
    spec, _ = load_spec(child)
    assert spec.name == "child"
    assert spec.optimizer.lr == 0.5 and spec.optimizer.momentum == 0.9  # merged, not replaced


def test_extends_replaces_a_section_whose_kind_changes(write_spec):
    write_spec(MINIMAL, "parent.yaml")
    child = write_spec("extends: parent.yaml\noptimizer: {name: adam, lr: 0.001}\n", "child.yaml")
    spec, _ = load_spec(child)
    assert spec.optimizer.name == "adam"  # SGD's momentum was not inherited


def test_extends_errors_point_into_the_right_file(write_spec, tmp_path):
    write_spec(MINIMAL.replace("lr: 0.1", "lr: -0.1"), "parent.yaml")
    child = write_spec("extends: parent.yaml\nname: child\nseed: -1\n", "child.yaml")
    assert errors_of(child) == [
        f"{child}:3: seed: must be >= 0 (got -1)",
        f"{tmp_path / 'parent.yaml'}:4: optimizer.lr: must be > 0 (got -0.1)",
    ]


def test_missing_extends_parent_is_reported_at_the_extends_line(write_spec, tmp_path):
    child = write_spec("name: child\nextends: nowhere/parent.yaml\n", "child.yaml")
    assert errors_of(child) == [
        f"{child}:2: extends: {tmp_path / 'nowhere' / 'parent.yaml'}: file not found"
    ]
    (tmp_path / "folder.yaml").mkdir()
    child = write_spec("extends: folder.yaml\nname: child\n", "child.yaml")
    assert errors_of(child) == [
        f"{child}:1: extends: {tmp_path / 'folder.yaml'}: is not a regular file"
    ]


def test_extends_cycle_is_reported(write_spec):
    write_spec("extends: b.yaml\nname: a\n", "a.yaml")
    b = write_spec("extends: a.yaml\nname: b\n", "b.yaml")
    assert errors_of(b) == [
        f"{b.parent / 'a.yaml'}:1: extends: cycle in extends: " "b.yaml -> a.yaml -> b.yaml"
    ]


# An unknown key in every kind of section, and the hint it gets: a misspelling (difflib)
# or a synonym from another library (ALIASES); each case is one section, put in MINIMAL.
SUGGESTIONS = {
    "perturbation": ("perturbation: {fixd: 0.1}", "perturbation.fixd", "fixed"),
    "perturbation.eps": (
        "perturbation: {eps: {finetuning: 0.1}}",
        "perturbation.eps.finetuning",
        "fine_tuning",
    ),
    "phase_detector": ("phase_detector: {evry: 5}", "phase_detector.evry", "every"),
    "phase_detector.thresholds": (
        "phase_detector: {thresholds: {tau_smoth: 0.1}}",
        "phase_detector.thresholds.tau_smoth",
        "tau_smooth",
    ),
    "train (alias)": ("train: {num_epochs: 2}", "train.num_epochs", "epochs"),
    "data (alias)": ("data: {dataset: mnist1d, bs: 64}", "data.bs", "batch_size"),
    "data (another member)": (
        "data: {dataset: imagefolder, num_classes: 2, img_size: 64}",
        "data.img_size",
        "image_size",
    ),
    "model (another member)": ("model: {arch: cnn1d, widht: 8}", "model.widht", "width"),
    "optimizer (alias)": (
        "optimizer: {name: sgd, lr: 0.1, wd: 0.1}",
        "optimizer.wd",
        "weight_decay",
    ),
    "optimizer (spelling)": (
        "optimizer: {name: sgd, lr: 0.1, Weight-Decay: 0.1}",
        "optimizer.Weight-Decay",
        "weight_decay",
    ),
    "schedule (discriminated)": (
        "schedule: {name: cosine, min_lr: 0.1}",
        "schedule.min_lr",
        "min_lr_ratio",
    ),
    "schedule (alias)": ("schedule: {name: step, warmup: 1}", "schedule.warmup", "warmup_epochs"),
    "top level (alias)": ("noise: {fixed: 0.1}", "noise", "perturbation"),
    "an extra baseline's section": (
        "baselines: {adam: {optimizer: {name: adam, lr: 0.001, betaz: [0.9, 0.99]}}}",
        "baselines.adam.optimizer.betaz",
        "betas",
    ),
    "an extra baseline itself": (
        "baselines: {adam: {optimiser: {name: adam, lr: 0.001}}}",
        "baselines.adam.optimiser",
        "optimizer",
    ),
}


def with_section(line: str) -> str:
    """MINIMAL with ``line`` as its last line, in place of the section it names."""
    section = line.partition(":")[0]
    kept = [old for old in MINIMAL.splitlines() if not old.startswith(section + ":")]
    return "\n".join(kept + [line]) + "\n"


@pytest.mark.parametrize("case", SUGGESTIONS, ids=list(SUGGESTIONS))
def test_unknown_keys_get_a_hint_in_every_section(case, write_spec):
    line, path, hint = SUGGESTIONS[case]
    text = with_section(line)
    spec = write_spec(text)
    where = f"{spec}:{text.count(chr(10))}"
    assert f"{where}: {path}: unknown key; did you mean {hint!r}?" in errors_of(spec)


def test_an_alias_hint_names_only_a_key_of_that_section(write_spec):
    spec = write_spec(with_section("train: {bs: 4}"))  # batch_size is data's key, not train's
    assert errors_of(spec) == [f"{spec}:6: train.bs: unknown key"]


def test_an_alias_of_a_required_key(write_spec):
    path = write_spec(MINIMAL.replace("lr: 0.1", "learning_rate: 0.1"))
    assert errors_of(path) == [
        f"{path}:4: optimizer.learning_rate: unknown key; did you mean 'lr'?",
    ]  # the missing lr is the one the alias names: not a second error


@pytest.mark.parametrize(
    "override, hint",
    [
        ("optimizer.learning_rate=1", "lr"),
        ("perturbation.fixd=0.1", "fixed"),
        ("perturbation.eps.finetuning=0.1", "fine_tuning"),
        ("phase_detector.thresholds.tau_smoth=0.1", "tau_smooth"),
        ("train.n_epochs=3", "epochs"),
    ],
)
def test_set_overrides_get_the_same_hints(override, hint, write_spec):
    path = write_spec()
    key = override.partition("=")[0]
    assert f"--set {override}: {key}: unknown key; did you mean {hint!r}?" in errors_of(
        path, [override]
    )


def test_onecycle_without_warm_up_is_valid_and_extra_baselines_are_checked(write_spec):
    spec, _ = load_spec(write_spec(MINIMAL + "schedule: {name: onecycle, pct_start: 0.2}\n"))
    assert spec.schedule.warmup_epochs == 0
    path = write_spec(
        MINIMAL + "baselines: {oc: {schedule: {name: onecycle, warmup_epochs: 1}}}\n"
    )
    assert errors_of(path) == [
        f"{path}:7: baselines.oc.schedule.warmup_epochs: must be 0 with onecycle, which warms "
        "up by itself: pct_start is the share of training spent rising to lr (got 1)"
    ]


def test_set_overrides_are_validated_like_the_file(write_spec):
    path = write_spec()
    spec, _ = load_spec(path, ["optimizer.lr=0.05", "variants=[fixed]"])
    assert spec.optimizer.lr == 0.05 and spec.variants == ["fixed"]
    assert errors_of(path, ["optimizer.lr=-1"]) == [
        "--set optimizer.lr=-1: optimizer.lr: must be > 0 (got -1)"
    ]
    assert errors_of(path, ["optimizer.lrr=1"]) == [
        "--set optimizer.lrr=1: optimizer.lrr: unknown key; did you mean 'lr'?"
    ]
    assert errors_of(path, ["no-equals"]) == [
        "--set no-equals: expected KEY.PATH=VALUE, e.g. optimizer.lr=0.05"
    ]


def test_extra_baselines_are_validated_with_their_override(write_spec):
    text = MINIMAL + "baselines:\n  adam: {optimizer: {name: adam, lr: 0.001, momentum: 0.9}}\n"
    path = write_spec(text)
    assert errors_of(path) == [f"{path}:8: baselines.adam.optimizer.momentum: unknown key"]
    ok = write_spec(MINIMAL + "baselines:\n  adam: {optimizer: {name: adam, lr: 0.001}}\n")
    spec, _ = load_spec(ok)
    assert list(spec.baselines) == ["adam"]


SAME_DATA = "every arm must train on the same data: the spec's"
PER_ARM = "(only batch_size, augment, workers may differ)"
BASELINE_DATA = {
    "another dataset": (
        "{dataset: mnist1d}",
        "dataset",
        "dataset is 'synthetic', this " "baseline's 'mnist1d'",
    ),
    "another root": ("{root: elsewhere}", "root", "root is 'data', this baseline's 'elsewhere'"),
    "another val size": ("{val_size: 16}", "val_size", "val_size is 32, this baseline's 16"),
    "another input shape": ("{shape: [4]}", "shape", "shape is [8], this baseline's [4]"),
}


@pytest.mark.parametrize("case", BASELINE_DATA, ids=list(BASELINE_DATA))
def test_an_extra_baseline_may_not_change_the_data(case, write_spec):
    override, key, says = BASELINE_DATA[case]
    path = write_spec(MINIMAL + f"baselines:\n  other:\n    data: {override}\n")
    assert errors_of(path) == [
        f"{path}:9: baselines.other.data.{key}: {SAME_DATA} {says} {PER_ARM}"
    ]


def test_an_extra_baseline_may_change_how_batches_are_drawn(write_spec):
    path = write_spec(MINIMAL + "baselines:\n  big:\n    data: {batch_size: 16}\n")
    spec, _ = load_spec(path)
    assert list(spec.baselines) == ["big"]
