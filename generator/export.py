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
from generator.plan import (
    Constant,
    RenderModel,
    noise_rule,
    peer_modules,
    perturbation_class,
    plan,
)
from generator.render import BLACK_MODE, GenerationError, environment, load_spec

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
