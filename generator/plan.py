"""Plan: a validated Spec becomes one frozen RenderModel per emitted arm.

Every decision a template would otherwise make with a multi-line condition is a named
field here, so that it is tested in Python and the templates stay layout.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from dataclasses import dataclass

from generator import __version__
from generator import spec as spec_module
from generator.constants import LIBRARY_ARCHES, Constant, constants, data_arguments
from generator.loading import Located
from generator.method import PERTURBATIONS, POLICIES, policy, policy_arguments
from generator.spec import CustomData, CustomModel, Spec, baseline_overrides, input_shape

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
