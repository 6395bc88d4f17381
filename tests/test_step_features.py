"""What happens inside one optimizer step (issue 19, part A): gradient clipping
(`train.clip_grad_norm`), gradient accumulation (`train.accumulate`) and label smoothing
(`train.label_smoothing`), each against a closed form or a torch reference, plus their
validation errors, their render-model fields and an exact resume with all three on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import pytest
import torch
from conftest import MINIMAL, evaluate_on_test, generate, run_inprocess, without_timing
from test_ddp import torchrun
from test_spec import errors_of
from test_static import arm_differences

from generator.plan import plan
from generator.render import load_spec
from generator.scriptload import load_script

# MINIMAL's tiny MLP (no batch norm, no dropout) with 64 training examples; a batch of 24
# gives steps of 24, 24 and 16 examples: a short last batch in every epoch
STEP_SPEC = (
    MINIMAL.replace("[baseline, fixed]", "[baseline, schedule_only, full]")
    .replace(
        "train: {epochs: 2, stability_window: 2}",
        "train: {epochs: 2, stability_window: 2, clip_grad_norm: 1.0, accumulate: 3, "
        "label_smoothing: 0.1}",
    )
    .replace("train_size: 64, val_size: 32}", "train_size: 64, val_size: 32, batch_size: 24}")
)
# a detector that samples every step and decides within the run
BUSY = ("phase_detector.every=1", "phase_detector.window=3", "phase_detector.patience=1")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def load(path):
    return torch.load(path, weights_only=True)


# ---- validation and the render model --------------------------------------------------


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("clip_grad_norm: 0", "train.clip_grad_norm: must be > 0 (got 0)"),
        ("clip_grad_norm: -1.5", "train.clip_grad_norm: must be > 0 (got -1.5)"),
        ("accumulate: 0", "train.accumulate: must be > 0 (got 0)"),
        (
            "accumulate: 5",
            "train.accumulate: must divide data.batch_size (128) into equal micro-batches "
            "(got 5)",
        ),
        ("label_smoothing: 1.0", "train.label_smoothing: must be < 1 (got 1.0)"),
        ("label_smoothing: -0.1", "train.label_smoothing: must be >= 0 (got -0.1)"),
    ],
)
def test_bad_settings_are_one_line_errors(setting, expected, write_spec):
    text = MINIMAL.replace("stability_window: 2}", f"stability_window: 2, {setting}}}")
    path = write_spec(text)
    assert errors_of(path) == [f"{path}:5: {expected}"]


def test_an_extra_baseline_with_a_batch_that_does_not_split_is_an_error(write_spec):
    text = MINIMAL + "baselines:\n  big: {data: {batch_size: 30}, train: {accumulate: 4}}\n"
    path = write_spec(text)
    assert errors_of(path) == [
        f"{path}:8: baselines.big.train.accumulate: must divide data.batch_size (30) into "
        "equal micro-batches (got 4)"
    ]


def test_render_model_fields_follow_the_settings(write_spec):
    off = plan(*load_spec(write_spec()))
    on = plan(*load_spec(write_spec(STEP_SPEC)))
    names = {"CLIP_GRAD_NORM", "ACCUMULATE", "LABEL_SMOOTHING"}
    for m in off:  # the settings stay, at the values that turn them off
        assert not m.accumulates and m.static_graph  # a built-in MLP, one batch per step
        values = {c.name: c.value for c in m.constants if c.name in names}
        assert values == {"CLIP_GRAD_NORM": None, "ACCUMULATE": 1, "LABEL_SMOOTHING": 0.0}
    for m in on:
        assert m.accumulates and not m.static_graph  # DDP's static graph breaks under no_sync
        # the arm whose detector samples the pre-clip norm handed to perturbation.step
        assert m.detector is (m.kind == "full")
        values = {c.name: c.value for c in m.constants if c.name in names}
        assert values == {"CLIP_GRAD_NORM": 1.0, "ACCUMULATE": 3, "LABEL_SMOOTHING": 0.1}


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_every_arm_steps_alike_and_the_scripts_are_clean(amp, tmp_path):
    """With all three on, each arm still differs from the baseline by the perturbation alone
    (the static guard of tests/test_static.py), and ruff finds no dangling name."""
    folder = generate(tmp_path, STEP_SPEC, f"train.amp={amp}", *BUSY)
    base = (folder / "train_baseline.py").read_text()
    for arm in ("schedule_only", "full"):
        assert arm_differences(base, (folder / f"train_{arm}.py").read_text()) == [], arm
    ruff = [sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select"]
    result = subprocess.run(
        [*ruff, "F821,F401,F811,F841,E9", str(folder)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- gradient clipping ------------------------------------------------------------------


def test_clipping_bounds_the_norm_and_the_detector_sees_it_before(tmp_path):
    """Each step's gradient, as the optimizer gets it, has norm min(g, max) where g is the
    norm the detector sampled: g is the pre-clip norm and clipping is torch's. clip_frac is
    the share of each epoch's steps with g > max."""
    folder = generate(tmp_path, STEP_SPEC, *BUSY, "train.clip_grad_norm=0.75")
    ns = load_script(str(folder / "train_full.py"), run_name="perturbgen_test")
    sampled, stepped = [], []
    observe = ns["PhaseDetector"].observe

    def recording_observe(self, step, g, d, loss):
        sampled.append(g)
        return observe(self, step, g, d, loss)

    build_optimizer = ns["build_optimizer"]

    def recording_optimizer(model):
        optimizer = build_optimizer(model)
        params = list(model.parameters())

        def norm_of_grads(*_):
            grads = [p.grad.double().norm() for p in params]
            stepped.append(float(torch.stack(grads).norm()))

        optimizer.register_step_pre_hook(norm_of_grads)
        return optimizer

    ns["PhaseDetector"].observe = recording_observe
    ns["main"].__globals__["build_optimizer"] = recording_optimizer  # what main() calls
    assert ns["main"](["--out", str(tmp_path / "run")]) == 0
    assert len(sampled) == len(stepped) == 6  # 3 steps per epoch, a sample every step
    for g, clipped in zip(sampled, stepped):
        # clip_grad_norm_ scales by max / (g + 1e-6): the norm is max to 3e-6 relative
        assert clipped == pytest.approx(min(g, 0.75), rel=1e-5), (g, clipped)
    fired = [g > 0.75 for g in sampled]
    assert 0 < sum(fired) < 6, sampled  # the threshold splits the steps: both cases seen
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["clip_frac"] for m in metrics] == [sum(fired[:3]) / 3, sum(fired[3:]) / 3]


