"""`arch: torchvision` and `arch: timm`: library models by name, random init, as optional
extras. PyPI's torchvision is a CUDA build that does not import beside the CPU torch this
suite runs on (and timm imports torchvision), so the real libraries run in a second
environment, the library environment (`.venv-lib`, which .ci/run builds: PyPI's torch with
the torchvision and timm made for it; it runs on the CPU): the emitted scripts' parameter
counts against the published ones, every arm's smoke run and an exact resume run there, in
its python. The wiring is also checked here against small stand-in packages with the same
entry points."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LOADER, REPO, cli, generate, run_script

# the library environment; PERTURBGEN_LIB_ENV names another folder
LIB_ENV = Path(os.environ.get("PERTURBGEN_LIB_ENV", REPO / ".venv-lib"))
MAKE_LIB_ENV = "python3 -m venv .venv-lib && .venv-lib/bin/pip install torchvision timm"

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

COUNT = LOADER + """\
import sys
ns = load_script(sys.argv[1], run_name="perturbgen_test")
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


@pytest.fixture(scope="module")
def lib_python():
    """The library environment's python. Where it is missing or does not import both
    libraries the tests that need it skip, saying how to make it, except under CI=true,
    where they fail: CI builds it (.ci/run)."""
    python, problem = LIB_ENV / "bin" / "python", None
    if not python.is_file():
        problem = f"no library environment at {LIB_ENV}"
    else:
        check = subprocess.run(
            [python, "-c", "import torchvision, timm"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={"PATH": "/usr/bin:/bin"},
        )
        if check.returncode != 0:
            last = (check.stderr.strip().splitlines() or ["no output"])[-1]
            problem = f"{LIB_ENV} does not import torchvision and timm ({last})"
    if problem is None:
        return python
    message = f"{problem}: make it with `{MAKE_LIB_ENV}` (or set PERTURBGEN_LIB_ENV)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


# Runs emitted scripts' main() one after another in one interpreter of the library
# environment (its torch starts once): argv[1] is a JSON list of [script, arg, ...].
RUN = LOADER + """\
import json, sys
for script, *args in json.loads(sys.argv[1]):
    code = load_script(script, run_name="perturbgen_test")["main"](args)
    if code:
        sys.exit(f"{script} {args} returned {code}")
"""

# Prints, per (arch, script) pair in argv[1:], the script's build_model()'s parameter count
# and that of the library's own builder called with the same name and class count.
COUNT_BOTH = LOADER + """\
import sys
import timm, torchvision
for arch, script in zip(sys.argv[1::2], sys.argv[2::2]):
    ns = load_script(script, run_name="perturbgen_test")
    name, classes = ns["LIBRARY_MODEL"], ns["NUM_CLASSES"]
    if arch == "timm":
        own = timm.create_model(name, pretrained=False, num_classes=classes)
    else:
        own = torchvision.models.get_model_builder(name)(weights=None, num_classes=classes)
    count = lambda model: sum(p.numel() for p in model.parameters())
    print(count(ns["build_model"]()), count(own))
"""


def in_lib_env(python, program, *args, cwd):
    result = subprocess.run(
        [python, "-c", program, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


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
def test_a_missing_library_is_one_line_naming_an_install_that_works(arch, tmp_path):
    """The install the line names is the one that made the library environment, which the
    tests above run in (not `pip install torchvision` beside a CPU torch: that is what
    leaves a torchvision that does not import)."""
    if importable(arch):
        pytest.skip(f"{arch} imports here")
    folder = generate(tmp_path / "g", spec_text(arch, "tiny"))
    result = run_script(
        folder / "train_baseline.py", "--smoke", "--out", tmp_path / "r", cwd=tmp_path
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: arch: {arch} needs the {arch} package, which did not import")
    hint = (
        "install it with the torch it was built for, e.g. in a fresh virtual environment: "
        f"pip install {arch}"
    )
    assert line.endswith(hint)
    (tmp_path / "spec.yaml").write_text(spec_text(arch, "tiny"))
    checked = cli("validate", "--import", tmp_path / "spec.yaml")
    assert checked.exit_code == 2 and hint in " ".join(checked.output.split())


# the published counts (ImageNet, 1000 classes) that say an architecture is the real one
PUBLISHED = {
    ("torchvision", "resnet18"): 11_689_512,
    ("torchvision", "efficientnet_b0"): 5_288_548,
    ("timm", "resnet18"): 11_689_512,
    ("timm", "efficientnet_b0"): 5_288_548,
}


def test_parameter_counts_are_the_published_ones(lib_python, tmp_path):
    scripts = []
    for arch, name in PUBLISHED:
        spec = spec_text(arch, name).replace("num_classes: 10", "num_classes: 1000")
        scripts += [arch, generate(tmp_path / f"{arch}_{name}", spec) / "train_baseline.py"]
    lines = in_lib_env(lib_python, COUNT_BOTH, *scripts, cwd=tmp_path).splitlines()
    counts = {key: tuple(map(int, line.split())) for key, line in zip(PUBLISHED, lines)}
    assert counts == {key: (n, n) for key, n in PUBLISHED.items()}


# a model with dropout (torchvision's classifier; timm's drop rates): a resume must replay
# its masks too
LIBRARY_RUNS = {
    "torchvision": ("mobilenet_v3_small", None),
    "timm": ("resnet10t", "{drop_rate: 0.2, drop_path_rate: 0.1}"),
}


@pytest.mark.parametrize("arch", LIBRARY_RUNS)
def test_every_arm_smoke_runs_and_a_resume_is_exact(arch, lib_python, tmp_path):
    """Every arm's smoke run (2 epochs of 2 steps) in the library environment; then the full
    arm stopped after step 3 (mid-epoch 2) and resumed ends on the smoke run's weights."""
    name, args = LIBRARY_RUNS[arch]
    spec = (
        spec_text(arch, name, args)
        .replace("[baseline, full]", "[baseline, fixed, phase_only, schedule_only, full]")
        .replace("epochs: 1", "epochs: 2")
    )
    folder = generate(tmp_path / "g", spec)
    arms = ("baseline", "fixed", "phase_only", "schedule_only", "full")
    runs = [
        [str(folder / f"train_{arm}.py"), "--smoke", "--out", str(tmp_path / arm)] for arm in arms
    ]
    full = str(folder / "train_full.py")
    runs.append([full, "--smoke", "--out", str(tmp_path / "b"), "--max-steps", "3"])
    runs.append([full, "--smoke", "--out", str(tmp_path / "b"), "--resume"])
    in_lib_env(lib_python, RUN, json.dumps(runs), cwd=tmp_path)
    for arm in arms:
        summary = json.loads((tmp_path / arm / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 4, arm
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in ("full", "b"))
    assert b["state"]["step"] == 4 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_arguments_perturbgen_passes_itself_are_refused(tmp_path):
    (tmp_path / "spec.yaml").write_text(spec_text("timm", "tiny", "{pretrained: true}"))
    result = cli("validate", tmp_path / "spec.yaml")
    assert result.exit_code == 2
    assert "model.args.pretrained: is passed by perturbgen itself" in result.output
