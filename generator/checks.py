"""Checks: validate a loaded spec (its models, then the cross-field checks a researcher would
want, the tune section's, and each extra baseline merged in) into SpecErrors that name
FILE:LINE: path: message."""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from generator.errors import SpecError, SpecErrors
from generator.loading import KIND_KEYS, Located, dotted
from generator.messages import allowed_keys, data_path, did_you_mean, error_message, suggestion
from generator.spec import (
    IMAGE_MODELS,
    PASSED_ARGS,
    SGD,
    OneCycleSchedule,
    SearchDim,
    Spec,
    arm_kind,
    arm_names,
    arm_spec,
    baseline_overrides,
    input_shape,
)


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
PEERS = ("perturbation.gradient_noise", "perturbation.anti_pgd")
OWN = ("perturbation.fixed", "perturbation.eps", "perturbation.base", "perturbation.decay")
UNUSED_BY_ARM = {
    "baseline": ("perturbation", "phase_detector"),
    "fixed": (*OWN[1:], "phase_detector", *PEERS),
    "phase_only": ("perturbation.fixed", "perturbation.base", "perturbation.decay", *PEERS),
    "schedule_only": ("perturbation.fixed", "perturbation.eps", "phase_detector", *PEERS),
    "full": ("perturbation.fixed", "perturbation.base", *PEERS),
    "gradient_noise": (*OWN, "phase_detector", PEERS[1]),
    "anti_pgd": (*OWN, "phase_detector", PEERS[0]),
}


# The noise magnitudes: a search over one must be able to reach 0, the method's null.
NOISE = (
    "perturbation.fixed",
    "perturbation.eps.exploration",
    "perturbation.eps.convergence",
    "perturbation.eps.fine_tuning",
    "perturbation.base",
    "perturbation.gradient_noise.eta",
    "perturbation.anti_pgd.sigma",
)


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
        return error_message(err, tuple(err["loc"]), None)
    return None


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
            path = data_path(err["loc"], data)
            if err["type"] == "union_tag_invalid":  # name the kind key, not the whole section
                path += (err["ctx"]["discriminator"].strip("'"),)
                err = {**err, "input": err["ctx"]["tag"]}
            found.append((path, err))
        # a misspelt key explains the missing one it was meant to be: one error, at the typo
        meant = {
            path[:-1] + (guess,)
            for path, err in found
            if err["type"] == "extra_forbidden"
            and (guess := suggestion(str(path[-1]), allowed_keys(path, data)))
        }
        for path, err in found:
            if not (err["type"] == "missing" and path in meant):
                report(path, error_message(err, path, data))
    else:
        for path, message in semantic_problems(spec):
            report(path, message)
    if errors:
        raise SpecErrors(sorted(set(errors), key=lambda e: (e.file, e.line or 0, e.path)))
    return spec
