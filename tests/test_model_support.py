"""The model section: every arm's architecture lives in the support module, and the arm's
short build_model() passes its own settings to it."""

from __future__ import annotations

import ast

import pytest
from conftest import GENERATED, REPO, SCRIPTS, generate, run_inprocess

from generator.constants import LIBRARY_ARCHES
from generator.plan import plan, support_model
from generator.render import load_spec
from generator.scriptload import load_script

MIXED = """\
name: mixed
data: {dataset: synthetic, shape: [1, 40], num_classes: 4, train_size: 64, val_size: 32,
       test_size: 32, batch_size: 16}
model: {arch: mlp, hidden: [8]}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
train: {epochs: 1, stability_window: 2}
variants: [baseline, fixed]
baselines:
  cnn: {model: {arch: cnn1d, width: 4}}
"""


def _modules(path):
    """The nn.Module subclasses a file defines."""
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in tree.body
        if isinstance(n, ast.ClassDef) and any(ast.unparse(b) == "nn.Module" for b in n.bases)
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(GENERATED).as_posix())
def test_no_arm_defines_a_network(script):
    assert not _modules(script)


def test_an_extra_baseline_with_another_architecture_builds_its_own(tmp_path):
    folder = generate(tmp_path, MIXED)
    (support,) = folder.glob("*_support.py")
    assert _modules(support) == {"MLP", "CNN1d"}  # each architecture once
    sizes = {}
    for arm, network in (("baseline", "MLP"), ("fixed", "MLP"), ("baseline_cnn", "CNN1d")):
        script = folder / f"train_{arm}.py"
        ns = load_script(script)
        model = ns["build_model"]()
        assert type(model).__name__ == network and network in ns
        assert {"MLP", "CNN1d"} - {network} - set(ns)  # it imports only its own
        sizes[arm] = sum(p.numel() for p in model.parameters())
        finished = run_inprocess(script, "--smoke", "--out", tmp_path / arm)
        assert finished.returncode == 0, finished.stderr
    # MLP 40 -> 8 -> 4; CNN1d of width 4 over length 40 (19, 10, 5 after each convolution)
    assert sizes == {
        "baseline": 40 * 8 + 8 + 8 * 4 + 4,
        "fixed": 40 * 8 + 8 + 8 * 4 + 4,
        "baseline_cnn": (5 * 4 + 4) + 2 * (3 * 4 * 4 + 4) + (4 * 5 * 4 + 4),
    }


def test_the_support_model_names_what_its_architectures_need(write_spec):
    spec, doc = load_spec(write_spec(MIXED), [])
    mixed = support_model(plan(spec, doc))
    assert mixed.arches == ("cnn1d", "mlp")
    assert not mixed.library_arches and not mixed.imports_by_name
    lib = MIXED.replace("[1, 40]", "[3, 32, 32]").replace(
        "cnn: {model: {arch: cnn1d, width: 4}}", "tv: {model: {arch: torchvision, name: resnet18}}"
    )
    spec, doc = load_spec(write_spec(lib), [])
    library = support_model(plan(spec, doc))
    assert library.library_arches == ("torchvision",) and library.imports_by_name


@pytest.mark.parametrize("template", sorted((REPO / "templates" / "model").glob("*.py.jinja")))
def test_library_arches_are_those_whose_template_imports_a_library(template):
    arch = template.name.removesuffix(".py.jinja")
    assert ("import_library(" in template.read_text()) == (arch in LIBRARY_ARCHES)
