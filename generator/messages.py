"""Messages: pydantic's validation errors as one line each, worded for the spec's author
(`FILE:LINE: path: message` is made in checks.py), with did-you-mean suggestions."""

from __future__ import annotations

import difflib
import re
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from generator.spec import Spec


def error_message(err: dict[str, Any], path: tuple, data: Any) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    got = f" (got {err.get('input')!r})"
    if kind == "extra_forbidden":
        return "unknown key" + did_you_mean(str(path[-1]), allowed_keys(path, data))
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
    guess = suggestion(word, allowed)
    return f"; did you mean {guess!r}?" if guess else ""


def _literal_hint(err: dict[str, Any], expected: str) -> str:
    """did_you_mean for a value that must be one of pydantic's quoted `expected` names."""
    value = err.get("input")
    return (
        did_you_mean(value, re.findall(r"'([^']*)'", expected)) if isinstance(value, str) else ""
    )


def suggestion(key: str, allowed: list[str]) -> str | None:
    """The allowed key that ``key`` most likely meant: a synonym, a spelling, or a typo."""
    plain = key.lower().replace("-", "_")
    for guess in (plain, ALIASES.get(plain)):
        if guess in allowed:
            return guess
    close = difflib.get_close_matches(plain, allowed, n=1)
    return close[0] if close else None


def allowed_keys(path: tuple, data: Any) -> list[str]:
    """The keys a mapping at ``path[:-1]`` may have, for the 'did you mean' hint.

    Walks the spec's field types along the path: a model's field, a dict's or a list's
    items, and of a discriminated union the member that the data's kind key selects.
    Every part of ``path[:-1]`` is in ``data`` (``data_path`` keeps only those).
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


def data_path(loc: tuple, data: Any) -> tuple:
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
