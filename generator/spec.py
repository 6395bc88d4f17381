"""The spec: pydantic v2 models of DESIGN §2, and validation that names file:line: path."""

from __future__ import annotations

import difflib
import keyword
import math
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

from generator.errors import SpecError, SpecErrors
from generator.loading import KIND_KEYS, Located, dotted, merge

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
ARMS = ("baseline", "fixed", "phase_only", "schedule_only", "full")

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=32)]
INT_LIMIT = 2**31  # every count and size fits in 32 bits: anything bigger is a typo
PosInt = Annotated[int, Field(gt=0, lt=INT_LIMIT)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Arm = Literal["baseline", "fixed", "phase_only", "schedule_only", "full"]


class Section(BaseModel):
    """Every spec section: unknown keys are errors, numbers finite, types not coerced."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, frozen=True)


# --- data ------------------------------------------------------------------------------


def _path_text(text: str) -> str:
    """A folder name: any printable text (it is emitted as a string literal)."""
    if not text.isprintable():
        raise ValueError("must be printable text (no control characters or line breaks)")
    return text


class _Data(Section):
    root: Annotated[str, AfterValidator(_path_text)] = Field(
        "data", min_length=1, description="Folder that holds (or caches) the data."
    )
    batch_size: PosInt = Field(128, description="Examples per optimizer step (global batch).")
    augment: bool = Field(False, description="Standard augmentation (image datasets only).")


VAL_SIZE_HELP = (
    "Validation examples, carved from the dataset's training split by a fixed permutation "
    "(the same for every seed and arm); the rest trains."
)


class SyntheticData(_Data):
    """Deterministic, learnable data of any shape: class prototypes plus Gaussian noise."""

    dataset: Literal["synthetic"]
    shape: list[PosInt] = Field([1, 40], min_length=1, max_length=3, description="Input shape.")
    num_classes: Annotated[int, Field(ge=2, lt=INT_LIMIT)] = 10
    train_size: PosInt = Field(1024, description="Training examples.")
    val_size: PosInt = Field(256, description="Validation examples.")
    test_size: PosInt = Field(256, description="Test examples, drawn apart from the others.")
    noise: NonNegFloat = Field(1.0, description="Std of the noise around each prototype.")


class MNIST1DData(_Data):
    """MNIST-1D made locally by the `mnist1d` package (4000 train, 1000 test, length 40)."""

    dataset: Literal["mnist1d"]
    val_size: Annotated[int, Field(gt=0, lt=4000)] = Field(500, description=VAL_SIZE_HELP)


class CIFAR10Data(_Data):
    dataset: Literal["cifar10"]
    val_size: Annotated[int, Field(gt=0, lt=50000)] = Field(5000, description=VAL_SIZE_HELP)


class CIFAR100Data(_Data):
    dataset: Literal["cifar100"]
    val_size: Annotated[int, Field(gt=0, lt=50000)] = Field(5000, description=VAL_SIZE_HELP)


class ImageFolderData(_Data):
    """root/train/<class>/* (training and validation) and root/val/<class>/* (test)."""

    dataset: Literal["imagefolder"]
    num_classes: Annotated[int, Field(ge=2, lt=INT_LIMIT)]
    image_size: PosInt = 224
    workers: Annotated[int, Field(ge=0, lt=INT_LIMIT)] = 4
    val_size: PosInt | None = Field(
        None,
        description=VAL_SIZE_HELP + " Default: a tenth of root/train (at least one image), "
        "since a folder's size is known only when the run reads it.",
    )


FACTORY_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"


def _factory_text(text: str) -> str:
    if not re.fullmatch(FACTORY_PATTERN, text) or not text.isascii():
        raise ValueError("must look like package.module:attribute (ASCII identifiers)")
    return text


Factory = Annotated[
    str,
    AfterValidator(_factory_text),
    Field(
        json_schema_extra={"pattern": FACTORY_PATTERN},
        max_length=200,
        description="An import path 'package.module:attribute'; the module is imported by "
        "name (installed, or on PYTHONPATH; perturbgen validate --import, ablate and tune "
        "add the folders of the spec file and of the specs it extends).",
    ),
]


def _plain_value(value: Any, where: str = "") -> None:
    """YAML data that pyrepr can emit: None, bool, int, finite float, printable str, and
    lists and string-keyed mappings of them."""
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where or 'value'} must be a finite number (got {value!r})")
        return
    if isinstance(value, str):
        if not value.isprintable():
            raise ValueError(f"{where or 'value'} must be printable text")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _plain_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where or 'mapping'} keys must be strings (got {key!r})")
            _plain_value(item, f"{where}.{key}" if where else key)
        return
    raise ValueError(f"{where or 'value'} must be plain YAML data (got {type(value).__name__})")


def _keyword_args(args: dict[str, Any]) -> dict[str, Any]:
    """A factory's keyword arguments: identifier keys, plain YAML values."""
    for key in args:
        if not key.isidentifier() or not key.isascii() or keyword.iskeyword(key):
            raise ValueError(f"key {key!r} is not a Python identifier (it is a keyword argument)")
    _plain_value(args)
    return args


FactoryArgs = Annotated[
    dict[str, Any],
    AfterValidator(_keyword_args),
    Field(description="Keyword arguments of the factory: plain YAML data."),
]


class CustomData(_Data):
    """Your own data: `factory(root, **args)` returns map-style Datasets (train, val, test)
    or (train, test); each item is (x, y), x of input_shape, y an int class."""

    dataset: Literal["custom"]
    factory: Factory
    args: FactoryArgs = {}
    input_shape: list[PosInt] = Field(
        min_length=1, max_length=3, description="Shape of one example x."
    )
    num_classes: Annotated[int, Field(ge=2, lt=INT_LIMIT)]
    workers: Annotated[int, Field(ge=0, lt=INT_LIMIT)] = Field(
        0, description="DataLoader processes (0: load in the training process)."
    )
    val_size: PosInt | None = Field(
        None,
        description="When the factory returns (train, test): validation examples carved "
        "from train by the fixed split of the built-in datasets (default a tenth).",
    )


Data = Annotated[
    Union[SyntheticData, MNIST1DData, CIFAR10Data, CIFAR100Data, ImageFolderData, CustomData],
    Field(discriminator="dataset"),
]

# --- model -----------------------------------------------------------------------------


class MLPModel(Section):
    arch: Literal["mlp"]
    hidden: list[PosInt] = Field([100, 100], description="Hidden layer widths (ReLU between).")


class CNN1dModel(Section):
    """The MNIST-1D paper's CNN: three stride-2 convolutions and a linear head."""

    arch: Literal["cnn1d"]
    width: PosInt = Field(25, description="Channels of every convolution.")


class ResNet18Model(Section):
    arch: Literal["resnet18"]


class VGG16Model(Section):
    arch: Literal["vgg16"]


class EfficientNetB0Model(Section):
    """EfficientNet-B0: MBConv blocks with squeeze-excitation and stochastic depth."""

    arch: Literal["efficientnet_b0"]
    drop_path: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.2, description="Stochastic-depth rate of the last block (linear in depth)."
    )
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.2, description="Before the head.")


class CustomModel(Section):
    """Your own network: `factory(input_shape, num_classes, **args)` returns an nn.Module."""

    arch: Literal["custom"]
    factory: Factory
    args: FactoryArgs = {}


LIBRARY_NAME = r"^[a-z][a-z0-9_.]*$"


class TorchvisionModel(Section):
    """A torchvision.models classification builder (extra `torchvision`), random init:
    `get_model_builder(name)(weights=None, num_classes=..., **args)`, nothing downloaded."""

    arch: Literal["torchvision"]
    name: Annotated[str, Field(pattern=LIBRARY_NAME, max_length=64)] = Field(
        description="A builder in torchvision.models, e.g. resnet18 or mobilenet_v3_small."
    )
    args: FactoryArgs = {}


class TimmModel(Section):
    """A timm model (extra `timm`): `timm.create_model(name, pretrained=False,
    num_classes=..., in_chans=..., **args)`, nothing downloaded."""

    arch: Literal["timm"]
    name: Annotated[str, Field(pattern=LIBRARY_NAME, max_length=64)] = Field(
        description="A timm model name, e.g. resnet10t or vit_tiny_patch16_224."
    )
    args: FactoryArgs = {}


# The arguments perturbgen passes to each kind of model itself: not allowed in `args`.
PASSED_ARGS = {
    "custom": ("input_shape", "num_classes"),
    "torchvision": ("weights", "num_classes"),
    "timm": ("pretrained", "num_classes", "in_chans"),
}

Model = Annotated[
    Union[
        MLPModel,
        CNN1dModel,
        ResNet18Model,
        VGG16Model,
        EfficientNetB0Model,
        CustomModel,
        TorchvisionModel,
        TimmModel,
    ],
    Field(discriminator="arch"),
]

# --- optimizer -------------------------------------------------------------------------


NoDecay = Literal["norm", "bias"]
NO_DECAY_HELP = (
    "Parameters without weight decay: 'norm' (every parameter of a normalisation layer), "
    "'bias' (every module's bias)."
)


class SGD(Section):
    name: Literal["sgd"]
    lr: PosFloat
    momentum: Fraction = 0.0
    dampening: Fraction = 0.0
    nesterov: bool = False
    weight_decay: NonNegFloat = 0.0
    no_decay: list[NoDecay] = Field([], description=NO_DECAY_HELP)


class Adam(Section):
    name: Literal["adam"]
    lr: PosFloat
    betas: list[Fraction] = Field([0.9, 0.999], min_length=2, max_length=2)
    eps: PosFloat = 1e-8
    weight_decay: NonNegFloat = 0.0
    no_decay: list[NoDecay] = Field([], description=NO_DECAY_HELP)


class AdamW(Adam):
    name: Literal["adamw"]  # type: ignore[assignment]
    weight_decay: NonNegFloat = 0.01


Optimizer = Annotated[Union[SGD, Adam, AdamW], Field(discriminator="name")]

# --- schedule --------------------------------------------------------------------------


class _Schedule(Section):
    warmup_epochs: NonNegFloat = Field(0.0, description="Linear warm-up from 0, in epochs.")


class ConstantSchedule(_Schedule):
    name: Literal["constant"]


class CosineSchedule(_Schedule):
    name: Literal["cosine"]
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0, description="Final learning rate as a fraction of optimizer.lr."
    )


class StepSchedule(_Schedule):
    name: Literal["step"]
    step_epochs: PosInt = 30
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1


class OneCycleSchedule(_Schedule):
    name: Literal["onecycle"]
    pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.3
    div_factor: Annotated[float, Field(ge=1)] = 25.0
    final_div_factor: Annotated[float, Field(ge=1)] = 1e4


Schedule = Annotated[
    Union[ConstantSchedule, CosineSchedule, StepSchedule, OneCycleSchedule],
    Field(discriminator="name"),
]

# --- training, perturbation, detector --------------------------------------------------


class EMA(Section):
    decay: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.999, description="ema <- decay * ema + (1 - decay) * weights."
    )
    every: PosInt = Field(1, description="Optimizer steps between two EMA updates.")


class EarlyStop(Section):
    patience: PosInt = Field(
        10, description="Epochs without a val-accuracy improvement before training stops."
    )
    min_delta: NonNegFloat = Field(
        0.0, description="An improvement must raise the best val accuracy by more than this."
    )


class Train(Section):
    epochs: PosInt = 60
    target_accuracy: Annotated[float, Field(gt=0, le=1)] = Field(
        0.9, description="Validation accuracy whose first crossing is 'time to target'."
    )
    stability_window: Annotated[int, Field(ge=2, lt=INT_LIMIT)] = Field(
        20, description="Last epochs over which the validation-loss CV is taken."
    )
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    deterministic: bool = Field(
        False,
        description="Deterministic kernels only (torch, cuDNN, cuBLAS): bit-exact GPU runs.",
    )
    clip_grad_norm: PosFloat | None = Field(
        None,
        description="Clip the global gradient L2 norm to this before each optimizer step "
        "(null: no clipping).",
    )
    accumulate: PosInt = Field(
        1,
        description="Micro-batches per optimizer step; data.batch_size stays the step's "
        "batch and must split into this many equal micro-batches.",
    )
    label_smoothing: Fraction = Field(
        0.0, description="Label smoothing of the training loss only (val/test: plain CE)."
    )
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        [], description="Experiment trackers the run logs to (each an optional extra)."
    )
    log_every: PosInt = Field(10, description="Optimizer steps between per-step scalars.")
    ema: EMA | None = Field(None, description="An exponential moving average of the weights.")
    early_stop: EarlyStop | None = Field(None, description="Stop when val accuracy stalls.")


class PhaseEps(Section):
    exploration: NonNegFloat = 2e-3
    convergence: NonNegFloat = 1e-3
    fine_tuning: NonNegFloat = 2.5e-4


class Perturbation(Section):
    kernel: Literal["auto", "triton", "torch"] = "auto"
    apply_to: Literal["all", "weights"] = Field(
        "all", description="'weights': only tensors with ndim >= 2 (no biases, no norms)."
    )
    scale: Literal["absolute", "lr"] = Field(
        "absolute", description="'lr': epsilon follows lr_t / lr_0."
    )
    fixed: NonNegFloat = Field(1e-3, description="The fixed arm's noise std (parameter units).")
    eps: PhaseEps = PhaseEps()
    base: NonNegFloat = Field(2e-3, description="schedule_only's epsilon at step 0.")
    decay: NonNegFloat = Field(1e-3, description="lambda of exp(-lambda t), per optimizer step.")


class Thresholds(Section):
    mode: Literal["relative", "absolute"] = "relative"
    tau1: PosFloat = 0.5
    tau2: PosFloat = 0.5
    tau3: PosFloat = 0.1
    tau4: PosFloat = 0.2
    tau_smooth: PosFloat | None = Field(
        None,
        description="If given, exploration also needs loss_smooth > tau_smooth and "
        "fine-tuning loss_smooth < tau_smooth.",
    )


class PhaseDetector(Section):
    every: PosInt = Field(10, description="Optimizer steps between two samples.")
    window: Annotated[int, Field(ge=3, lt=INT_LIMIT)] = Field(
        20, description="Samples in the sliding window."
    )
    thresholds: Thresholds = Thresholds()
    patience: PosInt = Field(3, description="Consecutive votes needed to change phase.")
    monotonic: bool = False


class BaselineOverride(Section):
    """An extra baseline arm: the spec with these sections merged in."""

    data: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    train: dict[str, Any] | None = None


def _plain_text(text: str) -> str:
    """Descriptions land in docstrings and READMEs: one line, no escapes, no quote runs."""
    if not text.isprintable() or "\\" in text or '"""' in text:
        raise ValueError('must be one printable line without backslashes or """')
    return text


# --- tuning (perturbgen tune) ------------------------------------------------------------

Number = Union[int, float]
Choice = Union[bool, int, float, str]
# What a trial's spec must produce, and its direction: accuracies up, epochs down.
OBJECTIVES = {
    "best_val_acc": "maximize",
    "final_val_acc": "maximize",
    "epochs_to_target": "minimize",
}


class SearchDim(Section):
    """One dimension of the search space: a range (low, high; log, step) or choices."""

    low: Number | None = Field(None, description="Lower bound (inclusive).")
    high: Number | None = Field(None, description="Upper bound (inclusive).")
    log: bool = Field(False, description="Sample uniformly in log space (low > 0).")
    step: Annotated[Number, Field(gt=0)] | None = Field(None, description="Grid step.")
    choices: list[Choice] | None = Field(
        None, min_length=1, description="Categorical: one of these values."
    )
    zero: bool = Field(
        False,
        description="Also try exactly 0 (an on/off choice beside the range): the null of a "
        "noise magnitude, reachable from a log range.",
    )


QUESTIONS = ("same_budget", "added_to_tuned_baseline")


class Tune(Section):
    """`perturbgen tune`: every listed arm tuned with Optuna on the validation split, the
    same number of finished trials each, then compared on fresh seeds."""

    arms: list[Name] = Field(
        min_length=1,
        description="The arms to compare (variants and baseline_<name> extra baselines); "
        "each gets a study of its own.",
    )
    question: Literal[QUESTIONS] = Field(
        "same_budget",
        description="same_budget: each arm tuned over the shared knobs and its own, with the "
        "same budget (the benchmark view). added_to_tuned_baseline: baseline tuned first, then "
        "each method arm tunes its own knobs only, on the baseline's tuned values, with the "
        "same budget (the ablation view).",
    )
    space: dict[str, SearchDim] = Field(
        min_length=1,
        description="Dotted spec path -> its range or choices, declared once: each arm "
        "searches the paths its script reads.",
    )
    arm_space: dict[Name, dict[str, SearchDim]] = Field(
        {},
        description="Per arm: ranges that replace or add to space for that arm (e.g. an extra "
        "baseline's optimizer.lr).",
    )
    objective: Literal["best_val_acc", "final_val_acc", "epochs_to_target"] = Field(
        "final_val_acc",
        description="Validation accuracy of the final epoch (the endpoint's; maximized) or of "
        "the best one, or epochs until validation accuracy reaches train.target_accuracy "
        "(minimized; never = epochs + 1).",
    )
    trials: PosInt = Field(20, description="Finished trials (completed or pruned) per arm.")
    seeds: PosInt = Field(1, description="Runs per trial, at seed, seed + 1, ...; scored by mean.")
    epochs: PosInt | None = Field(None, description="Epochs per run (default train.epochs).")
    fresh_seeds: Annotated[int, Field(ge=0, lt=INT_LIMIT)] = Field(
        5,
        description="Runs per arm of its best values on fresh seeds (after the tuning seeds), "
        "compared in the paired report; 0: tuning only.",
    )
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="Stops trials whose per-epoch validation value is bad."
    )
    startup_trials: Annotated[int, Field(ge=0, lt=INT_LIMIT)] = Field(
        5, description="Trials that finish before the median pruner prunes any."
    )
    prune_after: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.5,
        description="Share of the epochs before which no trial is pruned (hyperband: its "
        "minimum resource), so that noise that pays off late is not cut early.",
    )


class Spec(Section):
    """One experiment: the model, data and training of every arm, and the arms to emit."""

    model_config = ConfigDict(title="perturbgen spec")

    extends: str | None = Field(None, description="Parent spec, relative to this file.")
    name: Name = Field(description="Names the output folder.")
    description: Annotated[str, AfterValidator(_plain_text)] = Field("", max_length=500)
    seed: Annotated[int, Field(ge=0, lt=INT_LIMIT)] = 0
    data: Data
    model: Model
    optimizer: Optimizer
    schedule: Schedule = ConstantSchedule(name="constant")
    train: Train = Train()
    perturbation: Perturbation = Perturbation()
    phase_detector: PhaseDetector = PhaseDetector()
    variants: list[Arm] = Field(["baseline", "fixed"], min_length=1)
    baselines: dict[Name, BaselineOverride] = {}
    # not part of any script: excluded from dumps, so the spec hash ignores it
    tune: Tune | None = Field(None, exclude=True, description="What perturbgen tune does.")


# Input shape (without the batch dimension) and class count of each fixed dataset.
DATASET_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "mnist1d": ((1, 40), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}
IMAGE_MODELS = ("resnet18", "vgg16", "efficientnet_b0", "torchvision", "timm")


def input_shape(spec: Spec) -> tuple[tuple[int, ...], int]:
    """(shape of one example, number of classes) as the emitted script sees them."""
    if isinstance(spec.data, SyntheticData):
        return tuple(spec.data.shape), spec.data.num_classes
    if isinstance(spec.data, ImageFolderData):
        size = spec.data.image_size
        return (3, size, size), spec.data.num_classes
    if isinstance(spec.data, CustomData):
        return tuple(spec.data.input_shape), spec.data.num_classes
    return DATASET_SHAPES[spec.data.dataset]


def semantic_problems(spec: Spec) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-field checks a researcher would want."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    opt = spec.optimizer
    if isinstance(opt, SGD) and opt.nesterov and (opt.momentum == 0 or opt.dampening != 0):
        problems.append((("optimizer", "nesterov"), "nesterov needs momentum > 0 and dampening 0"))
    if isinstance(spec.schedule, OneCycleSchedule) and spec.schedule.warmup_epochs > 0:
        problems.append(
            (
                ("schedule", "warmup_epochs"),
                "must be 0 with onecycle, which warms up by itself: pct_start is the share "
                f"of training spent rising to lr (got {spec.schedule.warmup_epochs:g})",
            )
        )
    if spec.data.batch_size % spec.train.accumulate:
        problems.append(
            (
                ("train", "accumulate"),
                f"must divide data.batch_size ({spec.data.batch_size}) into equal "
                f"micro-batches (got {spec.train.accumulate})",
            )
        )
    for i, kind in enumerate(opt.no_decay):
        if kind in opt.no_decay[:i]:
            problems.append((("optimizer", "no_decay", i), f"{kind!r} is listed twice"))
    th = spec.phase_detector.thresholds
    if th.tau3 > th.tau1:
        problems.append(
            (
                ("phase_detector", "thresholds", "tau3"),
                f"must be <= tau1 ({th.tau1}) (got {th.tau3})",
            )
        )
    if th.tau4 > th.tau2:
        problems.append(
            (
                ("phase_detector", "thresholds", "tau4"),
                f"must be <= tau2 ({th.tau2}) (got {th.tau4})",
            )
        )
    for i, name in enumerate(spec.train.loggers):
        if name in spec.train.loggers[:i]:
            problems.append((("train", "loggers", i), f"{name!r} is listed twice"))
    seen: set[str] = set()
    for i, arm in enumerate(spec.variants):
        if arm in seen:
            problems.append((("variants", i), f"{arm!r} is listed twice"))
        seen.add(arm)
    if spec.data.augment and spec.data.dataset in ("synthetic", "mnist1d", "custom"):
        problems.append(
            (("data", "augment"), f"no augmentation is defined for {spec.data.dataset}")
        )
    passed = (("model", PASSED_ARGS.get(spec.model.arch, ())), ("data", ("root",)))
    for section, taken in passed:
        args = getattr(getattr(spec, section), "args", {})
        for key in sorted(set(args) & set(taken)):
            problems.append(
                ((section, "args", key), f"is passed by perturbgen itself: {', '.join(taken)}")
            )
    shape, _ = input_shape(spec)
    shape_key = {"synthetic": "shape", "custom": "input_shape"}.get(spec.data.dataset, "dataset")
    shape_path = ("data", shape_key)
    if spec.model.arch in IMAGE_MODELS and (len(shape) != 3 or min(shape[1:]) < 32):
        problems.append(
            (
                shape_path,
                f"{spec.model.arch} needs images of shape [channels, height, width] "
                f"with height and width >= 32 (got {list(shape)})",
            )
        )
    if spec.model.arch == "cnn1d":
        if len(shape) != 2 or shape[1] < 3:
            problems.append(
                (
                    shape_path,
                    "cnn1d needs data of shape [channels, length] "
                    f"with length >= 3 (got {list(shape)})",
                )
            )
    problems += tune_problems(spec)
    return problems


# The dotted prefixes each arm's script never reads: tuning them would waste the budget.
UNUSED_BY_ARM = {
    "baseline": ("perturbation", "phase_detector"),
    "fixed": ("perturbation.eps", "perturbation.base", "perturbation.decay", "phase_detector"),
    "phase_only": ("perturbation.fixed", "perturbation.base", "perturbation.decay"),
    "schedule_only": ("perturbation.fixed", "perturbation.eps", "phase_detector"),
    "full": ("perturbation.fixed", "perturbation.base"),
}


# The noise magnitudes: a search over one must be able to reach 0, the method's null.
NOISE = (
    "perturbation.fixed",
    "perturbation.eps.exploration",
    "perturbation.eps.convergence",
    "perturbation.eps.fine_tuning",
    "perturbation.base",
)


def arm_names(spec: Spec) -> list[str]:
    """The arms a spec emits, in order: its variants, then baseline_<name> per extra baseline."""
    return [*spec.variants, *(f"baseline_{name}" for name in sorted(spec.baselines))]


def arm_kind(spec: Spec, arm: str) -> str:
    """The variant an arm's script is: an extra baseline is a baseline."""
    return arm if arm in spec.variants else "baseline"


def arm_spec(spec: Spec, arm: str) -> Spec:
    """The spec an arm's script is made from: an extra baseline's override merged in."""
    if arm in spec.variants:
        return spec
    override = spec.baselines[arm.removeprefix("baseline_")].model_dump(exclude_none=True)
    data = merge(Located(spec.model_dump(mode="json")), Located(override)).data
    return Spec.model_validate(data)


def _unused(kind: str, key: str) -> str | None:
    """The prefix of `key` that the `kind` arm's script never reads, or None."""
    return next((p for p in UNUSED_BY_ARM[kind] if key == p or key.startswith(p + ".")), None)


def arm_space(spec: Spec, arm: str) -> dict[str, SearchDim]:
    """The knobs one arm searches: the paths of tune.space its script reads, with
    tune.arm_space's for it on top. Asking the method added to a tuned baseline, a method
    arm searches its own knobs only (the baseline's come from the baseline's study)."""
    tune, kind = spec.tune, arm_kind(spec, arm)
    child = arm_spec(spec, arm)
    out = {}
    for key, dim in tune.space.items():
        if _unused(kind, key) or isinstance(tune_field(child, key), str):
            continue
        if tune.question == "added_to_tuned_baseline" and kind != "baseline":
            if not _unused("baseline", key):
                continue
        out[key] = dim
    out.update(tune.arm_space.get(arm, {}))
    return dict(sorted(out.items()))


def tune_problems(spec: Spec) -> list[tuple[tuple[str | int, ...], str]]:
    """The tune section's checks: each arm exists and has knobs, each path names a numeric or
    choice field that some arm uses, each range or choice is one that field accepts, and
    every noise magnitude can reach 0."""
    tune = spec.tune
    if tune is None:
        return []
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if spec.train.early_stop is not None:  # a trial is complete when it ran every epoch
        problems.append(
            (
                ("train", "early_stop"),
                "must be left out of a spec that perturbgen tune searches (its pruner stops "
                "poor trials; a trial's runs must all run train.epochs)",
            )
        )
    known = arm_names(spec)
    arms = []
    for i, arm in enumerate(tune.arms):
        if arm not in known:
            message = f"{arm!r} is not an arm of this spec ({', '.join(known)})"
            problems.append((("tune", "arms", i), message + did_you_mean(arm, known)))
        elif arm in arms:
            problems.append((("tune", "arms", i), f"{arm!r} is listed twice"))
        else:
            arms.append(arm)
    if tune.question == "added_to_tuned_baseline" and "baseline" not in tune.arms:
        problems.append(
            (("tune", "arms"), "must list baseline: the method is added to the tuned baseline")
        )
    for key, dim in sorted(tune.space.items()):
        users = [a for a in arms if not _unused(arm_kind(spec, a), key)]
        problems += _key_problems(spec, ("tune", "space", key), key, dim, users)
    for arm, space in sorted(tune.arm_space.items()):
        if arm not in arms:
            problems.append((("tune", "arm_space", arm), "is not one of tune.arms"))
            continue
        for key, dim in sorted(space.items()):
            where = ("tune", "arm_space", arm, key)
            users = [] if _unused(arm_kind(spec, arm), key) else [arm]
            problems += _key_problems(arm_spec(spec, arm), where, key, dim, users, arm)
    if not problems:
        for i, arm in enumerate(tune.arms):
            if not arm_space(spec, arm):
                problems.append((("tune", "arms", i), f"{arm} uses no path of tune.space"))
    return problems


def _key_problems(spec: Spec, where: tuple, key: str, dim: SearchDim, users: list[str], arm=""):
    """One search dimension's problems: `users` are the listed arms whose scripts read it."""
    found = tune_field(spec, key)
    if isinstance(found, str):
        return [(where, found)]
    section, name = found
    kind = field_kind(type(section).model_fields[name].annotation)
    if key == "seed":
        return [(where, "tuning the seed picks luck, not settings")]
    if KIND_KEYS.get(tuple(key.split(".")[:-1])) == name:
        return [(where, "chooses the kind of its section; tune that kind's fields")]
    if kind is None:
        return [(where, "is neither a number nor a choice field: it cannot be tuned")]
    if not users:
        unused = arm and _unused(arm_kind(spec, arm), key)
        if unused:
            return [(where, f"the {arm_kind(spec, arm)} arm does not use {unused}")]
        return [(where, f"no arm of tune.arms uses {key}")]
    problems = _dim_problems(where, dim, kind, section, name)
    if not problems and key in NOISE and not _reaches_zero(dim):
        problems.append(
            (
                where,
                "a noise magnitude must be able to reach 0 (no noise): add zero: true, "
                "low: 0 or a 0 choice",
            )
        )
    return problems


def _reaches_zero(dim: SearchDim) -> bool:
    if dim.choices is not None:
        return 0 in dim.choices
    return dim.zero or dim.low == 0


def tune_field(spec: Spec, path: str) -> tuple[BaseModel, str] | str:
    """(the section holding a dotted path's field, the field's name), or why there is none."""
    node: Any = spec
    parts = path.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if not isinstance(node, BaseModel):
            return f"{where} is not a section"
        fields = [f for f in type(node).model_fields if f != "tune"]
        if part not in fields:
            return f"{where or 'the spec'} has no field {part!r}{did_you_mean(part, fields)}"
        if i < len(parts) - 1:
            node = getattr(node, part)
    return node, parts[-1]


def field_kind(annotation: Any) -> str | None:
    """'int', 'float' or 'choice' (a bool or a Literal) for a tunable field, else None."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):  # X | None: the X
        members = [a for a in get_args(annotation) if a is not type(None)]
        return field_kind(members[0]) if len(members) == 1 else None
    if annotation is bool or get_origin(annotation) is Literal:
        return "choice"
    return {int: "int", float: "float"}.get(annotation)


def _dim_problems(where: tuple, dim: SearchDim, kind: str, section: BaseModel, name: str):
    problems = []
    ranged = [k for k in ("low", "high", "log", "step") if k in dim.model_fields_set]
    if dim.choices is not None:
        if ranged:
            problems.append((where, "give either choices or low and high, not both"))
        if dim.zero:
            problems.append((where + ("zero",), "goes with a range; add 0 to the choices"))
        for i, value in enumerate(dim.choices):
            why = _field_error(section, name, value)
            if why:
                problems.append((where + ("choices", i), why))
        return problems
    if kind == "choice":
        return [(where, f"{name} is a choice field: give choices, e.g. {{choices: [...]}}")]
    for bound in ("low", "high"):
        value = getattr(dim, bound)
        if value is None:
            problems.append((where + (bound,), "required key is missing (or give choices)"))
        elif kind == "int" and not isinstance(value, int):
            problems.append((where + (bound,), f"{name} is an integer field (got {value!r})"))
        else:
            why = _field_error(section, name, value)
            if why:
                problems.append((where + (bound,), why))
    if problems:
        return problems
    if dim.high <= dim.low:
        problems.append((where + ("high",), f"must be > low ({dim.low}) (got {dim.high})"))
    if dim.log and dim.low <= 0:
        problems.append((where + ("low",), f"must be > 0 with log: true (got {dim.low})"))
    if dim.log and dim.step is not None:
        problems.append((where + ("step",), "log and step cannot be combined"))
    if kind == "int" and dim.step is not None and not isinstance(dim.step, int):
        problems.append((where + ("step",), f"{name} is an integer field (got {dim.step!r})"))
    return problems


def _field_error(section: BaseModel, name: str, value: Any) -> str | None:
    """Why `name: value` would be refused in this section, or None."""
    try:
        type(section).model_validate({**section.model_dump(), name: value})
    except ValidationError as exc:
        err = exc.errors()[0]
        return _message(err, tuple(err["loc"]), None)
    return None


def _message(err: dict[str, Any], path: tuple, data: Any) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    got = f" (got {err.get('input')!r})"
    if kind == "extra_forbidden":
        return "unknown key" + did_you_mean(str(path[-1]), _allowed_keys(path, data))
    if kind == "missing":
        return "required key is missing"
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        bound = next(iter(ctx.values()))
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {bounds[kind]} {bound}{got}"
    if kind == "finite_number":
        return f"must be a finite number{got}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}{got}{_literal_hint(err, ctx['expected'])}"
    if kind == "union_tag_invalid":
        return (
            f"must be one of {ctx['expected_tags']}{got}{_literal_hint(err, ctx['expected_tags'])}"
        )
    if kind == "union_tag_not_found":
        return f"required key {ctx['discriminator']} is missing"
    if kind == "string_pattern_mismatch":
        return f"must be a lowercase ASCII identifier matching {ctx['pattern']}{got}"
    text = err["msg"].removeprefix("Value error, ")
    text = text[0].lower() + text[1:]
    return text if kind in ("too_short", "too_long") else text + got


# Common synonyms of spec keys (PyTorch, Lightning and Hugging Face names) -> the spec's key;
# a hint names the synonym's key only where that key is allowed.
ALIASES = {
    "learning_rate": "lr",
    "base_lr": "lr",
    "max_lr": "lr",
    "wd": "weight_decay",
    "l2": "weight_decay",
    "n_epochs": "epochs",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "bs": "batch_size",
    "batchsize": "batch_size",
    "num_workers": "workers",
    "n_classes": "num_classes",
    "img_size": "image_size",
    "optim": "optimizer",
    "scheduler": "schedule",
    "lr_scheduler": "schedule",
    "warmup": "warmup_epochs",
    "precision": "amp",
    "noise": "perturbation",
    "detector": "phase_detector",
    "arms": "variants",
}


def did_you_mean(word: str, allowed: list[str]) -> str:
    """'; did you mean X?' for the allowed name (a key, an arm) `word` most likely meant."""
    guess = _suggestion(word, allowed)
    return f"; did you mean {guess!r}?" if guess else ""


def _literal_hint(err: dict[str, Any], expected: str) -> str:
    """did_you_mean for a value that must be one of pydantic's quoted `expected` names."""
    value = err.get("input")
    return (
        did_you_mean(value, re.findall(r"'([^']*)'", expected)) if isinstance(value, str) else ""
    )


def _suggestion(key: str, allowed: list[str]) -> str | None:
    """The allowed key that ``key`` most likely meant: a synonym, a spelling, or a typo."""
    plain = key.lower().replace("-", "_")
    for guess in (plain, ALIASES.get(plain)):
        if guess in allowed:
            return guess
    close = difflib.get_close_matches(plain, allowed, n=1)
    return close[0] if close else None


def _allowed_keys(path: tuple, data: Any) -> list[str]:
    """The keys a mapping at ``path[:-1]`` may have, for the 'did you mean' hint.

    Walks the spec's field types along the path: a model's field, a dict's or a list's
    items, and of a discriminated union the member that the data's kind key selects.
    Every part of ``path[:-1]`` is in ``data`` (``_data_path`` keeps only those).
    """
    annotation: Any = Spec
    discriminator: str | None = None
    node = data
    for part in path[:-1]:
        if get_origin(annotation) in (dict, list):
            annotation, discriminator = get_args(annotation)[-1], None
        else:
            model = _member(annotation, discriminator, node)
            field = model.model_fields.get(part) if model else None
            if field is None:
                return []
            annotation, discriminator = field.annotation, field.discriminator
        node = node[part]
    model = _member(annotation, discriminator, node)
    return list(model.model_fields) if model else []


def _member(annotation: Any, discriminator: str | None, node: Any) -> type[BaseModel] | None:
    """The model a value of this type validates as: the only one, or the tagged member."""
    members = [
        a
        for a in (get_args(annotation) or (annotation,))
        if isinstance(a, type) and issubclass(a, BaseModel)
    ]
    if discriminator is None:
        return members[0] if len(members) == 1 else None
    tag = node.get(discriminator) if isinstance(node, dict) else None
    if tag is None:
        return None
    return next(
        (m for m in members if tag in get_args(m.model_fields[discriminator].annotation)), None
    )


def _data_path(loc: tuple, data: Any) -> tuple:
    """The loc of a pydantic error as a path into the data: union tags dropped."""
    path: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif i == len(loc) - 1 and isinstance(node, dict) and part != "[key]":
            path.append(part)  # a missing key: name it
        # else: a union tag or a dict-key marker; not part of the data
    return tuple(path)


def baseline_overrides(spec: Spec, doc: Located) -> list[tuple[str, list[str], dict]]:
    """Each extra baseline as (name, the sections it overrides, the merged spec data)."""
    base = Located({k: v for k, v in doc.data.items() if k not in ("baselines", "tune")})
    out = []
    for name, override in sorted(spec.baselines.items()):
        sections = {k: v for k, v in override.model_dump().items() if v is not None}
        out.append((name, sorted(sections), merge(base, Located(sections)).data))
    return out


# What an extra baseline may change in `data`: how batches are drawn, never which examples.
PER_ARM_DATA = ("batch_size", "augment", "workers")


def data_differences(spec: Spec, child: Spec) -> list[tuple[str, str]]:
    """(key, message) for each data setting an extra baseline changes that every arm shares:
    the dataset, its root, its split sizes, its shape. A changed dataset is one difference."""
    mine, theirs = spec.data.model_dump(), child.data.model_dump()
    keys = ["dataset"] if mine["dataset"] != theirs["dataset"] else sorted(mine)
    return [
        (
            key,
            f"every arm must train on the same data: the spec's {key} is {mine[key]!r}, "
            f"this baseline's {theirs[key]!r} (only {', '.join(PER_ARM_DATA)} may differ)",
        )
        for key in keys
        if key not in PER_ARM_DATA and mine[key] != theirs[key]
    ]


def logging_differences(spec: Spec, child: Spec) -> list[tuple[str, str]]:
    """(key, message) for each logging setting an extra baseline changes: every arm of an
    ablation logs the same scalars to the same trackers, so that they compare."""
    differences = []
    for key in ("loggers", "log_every"):
        mine, theirs = getattr(spec.train, key), getattr(child.train, key)
        if mine != theirs:
            message = f"the spec's {key} is {mine!r}, this baseline's {theirs!r}"
            differences.append((key, f"every arm logs the same way: {message}"))
    return differences


def validate(doc: Located, file: str) -> Spec:
    """Validate a loaded spec; raise SpecErrors listing every problem with file:line.

    Each extra baseline is validated too, as the spec with its override merged in, and may
    not change the data the arms are compared on.
    """
    spec = _validate_one(doc.data, doc, file, ())
    errors: list[SpecError] = []
    for name, _, data in baseline_overrides(spec, doc):
        try:
            child = _validate_one(data, doc, file, ("baselines", name))
        except SpecErrors as exc:
            errors.extend(exc.errors)
            continue
        problems = [(("data", key), m) for key, m in data_differences(spec, child)]
        problems += [(("train", key), m) for key, m in logging_differences(spec, child)]
        for where, message in problems:
            path = ("baselines", name, *where)
            origin_file, line = doc.origin(path, file)
            errors.append(SpecError(origin_file, line, dotted(path), message))
    if errors:
        raise SpecErrors(errors)
    return spec


def _validate_one(data: Any, doc: Located, file: str, prefix: tuple) -> Spec:
    errors: list[SpecError] = []

    def report(path: tuple, message: str) -> None:
        origin_file, line = doc.origin(prefix + path, file)
        errors.append(SpecError(origin_file, line, dotted(prefix + path), message))

    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        found = []
        for err in exc.errors():
            path = _data_path(err["loc"], data)
            if err["type"] == "union_tag_invalid":  # name the kind key, not the whole section
                path += (err["ctx"]["discriminator"].strip("'"),)
                err = {**err, "input": err["ctx"]["tag"]}
            found.append((path, err))
        # a misspelt key explains the missing one it was meant to be: one error, at the typo
        meant = {
            path[:-1] + (guess,)
            for path, err in found
            if err["type"] == "extra_forbidden"
            and (guess := _suggestion(str(path[-1]), _allowed_keys(path, data)))
        }
        for path, err in found:
            if not (err["type"] == "missing" and path in meant):
                report(path, _message(err, path, data))
    else:
        for path, message in semantic_problems(spec):
            report(path, message)
    if errors:
        raise SpecErrors(sorted(set(errors), key=lambda e: (e.file, e.line or 0, e.path)))
    return spec
