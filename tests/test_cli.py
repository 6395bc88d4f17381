"""The CLI: exit codes, errors printed together, nothing written on error, help text."""

from __future__ import annotations

import json

import pytest
from conftest import MINIMAL, REPO, cli


def assert_clean(result):
    """No Python traceback ever reaches the user."""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


BAD = {
    "typo'd key": (("hidden", "hiden"), ":3: model.hiden: unknown key; did you mean 'hidden'?"),
    "negative lr": (("lr: 0.1", "lr: -0.1"), ":4: optimizer.lr: must be > 0 (got -0.1)"),
    "unclosed flow mapping": (
        ("[16]}", "[16]"),
        ":3: YAML syntax error: while parsing a flow mapping opened here:",
    ),
    "duplicate key": (("train:", "seed: 1\nseed: 1\ntrain:"), ":6: seed: duplicate key"),
    "unclosed flow sequence": (
        ("[baseline, fixed]", "[baseline,\n  fixed\nseed: 3"),
        ":6: YAML syntax error: while parsing a flow sequence opened here: expected ',' or ']', "
        "but got ':' on line 8",
    ),
    "missing parent": (("name: tiny", "extends: gone.yaml\nname: tiny"), ":1: extends: "),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_spec_exits_2_with_one_line_and_writes_nothing(case, write_spec, tmp_path):
    (old, new), message = BAD[case]
    path = write_spec(MINIMAL.replace(old, new, 1))
    out = tmp_path / "out"
    result = cli("generate", path, "-o", out)
    assert result.exit_code == 2
    assert_clean(result)
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"{path}{message}"), lines
    assert lines[1:] == ["1 error(s); nothing was written."]
    assert not out.exists()


def test_errors_of_all_specs_are_printed_together(write_spec, tmp_path):
    a = write_spec(MINIMAL.replace("lr: 0.1", "lr: -1"), "a.yaml")
    b = write_spec(MINIMAL.replace("hidden", "hiden"), "b.yaml")
    good = write_spec(MINIMAL.replace("name: tiny", "name: good"), "good.yaml")
    result = cli("validate", a, b, good)
    assert result.exit_code == 2
    assert f"{a}:4: optimizer.lr" in result.output and f"{b}:3: model.hiden" in result.output
    assert "2 error(s)" in result.output
    out = tmp_path / "out"
    assert cli("generate", a, good, "-o", out).exit_code == 2
    assert not out.exists()  # the good spec is not written either


def test_invalid_spec_leaves_the_previous_output_untouched(write_spec, tmp_path):
    path = write_spec()
    out = tmp_path / "out"
    assert cli("generate", path, "-o", out).exit_code == 0
    before = {p: p.read_bytes() for p in (out / "tiny").iterdir()}
    path.write_text(MINIMAL.replace("lr: 0.1", "lr: -1"))
    assert cli("generate", path, "-o", out).exit_code == 2
    assert {p: p.read_bytes() for p in (out / "tiny").iterdir()} == before


def test_generate_writes_every_arm(write_spec, tmp_path):
    result = cli("generate", write_spec(), "-o", tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [
        "README.md",
        "manifest.json",
        "tiny_support.py",
        "train_baseline.py",
        "train_fixed.py",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_variant_and_set_options(write_spec, tmp_path):
    result = cli(
        "generate",
        write_spec(),
        "-o",
        tmp_path,
        "--variant",
        "fixed",
        "--set",
        "perturbation.fixed=0.05",
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "tiny"
    assert sorted(p.name for p in folder.glob("train_*.py")) == ["train_fixed.py"]
    assert "EPS_FIXED = 0.05" in (folder / "train_fixed.py").read_text()
    assert (
        json.loads((folder / "manifest.json").read_text())["resolved_spec"]["perturbation"][
            "fixed"
        ]
        == 0.05
    )
    bad = cli("generate", write_spec(), "-o", tmp_path, "--variant", "full")
    assert bad.exit_code == 2
    assert "no arm named 'full' (this spec has: baseline, fixed)" in bad.output


def test_set_typos_get_a_hint_and_print_together(write_spec):
    result = cli(
        "validate",
        write_spec(),
        "--set",
        "optimizer.learning_rate=1",
        "--set",
        "perturbation.fixd=0.1",
    )
    assert result.exit_code == 2
    assert_clean(result)
    assert result.output.splitlines() == [
        "--set optimizer.learning_rate=1: optimizer.learning_rate: unknown key; "
        "did you mean 'lr'?",
        "--set perturbation.fixd=0.1: perturbation.fixd: unknown key; did you mean 'fixed'?",
        "2 error(s); nothing was written.",
    ]


def test_missing_file_and_empty_folder(tmp_path):
    result = cli("validate", tmp_path / "nope.yaml", tmp_path)
    assert result.exit_code == 2
    assert_clean(result)
    assert f"{tmp_path / 'nope.yaml'}: file not found" in result.output
    assert f"{tmp_path}: folder holds no *.yaml spec" in result.output


def test_check_on_a_missing_folder_is_drift(write_spec, tmp_path):
    result = cli("generate", write_spec(), "-o", tmp_path / "none", "--check")
    assert result.exit_code == 1
    assert (
        "is missing" in result.output and "refresh it with: perturbgen generate" in result.output
    )
    assert not (tmp_path / "none").exists()


def test_validate_ok():
    result = cli("validate", REPO / "specs")
    assert result.exit_code == 0, result.output
    assert (
        "mnist1d_cnn: baseline, fixed, phase_only, schedule_only, full, gradient_noise, "
        "anti_pgd, baseline_adam, baseline_sgd_constant"
    ) in result.output


def test_usage_error_exits_2():
    result = cli("generate")
    assert result.exit_code == 2
    assert_clean(result)


def test_schema_and_variants():
    schema = json.loads(cli("schema").output)
    assert schema["additionalProperties"] is False and "optimizer" in schema["required"]
    table = cli("variants").output
    for arm in ("baseline", "fixed", "phase_only", "schedule_only", "full", "gradient_noise"):
        assert arm in table
    assert "sigma; theta gets xi_{t+1} - xi_t" in table
    assert "eps_phase[p] * exp(-lambda * t_p)" in table


@pytest.mark.parametrize("command", ["generate", "validate", "schema", "variants"])
def test_every_option_has_help(command):
    import typer.main

    from generator.cli import app

    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        if param.param_type_name == "option" and param.name != "help":
            assert param.help, f"{command} --{param.name} has no help text"
