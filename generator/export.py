"""Export: one perturbing arm as a standalone module for training loops that already exist.

The module holds the method from its one source (generator/method/, emitted as it is into
the scripts too) plus a drop-in class and two callbacks (templates/
adaptive_perturbation.py.jinja), so the drop-in and the scripts cannot drift. Each instance
builds its policy and detector from its own settings: instances with different settings
live side by side in one process.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import black
import jinja2

from generator.errors import SpecError, SpecErrors
from generator.messages import did_you_mean
from generator.method import policy
from generator.constants import Constant
from generator.plan import (
    CLOCKS,
    RenderModel,
    noise_rule,
    peer_modules,
    perturbation_class,
    plan,
)
from generator.render import BLACK_MODE, GenerationError, environment, load_spec, pyrepr

MODULE = "adaptive_perturbation.py"  # the default file name, and the golden record's
GOLDEN_ARM = "full"  # the arm each spec folder of the golden record carries as MODULE

# The spec constants the Perturbation section reads; each is a constructor keyword of the
# exported class (its lower-case name). Constants an arm does not define are left out.
EXPORTED = (
    "SPEC_NAME",
    "ARM",
    "SEED",
    "KERNEL",
    "APPLY_TO",
    "NOISE_SCALE",
    "LR",
    "EPS_FIXED",
    "EPS_PHASE",
    "EPS_BASE",
    "DECAY",
    "NOISE_ETA",
    "NOISE_GAMMA",
    "SIGMA",
    "EVERY",
    "WINDOW",
    "THRESHOLD_MODE",
    "TAU1",
    "TAU2",
    "TAU3",
    "TAU4",
    "TAU_SMOOTH",
    "PATIENCE",
    "MONOTONIC",
)

FIXED = ("SPEC_NAME", "ARM", "SEED")  # not settings: seed is a constructor argument of its own

# The template under templates/export/ of each method class the drop-in class extends: it
# holds the drop-in's methods that differ by arm (what happens around the optimizer step).
VARIANTS = {
    "Perturbation": "parameter_noise",
    "SampledPerturbation": "sampled_parameter_noise",
    "GradientNoise": "gradient_noise",
    "AntiPGD": "anti_pgd",
}

# Docstring text that differs by arm: ExportModel's *_lines pick and fill it.
# How parameter noise enters, said of a loop whose optimizer is the user's (a peer's noise
# is said by plan.noise_rule).
DROP_IN_NOISE = """\
After every real optimizer step the parameters the optimizer trains receive Gaussian noise:"""
LR_DOC = """\
Noise scale 'lr': eps(t) is multiplied by lr_t / lr_0, lr_t the optimizer's learning rate at
the step and lr_0 the reference learning rate: the constructor argument `lr`, by default the
spec's optimizer.lr ({lr}). An optimizer that starts at another learning rate
multiplies every eps by its ratio to lr_0; pass lr=<that learning rate> to keep the spec's
eps values. The module prints lr_0 once when built and warns when the optimizer starts
elsewhere."""
HOOKS_DOC = """\
The optimizer's step hooks do what must happen around its step: before it, the step's
learning rate; after it, that the step happened."""
SAMPLED_HOOKS_DOC = """\
The optimizer's step hooks do what must happen around its step: before it, the step's
learning rate and, on a detector sample step, the gradient norm and a snapshot of the
parameters; after it, that the step happened."""
STATE_DOC = """\
perturb.eps is the eps of the last step (None before the first), perturb.phase the
phase's name (None in arms without a detector); state_dict() and load_state_dict() hold
the noise generators, {detector}the step count and the settings, for an exact resume.
Under DDP build it on every rank, with the same seed: every rank draws the same noise.{ranks}"""
RANKS = "Rank 0's detector decides, and its phase is broadcast to the other ranks."
STEP_DOC = """\
After optimizer.step(): the noise; returns eps. None back means the grad scaler skipped
the step (its gradients hold inf or NaN): no step, no noise, no count."""
SAMPLED_STEP_DOC = """\
After optimizer.step(): on a sample step the detector's sample, with this step's
training loss, then the noise; returns eps. None back means the grad scaler skipped
the step (its gradients hold inf or NaN): no step, no noise, no count."""


# The class docstring's first sentence, by how the arm's noise enters (the drop-in parameter
# noise of the method's arms unless a peer says otherwise).
CLASS_DOC = {
    "parameters": (
        "Adds eps(t) * xi to the parameters `optimizer` trains after each of its real steps:",
        "call perturb.step(loss) after every optimizer.step().",
    ),
    "gradient_noise": (
        "Adds eps(t) * xi to the gradients of the parameters `optimizer` trains before each of",
        "its real steps: call perturb.step(loss) after every optimizer.step().",
    ),
    "anti_pgd": (
        "Adds xi_(t+1) - xi_t, xi_t = eps(t) * N(0, I), to the parameters `optimizer` trains",
        "after each of its real steps: call perturb.step(loss) after every optimizer.step().",
    ),
}


@dataclass(frozen=True)
class ExportModel:
    """Everything templates/adaptive_perturbation.py.jinja needs for one arm's module."""

    version: str
    spec_hash: str
    spec_name: str
    arm: str
    kind: str
    eps_formula: str
    eps_values: str
    module: str
    constants: tuple[Constant, ...]  # the EXPORTED ones the arm defines, in that order
    overridable: tuple[str, ...]  # their constructor keywords, without `seed`
    policy: str  # the eps(t) policy's module under generator/method/
    policy_arguments: tuple[str, ...]  # its constructor keywords, settings of the module

    @property
    def perturbation_class(self) -> str:
        """The method's class the arm builds (plan.perturbation_class)."""
        return perturbation_class(self.kind, self.detector)

    @property
    def peer_modules(self) -> tuple[str, ...]:
        return peer_modules(self.kind)

    @property
    def noise_rule(self) -> tuple[str, str]:
        return noise_rule(self.kind)

    @property
    def noise_in_gradient(self) -> bool:
        """gradient_noise: the noise goes into the gradients, in the optimizer's pre-hook."""
        return self.kind == "gradient_noise"

    @property
    def detector(self) -> bool:
        return policy(self.kind).needs_detector

    def value(self, name: str):
        return next(c.value for c in self.constants if c.name == name)

    @property
    def scales_with_lr(self) -> bool:
        """Noise scale 'lr': the module states its reference learning rate lr_0."""
        return self.value("NOISE_SCALE") == "lr"

    @property
    def reference_lr(self) -> float:
        return self.value("LR")

    @property
    def variant(self) -> str:
        """The template under templates/export/ with the drop-in class's methods for this arm."""
        return VARIANTS[self.perturbation_class]

    @property
    def method_modules(self) -> tuple[str, ...]:
        """The modules under generator/method/ the module holds, in the order they build on
        each other: the detector and its sampling only where eps(t) reads the phase."""
        detector = ("detector",) if self.detector else ()
        sampling = ("sampling",) if self.detector else ()
        return ("seeds", *detector, self.policy, "noise", *self.peer_modules, *sampling)

    @property
    def intro_lines(self) -> tuple[str, ...]:
        """The module docstring's account of the noise: how it enters, eps(t), what its clock
        counts, and under noise scale 'lr' the reference learning rate, between blank lines."""
        sentence = self.noise_rule[0] if self.peer_modules else DROP_IN_NOISE
        rule = (self.noise_rule[1], self.eps_formula, self.eps_values)
        lines = (sentence, *(f"    {line}" for line in rule), *CLOCKS.get(self.kind, ()))
        if not self.scales_with_lr:
            return lines
        return (*lines, "", *LR_DOC.format(lr=pyrepr(self.reference_lr)).splitlines(), "")

    @property
    def example_arguments(self) -> str:
        """AdaptivePerturbation's keywords in the docstring's plain loop: the seed, and lr_0
        where the noise follows the learning rate."""
        lr = f", lr={pyrepr(self.reference_lr)}" if self.scales_with_lr else ""
        return f"seed=0{lr}"

    @property
    def class_lines(self) -> tuple[str, ...]:
        """The class docstring's first sentence: what the arm's noise does to which tensors,
        and when."""
        return CLASS_DOC.get(self.kind, CLASS_DOC["parameters"])

    @property
    def hook_lines(self) -> tuple[str, ...]:
        """The class docstring's account of what the optimizer's step hooks take."""
        return tuple((SAMPLED_HOOKS_DOC if self.detector else HOOKS_DOC).splitlines())

    @property
    def state_lines(self) -> tuple[str, ...]:
        """The class docstring's account of the state, and of the ranks under DDP."""
        detector, ranks = ("the detector, ", f"\n{RANKS}") if self.detector else ("", "")
        return tuple(STATE_DOC.format(detector=detector, ranks=ranks).splitlines())

    @property
    def step_doc_lines(self) -> tuple[str, ...]:
        """step()'s docstring: what it does after the optimizer step."""
        return tuple((SAMPLED_STEP_DOC if self.detector else STEP_DOC).splitlines())


