"""`arch: torchvision` and `arch: timm`: library models by name, random init, as optional
extras. PyPI's torchvision 0.28.0 is a CUDA build that does not import with the CPU torch
this suite runs on (and timm imports torchvision), so the wiring is also checked against
small stand-in packages with the same entry points; the parameter-count check against the
real library runs wherever it imports."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import cli, generate, run_script

SPEC = """\
name: lib
data: {dataset: synthetic, shape: [3, 32, 32], num_classes: 10, train_size: 64, val_size: 32,
       test_size: 32}
model: {arch: ARCH, name: NAME}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
train: {epochs: 1, stability_window: 2}
variants: [baseline, full]
"""

# Stand-ins with the entry points perturbgen calls; each builder refuses a download.
FAKES = {
    "torchvision": {
        "__init__.py": "__version__ = 'stand-in'\nfrom torchvision import models\n",
        "models.py": """\
import torch.nn as nn


def get_model_builder(name):
    if name != "tiny":
        raise ValueError(f"Unknown model {name}")

    def tiny(*, weights="DEFAULT", num_classes=1000, width=4):
        assert weights is None, "asked for pretrained weights"
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.ReLU(),
                             nn.Linear(width, num_classes))

    return tiny
""",
    },
    "timm": {
        "__init__.py": """\
import torch.nn as nn

__version__ = "stand-in"


def is_model(name):
    return name == "tiny"


def create_model(name, pretrained=True, num_classes=1000, in_chans=3, width=4):
    assert not pretrained, "asked for pretrained weights"
    return nn.Sequential(nn.Conv2d(in_chans, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))
""",
    },
}

COUNT = """\
import runpy, sys
ns = runpy.run_path(sys.argv[1], run_name="perturbgen_test")
print(sum(p.numel() for p in ns["build_model"]().parameters()))
"""


def stand_in(tmp_path, arch):
    folder = tmp_path / "site"
    (folder / arch).mkdir(parents=True)
    for name, text in FAKES[arch].items():
        (folder / arch / name).write_text(text)
    return folder


def spec_text(arch, name, args=None):
    text = SPEC.replace("ARCH", arch).replace("NAME", name)
    return text.replace("}\noptimizer", f", args: {args}}}\noptimizer") if args else text


def count_parameters(script, pythonpath):
    result = subprocess.run(
        [sys.executable, "-c", COUNT, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


def importable(name):
    try:
        return importlib.util.find_spec(name) is not None and bool(importlib.import_module(name))
    except Exception:  # noqa: BLE001 - installed but broken is not importable
        return False


@pytest.mark.parametrize("arch", ["torchvision", "timm"])
def test_a_stand_in_library_model_trains_with_its_args_and_no_weights(arch, tmp_path):
    site = stand_in(tmp_path, arch)
    folder = generate(tmp_path / "g", spec_text(arch, "tiny", "{width: 6}"))
    for script in ("train_baseline.py", "train_full.py"):
        result = run_script(
            folder / script,
            "--smoke",
            "--out",
            tmp_path / script,
            cwd=tmp_path,
            env={"PYTHONPATH": str(site)},
        )
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads((tmp_path / script / "summary.json").read_text())
        assert summary["status"] == "completed"
    width, classes = 6, 10  # the spec's args and num_classes reached the builder
    expected = (
        3 * 32 * 32 * width + width + width * classes + classes
        if arch == "torchvision"
        else 3 * width * 9 + width + width * classes + classes
    )
    assert count_parameters(folder / "train_full.py", site) == expected


@pytest.mark.parametrize("arch", ["torchvision", "timm"])
def test_validate_import_finds_the_stand_in_and_refuses_an_unknown_name(arch, tmp_path):
    site = stand_in(tmp_path, arch)
    (tmp_path / "spec.yaml").write_text(spec_text(arch, "nope"))
    sys.path.insert(0, str(site))
    try:
        bad = cli("validate", "--import", tmp_path / "spec.yaml")
        good = cli("validate", "--import", tmp_path / "spec.yaml", "--set", "model.name=tiny")
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(arch, None)
        sys.modules.pop(f"{arch}.models", None)
    assert bad.exit_code == 2 and f"model.name: nope: {arch} has no model named 'nope'" in (
        bad.output
    )
    assert good.exit_code == 0, good.output


@pytest.mark.parametrize("arch", ["torchvision", "timm"])
def test_a_missing_library_is_one_line_naming_the_extra(arch, tmp_path):
    if importable(arch):
        pytest.skip(f"{arch} imports here")
    folder = generate(tmp_path / "g", spec_text(arch, "tiny"))
    result = run_script(
        folder / "train_baseline.py", "--smoke", "--out", tmp_path / "r", cwd=tmp_path
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: arch: {arch} needs the {arch} package, which did not import")
    assert line.endswith(f"pip install 'perturbgen[{arch}]')")
    (tmp_path / "spec.yaml").write_text(spec_text(arch, "tiny"))
    checked = cli("validate", "--import", tmp_path / "spec.yaml")
    assert checked.exit_code == 2 and f"perturbgen[{arch}]" in checked.output


@pytest.mark.parametrize(
    "arch, name", [("torchvision", "mobilenet_v3_small"), ("timm", "resnet10t")]
)
def test_parameter_count_is_the_library_s_own(arch, name, tmp_path):
    if not importable(arch):
        pytest.skip(f"{arch} does not import here (PyPI's wheel is built for CUDA torch)")
    lib = importlib.import_module(arch)
    folder = generate(tmp_path / "g", spec_text(arch, name))
    if arch == "torchvision":
        own = lib.models.get_model_builder(name)(weights=None, num_classes=10)
    else:
        own = lib.create_model(name, pretrained=False, num_classes=10, in_chans=3)
    count = count_parameters(folder / "train_baseline.py", ":".join(sys.path))
    assert count == sum(p.numel() for p in own.parameters())
    result = run_script(folder / "train_full.py", "--smoke", "--out", tmp_path / "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


def test_arguments_perturbgen_passes_itself_are_refused(tmp_path):
    (tmp_path / "spec.yaml").write_text(spec_text("timm", "tiny", "{pretrained: true}"))
    result = cli("validate", tmp_path / "spec.yaml")
    assert result.exit_code == 2
    assert "model.args.pretrained: is passed by perturbgen itself" in result.output