# ---- gradient accumulation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory):
    """schedule_only (eps decays per step) under a cosine LR, with 3 micro-batches per step
    and with one batch: folders of the two runs."""
    root = tmp_path_factory.mktemp("accumulate")
    runs = {}
    for k in (1, 3):
        sets = [f"train.accumulate={k}", "train.clip_grad_norm=null", "schedule.name=cosine"]
        folder = generate(root / f"k{k}", STEP_SPEC, *sets)
        run = root / f"run{k}"
        result = run_inprocess(folder / "train_schedule_only.py", "--out", run)
        assert result.returncode == 0, result.stderr
        runs[k] = run
    return runs


def test_micro_batches_give_the_big_batch_gradient(accumulation_runs):
    """k micro-batches of 8 (and 6, 5, 5 in the short last batch), each loss weighted by its
    share, equal one batch of 24 to float tolerance; the optimizer steps, the LR and eps
    count steps, not micro-batches."""
    one, three = (load(accumulation_runs[k] / "last.pt") for k in (1, 3))
    for name, tensor in one["model"].items():
        # the same gradient summed in another order: 3e-8 apart after 6 steps (a few fp32
        # ulps); weighting the short batch's micro-batches equally instead puts them 2e-3 apart
        torch.testing.assert_close(three["model"][name], tensor, rtol=0, atol=1e-6)
    config = json.loads((accumulation_runs[3] / "config.json").read_text())
    assert config["constants"]["ACCUMULATE"] == 3  # the run did split its batches
    m1, m3 = (read_jsonl(accumulation_runs[k] / "metrics.jsonl") for k in (1, 3))
    assert [m["step"] for m in m3] == [m["step"] for m in m1] == [3, 6]
    assert [(m["lr"], m["eps"]) for m in m3] == [(m["lr"], m["eps"]) for m in m1]
    for a, b in zip(m1, m3):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["train_acc"] == a["train_acc"]


