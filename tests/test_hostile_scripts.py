"""Emitted scripts under damage: checkpoints, full disks, broken data and signals.

Every case ends with a one-line `error:` (exit 2) or a clean stop (exit 143/130) that
--resume continues; none loses the previous checkpoint. Counted in the robustness tally.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    GENERATED,
    MINIMAL,
    generate,
    run_inprocess,
    wait_inside_epoch_2,
    without_timing,
)
from robustness import TALLY
from test_training import IMAGE_MLP, image_folder_scripts, write_cifar, write_image_folder


def finished(cls, result, code, message, lost=None):
    """Record and check one case: its exit code, its one-line message, no traceback; `lost`
    (where there was something to lose) says whether the previous files changed."""
    traceback = "Traceback" in result.stderr
    outcome = f"exit {result.returncode}" + (", kept" if lost is False else "")
    lost = bool(lost)
    TALLY.record(cls, outcome, traceback=traceback, lost=lost)
    assert not traceback, result.stderr
    assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(
        tmp_path_factory.mktemp("tiny"), MINIMAL.replace("[baseline, fixed]", "[full]")
    )


def model_of(run: Path):
    return torch.load(run / "last.pt", weights_only=True)["model"]


def metrics_of(run: Path):
    return without_timing(run / "metrics.jsonl")


# --- damaged checkpoints -----------------------------------------------------------------


def _truncate(n):
    return lambda path: path.write_bytes(path.read_bytes()[:n])


def _edit(change):
    def damage(path):
        ckpt = torch.load(path, weights_only=True)
        change(ckpt)
        torch.save(ckpt, path)

    return damage


DAMAGE = {
    "empty": (_truncate(0), "cannot load checkpoint"),
    "first 100 bytes": (_truncate(100), "cannot load checkpoint"),
    "first half": (
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "cannot load checkpoint",
    ),
    "last byte cut": (lambda p: p.write_bytes(p.read_bytes()[:-1]), "cannot load checkpoint"),
    "random bytes": (
        lambda p: p.write_bytes(random.Random(0).randbytes(5000)),
        "cannot load checkpoint",
    ),
    "a pickle that runs code": (
        lambda p: p.write_bytes(pickle.dumps(os.system)),
        "cannot load checkpoint",
    ),
    "a torch list": (lambda p: torch.save([1, 2], p), "is not a checkpoint written by"),
    "a torch dict": (lambda p: torch.save({"model": {}}, p), "is not a checkpoint written by"),
    "another arm's": (
        _edit(lambda c: c["config"].update(arm="baseline")),
        "was made with other settings (arm: 'baseline' -> 'full')",
    ),
    "no model": (_edit(lambda c: c.pop("model")), "cannot resume from"),
    "a weight of the wrong shape": (
        _edit(lambda c: c["model"].update({k: torch.zeros(1) for k in list(c["model"])[:1]})),
        "cannot resume from",
    ),
    "no noise state": (_edit(lambda c: c.pop("perturbation")), "cannot resume from"),
    "counters missing": (_edit(lambda c: c["state"].pop("sums")), "cannot resume from"),
}


def files(run):
    """The run folder's results: run.lock only names whoever opened the folder last."""
    return {p.name: p.read_bytes() for p in run.iterdir() if p.name != "run.lock"}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_is_a_clear_error_and_stays(tiny, case, tmp_path):
    damage, message = DAMAGE[case]
    script, run = tiny / "train_full.py", tmp_path / "run"
    assert run_inprocess(script, "--smoke", "--max-steps", "3", "--out", run).returncode == 0
    damage(run / "last.pt")
    before = files(run)
    result = run_inprocess(script, "--smoke", "--resume", "--out", run)
    lost = files(run) != before
    finished("damaged checkpoint", result, 2, message, lost=lost)
    assert not lost  # never a silent restart that overwrites the run


# --- a write fails -----------------------------------------------------------------------


def enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("what", ["last.pt", "metrics.jsonl"])
def test_a_failed_write_keeps_the_previous_file(tiny, what, tmp_path, monkeypatch):
    """ENOSPC halfway through a write: exit 2, the previous file intact, no temporary file."""
    script, run = tiny / "train_full.py", tmp_path / "run"
    assert run_inprocess(script, "--smoke", "--max-steps", "2", "--out", run).returncode == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    real_fsync = os.fsync

    def fsync(fd):  # where a full disk shows up once the data is written (in part)
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(what):
            raise enospc()
        return real_fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        result = run_inprocess(script, "--smoke", "--resume", "--out", run)
    after = {p.name: p.read_bytes() for p in run.iterdir()}
    assert not any(name.endswith(".tmp") for name in after), sorted(after)
    kept = after[what] == before[what]
    finished("checkpoint write fails", result, 2, f"cannot write {run / what}", lost=not kept)
    assert f"No space left on device; the previous {what} is kept" in result.stderr
    torch.load(run / "last.pt", weights_only=True)  # still loadable


def test_resume_after_a_failed_checkpoint_write_is_exact(tmp_path, monkeypatch):
    spec = MINIMAL.replace("[baseline, fixed]", "[full]")
    script = generate(tmp_path, spec, "train.epochs=3") / "train_full.py"
    straight = run_inprocess(script, "--out", tmp_path / "straight")
    assert straight.returncode == 0
    run = tmp_path / "run"
    assert run_inprocess(script, "--out", run, "--max-steps", "2").returncode == 0
    before = (run / "last.pt").read_bytes()
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # the disk fills up halfway through torch.save
        if "last.pt" in getattr(f, "name", ""):
            f.write(b"half a file")
            raise enospc()
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        failed = run_inprocess(script, "--out", run, "--resume")
    kept = (run / "last.pt").read_bytes() == before
    finished("checkpoint write fails", failed, 2, "cannot write", lost=not kept)
    resumed = run_inprocess(script, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    same = all(
        torch.equal(a, b)
        for a, b in zip(model_of(run).values(), model_of(tmp_path / "straight").values())
    )
    assert same and metrics_of(run) == metrics_of(tmp_path / "straight")
    TALLY.record("checkpoint write fails", "resumed exactly")


# --- broken datasets ---------------------------------------------------------------------

MNIST1D = GENERATED / "mnist1d_cnn" / "train_baseline.py"


def _file_as_root(tmp):
    (tmp / "data").write_text("a file, not a folder")
    return tmp / "data", "cannot make the data folder"


def _garbage_cache(tmp):
    (tmp / "data").mkdir()
    (tmp / "data" / "mnist1d.pt").write_bytes(b"\x00garbage" * 100)
    return tmp / "data", "cannot read the MNIST-1D cache"


def _foreign_cache(tmp):
    (tmp / "data").mkdir()
    x, y = torch.zeros(10, 1, 30), torch.zeros(10, dtype=torch.int64)
    torch.save({"x": x, "y": y, "x_test": x, "y_test": y}, tmp / "data" / "mnist1d.pt")
    return tmp / "data", "holds 10 examples of shape [1, 30] and 10 labels; expected"


def _bad_labels(tmp):
    (tmp / "data").mkdir()
    x, y = torch.zeros(10, 1, 40), torch.full((10,), 10)
    torch.save({"x": x, "y": y, "x_test": x, "y_test": y}, tmp / "data" / "mnist1d.pt")
    return tmp / "data", "holds labels outside 0..9"


MNIST1D_CASES = {
    "data root is a file": _file_as_root,
    "garbage cache": _garbage_cache,
    "cache of another shape": _foreign_cache,
    "labels out of range": _bad_labels,
}


@pytest.mark.parametrize("case", MNIST1D_CASES, ids=list(MNIST1D_CASES))
def test_broken_mnist1d_data_is_one_line(case, tmp_path):
    root, message = MNIST1D_CASES[case](tmp_path)
    result = run_inprocess(MNIST1D, "--data-root", root, "--out", tmp_path / "run")
    finished("broken dataset", result, 2, message)
    assert str(root) in result.stderr  # the message names the path


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar")
    spec = (GENERATED.parent / "specs" / "cifar10_resnet18.yaml").read_text()
    return generate(tmp, spec, *IMAGE_MLP) / "train_baseline.py"


def _cifar_pickle(obj):
    def damage(batches):
        (batches / "data_batch_2").write_bytes(pickle.dumps(obj))

    return damage


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


CIFAR_CASES = {
    "missing batch": (lambda b: (b / "test_batch").unlink(), "cifar10 not found: expected"),
    "truncated batch": (
        lambda b: (b / "data_batch_1").write_bytes((b / "data_batch_1").read_bytes()[:999]),
        "data_batch_1 is not a cifar10 python batch",
    ),
    "a pickle that runs code": (
        _cifar_pickle(RunsCode()),
        "data_batch_2 is not a cifar10 python batch (refusing to load posix.system)",
    ),
    "not a dict": (_cifar_pickle([1, 2, 3]), "data_batch_2 is not a cifar10 python batch"),
    "labels out of range": (
        _cifar_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
        "data_batch_2 holds labels outside 0..9",
    ),
    "fewer labels than images": (
        _cifar_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
        "data_batch_2 holds 2 examples of shape [3, 32, 32] and 1 labels",
    ),
}


@pytest.mark.parametrize("case", CIFAR_CASES, ids=list(CIFAR_CASES))
def test_broken_cifar_is_one_line(cifar, case, tmp_path):
    damage, message = CIFAR_CASES[case]
    batches = write_cifar(tmp_path / "data", "cifar10")
    damage(batches)
    result = run_inprocess(cifar, "--data-root", tmp_path / "data", "--out", tmp_path / "run")
    finished("broken dataset", result, 2, message)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("case", ["not an image", "missing split"])
def test_broken_image_folder_is_one_line(case, workers, tmp_path):
    folder = image_folder_scripts(tmp_path, workers)
    write_image_folder(tmp_path / "images")
    bad = tmp_path / "images" / "train" / "class_1" / "3.png"
    if case == "not an image":
        bad.write_bytes(b"this is not a PNG")
        message = f"cannot read image {bad}: cannot identify image file"
    else:
        for path in sorted((tmp_path / "images" / "val").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (tmp_path / "images" / "val").rmdir()
        message = f"image folder not found: expected {tmp_path / 'images' / 'val'}/<class>"
    result = run_inprocess(
        folder / "train_baseline.py", "--data-root", tmp_path / "images", "--out", tmp_path / "r"
    )
    finished("broken dataset", result, 2, message)


# --- signals -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A run of three ~1 s epochs, and its uninterrupted result."""
    tmp = tmp_path_factory.mktemp("long")
    spec = MINIMAL.replace("train_size: 64", "train_size: 12000").replace(
        "[baseline, fixed]", "[full]"
    )
    script = generate(tmp, spec, "data.batch_size=4", "train.epochs=3") / "train_full.py"
    assert run_inprocess(script, "--out", tmp / "straight").returncode == 0
    return script, tmp / "straight"


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_resume_is_exact(long_run, signum, code, tmp_path):
    script, straight = long_run
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, script, "--out", run],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_inside_epoch_2(proc, run)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    summary = json.loads((run / "summary.json").read_text())
    ckpt = torch.load(run / "last.pt", weights_only=True)
    traceback = "Traceback" in stderr
    TALLY.record("signals", f"exit {proc.returncode}", traceback=traceback)
    assert proc.returncode == code and not traceback, stderr
    assert "stopped by a signal after" in stdout and summary["status"] == "stopped"
    assert ckpt["state"]["epoch"] == 1 and ckpt["state"]["batch"] > 0  # mid-epoch 2
    resumed = run_inprocess(script, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    exact = all(
        torch.equal(a, b) for a, b in zip(model_of(run).values(), model_of(straight).values())
    )
    exact = exact and metrics_of(run) == metrics_of(straight)
    TALLY.record("signals", "resumed exactly" if exact else "resumed differently", lost=not exact)
    assert exact
