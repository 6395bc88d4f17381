"""train.ema, train.early_stop and optimizer.no_decay (issue 19, part B): validation, the
render model, the arms' equality, and each feature against a closed form or torch."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import pytest
import torch
from conftest import MINIMAL, TIMING, cli, generate, load_module, without_timing
from test_static import arm_differences, ruff_names

from generator.errors import SpecErrors
from generator.plan import plan
from generator.render import load_spec
from generator.runs import load_run

# a model with batch norm (buffers, norm parameters) and biases, as a user's factory
BN_NET = """\
import torch.nn as nn


def make(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))
"""
FEATURES = """\
name: tiny
data: {dataset: synthetic, shape: [8], num_classes: 3, train_size: 64, val_size: 32,
       batch_size: 16}
model: {arch: custom, factory: "bn_net:make"}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.01, no_decay: [norm, bias]}
train: {epochs: 3, stability_window: 2, ema: {decay: 0.9, every: 2},
        early_stop: {patience: 2, min_delta: 0.0}}
variants: [baseline, fixed, full]
"""


@pytest.fixture
def bn_net(tmp_path, monkeypatch):
    (tmp_path / "bn_net.py").write_text(BN_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("bn_net", None)


def run_main(module, *args):
    """main() of an imported script (so that a test may patch its functions first)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return module.main([str(a) for a in args])
        except SystemExit as exc:
            return exc.code


def errors_of(path):
    with pytest.raises(SpecErrors) as info:
        load_spec(path, [])
    return [str(e) for e in info.value.errors]


# --- validation and the render model ------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        (
            "epochs: 2,",
            "epochs: 2, ema: {decay: 1.0},",
            5,
            "train.ema.decay: must be < 1 (got 1.0)",
        ),
        ("epochs: 2,", "epochs: 2, ema: {every: 0},", 5, "train.ema.every: must be > 0 (got 0)"),
        (
            "epochs: 2,",
            "epochs: 2, early_stop: {patience: 0},",
            5,
            "train.early_stop.patience: must be > 0 (got 0)",
        ),
        (
            "epochs: 2,",
            "epochs: 2, early_stop: {min_delta: -0.1},",
            5,
            "train.early_stop.min_delta: must be >= 0 (got -0.1)",
        ),
        (
            "momentum: 0.9",
            "momentum: 0.9, no_decay: [norm, weights]",
            4,
            "optimizer.no_decay[1]: must be one of 'norm' or 'bias' (got 'weights')",
        ),
        (
            "momentum: 0.9",
            "momentum: 0.9, no_decay: [bias, bias]",
            4,
            "optimizer.no_decay[1]: 'bias' is listed twice",
        ),
    ],
)
def test_bad_fields_are_one_line_errors(write_spec, old, new, line, message):
    path = write_spec(MINIMAL.replace(old, new))
    assert errors_of(path) == [f"{path}:{line}: {message}"]


def test_early_stop_is_refused_in_a_spec_to_tune(write_spec):
    text = MINIMAL.replace("epochs: 2,", "epochs: 2, early_stop: {patience: 3},")
    path = write_spec(
        text + "tune: {arms: [fixed], space: {optimizer.lr: {low: 0.01, high: 1}}}\n"
    )
    message = (
        "train.early_stop: must be left out of a spec that perturbgen tune searches (its "
        "pruner stops poor trials; a trial's runs must all run train.epochs)"
    )
    assert errors_of(path) == [f"{path}:5: {message}"]


