"""Layer 6: the three splits of an emitted script — train, val carved from the dataset's
training split by a fixed permutation, the dataset's own test split — and which split
each number of a run comes from."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import GENERATED, MINIMAL, evaluate_on_test, generate, run_inprocess

from generator.scriptload import arm_data, load_script

MNIST1D = GENERATED / "mnist1d_cnn" / "train_baseline.py"


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """MINIMAL (64 train, 32 val, 256 test; one step per epoch) over 3 epochs, with a target
    that the first epoch reaches."""
    return generate(
        tmp_path_factory.mktemp("splits"), MINIMAL, "train.epochs=3", "train.target_accuracy=0.05"
    )


def splits_of(script, seed=0, root="unused"):
    ns = load_script(str(script), run_name="perturbgen_test")
    return arm_data(ns, root, False, seed, torch.device("cpu"))


def rows(x):
    """Each example as bytes, to compare splits example by example."""
    return [row.numpy().tobytes() for row in x.reshape(len(x), -1)]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_val_examples_are_the_same_for_every_seed_and_arm(scripts):
    datas = [
        splits_of(scripts / f"train_{arm}.py", seed)
        for arm in ("baseline", "fixed")
        for seed in (0, 7)
    ]
    first = datas[0]
    order = torch.randperm(
        96,
        generator=torch.Generator().manual_seed(
            load_script(str(scripts / "train_fixed.py"))["derived_seed"](0, "val-split")
        ),
    )
    val_text = ",".join(str(i) for i in order[:32].sort().values.tolist())
    assert first.splits == {
        "train": 64,
        "val": 32,
        "test": 256,
        "val_indices_sha256": hashlib.sha256(val_text.encode()).hexdigest(),
    }
    for data in datas[1:]:
        assert data.splits == first.splits
        for split in ("val", "test"):
            assert torch.equal(data.eval_sets[split][0], first.eval_sets[split][0])
        assert torch.equal(data.x_train, first.x_train)


def test_synthetic_splits_are_disjoint(scripts):
    data = splits_of(scripts / "train_fixed.py")
    train, val, test = (
        rows(data.x_train),
        rows(data.eval_sets["val"][0]),
        rows(data.eval_sets["test"][0]),
    )
    assert len(set(train)) == 64 and len(set(val)) == 32 and len(set(test)) == 256
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)


def fake_mnist1d(root, n_train=4000):
    """A cache in MNIST-1D's format whose every example is distinct (its index is in it)."""
    root.mkdir()
    x = torch.arange(n_train, dtype=torch.float32)[:, None, None] + torch.zeros(1, 1, 40)
    x_test = -1 - torch.arange(1000, dtype=torch.float32)[:, None, None] + torch.zeros(1, 1, 40)
    y, y_test = torch.arange(n_train) % 10, torch.arange(1000) % 10
    torch.save({"x": x, "y": y, "x_test": x_test, "y_test": y_test}, root / "mnist1d.pt")
    return x


def test_mnist1d_val_is_carved_from_its_training_split(tmp_path):
    x = fake_mnist1d(tmp_path / "data")
    data = splits_of(MNIST1D, root=tmp_path / "data")
    assert {k: v for k, v in data.splits.items() if k != "val_indices_sha256"} == {
        "train": 3500,
        "val": 500,
        "test": 1000,
    }
    train, val = rows(data.x_train), rows(data.eval_sets["val"][0])
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(rows(x))  # together, exactly the training split
    assert not set(rows(data.eval_sets["test"][0])) & set(rows(x))


def test_too_small_a_training_split_is_one_line(tmp_path):
    fake_mnist1d(tmp_path / "data", n_train=100)
    result = run_inprocess(MNIST1D, "--data-root", tmp_path / "data", "--out", tmp_path / "r")
    assert result.returncode == 2
    assert (
        "error: the mnist1d training split holds 100 examples: too few to set 500 aside for "
        "validation (data.val_size in the spec)"
    ) in result.stderr


def test_a_run_selects_on_val_and_touches_test_once(scripts, tmp_path):
    script, run = scripts / "train_fixed.py", tmp_path / "run"
    result = run_inprocess(script, "--out", run)
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["splits"] == splits_of(script).splits
    metrics = read_jsonl(run / "metrics.jsonl")
    assert len(metrics) == 3
    assert not [k for m in metrics for k in m if "test" in k]  # no test metric per epoch
    summary = json.loads((run / "summary.json").read_text())
    accs = [m["val_acc"] for m in metrics]
    assert summary["best_val_epoch"] == accs.index(max(accs)) + 1
    final_loss, final_acc = evaluate_on_test(script, run / "last.pt", tmp_path)
    best_loss, best_acc = evaluate_on_test(script, run / "best.pt", tmp_path)
    assert summary["test_acc"] == final_acc and summary["test_acc_at_best_val"] == best_acc
    assert summary["test_loss"] == pytest.approx(final_loss, rel=1e-5)  # batch sums' order
    assert summary["test_loss_at_best_val"] == pytest.approx(best_loss, rel=1e-5)
    # time to target counts training steps only: train_s, never more than the wall time
    assert summary["epochs_to_target"] == 1
    assert summary["seconds_to_target"] == metrics[0]["train_s"]
    train_s = [m["train_s"] for m in metrics]
    assert 0 < train_s[0] < train_s[1] < train_s[2]
    assert all(m["train_s"] <= m["elapsed_s"] for m in metrics)


def test_a_stopped_run_has_no_test_numbers_and_resumes_its_train_s(scripts, tmp_path):
    script, run = scripts / "train_fixed.py", tmp_path / "run"
    assert run_inprocess(script, "--out", run, "--max-steps", "2").returncode == 0
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["best_val_epoch"] in (1, 2)
    assert all(
        stopped[k] is None
        for k in ("test_loss", "test_acc", "test_loss_at_best_val", "test_acc_at_best_val")
    )
    before = read_jsonl(run / "metrics.jsonl")
    assert run_inprocess(script, "--out", run, "--resume").returncode == 0
    after = read_jsonl(run / "metrics.jsonl")
    assert after[:2] == before  # the history is kept, clock readings included
    assert after[1]["train_s"] < after[2]["train_s"] <= after[2]["elapsed_s"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_acc"] is not None
