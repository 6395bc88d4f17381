"""Behaviour of the complete emitted script: datasets on disk, models, schedules, AMP,
compile, and resume after a hard kill."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    GENERATED,
    LOADER,
    MINIMAL,
    generate,
    run_inprocess,
    wait_inside_epoch_2,
    without_timing,
)

from generator import scriptload
from generator.scriptload import load_script

IMAGE_MLP = ["model={arch: mlp, hidden: [16]}", "train.epochs=1"]


def script_namespace(path):
    return load_script(str(path), run_name="perturbgen_test")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# --- models: the published parameter counts say these are the real architectures --------


def test_resnet18_parameter_counts():
    ns = script_namespace(GENERATED / "cifar10_resnet18" / "train_baseline.py")
    assert n_params(ns["ResNet18"](3, 224, 1000)) == 11_689_512  # ImageNet stem
    assert n_params(ns["ResNet18"](3, 32, 10)) == 11_173_962  # CIFAR stem


def test_vgg16_bn_parameter_count():
    ns = script_namespace(GENERATED / "cifar100_vgg16" / "train_baseline.py")
    assert n_params(ns["VGG16"](3, 224, 1000)) == 138_365_992
    model = ns["VGG16"](3, 32, 100)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_efficientnet_b0_parameter_count():
    ns = script_namespace(GENERATED / "imagenet100_efficientnet_b0" / "train_baseline.py")
    model = ns["EfficientNetB0"](3, 1000, 0.2, 0.2)  # dropout, drop-path
    assert n_params(model) == 5_288_548
    drops = [b.drop_path for b in model.modules() if type(b).__name__ == "MBConv"]
    assert len(drops) == 16 and drops[0] == 0 and drops[-1] == pytest.approx(0.2 * 15 / 16)


# --- datasets in their exact on-disk formats ---------------------------------------------


def write_cifar(root, dataset):
    rng = np.random.default_rng(0)

    def batch(n, classes, key):
        return {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: rng.integers(0, classes, n).tolist(),
        }

    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": batch(16, 10, b"labels") for i in range(1, 6)}
        files["test_batch"] = batch(24, 10, b"labels")
    else:
        folder = root / "cifar-100-python"
        files = {"train": batch(80, 100, b"fine_labels"), "test": batch(24, 100, b"fine_labels")}
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(pickle.dumps(content))
    return folder


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_trains_from_python_batches(dataset, tmp_path):
    spec = {"cifar10": "cifar10_resnet18", "cifar100": "cifar100_vgg16"}[dataset]
    folder = generate(
        tmp_path,
        (GENERATED.parent / "specs" / f"{spec}.yaml").read_text(),
        *IMAGE_MLP,
        "data.batch_size=16",
        "data.val_size=16",
    )
    write_cifar(tmp_path / "data", dataset)
    result = run_inprocess(
        folder / "train_fixed.py", "--data-root", tmp_path / "data", "--out", tmp_path / "run"
    )
    assert result.returncode == 0, result.stderr
    (metrics,) = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics["step"] == (80 - 16) // 16 and math.isfinite(metrics["val_loss"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["constants"]["AUGMENT"]
    assert [config["splits"][k] for k in ("train", "val", "test")] == [64, 16, 24]


def test_missing_and_broken_cifar_are_clear_errors(tmp_path):
    folder = generate(
        tmp_path, (GENERATED.parent / "specs" / "cifar10_resnet18.yaml").read_text(), *IMAGE_MLP
    )
    result = run_inprocess(
        folder / "train_baseline.py", "--data-root", tmp_path / "none", "--out", tmp_path / "r1"
    )
    assert result.returncode == 2
    assert (
        f"error: cifar10 not found: expected {tmp_path / 'none'}/cifar-10-batches-py/"
        "data_batch_1; download cifar-10-python.tar.gz"
    ) in result.stderr
    batches = write_cifar(tmp_path / "data", "cifar10")
    (batches / "data_batch_3").write_bytes(b"not a pickle")
    result = run_inprocess(
        folder / "train_baseline.py", "--data-root", tmp_path / "data", "--out", tmp_path / "r2"
    )
    assert result.returncode == 2
    assert f"error: {batches / 'data_batch_3'} is not a cifar10 python batch" in result.stderr


def test_crop_flip_takes_a_window_of_the_padded_image():
    ns = script_namespace(GENERATED / "cifar10_resnet18" / "cifar10_resnet18_support.py")
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = ns["random_crop_flip"](x, *ns["crop_flip_draws"](0, 0, 0, [64]))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(64):
        windows = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if torch.equal(
                out[i], (lambda w: w.flip(2) if f else w)(padded[i, :, dy : dy + 32, dx : dx + 32])
            )
        ]
        assert windows, f"sample {i} is not a crop of its padded image"
        flips += windows[0][2]
    assert 16 <= flips <= 48  # Binomial(64, 1/2): outside [16, 48] has probability < 1e-4


def write_image_folder(root, classes=2, per_class=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def image_folder_scripts(tmp_path, workers):
    """The ImageNet spec shrunk to an MLP on two classes of 32-pixel images, batch 4."""
    return generate(
        tmp_path,
        (GENERATED.parent / "specs" / "imagenet100_efficientnet_b0.yaml").read_text(),
        *IMAGE_MLP,
        "data.num_classes=2",
        "data.image_size=32",
        f"data.workers={workers}",
        "data.batch_size=4",
        "data.val_size=4",
        "train.amp=none",
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_trains_with_pillow(workers, tmp_path):
    folder = image_folder_scripts(tmp_path, workers)
    write_image_folder(tmp_path / "images")
    result = run_inprocess(
        folder / "train_fixed.py", "--data-root", tmp_path / "images", "--out", tmp_path / "run"
    )
    assert result.returncode == 0, result.stderr
    (metrics,) = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics["step"] == 2  # 12 images in train/, 4 of them for val, batches of 4
    splits = json.loads((tmp_path / "run" / "config.json").read_text())["splits"]
    assert [splits[k] for k in ("train", "val", "test")] == [8, 4, 12]  # test: val/


def test_image_folders_without_pillow_are_one_line(tmp_path, monkeypatch):
    """Pillow is imported where images are decoded (the support module needs torch alone);
    missing, the run says so before any loader worker starts."""
    folder = image_folder_scripts(tmp_path, 2)
    write_image_folder(tmp_path / "images")
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` fails
    result = run_inprocess(
        folder / "train_fixed.py", "--data-root", tmp_path / "images", "--out", tmp_path / "run"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: image folders are decoded by Pillow: pip install pillow"
    ]


def test_a_small_image_folder_validates_on_a_tenth_of_train_by_default(tmp_path):
    """The folder's size is known only at run time: no fixed val_size to outgrow it."""
    spec = (GENERATED.parent / "specs" / "imagenet100_efficientnet_b0.yaml").read_text()
    shrunk = (*IMAGE_MLP, "data.num_classes=2", "data.image_size=32", "data.workers=0")
    folder = generate(tmp_path, spec, *shrunk, "data.batch_size=4", "train.amp=none")
    write_image_folder(tmp_path / "images", per_class=10)
    run = tmp_path / "run"
    args = ("--data-root", tmp_path / "images", "--out", run, "--epochs", "1")
    result = run_inprocess(folder / "train_baseline.py", *args)
    assert result.returncode == 0, result.stderr
    splits = json.loads((run / "config.json").read_text())["splits"]
    assert [splits[k] for k in ("train", "val", "test")] == [18, 2, 20]
    too_many = generate(tmp_path / "explicit", spec, *shrunk, "data.val_size=20")
    result = run_inprocess(too_many / "train_baseline.py", *args[:2], "--out", tmp_path / "r2")
    assert result.returncode == 2
    assert "holds 20 examples: too few to set 20 aside for validation" in result.stderr


