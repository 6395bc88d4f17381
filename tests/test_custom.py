"""Your own model and data: `arch: custom` / `dataset: custom` import factories — spec
validation, `validate --import`, the emitted script's checks, exact resume with DataLoader
workers, DDP and the clean ablation diff."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import GENERATED, REPO, cli, generate, run_inprocess, run_script, without_timing

FACTORIES = '''\
import torch
import torch.nn as nn


class Items(torch.utils.data.Dataset):
    """Learnable 1-D examples: the class is where the bump is."""

    def __init__(self, size, seed, bad=None):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(3, (size,), generator=g)
        self.x = torch.randn(size, 1, 12, generator=g) * 0.3
        self.x[torch.arange(size), 0, self.y * 4] += 2.0
        self.bad = bad

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if i == self.bad:
            return torch.zeros(1, 11), int(self.y[i])
        return self.x[i], int(self.y[i])


def two_splits(root, size=96, bad=None):
    return Items(size, 1, bad), Items(32, 2)


class Jittered(Items):
    """Items augmented in __getitem__ from torch's, random's and numpy's global streams."""

    def __getitem__(self, i):
        import random

        import numpy as np

        x, y = super().__getitem__(i)
        return x + 0.1 * torch.randn(x.shape) + random.gauss(0, 0.1) + np.random.normal(0, 0.1), y


def jittered(root):
    return Jittered(96, 1), Jittered(32, 2)


def float_labels(root, **args):
    return [(torch.zeros(1, 12), 0.5)], [(torch.zeros(1, 12), 0)]


class Stream(torch.utils.data.IterableDataset):
    def __len__(self):
        return 4

    def __iter__(self):
        return iter([])


def iterable(root):
    return Stream(), Stream()


def three_splits(root):
    return Items(96, 1), Items(24, 3), Items(32, 2)


def net(input_shape, num_classes, hidden=8, dropout=0.0):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], hidden), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(hidden, num_classes))


def not_a_module(input_shape, num_classes, **args):
    return 42


def no_classes(input_shape):
    return nn.Linear(1, 1)