def export_model(arm: RenderModel, module: str = MODULE) -> ExportModel:
    if not arm.perturbs:
        raise ValueError(f"arm {arm.arm!r} adds no noise: there is nothing to export")
    by_name = {c.name: c for c in arm.constants}
    constants = tuple(by_name[name] for name in EXPORTED if name in by_name)
    return ExportModel(
        version=arm.version,
        spec_hash=arm.spec_hash,
        spec_name=arm.spec_name,
        arm=arm.arm,
        kind=arm.kind,
        eps_formula=arm.eps_formula,
        eps_values=arm.eps_values,
        module=module,
        constants=constants,
        overridable=tuple(c.name.lower() for c in constants if c.name not in FIXED),
        policy=arm.policy,
        policy_arguments=arm.policy_arguments,
    )


def module_source(model: ExportModel) -> str:
    """The module before black."""
    try:
        return environment().get_template("adaptive_perturbation.py.jinja").render(m=model)
    except jinja2.TemplateError as exc:
        raise GenerationError(f"template adaptive_perturbation.py.jinja failed: {exc}") from exc


def render_module(model: ExportModel) -> str:
    source = module_source(model)
    try:
        source = black.format_str(source, mode=BLACK_MODE)
    except Exception as exc:  # any black failure is a generator bug
        raise GenerationError(f"black could not format {model.module}: {exc}") from exc
    try:
        ast.parse(source, filename=model.module)
    except SyntaxError as exc:
        raise GenerationError(f"{model.module} is not valid Python: {exc}") from exc
    return source


def golden_sources(models: list[RenderModel]) -> dict[str, str]:
    """The module a spec's generated folder carries, unformatted: its `full` arm's, if it
    has one (render_all formats it with the scripts)."""
    full = [m for m in models if m.arm == GOLDEN_ARM]
    return {MODULE: module_source(export_model(full[0]))} if full else {}


def export(path: Path, arm: str, overrides: list[str] = (), module: str = MODULE) -> str:
    """The source of arm `arm` of the spec at `path` as a standalone module."""
    spec, doc = load_spec(path, overrides)
    models = {m.arm: m for m in plan(spec, doc)}
    perturbing = [name for name, m in models.items() if m.perturbs]
    if arm not in perturbing:
        unknown = f"is not an arm of this spec{did_you_mean(arm, perturbing)}"
        why = "adds no noise" if arm in models else unknown
        raise SpecErrors(
            [
                SpecError(
                    str(path),
                    None,
                    "",
                    f"arm {arm!r} {why}; export one of: {', '.join(perturbing) or '(none)'}",
                )
            ]
        )
    return render_module(export_model(models[arm], module))
