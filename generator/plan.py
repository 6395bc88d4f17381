"""Plan: a validated Spec becomes one frozen RenderModel per emitted arm.

Every decision a template would otherwise make with a multi-line condition is a named
field here, so that it is tested in Python and the templates stay layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from dataclasses import dataclass
from typing import Any

from generator import __version__
from generator import spec as spec_module
from generator.loading import Located
from generator.method import PERTURBATIONS, POLICIES, policy, policy_arguments
from generator.spec import (
    SGD,
    CustomData,
    CustomModel,
    ImageFolderData,
    Spec,
    SyntheticData,
    baseline_overrides,
    input_shape,
)

# Per-channel mean and std used to standardise each image dataset.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}


# train.loggers: the PyPI package each tracker comes from (the extra of the same name).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}

# The standard-library modules the support module always imports, those a data source adds
# (templates/data/<source>.py.jinja), and those import_factory and call_factory add.
SUPPORT_IMPORTS = frozenset(
    "argparse ast contextlib fcntl gc hashlib json math os shutil signal socket statistics sys "
    "time warnings".split()
)
DATA_IMPORTS = {"cifar": ("pickle",), "custom": ("contextlib", "operator", "random")}
FACTORY_IMPORTS = ("importlib", "inspect")

SEED_COMMENT = ("seeds init, data order and dropout", "seeds init, data order, dropout and noise")


@dataclass(frozen=True)
class Constant:
    """One module-level constant of the emitted script, with its unit comment."""

    name: str
    value: Any
    comment: str


# How each arm's noise enters, for docstrings: (the sentence, the update); the other
# perturbing arms add eps(t) * xi to the parameters.
NOISE_RULES = {
    "gradient_noise": (
        "Before every optimizer step the gradient receives annealed Gaussian noise:",
        "g <- g + eps(t) * xi,   xi ~ N(0, I) from a dedicated generator",
    ),
    "anti_pgd": (
        "After every optimizer step the parameters receive anticorrelated Gaussian noise:",
        "theta <- theta + xi_(t+1) - xi_t,   xi_t = eps(t) * N(0, I) from a dedicated generator",
    ),
}
# What eps(t)'s clock counts, for docstrings (fixed has no clock).
PHASE = "p is the phase the detector reports (exploration, convergence, fine_tuning)"
STEPS = "t counts optimizer steps from 0."
CLOCKS = {
    "phase_only": (f"{PHASE}.",),
    "full": (f"{PHASE};", "t_p counts optimizer steps since p began."),
    "schedule_only": (STEPS,),
    "gradient_noise": (STEPS,),
    "anti_pgd": (STEPS,),
}
PARAMETER_NOISE = (
    "After every optimizer step each parameter receives Gaussian noise:",
    "theta <- theta + eps(t) * xi,   xi ~ N(0, I) from a dedicated generator",
)


@dataclass(frozen=True)
class RenderModel:
    """Everything the templates need to emit one arm's script."""

    version: str
    spec_hash: str
    spec_name: str
    description_lines: tuple[str, ...]  # the spec's description, wrapped for a docstring
    arm: str  # file name part: baseline, fixed, baseline_adam, ...
    kind: str  # the method's arm: baseline, fixed, phase_only, schedule_only, full
    script: str
    override: str  # the sections an extra baseline overrides ("optimizer, schedule"), or ""
    eps_formula: str  # e.g. "eps(t) = eps_base * exp(-lambda * t)"
    eps_values: str  # e.g. "eps_base = 0.002, lambda = 0.001"
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    crop_flip: bool  # CIFAR's pad-crop-flip augmentation, done on tensors
    arch: str
    optimizer: str
    schedule: str
    compile: bool
    constants: tuple[Constant, ...]
    factory_refs: tuple[str, ...] = ()  # "model.factory = pkg.mod:attr" per user factory
    accumulates: bool = False  # train.accumulate > 1: micro-batches per optimizer step
    loggers: tuple[str, ...] = ()  # train.loggers: experiment trackers, in the spec's order
    no_decay: bool = False  # optimizer.no_decay: two parameter groups, one without decay
    policy: str = ""  # the eps(t) policy's module under generator/method/ ("" in a baseline)
    policy_arguments: tuple[str, ...] = ()  # its constructor keywords: constants, lower case
    data_arguments: tuple[str, ...] = ()  # load_data's keywords: the data constants, lower case
    # the names this arm's script takes from the spec's support module (render fills it in)
    support_imports: tuple[str, ...] = ()

    @property
    def support_module(self) -> str:
        """The module beside the scripts that every arm of the spec shares (its import name)."""
        return support_module(self.spec_name)

    @property
    def optimizer_family(self) -> str:
        """The optimizer's template, templates/optimizer/<family>.py.jinja: Adam and AdamW
        share one (optimizer_class names which)."""
        return "sgd" if self.optimizer == "sgd" else "adam"

    @property
    def optimizer_class(self) -> str:
        """torch.optim's class of the spec's optimizer."""
        return {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[self.optimizer]

    @property
    def readme_arm(self) -> str:
        """The README table's arm cell: its kind, and the sections an extra baseline overrides."""
        return f"{self.kind} (overrides: {self.override})" if self.override else self.kind

    @property
    def readme_eps(self) -> str:
        """The README table's eps(t) cell: the formula, and the spec's numbers in it."""
        return f"`{self.eps_formula}`" + (f"; {self.eps_values}" if self.eps_values else "")

    @property
    def doc_head_lines(self) -> tuple[str, ...]:
        """The docstring under its title: the spec's description and the arm's sentence, the
        method's lines, and where the spec has its own code, how the script finds it."""
        lines = self.about_lines + ("",) + self.method_lines
        if not self.factories:
            return lines
        return (
            lines
            + ("", "The spec's own code, imported by name when the run starts:")
            + tuple(f"    {ref}" for ref in self.factory_refs)
            + (
                "Install those modules, or put the folder that holds them on PYTHONPATH (perturbgen ablate",
                f"puts the spec file's folder there): PYTHONPATH=SPEC_FOLDER python {self.script}",
            )
        )

    @property
    def replicas_note(self) -> str:
        """What the docstring adds to "the replicas stay bit-identical" in a perturbing arm."""
        return " (every rank draws the same noise)" if self.perturbs else ""

    @property
    def tracker_line(self) -> str:
        """The docstring's line on the experiment trackers, with its newline ("" if none)."""
        if not self.logs:
            return ""
        return f"The run is also logged to {', '.join(self.loggers)} (train.loggers; see ExperimentLog).\n"

    @property
    def about_lines(self) -> tuple[str, ...]:
        """The docstring's opening under its title: the spec's description (if any), then
        the sentence naming the arm."""
        return self.description_lines + ("",) * bool(self.description_lines) + (self.arm_line,)

    @property
    def arm_line(self) -> str:
        """The docstring's sentence naming the arm: of the ablation, or an extra baseline."""
        if self.override:
            return f"Arm `{self.arm}`: an extra baseline, the spec with its own {self.override} section(s)."
        return f"Arm `{self.arm}` of an ablation of adaptive perturbation training."

    @property
    def method_lines(self) -> tuple[str, ...]:
        """The docstring's account of the arm's noise: the update, eps(t) with the spec's
        numbers, and what its symbols count."""
        if not self.perturbs:
            return (
                "No perturbation: plain training, the reference every other arm is compared with.",
            )
        sentence, update = self.noise_rule
        lines = (sentence, f"    {update}", f"    {self.eps_formula}", f"    {self.eps_values}")
        return lines + CLOCKS.get(self.kind, ())

    @property
    def perturbs(self) -> bool:
        """Whether the script holds perturbation code at all (never in a baseline)."""
        return self.kind != "baseline"

    @property
    def factories(self) -> bool:
        """Whether the script imports a user's factory (custom model or custom data)."""
        return bool(self.factory_refs)

    @property
    def data_source(self) -> str:
        """The dataset's template, templates/data/<data_source>.py.jinja: CIFAR-10 and
        CIFAR-100 share one reader."""
        return "cifar" if self.dataset in ("cifar10", "cifar100") else self.dataset

    @property
    def loader_data(self) -> bool:
        """Whether examples come through a DataLoader (image folders, custom datasets)
        rather than as tensors held whole on the device."""
        return self.dataset in ("imagefolder", "custom")

    @property
    def logs(self) -> bool:
        """Whether the script logs to experiment trackers (train.loggers is not empty)."""
        return bool(self.loggers)

    @property
    def static_graph(self) -> bool:
        """DDP's static_graph: only where the graph is known to be the same at every step
        (a built-in architecture; no no_sync micro-batches, under which DDP's static graph
        mis-counts gradients, pytorch#143580; not compiled, a pairing not measured)."""
        library = self.arch == "custom" or self.arch in LIBRARY_ARCHES
        return not (library or self.accumulates or self.compile)

    @property
    def perturbation_class(self) -> str:
        """The method's class the arm builds: a peer's own (gradient noise, anti-PGD), else
        with the detector's samples, or the noise alone."""
        return perturbation_class(self.kind, self.detector)

    @property
    def noise_rule(self) -> tuple[str, str]:
        """How the arm's noise enters (docstrings): the sentence and the update."""
        return noise_rule(self.kind)

    @property
    def peer_modules(self) -> tuple[str, ...]:
        return peer_modules(self.kind)

    @property
    def detector(self) -> bool:
        """Whether the script holds the phase detector: its eps(t) policy needs the phase
        (phase_only and full)."""
        return self.perturbs and policy(self.kind).needs_detector

    @property
    def method_modules(self) -> tuple[str, ...]:
        """The modules of generator/method/ the arm's method section emits, in order: the
        detector where its eps(t) needs the phase, the policy, a peer's own modules."""
        return ("detector",) * self.detector + (self.policy,) + self.peer_modules

    @property
    def detector_template(self) -> str:
        """templates/perturbation/<name>.py.jinja: the detector make_perturbation builds."""
        return "detector" if self.detector else "none"


# model.arch values whose network an optional package builds (imported when it is built)
LIBRARY_ARCHES = ("torchvision", "timm")


@dataclass(frozen=True)
class SupportModel:
    """The spec's support module: code every arm shares, made from all the spec's arms (an
    extra baseline may read other data or build another model: the module holds each one's,
    and every arm passes its own settings as arguments)."""

    spec_name: str
    version: str
    arms: tuple[RenderModel, ...]

    @property
    def data_sources(self) -> tuple[str, ...]:
        """The data templates the arms read, templates/data/<source>.py.jinja, each once."""
        return tuple(sorted({arm.data_source for arm in self.arms}))

    @property
    def datasets(self) -> tuple[tuple[str, str], ...]:
        """(dataset, its data source) of every dataset the arms read: load_data's dispatch."""
        return tuple(sorted({(arm.dataset, arm.data_source) for arm in self.arms}))

    @property
    def stdlib_imports(self) -> tuple[str, ...]:
        """The standard-library modules the module imports: its own, and those of the data
        sources, factories and library models the arms use (PIL, mnist1d, torchvision and
        timm are imported where used)."""
        extra = {m for arm in self.arms for m in DATA_IMPORTS.get(arm.data_source, ())}
        extra |= set(FACTORY_IMPORTS) if self.any("factories") else set()
        extra |= {"importlib"} if self.imports_by_name else set()
        return tuple(sorted(SUPPORT_IMPORTS | extra))

    @property
    def arches(self) -> tuple[str, ...]:
        """The model templates the arms build, templates/model/<arch>.py.jinja, each once."""
        return tuple(sorted({arm.arch for arm in self.arms}))

    @property
    def tracker_packages(self) -> dict[str, str]:
        """The PyPI package of every tracker ExperimentLog opens (whichever an arm asks for),
        for the error a missing one gets."""
        return dict(TRACKER_PACKAGES)

    @property
    def library_arches(self) -> tuple[str, ...]:
        """The arches whose models come from an optional package, imported when built."""
        return tuple(arch for arch in self.arches if arch in LIBRARY_ARCHES)

    @property
    def imports_by_name(self) -> bool:
        """Whether the module imports modules by name when a run starts (importlib): a
        user's factory, or a library model's package."""
        return self.any("factories") or bool(self.library_arches)

    def any(self, field: str) -> bool:
        """Whether any arm's `field` is true (e.g. "crop_flip", "loader_data", "logs")."""
        return any(getattr(arm, field) for arm in self.arms)


def support_model(models: list[RenderModel]) -> SupportModel:
    """The support module's model, from every arm of one spec."""
    return SupportModel(models[0].spec_name, models[0].version, tuple(models))


def support_module(spec_name: str) -> str:
    """The shared module's name: the spec's, so scripts of two specs never share one."""
    return f"{spec_name}_support"


def noise_rule(kind: str) -> tuple[str, str]:
    """How an arm's noise enters, for docstrings: the sentence and the update."""
    return NOISE_RULES.get(kind, PARAMETER_NOISE)


def peer_modules(kind: str) -> tuple[str, ...]:
    """The modules under generator/method/ a peer's class needs after noise.py."""
    return PERTURBATIONS[kind][0] if kind in PERTURBATIONS else ()


def perturbation_class(kind: str, detector: bool) -> str:
    """The method's class an arm of `kind` builds (for the scripts and the export)."""
    if kind in PERTURBATIONS:
        return PERTURBATIONS[kind][1]
    return "SampledPerturbation" if detector else "Perturbation"


@dataclass(frozen=True)
class ReadmeModel:
    """The emitted folder's README.md."""

    spec_name: str
    description: str
    version: str
    arms: tuple[RenderModel, ...]


# Training features that came after specs were in use, with the value that turns each off.
# While off they stay out of the spec hash, so that a spec which does not use them keeps the
# hash its run folders (ablation.json, manifest.json) and the golden record carry.
LATER_FEATURES = {
    "train": {
        "clip_grad_norm": None,
        "accumulate": 1,
        "label_smoothing": 0.0,
        "ema": None,
        "early_stop": None,
        "loggers": [],
        "channels_last": "auto",
        "check_every": 50,  # when it reads the device: the same numbers at any value
    },
    "optimizer": {"no_decay": []},
    # the peers' settings, at their defaults (a spec without the peers never reads them)
    "perturbation": {
        "gradient_noise": spec_module.GradientNoise().model_dump(mode="json"),
        "anti_pgd": spec_module.AntiPGD().model_dump(mode="json"),
    },
}


def spec_hash(spec: Spec) -> str:
    data = spec.model_dump(mode="json")
    for section, features in LATER_FEATURES.items():
        for key, off in features.items():
            if key in data[section] and data[section][key] == off:
                del data[section][key]
    if "loggers" not in data["train"]:
        data["train"].pop("log_every", None)  # it means nothing without a logger
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def eps_formula(spec: Spec, kind: str) -> tuple[str, str]:
    """eps(t) of an arm and the spec's numbers in it, for docstrings and READMEs."""
    p = spec.perturbation
    ratio = " * lr_t / lr_0" if p.scale == "lr" else ""
    phases = f"eps_phase = ({p.eps.exploration!r}, {p.eps.convergence!r}, {p.eps.fine_tuning!r})"
    return {
        "baseline": ("eps(t) = 0 (no perturbation)", ""),
        "fixed": (f"eps(t) = eps_fixed{ratio}", f"eps_fixed = {p.fixed!r}"),
        "phase_only": (f"eps(t) = eps_phase[p]{ratio}", phases),
        "schedule_only": (
            f"eps(t) = eps_base * exp(-lambda * t){ratio}",
            f"eps_base = {p.base!r}, lambda = {p.decay!r}",
        ),
        "full": (
            f"eps(t) = eps_phase[p] * exp(-lambda * t_p){ratio}",
            f"{phases}, lambda = {p.decay!r}",
        ),
        "gradient_noise": (
            f"eps(t) = sqrt(eta / (1 + t)^gamma){ratio}, the std of the gradient noise",
            f"eta = {p.gradient_noise.eta!r}, gamma = {p.gradient_noise.gamma!r}",
        ),
        "anti_pgd": (
            f"eps(t) = sigma{ratio}, the std of xi_t; theta receives xi_(t+1) - xi_t",
            f"sigma = {p.anti_pgd.sigma!r}",
        ),
    }[kind]


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


def factory_refs(spec: Spec) -> tuple[str, ...]:
    """The user's factories a script imports, as docstring lines."""
    return tuple(
        f"{section}.factory = {getattr(spec, section).factory}"
        for section in ("model", "data")
        if isinstance(getattr(spec, section), (CustomModel, CustomData))
    )


def plan(spec: Spec, doc: Located) -> list[RenderModel]:
    """One RenderModel per arm: the spec's variants, then its extra baselines by name."""
    arms: list[tuple[str, str, Spec, str]] = [(v, v, spec, "") for v in spec.variants]
    for name, sections, data in baseline_overrides(spec, doc):
        child = Spec.model_validate(data)  # already validated with its line numbers
        arms.append((f"baseline_{name}", "baseline", child, ", ".join(sections)))
    digest = spec_hash(spec)
    models = []
    for arm, kind, s, override in arms:
        formula, values = eps_formula(s, kind)
        shape, classes = input_shape(s)
        models.append(
            RenderModel(
                version=__version__,
                spec_hash=digest,
                spec_name=s.name,
                description_lines=tuple(textwrap.wrap(s.description, 88)),
                arm=arm,
                kind=kind,
                script=f"train_{arm}.py",
                override=override,
                eps_formula=formula,
                eps_values=values,
                dataset=s.data.dataset,
                input_shape=shape,
                num_classes=classes,
                crop_flip=s.data.dataset in ("cifar10", "cifar100"),
                arch=s.model.arch,
                optimizer=s.optimizer.name,
                schedule=s.schedule.name,
                compile=s.train.compile,
                constants=constants(s, arm, kind),
                factory_refs=factory_refs(s),
                accumulates=s.train.accumulate > 1,
                loggers=tuple(s.train.loggers),
                no_decay=bool(s.optimizer.no_decay),
                policy=POLICIES.get(kind, ""),
                policy_arguments=policy_arguments(kind) if kind in POLICIES else (),
                data_arguments=data_arguments(s),
            )
        )
    return models