def test_render_model_fields_are_off_by_default_and_on_when_asked(write_spec, bn_net):
    def models(text):
        spec, doc = load_spec(write_spec(text), [])
        return plan(spec, doc)

    def settings(m):
        return {c.name: c.value for c in m.constants}

    for m in models(MINIMAL):  # every script states the features, at the values that are off
        off = settings(m)
        assert off["EMA_DECAY"] is None and off["EARLY_STOP_PATIENCE"] is None
        assert not m.no_decay and "NO_DECAY" not in off
    on = models(FEATURES)
    assert all(m.no_decay for m in on)
    assert all(settings(m)["EMA_DECAY"] is not None for m in on)
    assert all(settings(m)["EARLY_STOP_PATIENCE"] is not None for m in on)
    names = settings(on[0])
    assert names["NO_DECAY"] == ("bias", "norm") and names["EMA_EVERY"] == 2
    assert names["EARLY_STOP_PATIENCE"] == 2 and names["EMA_DECAY"] == 0.9


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_every_arm_applies_the_features_alike(tmp_path, bn_net, amp):
    """The features are in every arm, and the arms still differ by the perturbation alone;
    no undefined or unused name in any arm."""
    folder = generate(tmp_path, FEATURES, f"train.amp={amp}")
    base = (folder / "train_baseline.py").read_text()
    assert "ema = EMA(model, EMA_DECAY, EMA_EVERY, build_model, memory_format)" in base
    assert "stops_early(state['history'], EARLY_STOP_PATIENCE" in base.replace('"', "'")
    assert "decay_groups(model, NO_DECAY)" in base
    for arm in ("fixed", "full"):
        problems = arm_differences(base, (folder / f"train_{arm}.py").read_text())
        assert not problems, arm + "\n" + "\n".join(problems)
    checked = ruff_names(folder)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- optimizer.no_decay ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_no_decay_groups_and_one_step_against_torch(tmp_path, bn_net, name):
    """Biases and batch-norm parameters get weight decay 0, the rest the spec's; one step
    of the script's optimizer moves each tensor exactly as torch's optimizer does with that
    tensor's decay (bias: as without decay)."""
    opt = {
        "sgd": "{name: sgd, lr: 0.1, momentum: 0.9",
        "adam": "{name: adam, lr: 0.01",
        "adamw": "{name: adamw, lr: 0.01",
    }[name]
    text = FEATURES.replace("{name: sgd, lr: 0.1, momentum: 0.9", opt).replace(
        "weight_decay: 0.01", "weight_decay: 0.5"
    )
    module = load_module(generate(tmp_path, text) / "train_fixed.py", f"nd_{name}")
    torch.manual_seed(0)
    model = module.build_model()
    module.flatten_parameters(model)  # several groups over views into one flat buffer
    optimizer = module.build_optimizer(model)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    expected = {
        "0.weight": 0.5,
        "0.bias": 0.0,
        "1.weight": 0.0,
        "1.bias": 0.0,
        "3.weight": 0.5,
        "3.bias": 0.0,
    }
    assert {n: decays[id(p)] for n, p in model.named_parameters()} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    optimizer.step()
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    kwargs = {"sgd": {"lr": 0.1, "momentum": 0.9}, "adam": {"lr": 0.01}, "adamw": {"lr": 0.01}}[
        name
    ]
    for n, p in model.named_parameters():
        ref = before[n].clone().requires_grad_()
        ref.grad = grads[n].clone()
        cls([ref], weight_decay=expected[n], **kwargs).step()
        assert torch.equal(p.detach(), ref.detach()), n
    bias = before["3.bias"] - 0.1 * grads["3.bias"]  # plain SGD's first step: no decay term
    if name == "sgd":
        assert torch.allclose(model[3].bias.detach(), bias, rtol=0, atol=1e-7)


def test_no_decay_bias_only_keeps_norm_weights_decayed(tmp_path, bn_net):
    text = FEATURES.replace("no_decay: [norm, bias]", "no_decay: [bias]")
    module = load_module(generate(tmp_path, text) / "train_fixed.py", "nd_bias")
    model = module.build_model()
    groups = module.build_optimizer(model).param_groups
    decays = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert [decays[id(p)] for _, p in model.named_parameters()] == [0.01, 0, 0.01, 0, 0.01, 0]


