"""The emitted folder's shape: small arm scripts beside one support module per spec."""

from __future__ import annotations

import difflib
import inspect
import math
import re
import subprocess
import sys

import pytest
from conftest import GENERATED, LOADER, MINIMAL, REPO, cli, generate

from generator.scriptload import data_settings, load_script

FOLDERS = sorted(p for p in GENERATED.iterdir() if p.is_dir())


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_one_support_module_serves_every_arm(folder):
    (support,) = folder.glob("*_support.py")
    assert support.name == f"{folder.name}_support.py"
    for script in folder.glob("train_*.py"):
        assert f"\nfrom {support.stem} import (\n" in script.read_text(), script.name


def test_the_support_module_is_the_same_whichever_arms_are_written(tmp_path):
    # the golden record writes every arm; one arm alone, an extra baseline (other optimizer
    # and schedule), gets the same file
    spec = GENERATED.parent / "specs" / "mnist1d_cnn.yaml"
    result = cli("generate", spec, "--variant", "baseline_adam", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    name = "mnist1d_cnn_support.py"
    assert (tmp_path / "mnist1d_cnn" / name).read_bytes() == (
        GENERATED / "mnist1d_cnn" / name
    ).read_bytes()


def test_the_support_module_needs_torch_and_the_standard_library_only():
    # everything importing it loads beyond what `import torch` loads is stdlib (or triton,
    # optional); mnist1d, scipy and the like are the dataset's, imported when data is read
    probe = (
        "import sys, sysconfig, torch\n"
        "before = set(sys.modules)\n"
        f"sys.path.insert(0, {str(GENERATED / 'mnist1d_cnn')!r})\n"
        "import mnist1d_cnn_support\n"
        "stdlib = sysconfig.get_paths()['stdlib']\n"
        "def outside(name):\n"
        "    where = getattr(sys.modules[name], '__file__', None) or stdlib\n"
        "    return not where.startswith(stdlib) or 'site-packages' in where\n"
        "new = {m for m in set(sys.modules) - before if m.split('.')[0] not in "
        "sys.stdlib_module_names and outside(m)}\n"
        "print(sorted({m.split('.')[0] for m in new} - {'torch', 'triton', "
        "'mnist1d_cnn_support'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_ablation_diff_is_short():
    # issue 26's target: baseline -> fixed shows the method and its call sites, on one screen
    folder = GENERATED / "mnist1d_cnn"
    base, fixed = (
        (folder / f"train_{a}.py").read_text().splitlines() for a in ("baseline", "fixed")
    )
    diff = [line for line in difflib.ndiff(base, fixed) if line[:1] in "+-"]
    assert len(diff) <= 150


def test_the_arm_scripts_are_nanogpt_sized():
    # issue 26's targets for mnist1d_cnn: each arm is its settings, its method and its loop
    folder = GENERATED / "mnist1d_cnn"
    lines = {
        a: len((folder / f"train_{a}.py").read_text().splitlines()) for a in ("baseline", "full")
    }
    assert lines["baseline"] <= 400 and lines["full"] <= 600, lines


TEMPLATES = sorted((REPO / "templates").rglob("*.jinja"))
CONTROL_TAG = re.compile(r"\{%-?\s*(?:if|elif|else|for)\b")


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_templates_read_like_their_output(template):
    # no template over about 400 lines, and at most about 5 control tags per 100 lines,
    # rounded up (a file under 60 lines may hold 3): variants are files chosen by a
    # render-model field, and a condition of more than one line is a field
    text = template.read_text()
    lines = len(text.splitlines())
    tags = len(CONTROL_TAG.findall(text))
    assert lines <= 400, lines
    assert tags <= math.ceil(5 * max(lines, 60) / 100), (tags, lines)


def test_scripts_of_two_folders_of_one_spec_name_load_their_own_support(tmp_path):
    # two generations of the same spec name in one process (as the tests and a notebook
    # run them): each script sees its own folder's support module, never the first one's
    first = generate(tmp_path / "a")
    second = generate(tmp_path / "b", MINIMAL.replace("epochs: 2", "epochs: 1"))
    (second / f"{second.name}_support.py").write_text(
        (second / f"{second.name}_support.py").read_text() + "\nMARK = 'b'\n"
    )
    a = load_script(first / "train_baseline.py")
    b = load_script(second / "train_baseline.py")
    assert "MARK" not in a["fail"].__globals__
    assert b["fail"].__globals__.get("MARK") == "b"
    assert sys.modules.get(f"{first.name}_support") is None  # nothing left behind


def test_a_probe_in_another_interpreter_loads_the_script_beside_its_support(tmp_path):
    script = GENERATED / "mnist1d_cnn" / "train_baseline.py"
    probe = LOADER + f"print(load_script({str(script)!r})['fail'].__module__)\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mnist1d_cnn_support"


def keywords(function, required=False):
    """The keyword-only parameters of `function` (those without a default, if `required`)."""
    return {
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind == p.KEYWORD_ONLY and not (required and p.default is not p.empty)
    }


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_each_arm_passes_load_data_what_its_data_source_takes(folder):
    # --smoke never calls the dataset's source: its keywords are checked here, every arm's
    for script in sorted(folder.glob("train_*.py")):
        ns = load_script(script)
        settings = data_settings(ns)
        load_data = ns["load_data"]
        source = load_data.__globals__["DATA_SOURCES"][settings["dataset"]]
        assert set(settings) <= keywords(load_data) | keywords(source), script.name
        assert keywords(load_data, True) | keywords(source, True) <= set(settings), script.name
