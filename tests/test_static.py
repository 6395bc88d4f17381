"""Layer 4: static checks of every emitted file, for every arm of every spec."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys

import pytest
from conftest import GENERATED, SCRIPTS, cli

ids = [p.relative_to(GENERATED).as_posix() for p in SCRIPTS]


def test_there_are_scripts_to_check():
    assert len(SCRIPTS) >= 6


def test_ruff_finds_no_undefined_or_unused_names(tmp_path, write_spec):
    # the golden record, plus every arm of a spec using the other options
    spec = write_spec()
    assert cli("generate", spec, "-o", tmp_path / "out").exit_code == 0
    ruff = [sys.executable, "-m", "ruff"] if shutil.which("ruff") is None else ["ruff"]
    result = subprocess.run(
        [
            *ruff,
            "check",
            "--no-cache",
            "--isolated",
            "--select",
            "F821,F401,F811,F841,E9",
            str(GENERATED),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=ids)
def test_script_reads_like_a_script(script):
    source = script.read_text()
    tree = ast.parse(source)
    assert ast.get_docstring(tree).startswith(script.parent.name)
    assert max(len(line) for line in source.splitlines()) < 100
    calls = {
        n.func.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert not calls & {"exec", "eval", "globals", "compile"}
    # no work at import time: the module body holds only imports, constants, defs and the guard
    for node in tree.body:
        assert isinstance(
            node,
            (
                ast.Import,
                ast.ImportFrom,
                ast.Assign,
                ast.FunctionDef,
                ast.ClassDef,
                ast.If,
                ast.Expr,
                ast.Try,
            ),
        ), ast.dump(node)[:80]
        if isinstance(node, ast.Try):  # only an optional import with its fallback
            assert all(isinstance(n, ast.Import) for n in node.body)
            assert [h.type.id for h in node.handlers] == ["ImportError"]
    sections = [line for line in source.splitlines() if line.startswith("# ")]
    order = [
        s
        for s in ["# Data", "# Model", "# Perturbation", "# Checkpointing", "# Training"]
        if s in sections
    ]
    assert order == [s for s in sections if s in order]


# The names each arm's script must define, and those it must not: an arm holds only the
# code its ablation needs.
ARM_NAMES = {
    "baseline": set(),
    "fixed": {"Perturbation", "EPS_FIXED"},
    "phase_only": {"Perturbation", "PhaseDetector", "EPS_PHASE", "EVERY", "WINDOW"},
    "schedule_only": {"Perturbation", "EPS_BASE", "DECAY"},
    "full": {"Perturbation", "PhaseDetector", "EPS_PHASE", "DECAY", "EVERY", "WINDOW"},
}


@pytest.mark.parametrize("script", SCRIPTS, ids=ids)
def test_each_arm_holds_only_the_code_it_needs(script):
    tree = ast.parse(script.read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    defined |= {
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    arm = script.stem.removeprefix("train_")
    kind = "baseline" if arm.startswith("baseline") else arm
    everything = set().union(*ARM_NAMES.values())
    assert defined & everything == ARM_NAMES[kind]


def test_two_arms_differ_only_in_the_ablation():
    base = (GENERATED / "mnist1d_cnn" / "train_baseline.py").read_text().splitlines()
    fixed = (GENERATED / "mnist1d_cnn" / "train_fixed.py").read_text().splitlines()
    import difflib

    removed = [l for l in difflib.ndiff(base, fixed) if l.startswith("- ")]
    # the baseline loses nothing but its name, the docstring's no-perturbation line, and
    # the two optimizer calls that the perturbing arms hand to Perturbation
    handed_over = {"optimizer.zero_grad(set_to_none=True)", "optimizer.step()"}
    assert all(
        "baseline" in l
        or "No perturbation" in l
        or "reference" in l
        or "kernel" in l
        or l[2:].strip() in handed_over
        for l in removed
    ), removed