def test_image_folder_efficientnet_resume_mid_epoch_is_exact(tmp_path):
    """The ImageNet spec as it is (EfficientNet-B0 with its default dropout and drop-path,
    augmentation, DataLoader workers) on 32-pixel images: 16 training images in batches of
    4, stopped after step 6 (mid-epoch 2) and resumed, ends on the uninterrupted run's
    weights bit for bit."""
    folder = generate(
        tmp_path,
        (GENERATED.parent / "specs" / "imagenet100_efficientnet_b0.yaml").read_text(),
        "data.num_classes=2",
        "data.image_size=32",
        "data.workers=2",
        "data.batch_size=4",
        "data.val_size=4",
        "train.amp=none",
        "train.epochs=2",
    )
    write_image_folder(tmp_path / "images", per_class=10)
    script, common = folder / "train_full.py", ["--data-root", tmp_path / "images", "--out"]
    assert run_inprocess(script, *common, tmp_path / "a").returncode == 0
    first = run_inprocess(script, *common, tmp_path / "b", "--max-steps", "6")
    assert first.returncode == 0, first.stderr
    assert run_inprocess(script, *common, tmp_path / "b", "--resume").returncode == 0
    assert without_timing(tmp_path / "a" / "metrics.jsonl") == without_timing(
        tmp_path / "b" / "metrics.jsonl"
    )
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_folder_with_the_wrong_class_count(tmp_path):
    folder = generate(
        tmp_path,
        (GENERATED.parent / "specs" / "imagenet100_efficientnet_b0.yaml").read_text(),
        *IMAGE_MLP,
        "data.image_size=32",
        "data.workers=0",
    )
    write_image_folder(tmp_path / "images", classes=3)
    result = run_inprocess(
        folder / "train_baseline.py", "--data-root", tmp_path / "images", "--out", tmp_path / "run"
    )
    assert result.returncode == 2
    assert (
        f"{tmp_path / 'images' / 'train'} holds 3 class folders; the spec says 100"
        in result.stderr
    )