def test_a_batch_size_that_does_not_split_is_refused(tmp_path):
    folder = generate(tmp_path, STEP_SPEC)
    result = run_inprocess(folder / "train_baseline.py", "--batch-size", "25", "--out", tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "error: --batch-size 25 does not split into ACCUMULATE = 3 equal micro-batches: "
        "use a multiple of it\n"
    )


def test_accumulation_under_ddp_matches_one_process(tmp_path):
    """2 ranks, each splitting its half of every batch into 3 micro-batches with no_sync on
    the first two: the replicas stay identical and train as one process does."""
    folder = generate(tmp_path, STEP_SPEC, *BUSY)
    script = folder / "train_full.py"
    ddp = torchrun(script, "--out", tmp_path / "ddp", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_inprocess(script, "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["replicas"][0] == summary["replicas"][1]
    a, b = (load(tmp_path / run / "last.pt")["model"] for run in ("one", "ddp"))
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=1e-5)


# ---- label smoothing ----------------------------------------------------------------------


def test_label_smoothing_is_in_the_training_loss_only(tmp_path):
    """Every training loss is the closed form (1 - s) * NLL + s * mean over classes of
    -log p; val and test losses are plain cross-entropy, so they compare across specs."""
    folder = generate(tmp_path, STEP_SPEC, "train.clip_grad_norm=null", "train.accumulate=1")
    script = folder / "train_baseline.py"
    ns = load_script(str(script), run_name="perturbgen_test")
    calls = []

    def cross_entropy(logits, target, **kwargs):
        loss = torch.nn.functional.cross_entropy(logits, target, **kwargs)
        calls.append((logits.detach().double(), target, kwargs, loss.detach().double()))
        return loss

    fake = types.SimpleNamespace(cross_entropy=cross_entropy)
    ns["main"].__globals__["F"] = fake  # the training loss, in the script
    ns["summarize"].__globals__["F"] = fake  # evaluation, in the support module
    run = tmp_path / "run"
    assert ns["main"](["--out", str(run)]) == 0
    train = [c for c in calls if "reduction" not in c[2]]
    evaluation = [c for c in calls if "reduction" in c[2]]
    assert len(train) == 6 and all(c[2] == {"label_smoothing": 0.1} for c in train)
    for logits, target, _, loss in train:
        logp = logits.log_softmax(1)
        nll = -logp.gather(1, target[:, None]).mean()
        expected = 0.9 * nll + 0.1 * (-logp.mean(1)).mean()
        assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert evaluation and all(c[2] == {"reduction": "sum"} for c in evaluation)
    # the script's test loss is plain cross-entropy of its final model, computed apart
    summary = json.loads((run / "summary.json").read_text())
    plain, _ = evaluate_on_test(script, run / "last.pt", tmp_path)
    assert summary["test_loss"] == pytest.approx(plain, rel=1e-5)
    sizes = [len(c[1]) for c in train[:3]]
    first_epoch = sum(float(c[3]) * n for c, n in zip(train, sizes)) / sum(sizes)
    assert read_jsonl(run / "metrics.jsonl")[0]["train_loss"] == pytest.approx(first_epoch)


# ---- exact resume with every feature on ---------------------------------------------------


def test_resume_mid_epoch_with_every_feature_on_is_exact(tmp_path):
    """Stopped after 4 of 6 steps (mid-epoch 2: the clip count and the detector's window are
    in the checkpoint) and resumed, the full arm ends bit-identical to a straight run."""
    folder = generate(tmp_path, STEP_SPEC, *BUSY, "train.clip_grad_norm=0.75")
    script = folder / "train_full.py"
    straight = run_inprocess(script, "--out", tmp_path / "a")
    first = run_inprocess(script, "--max-steps", "4", "--out", tmp_path / "b")
    assert straight.returncode == 0 and first.returncode == 0, first.stderr
    assert load(tmp_path / "b" / "last.pt")["state"]["step"] == 4
    second = run_inprocess(script, "--resume", "--out", tmp_path / "b")
    assert second.returncode == 0, second.stderr
    a, b = load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["perturbation"]["detector"] == b["perturbation"]["detector"]
    metrics = without_timing(tmp_path / "a" / "metrics.jsonl")
    assert metrics == without_timing(tmp_path / "b" / "metrics.jsonl")
    assert all(0 <= m["clip_frac"] <= 1 and math.isfinite(m["train_loss"]) for m in metrics)