def wrong_output(input_shape, num_classes, **args):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes + 1))
'''

SPEC = """\
name: mine
model: {arch: custom, factory: "user_code:net", args: {hidden: 8}}
data:
  dataset: custom
  factory: "user_code:two_splits"
  input_shape: [1, 12]
  num_classes: 3
  batch_size: 16
  val_size: 16
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
train: {epochs: 3, stability_window: 2}
variants: [baseline, fixed, full]
"""


@pytest.fixture
def user(tmp_path):
    """A folder holding the spec and user_code.py, the way a user would lay them out."""
    (tmp_path / "user_code.py").write_text(FACTORIES)
    (tmp_path / "spec.yaml").write_text(SPEC)
    return tmp_path


def validate(folder, *sets):
    args = [a for s in sets for a in ("--set", s)]
    return cli("validate", "--import", folder / "spec.yaml", *args)


# --- layer 1: the spec ------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, message",
    [
        ("model.factory=user_code", "model.factory: must look like"),
        ("model.factory=a.b:c d", "model.factory: must look like package.module:attribute"),
        ("data.factory=user_code.x", "data.factory: must look like"),
        ("model.args={1x: 2}", "model.args: key '1x' is not a Python identifier"),
        ("model.args={input_shape: 2}", "model.args.input_shape: is passed by perturbgen"),
        ("data.args={root: x}", "data.args.root: is passed by perturbgen itself"),
        ("data.args={n: .inf}", "must be a finite number"),
        ("data.augment=true", "data.augment: no augmentation is defined for custom"),
        ("data.input_shape=[]", "data.input_shape:"),
    ],
)
def test_bad_factory_settings_are_one_line_each(user, setting, message):
    result = cli("validate", user / "spec.yaml", "--set", setting)
    assert result.exit_code == 2
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_the_factory_line_is_named(user):
    (user / "spec.yaml").write_text(SPEC.replace('"user_code:net"', '"user code:net"'))
    result = cli("validate", user / "spec.yaml")
    assert result.exit_code == 2
    assert f"{user / 'spec.yaml'}:2: model.factory: must look like" in result.output


# --- validate --import ------------------------------------------------------------------


def test_validate_import_accepts_good_factories(user):
    result = validate(user)
    assert result.exit_code == 0, result.output
    assert "ok (mine: baseline, fixed, full)" in result.output


@pytest.mark.parametrize(
    "setting, message",
    [
        ("model.factory=no_such_module:net", "no module named 'no_such_module'"),
        ("model.factory=user_code:nope", "'user_code' has no attribute 'nope'"),
        ("model.factory=user_code:Items.nope", "has no attribute 'nope'"),
        ("model.factory=user_code:no_classes", "cannot be called as factory((1, 12), 3"),
        ("model.factory=user_code:not_a_module", "returned a int, not a torch.nn.Module"),
        ("model.factory=user_code:wrong_output", "expected logits of shape [2, 3]"),
        ("model.args={depth: 2}", "got an unexpected keyword argument 'depth'"),
        ("data.factory=user_code:net", "cannot be called as factory('data')"),
        ("data.factory=user_code:three_splits", "drop data.val_size"),
        ("data.factory=user_code:iterable", "its train split is a Stream, not a map-style"),
        ("data.input_shape=[1, 13]", "x has shape [1, 12]; data.input_shape is [1, 13]"),
        ("data.factory=user_code:float_labels", "y is 0.5; expected an int class in 0..2"),
        ("data.args={bad: 0}", "train example 0: x has shape [1, 11]"),
    ],
)
def test_validate_import_names_each_broken_factory(user, setting, message):
    result = validate(user, setting)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if "error(s)" not in line]
    assert len(lines) == 1 and message in lines[0], result.output
    assert lines[0].startswith(f"--set {setting}:") or f"{user / 'spec.yaml'}:" in lines[0]


def test_validate_import_leaves_sys_path_as_it_was(user):
    before = list(sys.path)
    assert validate(user).exit_code == 0
    assert sys.path == before


# --- the emitted script -----------------------------------------------------------------


def test_a_bad_example_is_one_error_line_naming_its_index(user):
    folder = generate(user / "g", SPEC, "data.args={bad: 5}", "data.workers=2")
    result = run_script(
        folder / "train_baseline.py", "--out", user / "r", cwd=user, env={"PYTHONPATH": str(user)}
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train example 5 of user_code:two_splits: x has shape [1, 11]; expected [1, 12]"
    )


def test_a_missing_module_at_run_time_says_where_to_put_it(user):
    folder = generate(user / "g", SPEC)
    result = run_script(folder / "train_baseline.py", "--out", user / "r", cwd=user / "g")
    assert result.returncode == 2
    assert "error: data.factory 'user_code:two_splits': no module named 'user_code'" in (
        result.stderr
    )
    assert "PYTHONPATH" in result.stderr and "Traceback" not in result.stderr


def test_val_is_carved_by_the_fixed_split_and_recorded(user, monkeypatch):
    monkeypatch.syspath_prepend(str(user))
    folder = generate(user / "g", SPEC)
    assert run_inprocess(folder / "train_baseline.py", "--out", user / "r").returncode == 0
    splits = json.loads((user / "r" / "config.json").read_text())["splits"]
    assert (splits["train"], splits["val"], splits["test"]) == (80, 16, 32)
    summary = json.loads((user / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_acc"] is not None


# a model with dropout: its masks come from the global stream, which a DataLoader that
# drew its workers' base seed from it (on resume, mid-epoch) would shift
DROPOUT = "model.args={hidden: 8, dropout: 0.5}"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("factory", ["two_splits", "jittered"])
def test_resume_mid_epoch_is_exact_with_dataloader_workers(user, factory, workers, monkeypatch):
    """5 steps per epoch: stopping after step 8 is mid-epoch 2; the resumed run must end on
    the same parameters, metrics and phases as the uninterrupted one, bit for bit — also
    when the dataset draws its own augmentation in __getitem__ (`jittered`)."""
    monkeypatch.syspath_prepend(str(user))
    data = f"data.factory=user_code:{factory}"
    folder = generate(user / "g", SPEC, f"data.workers={workers}", DROPOUT, data)
    script = folder / "train_full.py"
    assert run_inprocess(script, "--out", user / "a").returncode == 0
    first = run_inprocess(script, "--out", user / "b", "--max-steps", "8")
    assert first.returncode == 0, first.stderr
    assert json.loads((user / "b" / "summary.json").read_text())["status"] == "stopped"
    assert run_inprocess(script, "--out", user / "b", "--resume").returncode == 0
    for name in ("metrics.jsonl", "phases.jsonl"):
        assert without_timing(user / "a" / name) == without_timing(user / "b" / name), name
    a, b = (torch.load(user / r / "last.pt", weights_only=True)["model"] for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def torchrun(user, script, *args):
    """The script under 2-rank torchrun (gloo), the user's factories on PYTHONPATH."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            *map(str, args),
        ],
        cwd=user,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(user)},
    )


def test_two_rank_ddp_with_a_custom_dataset_keeps_replicas_identical(user):
    folder = generate(user / "g", SPEC, "data.workers=1")
    result = torchrun(user, folder / "train_full.py", "--out", user / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((user / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["replicas"][0] == summary["replicas"][1]
    assert summary["steps"] == 3 * 5  # 80 training examples, global batch 16


def test_two_rank_resume_mid_epoch_with_dropout_is_exact(user):
    """Each rank's loaders take their generators from (seed, epoch), not from the rank's
    global stream, so a 2-rank run stopped mid-epoch 2 and resumed ends bit for bit as the
    straight one, on both replicas."""
    script = generate(user / "g", SPEC, "data.workers=1", DROPOUT) / "train_full.py"
    straight = torchrun(user, script, "--out", user / "a")
    first = torchrun(user, script, "--out", user / "b", "--max-steps", "8")
    assert straight.returncode == 0 and first.returncode == 0, first.stderr[-3000:]
    second = torchrun(user, script, "--out", user / "b", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = (json.loads((user / r / "summary.json").read_text()) for r in "ab")
    assert a["replicas"][0] == a["replicas"][1] and a["replicas"] == b["replicas"]
    assert without_timing(user / "a" / "metrics.jsonl") == without_timing(
        user / "b" / "metrics.jsonl"
    )


# --- the example spec -------------------------------------------------------------------


def test_ablate_smoke_runs_the_example_with_its_factories_next_to_the_spec(tmp_path):
    spec = REPO / "specs" / "custom_stripes.yaml"
    result = cli(
        "ablate",
        spec,
        "--smoke",
        "--seeds",
        "1",
        "--jobs",
        "2",
        "--arms",
        "baseline,full",
        "-o",
        tmp_path / "abl",
    )
    assert result.exit_code == 0, result.output
    for arm in ("baseline", "full"):
        s = json.loads((tmp_path / "abl" / arm / "seed0" / "summary.json").read_text())
        assert s["status"] == "completed"
    assert (tmp_path / "abl" / "report" / "report.md").exists()


def test_the_example_trains_its_own_data_through_the_spec_folder(tmp_path):
    """Not --smoke: the stripes come from specs/custom/my_data.py via PYTHONPATH."""
    script = GENERATED / "custom_stripes" / "train_full.py"
    result = run_script(
        script,
        "--epochs",
        "1",
        "--out",
        tmp_path / "r",
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO / "specs")},
    )
    assert result.returncode == 0, result.stderr
    splits = json.loads((tmp_path / "r" / "config.json").read_text())["splits"]
    assert (splits["train"], splits["val"], splits["test"]) == (768, 256, 256)


def test_the_ablation_diff_shows_only_the_method():
    result = cli("diff", REPO / "specs" / "custom_stripes.yaml", "baseline", "full")
    assert result.exit_code == 0
    changed = [
        line[1:]
        for line in result.output.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert not any("FACTORY" in line or "build_model" in line for line in changed)
    assert any("Perturbation" in line for line in changed)


# --- layer 2: the render model ----------------------------------------------------------


def test_render_model_names_the_factories_and_the_loader(user):
    from generator.plan import plan
    from generator.render import load_spec

    spec, doc = load_spec(user / "spec.yaml")
    models = plan(spec, doc)
    assert {m.arm for m in models} == {"baseline", "fixed", "full"}
    for m in models:
        assert m.factory_refs == (
            "model.factory = user_code:net",
            "data.factory = user_code:two_splits",
        )
        assert m.factories and m.loader_data
        values = {c.name: c.value for c in m.constants}
        assert values["MODEL_ARGS"] == {"hidden": 8} and values["DATA_ARGS"] == {}
        assert values["INPUT_SHAPE"] == (1, 12) and values["VAL_SIZE"] == 16
    custom_model_only = SPEC[: SPEC.index("data:")] + "data: {dataset: synthetic}\n"
    custom_model_only += SPEC[SPEC.index("optimizer:") :]
    (user / "spec.yaml").write_text(custom_model_only)
    spec, doc = load_spec(user / "spec.yaml")
    m, *_ = plan(spec, doc)
    assert m.factory_refs == ("model.factory = user_code:net",) and not m.loader_data
