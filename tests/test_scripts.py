"""Layers 5 and 6: emitted scripts run — smoke runs of every arm, then their behaviour."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from conftest import (
    GENERATED,
    MINIMAL,
    SCRIPTS,
    cli,
    generate,
    run_inprocess,
    run_script,
    without_timing,
)

from generator import stats
from generator.scriptload import load_script


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_scripts(tmp_path_factory):
    """Every arm of the minimal spec (MLP, SGD, synthetic data) and the method's peers,
    generated once."""
    root = tmp_path_factory.mktemp("tiny")
    peers = "[baseline, fixed, gradient_noise, anti_pgd]"
    (root / "spec.yaml").write_text(MINIMAL.replace("[baseline, fixed]", peers))
    assert cli("generate", root / "spec.yaml", "-o", root / "gen").exit_code == 0
    return root / "gen" / "tiny"


@pytest.mark.parametrize(
    "script", SCRIPTS, ids=[p.relative_to(GENERATED).as_posix() for p in SCRIPTS]
)
def test_smoke_run(script, tmp_path):
    result = run_inprocess(script, "--smoke", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    (support,) = script.parent.glob("*_support.py")  # the module the script imports
    logged = {"loggers.json", "tensorboard"} if "LOGGERS = " in script.read_text() else set()
    assert {p.name for p in run.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "phases.jsonl",
        "summary.json",
        "last.pt",
        "best.pt",
        "run.lock",  # who writes the folder (pid, host, since): one writer per run folder
        script.name,
        support.name,
        *logged,  # the example that logs writes to TensorBoard only
    }
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["train_loss"]) and 0 <= m["val_acc"] <= 1 for m in metrics)
    perturbs = not script.stem.startswith("train_baseline")
    assert all((m.get("eps", 0) > 0) is perturbs for m in metrics)  # baselines have no eps
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == metrics[-1]["step"] == 4
    config = json.loads((run / "config.json").read_text())
    assert config["smoke"] is True and config["kernel"] == ("torch" if perturbs else None)
    assert (run / script.name).read_bytes() == script.read_bytes()
    assert (run / support.name).read_bytes() == support.read_bytes()


def test_mnist1d_baseline_reaches_its_target(tmp_path):
    """The default spec's CNN trains for real: >= 0.85 test accuracy within its 60 epochs."""
    script = GENERATED / "mnist1d_cnn" / "train_baseline.py"
    result = run_script(
        script,
        "--out",
        tmp_path / "run",
        "--data-root",
        tmp_path / "data",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 60 and summary["final_val_acc"] >= 0.85, summary
    assert summary["epochs_to_target"] is not None  # the spec's 0.90 is reached too
    assert (tmp_path / "data" / "mnist1d.pt").exists()  # made locally and cached


@pytest.mark.parametrize("arm", ["fixed", "gradient_noise", "anti_pgd"])
def test_resume_continues_exactly(tiny_scripts, tmp_path, arm):
    """Stopped mid-epoch and resumed, a run ends bit-identical to an uninterrupted one (the
    noise generators' state, and anti-PGD's xi_t, are in last.pt)."""
    script = tiny_scripts / f"train_{arm}.py"
    straight = run_inprocess(script, "--smoke", "--out", tmp_path / "a")
    first = run_inprocess(script, "--smoke", "--max-steps", "3", "--out", tmp_path / "b")
    assert straight.returncode == 0 and first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "stopped"
    second = run_inprocess(script, "--smoke", "--resume", "--out", tmp_path / "b")
    assert second.returncode == 0, second.stderr
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for x, y in zip(a["perturbation"]["generators"], b["perturbation"]["generators"], strict=True):
        assert torch.equal(x, y)
    assert without_timing(tmp_path / "a" / "metrics.jsonl") == without_timing(
        tmp_path / "b" / "metrics.jsonl"
    )


def test_same_seed_same_run_other_seed_other_run(tiny_scripts, tmp_path):
    script = tiny_scripts / "train_fixed.py"
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert (
            run_inprocess(script, "--smoke", "--seed", seed, "--out", tmp_path / name).returncode
            == 0
        )
        runs[name] = without_timing(tmp_path / name / "metrics.jsonl")
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_summary_cv_is_the_sample_cv_of_the_last_window(tmp_path):
    """summary.json's val_loss_cv_pct: the sample std (n - 1) over the mean, in percent, of
    the last STABILITY_WINDOW validation losses; stats.cv_pct is the same number."""
    text = MINIMAL.replace("[baseline, fixed]", "[baseline]")
    folder = generate(tmp_path, text, "train.stability_window=3")
    ns = load_script(str(folder / "train_baseline.py"), run_name="perturbgen_test")

    def summarize(history, status, step, elapsed_s):
        return ns["summarize"](
            "s", "baseline", history, status, step, elapsed_s, 0.9, ns["STABILITY_WINDOW"]
        )

    history = [
        {"epoch": e, "step": 2 * e, "val_acc": 0.5, "val_loss": loss, "train_s": e, "elapsed_s": e}
        for e, loss in enumerate([9.0, 2.0, 3.0, 4.0], 1)
    ]
    summary = summarize(history, "completed", 8, 1.0)
    assert summary["cv_epochs"] == 3
    # stdev([2, 3, 4]) = 1 (with n - 1; sqrt(2/3) with n): 33.3 %, not 27.2 %
    assert summary["val_loss_cv_pct"] == pytest.approx(100 * statistics.stdev([2, 3, 4]) / 3)
    assert summary["val_loss_cv_pct"] == pytest.approx(stats.cv_pct([2.0, 3.0, 4.0]))
    assert summarize(history[:1], "completed", 2, 1.0)["val_loss_cv_pct"] is None  # one epoch
    history[-1]["val_loss"] = math.inf
    assert summarize(history, "diverged", 8, 1.0)["val_loss_cv_pct"] is None


def test_divergence_exits_3_and_keeps_the_last_good_checkpoint(tmp_path):
    (tmp_path / "spec.yaml").write_text(MINIMAL)
    assert (
        cli(
            "generate",
            tmp_path / "spec.yaml",
            "-o",
            tmp_path / "gen",
            "--set",
            "optimizer.lr=1.0e+30",
        ).exit_code
        == 0
    )
    script = tmp_path / "gen" / "tiny" / "train_baseline.py"
    result = run_script(script, "--smoke", "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 3
    assert "error: the training loss is nan in steps 0.." in result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert not (tmp_path / "run" / "last.pt").exists()  # it diverged within epoch 1


def test_divergence_after_a_checkpoint_leaves_it_untouched(tiny_scripts, tmp_path):
    """A run that diverges after its first checkpoint exits 3 and writes nothing over it."""
    script, run = tiny_scripts / "train_fixed.py", tmp_path / "run"
    assert run_inprocess(script, "--smoke", "--max-steps", "2", "--out", run).returncode == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    for tensor in ckpt["model"].values():  # weights that overflow the next forward pass
        tensor.fill_(1e30)
    torch.save(ckpt, run / "last.pt")
    before = {name: (run / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    result = run_inprocess(script, "--smoke", "--resume", "--out", run)
    assert result.returncode == 3
    assert "the training loss is nan in steps 2..3 (epoch 2;" in result.stderr  # right after it
    assert {name: (run / name).read_bytes() for name in before} == before
    assert "NaN" not in before["metrics.jsonl"].decode()
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "argument --epochs: must be > 0 (got 0)"),
        (["--epochs", "x"], "argument --epochs: invalid positive_int value: 'x'"),
        (["--seed", "-1"], "argument --seed: must be in [0, 2**31) (got -1)"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--device", "warp"], "--device 'warp' is not a device"),
        (["--resume"], "nothing to resume"),
    ],
)
def test_bad_arguments_exit_2(tiny_scripts, tmp_path, args, message):
    result = run_inprocess(
        tiny_scripts / "train_baseline.py", "--smoke", "--out", tmp_path / "r", *args
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_finished_run_is_not_overwritten(tiny_scripts, tmp_path):
    script = tiny_scripts / "train_baseline.py"
    assert run_inprocess(script, "--smoke", "--out", tmp_path / "r").returncode == 0
    before = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    again = run_inprocess(script, "--smoke", "--out", tmp_path / "r")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == before
    other = run_inprocess(script, "--smoke", "--seed", "9", "--resume", "--out", tmp_path / "r")
    assert other.returncode == 2 and "was made with other settings (seed: 0 -> 9)" in other.stderr


def test_corrupt_checkpoint_is_a_clear_error(tiny_scripts, tmp_path):
    script = tiny_scripts / "train_baseline.py"
    assert (
        run_inprocess(script, "--smoke", "--max-steps", "2", "--out", tmp_path / "r").returncode
        == 0
    )
    ckpt = tmp_path / "r" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    result = run_inprocess(script, "--smoke", "--resume", "--out", tmp_path / "r")
    assert result.returncode == 2
    assert f"error: cannot load checkpoint {ckpt}" in result.stderr


def test_noise_has_the_spec_std(tmp_path):
    """With lr ~ 0 the only change to a weight is the noise: its std must be eps_fixed.

    Each of the CNN's n = 4,328 parameters (3 classes) moves by the sum of 4 independent
    N(0, eps^2) draws, i.e. N(0, 4 eps^2). The sample std of n normal values has relative standard
    error 1/sqrt(2n) = 1.1 %, so a 5 % band is 4.7 sigma; the mean's s.e. is sqrt(4/n) eps.
    """
    (tmp_path / "spec.yaml").write_text(MINIMAL)
    eps = 0.01
    assert (
        cli(
            "generate",
            tmp_path / "spec.yaml",
            "-o",
            tmp_path / "gen",
            "--set",
            "optimizer={name: sgd, lr: 1.0e-12}",
            "--set",
            f"perturbation.fixed={eps}",
            "--set",
            "model={arch: cnn1d}",
            "--set",
            "data.shape=[1, 40]",
        ).exit_code
        == 0
    )
    folder = tmp_path / "gen" / "tiny"
    for arm in ("baseline", "fixed"):
        assert (
            run_inprocess(
                folder / f"train_{arm}.py", "--smoke", "--out", tmp_path / arm
            ).returncode
            == 0
        )
    a = torch.load(tmp_path / "baseline" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "fixed" / "last.pt", weights_only=True)["model"]
    delta = torch.cat([(b[k] - a[k]).flatten() for k in a])
    assert delta.numel() == 4328
    per_step = delta.std().item() / math.sqrt(4)  # 4 independent steps add up in variance
    assert abs(per_step / eps - 1) < 0.05, per_step
    assert abs(delta.mean().item()) < 5 * eps * math.sqrt(4) / math.sqrt(4328)
