"""The settings section of an arm script: one constant per setting the arm reads, with its
unit in a comment (the script states them; config.json records them; its data constants are
also load_data's keywords)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from generator.spec import SGD, CustomData, ImageFolderData, Spec, SyntheticData, input_shape

# model.arch values whose network an optional package builds (imported when it is built)
LIBRARY_ARCHES = ("torchvision", "timm")

# Per-channel mean and std used to standardise each image dataset.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}


SEED_COMMENT = ("seeds init, data order and dropout", "seeds init, data order, dropout and noise")


@dataclass(frozen=True)
class Constant:
    """One module-level constant of the emitted script, with its unit comment."""

    name: str
    value: Any
    comment: str


def data_constants(spec: Spec) -> list[Constant]:
    """The data section's constants: the arm passes them to load_data (DATA_ROOT, the
    default of --data-root, as its first argument; the rest by name, see data_arguments)."""
    shape, classes = input_shape(spec)
    c = [
        Constant("DATASET", spec.data.dataset, "--smoke swaps in synthetic data of this shape"),
        Constant("DATA_ROOT", spec.data.root, "folder holding (or caching) the data"),
        Constant("INPUT_SHAPE", shape, "one example, without the batch dimension"),
        Constant("NUM_CLASSES", classes, "output classes"),
    ]
    if isinstance(spec.data, SyntheticData):
        c += [
            Constant("TRAIN_SIZE", spec.data.train_size, "synthetic training examples"),
            Constant("VAL_SIZE", spec.data.val_size, "synthetic validation examples"),
            Constant("TEST_SIZE", spec.data.test_size, "synthetic test examples"),
            Constant("SYNTHETIC_NOISE", spec.data.noise, "std of the noise around prototypes"),
        ]
    elif isinstance(spec.data, CustomData):
        c += [
            Constant("DATA_FACTORY", spec.data.factory, "module:attribute of the data factory"),
            Constant("DATA_ARGS", spec.data.args, "keyword arguments of the data factory"),
            Constant("WORKERS", spec.data.workers, "DataLoader processes loading examples"),
            Constant("VAL_SIZE", spec.data.val_size, "carved from train if no val (None: 1/10)"),
        ]
    else:
        tenth = " (None: a tenth)" if isinstance(spec.data, ImageFolderData) else ""
        c.append(
            Constant("VAL_SIZE", spec.data.val_size, f"validation examples, from train{tenth}")
        )
    if isinstance(spec.data, ImageFolderData):
        c += [
            Constant("IMAGE_SIZE", spec.data.image_size, "pixels, height and width"),
            Constant("WORKERS", spec.data.workers, "DataLoader processes decoding images"),
        ]
    if spec.data.dataset in NORMALIZATION:
        mean, std = NORMALIZATION[spec.data.dataset]
        c += [
            Constant("AUGMENT", spec.data.augment, "random crops and flips while training"),
            Constant("NORM_MEAN", mean, "per-channel mean of the training images"),
            Constant("NORM_STD", std, "per-channel std of the training images"),
        ]
    return c


def data_arguments(spec: Spec) -> tuple[str, ...]:
    """load_data's keywords in an arm's call: its data constants but DATA_ROOT, lower case."""
    return tuple(c.name.lower() for c in data_constants(spec) if c.name != "DATA_ROOT")


def constants(spec: Spec, arm: str, kind: str) -> tuple[Constant, ...]:
    shape, _ = input_shape(spec)
    c = [
        Constant("SPEC_NAME", spec.name, "the spec this script was generated from"),
        Constant("ARM", arm, "the ablation arm"),
        Constant("SEED", spec.seed, SEED_COMMENT[kind != "baseline"]),
        *data_constants(spec),
        Constant("BATCH_SIZE", spec.data.batch_size, "examples per optimizer step"),
    ]
    model = spec.model
    if model.arch == "mlp":
        c.append(Constant("IN_FEATURES", math.prod(shape), "flattened input size"))
        c.append(Constant("HIDDEN", tuple(model.hidden), "hidden layer widths"))
    elif model.arch == "cnn1d":
        c.append(Constant("WIDTH", model.width, "channels of each convolution"))
    elif model.arch in LIBRARY_ARCHES:
        c += [
            Constant("LIBRARY_MODEL", model.name, f"the {model.arch} model, random init"),
            Constant("MODEL_ARGS", model.args, "its further keyword arguments"),
        ]
    elif model.arch == "custom":
        c += [
            Constant("MODEL_FACTORY", model.factory, "module:attribute of the model factory"),
            Constant("MODEL_ARGS", model.args, "keyword arguments of the model factory"),
        ]
    elif model.arch == "efficientnet_b0":
        c += [
            Constant("DROP_PATH", model.drop_path, "stochastic depth of the last block"),
            Constant("DROPOUT", model.dropout, "dropout before the classifier"),
        ]
    opt = spec.optimizer
    c.append(Constant("LR", opt.lr, "peak learning rate"))
    if isinstance(opt, SGD):
        c += [
            Constant("MOMENTUM", opt.momentum, "SGD momentum coefficient"),
            Constant("DAMPENING", opt.dampening, "SGD dampening"),
            Constant("NESTEROV", opt.nesterov, "Nesterov momentum"),
        ]
    else:
        c += [
            Constant("BETAS", tuple(opt.betas), "Adam moment decay rates"),
            Constant("ADAM_EPS", opt.eps, "Adam denominator epsilon"),
        ]
    c.append(Constant("WEIGHT_DECAY", opt.weight_decay, "L2 penalty (decoupled for adamw)"))
    if opt.no_decay:
        c.append(Constant("NO_DECAY", tuple(sorted(opt.no_decay)), "parameters without decay"))
    c.append(Constant("WARMUP_EPOCHS", spec.schedule.warmup_epochs, "linear LR warm-up, epochs"))
    sched = spec.schedule
    if sched.name == "cosine":
        c.append(Constant("MIN_LR_RATIO", sched.min_lr_ratio, "final LR / LR"))
    elif sched.name == "step":
        c += [
            Constant("STEP_EPOCHS", sched.step_epochs, "epochs between LR drops"),
            Constant("GAMMA", sched.gamma, "LR factor at each drop"),
        ]
    elif sched.name == "onecycle":
        c += [
            Constant("PCT_START", sched.pct_start, "fraction of steps spent rising"),
            Constant("DIV_FACTOR", sched.div_factor, "LR / starting LR"),
            Constant("FINAL_DIV_FACTOR", sched.final_div_factor, "starting LR / final LR"),
        ]
    c += [
        Constant("EPOCHS", spec.train.epochs, "passes over the training set"),
        Constant("TARGET_ACCURACY", spec.train.target_accuracy, "for time-to-target"),
        Constant("STABILITY_WINDOW", spec.train.stability_window, "epochs, for the val-loss CV"),
        Constant("DETERMINISTIC", spec.train.deterministic, "deterministic GPU kernels only"),
        Constant("CHANNELS_LAST", spec.train.channels_last, "NHWC conv weights and images"),
        Constant("CHECK_EVERY", spec.train.check_every, "optimizer steps between check points"),
    ]
    t, ema, stop = spec.train, spec.train.ema, spec.train.early_stop
    c += [  # features the same in every arm, off by default
        Constant("AMP", t.amp, "autocast: none, bf16, or fp16 with a grad scaler"),
        Constant("COMPILE", t.compile, "torch.compile the model"),
        Constant("ACCUMULATE", t.accumulate, "micro-batches per optimizer step"),
        Constant("CLIP_GRAD_NORM", t.clip_grad_norm, "max global gradient L2 norm, or None"),
        Constant("LABEL_SMOOTHING", t.label_smoothing, "of the training loss only"),
        Constant("EMA_DECAY", ema.decay if ema else None, "EMA of the weights, or None"),
        Constant("EMA_EVERY", ema.every if ema else 1, "optimizer steps between EMA updates"),
        Constant("EARLY_STOP_PATIENCE", stop.patience if stop else None, "epochs, or None"),
        Constant("EARLY_STOP_MIN_DELTA", stop.min_delta if stop else 0.0, "val acc gain"),
    ]
    if spec.train.loggers:
        c += [
            Constant("LOGGERS", tuple(spec.train.loggers), "experiment trackers logged to"),
            Constant("LOG_EVERY", spec.train.log_every, "optimizer steps between step scalars"),
        ]
    p = spec.perturbation
    if kind != "baseline":
        c += [
            Constant("KERNEL", p.kernel, "noise kernel: auto, triton or torch (--kernel)"),
            Constant("APPLY_TO", p.apply_to, "'weights': only tensors with ndim >= 2"),
            Constant("NOISE_SCALE", p.scale, "'lr': eps follows lr_t / lr_0"),
        ]
    if kind == "fixed":
        c.append(Constant("EPS_FIXED", p.fixed, "noise std, parameter units"))
    if kind in ("phase_only", "full"):
        eps = (p.eps.exploration, p.eps.convergence, p.eps.fine_tuning)
        c.append(Constant("EPS_PHASE", eps, "noise std in exploration, convergence, fine-tuning"))
    if kind == "schedule_only":
        c.append(Constant("EPS_BASE", p.base, "noise std at step 0, parameter units"))
    if kind in ("schedule_only", "full"):
        c.append(Constant("DECAY", p.decay, "lambda of exp(-lambda t), per optimizer step"))
    if kind == "gradient_noise":
        c += [
            Constant("NOISE_ETA", p.gradient_noise.eta, "sigma_0^2, gradient units squared"),
            Constant("NOISE_GAMMA", p.gradient_noise.gamma, "sigma_t^2 = eta / (1 + t)^gamma"),
        ]
    if kind == "anti_pgd":
        c.append(Constant("SIGMA", p.anti_pgd.sigma, "std of xi_t, parameter units"))
    if kind in ("phase_only", "full"):
        d = spec.phase_detector
        c += [
            Constant("EVERY", d.every, "optimizer steps between detector samples"),
            Constant("WINDOW", d.window, "samples in the detector's sliding window"),
            Constant("THRESHOLD_MODE", d.thresholds.mode, "'relative': over the first window"),
            Constant("TAU1", d.thresholds.tau1, "exploration: grad_var above"),
            Constant("TAU2", d.thresholds.tau2, "exploration: param_delta above"),
            Constant("TAU3", d.thresholds.tau3, "fine-tuning: grad_var below"),
            Constant("TAU4", d.thresholds.tau4, "fine-tuning: param_delta below"),
            Constant("TAU_SMOOTH", d.thresholds.tau_smooth, "loss_smooth threshold, or None"),
            Constant("PATIENCE", d.patience, "consecutive votes to change phase"),
            Constant("MONOTONIC", d.monotonic, "phases only advance"),
        ]
    return tuple(c)
