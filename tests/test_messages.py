"""Commands that name what to type and keep what is there: 'did you mean' for arm names
wherever one is given, one error (at the typo) for a misspelt required key, and
`generate --variant` into a folder that holds the spec's other arms."""

from __future__ import annotations

import json

import pytest
from conftest import MINIMAL, cli

from generator.render import load_spec

TYPO = "; did you mean 'fixed'?"


def test_a_misspelt_required_key_is_one_error_at_the_typo(write_spec):
    spec = write_spec(MINIMAL.replace("optimizer:", "optimiser:"))
    result = cli("validate", spec)
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"{spec}:4: optimiser: unknown key; did you mean 'optimizer'?",
        "1 error(s); nothing was written.",
    ]


def test_a_missing_required_key_without_a_typo_is_still_reported(write_spec):
    spec = write_spec(MINIMAL.replace("optimizer:", "zzz:"))
    result = cli("validate", spec)
    assert "optimizer: required key is missing" in result.output
    assert "zzz: unknown key" in result.output


def test_a_misspelt_kind_gets_a_suggestion(write_spec):
    spec = write_spec(MINIMAL.replace("name: sgd", "name: adamw_").replace("sgd", "x"))
    result = cli("validate", spec)
    assert "optimizer.name: must be one of" in result.output
    assert "did you mean 'adamw'?" in result.output


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "SPEC", "-o", "OUT", "--variant", "fixd"],
        ["ablate", "SPEC", "-o", "OUT", "--arms", "baseline,fixd"],
        ["diff", "SPEC", "baseline", "fixd"],
        ["export", "SPEC", "fixd", "-o", "OUT/m.py"],
        [
            "tune",
            "SPEC",
            "--set",
            "tune={arms: [fixd], space: {optimizer.lr: {low: 0.1, high: 1}}}",
        ],
    ],
)
def test_an_arm_misspelt_on_the_command_line_gets_a_suggestion(write_spec, tmp_path, command):
    spec = write_spec()
    out = tmp_path / "out"
    args = [str(spec) if a == "SPEC" else a.replace("OUT", str(out)) for a in command]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert "'fixd'" in result.output and TYPO in result.output, result.output
    assert not out.exists()


def test_generate_one_variant_into_a_folder_keeps_the_other_arms(write_spec, tmp_path):
    spec = write_spec(MINIMAL.replace("[baseline, fixed]", "[baseline, fixed, full]"))
    out = tmp_path / "out"
    assert cli("generate", spec, "-o", out).exit_code == 0
    result = cli("generate", spec, "-o", out, "--variant", "fixed", "--set", "seed=7")
    assert result.exit_code == 0, result.output
    folder = out / "tiny"
    manifest = json.loads((folder / "manifest.json").read_text())
    scripts = ["train_baseline.py", "train_fixed.py", "train_full.py"]
    assert [f for f in manifest["files"] if f.startswith("train_")] == scripts
    assert sorted(p.name for p in folder.glob("train_*.py")) == scripts
    assert manifest["resolved_spec"]["seed"] == 7  # every arm: one folder, one spec
    check = cli("generate", spec, "-o", out, "--set", "seed=7", "--check")
    assert check.exit_code == 0, check.output


def test_ablate_into_a_folder_of_another_spec_names_each_difference(write_spec, tmp_path):
    spec, out = write_spec(), tmp_path / "ab"
    first = cli("ablate", spec, "--smoke", "--seeds", "1", "--arms", "baseline", "-o", out)
    assert first.exit_code == 0, first.output
    again = cli("ablate", spec, "--smoke", "--seeds", "1", "-o", out, "--epochs", "3",
                "--set", "optimizer.lr=0.05", "--set", "optimizer.momentum=0")  # fmt: skip
    assert again.exit_code == 2
    assert (
        f"{out}: holds runs made with other settings (epochs: None -> 3; overrides: [] -> "
        "['optimizer.lr=0.05', 'optimizer.momentum=0']; spec.optimizer.lr: 0.1 -> 0.05; "
        "spec.optimizer.momentum: 0.9 -> 0.0); rerun with the same ones, or choose another --out"
    ) in " ".join(again.output.split())


def test_tuned_yaml_keeps_the_tune_values_given_with_set(write_spec, tmp_path):
    tune = "tune: {arms: [baseline], trials: 1, fresh_seeds: 0, pruner: none, space: {optimizer.lr: {low: 0.01, high: 0.1}}}\n"
    spec, out = write_spec(MINIMAL + tune), tmp_path / "t"
    result = cli("tune", spec, "-o", out, "--set", "tune.epochs=1", "--set", "seed=3")
    assert result.exit_code == 0, result.output
    tuned, _ = load_spec(out / "tuned" / "baseline.yaml")
    assert tuned.tune.epochs == 1 and tuned.seed == 3