# --- train.ema ------------------------------------------------------------------------------


def test_ema_is_the_recurrence_over_the_raw_trajectory(tmp_path, bn_net):
    """In a real run of the full arm (noise, BN): at every EMA_EVERY-th step the average is
    DECAY * average + (1 - DECAY) * the weights after that step's noise, from the init;
    buffers are the raw model's as of the last update."""
    module = load_module(generate(tmp_path, FEATURES) / "train_full.py", "ema_full")
    seen = []  # (steps, the raw parameters and buffers when the update is called)
    update = module.EMA.update

    def recording(self, steps):
        raw = [p.detach().clone() for p in self.pairs[1]]
        seen.append((steps, raw, [b.clone() for _, b in self.buffers]))
        update(self, steps)

    module.EMA.update = recording
    init = []
    original_init = module.EMA.__init__

    def init_recording(self, model, *args):
        original_init(self, model, *args)
        init.append([p.detach().clone() for p in model.parameters()])

    module.EMA.__init__ = init_recording
    assert run_main(module, "--out", tmp_path / "run", "--epochs", "2") == 0
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert [s for s, _, _ in seen] == list(range(1, 9))  # 2 epochs of 64 / 16 = 4 steps
    average = [p.double() for p in init[0]]
    for steps, raw, _ in seen:
        if steps % 2 == 0:
            average = [0.9 * a + 0.1 * w.double() for a, w in zip(average, raw, strict=True)]
    model = module.build_model()
    names = [n for n, _ in model.named_parameters()]
    for name, expected in zip(names, average, strict=True):
        # fp32 lerp against the float64 recurrence: 4 updates, each within a few ulps
        assert torch.allclose(ckpt["ema"][name].double(), expected, rtol=1e-6, atol=1e-7), name
    raw_final = dict(zip(names, seen[-1][1], strict=True))  # the last update saw the final,
    for name in names:  # noisy weights
        assert torch.equal(raw_final[name], ckpt["model"][name]), name
    buffers = [n for n, _ in model.named_buffers()]
    for name, value in zip(buffers, seen[-1][2], strict=True):
        assert torch.equal(ckpt["ema"][name], value), name
    assert not torch.equal(ckpt["ema"]["0.weight"], ckpt["model"]["0.weight"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert all(0 <= m["ema_val_acc"] <= 1 and m["ema_val_loss"] > 0 for m in metrics)
    assert summary["ema_final_val_acc"] == metrics[-1]["ema_val_acc"]
    assert summary["ema_best_val_acc"] == max(m["ema_val_acc"] for m in metrics)
    assert 0 <= summary["ema_test_acc"] <= 1 and summary["ema_test_loss"] > 0
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["state"]["epoch"] == summary["best_val_epoch"]  # raw val acc drives best.pt


def test_an_ema_run_trains_the_raw_model_as_without_ema(tmp_path, bn_net):
    """The EMA only watches: the raw run is bit-identical with and without it."""
    on = load_module(generate(tmp_path / "on", FEATURES) / "train_full.py", "ema_on")
    off_text = FEATURES.replace("ema: {decay: 0.9, every: 2},", "")
    off = load_module(generate(tmp_path / "off", off_text) / "train_full.py", "ema_off")
    assert run_main(on, "--out", tmp_path / "a", "--epochs", "1") == 0
    assert run_main(off, "--out", tmp_path / "b", "--epochs", "1") == 0
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# --- train.early_stop -----------------------------------------------------------------------


def test_the_stop_epoch_on_scripted_curves(tmp_path):
    # min_delta 0.125 and accuracies that are sums of powers of 2: exact comparisons
    text = MINIMAL.replace("epochs: 2,", "epochs: 2, early_stop: {patience: 2, min_delta: 0.125},")
    module = load_module(generate(tmp_path, text) / "train_baseline.py", "stop_rule")

    def stop_epoch(curve):
        history = []
        for epoch, acc in enumerate(curve, 1):
            history.append({"val_acc": acc})
            if module.stops_early(history, module.EARLY_STOP_PATIENCE, 0.125):
                return epoch
        return None

    assert stop_epoch([0.125, 0.375, 0.625, 0.875]) is None  # always improving
    assert stop_epoch([0.5, 0.75, 0.75, 0.75, 1.0]) == 4  # 2 epochs without a rise
    assert stop_epoch([0.25, 0.5, 0.125, 0.75, 0.75, 0.75]) == 6  # a dip, a rise, a plateau
    # a rise of exactly min_delta does not count, and the best moves only on a counted rise:
    assert stop_epoch([0.25, 0.3125, 0.375]) == 3  # creeping up by less than min_delta
    assert stop_epoch([0.25, 0.3125, 0.40625]) is None  # 0.40625 > 0.25 + 0.125 counts
    assert module.stops_early([{"val_acc": 0.5}] * 9, None, 0.125) is False  # no early stop
    assert module.EARLY_STOP_MIN_DELTA == 0.125


def test_a_run_stops_early_is_completed_and_resumes_as_stopped(tmp_path, bn_net):
    """min_delta 1: no epoch after the first improves, so patience 2 stops after epoch 3 of
    10; test is evaluated, the LR followed the 10-epoch cosine, the report counts it
    completed, and --resume leaves it as it is."""
    text = FEATURES.replace("epochs: 3,", "epochs: 10,").replace(
        "min_delta: 0.0", "min_delta: 1.0"
    )
    text = text.replace("variants: [baseline, fixed, full]", "schedule: {name: cosine}")
    module = load_module(generate(tmp_path, text) / "train_fixed.py", "stop_run")
    run = tmp_path / "runs" / "tiny" / "fixed-seed0"
    assert run_main(module, "--out", run) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stopped_early"] is True
    assert summary["stopped_epoch"] == 3 == summary["epochs"] and summary["steps"] == 12
    assert summary["test_acc"] is not None and summary["ema_test_acc"] is not None
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    # lr at the last step of epoch 3 (step 11 of 40): cosine over the planned 10 epochs
    assert metrics[-1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 11 / 40)))
    before = without_timing(run / "metrics.jsonl")
    assert run_main(module, "--out", run, "--resume") == 0
    assert json.loads((run / "summary.json").read_text())["stopped_epoch"] == 3
    assert without_timing(run / "metrics.jsonl") == before
    loaded = load_run(run)
    assert loaded.complete and loaded.outcome == "completed"
    assert cli("report", tmp_path / "runs", "-o", tmp_path / "report").exit_code == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "1 completed run(s) stopped early (fixed 1)" in report


# --- exact resume -----------------------------------------------------------------------------


@pytest.mark.parametrize("arm", ["baseline", "full"])
def test_resume_with_every_feature_on_is_exact(tmp_path, bn_net, arm):
    """Stopped mid-epoch (after step 6 of 3 x 4) and resumed, a run with EMA, early stop
    and no-decay groups ends bit-identical to an uninterrupted one, EMA included."""
    module = load_module(generate(tmp_path, FEATURES) / f"train_{arm}.py", f"resume_{arm}")
    assert run_main(module, "--out", tmp_path / "a") == 0
    assert run_main(module, "--out", tmp_path / "b", "--max-steps", "6") == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "stopped"
    assert run_main(module, "--out", tmp_path / "b", "--resume") == 0
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in "ab")
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert without_timing(tmp_path / "a" / "metrics.jsonl") == without_timing(
        tmp_path / "b" / "metrics.jsonl"
    )
    sa, sb = (json.loads((tmp_path / r / "summary.json").read_text()) for r in "ab")
    assert {k: v for k, v in sa.items() if k not in TIMING} == {
        k: v for k, v in sb.items() if k not in TIMING
    }
