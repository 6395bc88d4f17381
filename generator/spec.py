"""The spec: pydantic v2 models of DESIGN §2 (checks.py validates a loaded spec across fields;
messages.py words pydantic's errors)."""

from __future__ import annotations

import json
import keyword
import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
)

from generator.loading import Located, merge

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
ARMS = ("baseline", "fixed", "phase_only", "schedule_only", "full", "gradient_noise", "anti_pgd")

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=32)]
INT_LIMIT = 2**31  # every count and size fits in 32 bits: anything bigger is a typo
PosInt = Annotated[int, Field(gt=0, lt=INT_LIMIT)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Arm = Literal[ARMS]  # the same as Literal["baseline", ..., "full"]


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
    channels_last: Literal["auto", True, False] = Field(
        "auto",
        description="Channels-last (NHWC) memory for 4-D weights and image batches: 'auto' "
        "chooses it for conv nets on CUDA, true on every device, false never.",
    )
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
    check_every: PosInt = Field(
        50,
        description="Optimizer steps between check points, where the device's loss sums and "
        "finiteness are read and a stop signal is agreed across ranks; no other step waits "
        "for the host. A signal or divergence is acted on at most this many steps late; 50 "
        "makes the read cost 1/50 of a per-step sync.",
    )
    ema: EMA | None = Field(None, description="An exponential moving average of the weights.")
    early_stop: EarlyStop | None = Field(None, description="Stop when val accuracy stalls.")


class PhaseEps(Section):
    exploration: NonNegFloat = 2e-3
    convergence: NonNegFloat = 1e-3
    fine_tuning: NonNegFloat = 2.5e-4


class GradientNoise(Section):
    eta: NonNegFloat = Field(
        0.01,
        description="sigma_t^2 = eta / (1 + t)^gamma, gradient units squared (the paper's "
        "eta in {0.01, 0.3, 1.0}; 0: no noise).",
    )
    gamma: NonNegFloat = Field(0.55, description="Annealing exponent (the paper's 0.55).")


class AntiPGD(Section):
    sigma: NonNegFloat = Field(
        1e-3,
        description="Std of xi_t ~ N(0, sigma^2 I), parameter units; theta receives "
        "xi_{t+1} - xi_t (0: no noise).",
    )


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
    gradient_noise: GradientNoise = Field(
        GradientNoise(), description="The gradient_noise arm (Neelakantan et al. 2015)."
    )
    anti_pgd: AntiPGD = Field(AntiPGD(), description="The anti_pgd arm (Orvieto et al. 2022).")


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


def baseline_overrides(spec: Spec, doc: Located) -> list[tuple[str, list[str], dict]]:
    """Each extra baseline as (name, the sections it overrides, the merged spec data)."""
    base = Located({k: v for k, v in doc.data.items() if k not in ("baselines", "tune")})
    out = []
    for name, override in sorted(spec.baselines.items()):
        sections = {k: v for k, v in override.model_dump().items() if v is not None}
        out.append((name, sorted(sections), merge(base, Located(sections)).data))
    return out


def schema_text() -> str:
    """The spec's JSON Schema, as committed in specs/spec.schema.json."""
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **Spec.model_json_schema(),
    }
    return json.dumps(document, indent=2) + "\n"