# --- optimizers and schedules -------------------------------------------------------------


SCHEDULES = {
    "constant": ("{name: constant, warmup_epochs: 1}", {0: 0.01, 9: 0.1, 10: 0.1, 99: 0.1}),
    "cosine": ("{name: cosine, min_lr_ratio: 0.1}", {0: 0.1, 50: 0.055, 100: 0.01}),
    "step": ("{name: step, step_epochs: 2, gamma: 0.5}", {19: 0.1, 20: 0.05, 45: 0.025}),
    "onecycle": (
        "{name: onecycle, pct_start: 0.25, div_factor: 10, final_div_factor: 100}",
        {0: 0.01, 25: 0.1, 100: 0.0001},
    ),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_learning_rate_schedules(name, tmp_path):
    schedule, expected = SCHEDULES[name]
    folder = generate(tmp_path, MINIMAL, f"schedule={schedule}")
    lr_at = script_namespace(folder / "train_baseline.py")["lr_at"]
    total, steps_per_epoch = 100, 10
    warmup = 10 if name == "constant" else 0
    for step, lr in expected.items():
        assert lr_at(step, total, warmup, steps_per_epoch) == pytest.approx(lr), step


def test_adamw_is_decoupled_adam(tmp_path):
    folder = generate(tmp_path, MINIMAL, "optimizer={name: adamw, lr: 0.001}")
    ns = script_namespace(folder / "train_baseline.py")
    optimizer = ns["build_optimizer"](ns["build_model"]())
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["weight_decay"] == 0.01


# --- AMP and compile ------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["train.amp=bf16", "train.amp=fp16", "train.compile=true"])
def test_amp_and_compile_smoke(setting, tmp_path):
    folder = generate(tmp_path, MINIMAL, setting)
    source = (folder / "train_fixed.py").read_text()
    result = run_inprocess(folder / "train_fixed.py", "--smoke", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    key, value = setting.removeprefix("train.").split("=")
    assert str(config[key]).lower() == value
    if key == "amp":
        assert f'\nAMP = "{value}"  #' in source  # the one setting; the loop is every spec's
    else:
        ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
        assert not any(k.startswith("_orig_mod") for k in ckpt["model"])  # uncompiled names


@pytest.fixture
def fp16_full(tmp_path):
    text = MINIMAL.replace("[baseline, fixed]", "[baseline, full, gradient_noise, anti_pgd]")
    return generate(tmp_path, text, "train.amp=fp16", "phase_detector.every=1")


def test_a_step_the_grad_scaler_skips_is_no_step(fp16_full):
    """An inf gradient makes the scaler skip the step; through Perturbation.step that is no
    noise (parameters and noise generators untouched) and no detector sample."""
    ns = script_namespace(fp16_full / "train_full.py")
    torch.manual_seed(0)
    model = ns["build_model"]()
    ns["flatten_parameters"](model)
    optimizer = ns["build_optimizer"](model)
    scaler = torch.amp.GradScaler("cpu")
    perturbation = ns["make_perturbation"](model, 0, torch.device("cpu"), "torch")
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    def step(index, poison):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if poison:
            next(model.parameters()).grad[0] = float("inf")
        scaler.unscale_(optimizer)
        return perturbation.step(lambda: ns["scaler_step"](scaler, optimizer), index, 0.1, 1.0)

    eps, _ = step(0, poison=False)
    assert eps == ns["EPS_PHASE"][0] and len(perturbation.detector.samples) == 1
    params, scale = perturbation.flat.clone(), scaler.get_scale()
    streams = [g.get_state() for g in perturbation.generators]
    assert step(1, poison=True) == (None, None)
    assert scaler.get_scale() < scale  # the scaler did skip it
    assert torch.equal(perturbation.flat, params)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(perturbation.generators, streams))
    assert len(perturbation.detector.samples) == 1
    assert step(1, poison=False)[0] is not None and len(perturbation.detector.samples) == 2


@pytest.mark.parametrize("arm", ["baseline", "full", "gradient_noise", "anti_pgd"])
def test_a_skipped_step_is_not_counted_by_the_script(arm, fp16_full, tmp_path):
    """The whole script with an inf gradient at its third backward pass takes one optimizer
    step fewer than without it (the grad scaler on this tiny model skips nothing else)."""
    script = fp16_full / f"train_{arm}.py"
    steps = []
    for poison in (False, True):
        ns = script_namespace(script)
        scope, build = ns["main"].__globals__, ns["build_model"]
        calls = []

        def build_poisoned(build=build, poison=poison, calls=calls):
            model = build()
            bad = lambda g: g * float("inf") if len(calls) == 2 else g  # noqa: E731
            first = next(model.parameters())
            first.register_hook(lambda g: (bad(g), calls.append(1))[0] if poison else g)
            return model

        scope["build_model"] = build_poisoned
        out = tmp_path / f"{arm}-{poison}"
        code = scope["main"](["--smoke", "--out", str(out)])
        assert code == 0
        steps.append(json.loads((out / "summary.json").read_text())["steps"])
    assert steps[1] == steps[0] - 1, steps


# --- the command line and exact resume after SIGKILL ------------------------------------


def test_help_explains_every_flag(tmp_path):
    folder = generate(tmp_path)
    parser = script_namespace(folder / "train_fixed.py")["build_parser"]()
    flags = {a.option_strings[-1]: a.help for a in parser._actions if a.dest != "help"}
    assert sorted(flags) == sorted(
        [
            "--epochs",
            "--max-steps",
            "--batch-size",
            "--data-root",
            "--out",
            "--seed",
            "--device",
            "--resume",
            "--checkpoint-every",
            "--smoke",
            "--no-test",
            "--kernel",
        ]
    )
    baseline = script_namespace(folder / "train_baseline.py")["build_parser"]()
    assert "--kernel" not in {a.option_strings[-1] for a in baseline._actions}  # no noise
    assert all(text and len(text) > 15 for text in flags.values()), flags
    result = subprocess.run(
        [sys.executable, folder / "train_fixed.py", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--max-steps" in result.stdout


def test_sigkill_mid_epoch_then_resume_matches(tmp_path):
    """A run killed with SIGKILL in its second epoch resumes from the epoch-1 checkpoint and
    ends with exactly the parameters and metrics of an uninterrupted run."""
    spec = MINIMAL.replace("train_size: 64", "train_size: 12000")
    folder = generate(tmp_path, spec, "data.batch_size=4", "train.epochs=3")
    script = folder / "train_fixed.py"
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, script, "--out", killed],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_inside_epoch_2(proc, killed)  # epochs take about 1 s here
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_inprocess(script, "--out", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight = run_inprocess(script, "--out", tmp_path / "straight")
    assert straight.returncode == 0
    a = torch.load(killed / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    strip = without_timing(killed / "metrics.jsonl")
    assert strip == without_timing(tmp_path / "straight" / "metrics.jsonl")
    assert len(strip) == 3


class Crash(BaseException):
    """Stands for the process dying (power, OOM killer) at a chosen point."""


def test_checkpoint_cadence_and_resume_from_an_older_checkpoint(tmp_path):
    """last.pt after epoch 1, then not again for --checkpoint-every seconds, and at the end.
    A crash in between resumes from the older checkpoint: the metrics lines written after it
    are dropped and trained again, and the run ends exactly as an uninterrupted one."""
    script = generate(tmp_path, MINIMAL, "train.epochs=4") / "train_fixed.py"
    straight = run_inprocess(script, "--out", tmp_path / "straight", "--checkpoint-every", "0")
    assert straight.returncode == 0, straight.stderr

    run, calls = tmp_path / "run", []
    ns = script_namespace(script)
    evaluate = ns["evaluate"]

    def crash_in_epoch_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Crash
        return evaluate(*args)

    ns["train"].__globals__["evaluate"] = crash_in_epoch_3  # where train() looks it up
    with pytest.raises(Crash):
        ns["main"](["--out", str(run), "--checkpoint-every", "1e9"])
    assert torch.load(run / "last.pt", weights_only=True)["state"]["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # epoch 2: no checkpoint

    resumed = run_inprocess(script, "--out", run, "--resume", "--checkpoint-every", "1e9")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(run / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert a["state"]["epoch"] == 4 and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
    )

    def lines(folder):
        return without_timing(folder / "metrics.jsonl")

    assert lines(run) == lines(tmp_path / "straight") and len(lines(run)) == 4
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["state"]["history"][-1]["val_acc"] == max(r["val_acc"] for r in lines(run))


def test_a_cached_mnist1d_imports_neither_mnist1d_nor_scipy(tmp_path):
    """Start-up: with data/mnist1d.pt in place the script needs only torch (the mnist1d
    package pulls in scipy, matplotlib and requests, seconds of imports)."""
    x, y = torch.randn(600, 1, 40), torch.arange(600) % 10  # 500 of them become val
    torch.save({"x": x, "y": y, "x_test": x, "y_test": y}, tmp_path / "mnist1d.pt")
    script = GENERATED / "mnist1d_cnn" / "train_baseline.py"
    probe = (
        LOADER
        + "import sys\n"
        f"ns = load_script({str(script)!r}, run_name='probe')\n"
        f"arm_data = runpy.run_path({scriptload.__file__!r})['arm_data']\n"
        f"arm_data(ns, {str(tmp_path)!r}, False, 0, __import__('torch').device('cpu'))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'mnist1d', 'scipy', 'matplotlib', 'requests'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- train.deterministic ----------------------------------------------------------------------


def test_deterministic_switch_sets_every_knob_before_cuda(tmp_path):
    """In a fresh process (the switch is process-wide): main() turns on deterministic
    algorithms, the cuDNN settings and cuBLAS's workspace, and a run under it completes."""
    folder = generate(tmp_path, MINIMAL, "train.deterministic=true")
    probe = (
        LOADER
        + "import sys, os, torch\n"
        "ns = load_script(sys.argv[1], run_name='probe')\n"
        "assert not torch.are_deterministic_algorithms_enabled()\n"
        "assert ns['main'](['--smoke', '--out', sys.argv[2]]) == 0\n"
        "print(torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,"
        " torch.backends.cudnn.benchmark, os.environ['CUBLAS_WORKSPACE_CONFIG'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-c", probe, str(folder / "train_fixed.py"), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ["True", "True", "False", ":4096:8"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["constants"]["DETERMINISTIC"] is True
    plain = generate(tmp_path / "plain", MINIMAL) / "train_fixed.py"
    assert "DETERMINISTIC = False" in plain.read_text()
