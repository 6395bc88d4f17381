"""A spec's own factories: where their modules are found, and the checks that they import
(before `ablate` or `tune` starts anything) and work (`perturbgen validate --import`: called
once, the way the emitted script will), so that a broken factory is one line before any run
starts.

A factory's module is imported by name with the folders of the spec file and of the specs it
extends first on sys.path: the folders every command that runs a spec puts first on its
runs' PYTHONPATH (`spec_folders`, `python_path`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import operator
import os
import sys
from typing import Any

from generator.errors import SpecError, SpecErrors
from generator.loading import Located, dotted
from generator.spec import CustomData, CustomModel, Spec, TimmModel, TorchvisionModel, input_shape


class FactoryProblem(Exception):
    """One problem with a factory, as the message of one line."""


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text if len(text) <= 200 else text[:197] + '...'}"


def spec_folders(doc: Located) -> list[str]:
    """The folders of the spec file and of the specs it extends, the spec's own first: where
    the modules of its factories may sit."""
    return list(dict.fromkeys(str(file.parent) for file in doc.files))


def python_path(folders: list[str]) -> dict[str, str]:
    """The PYTHONPATH of a process that runs a spec: its folders, then the caller's own."""
    inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    joined = os.pathsep.join(dict.fromkeys(p for p in [*folders, *inherited] if p))
    return {"PYTHONPATH": joined} if joined else {}


@contextlib.contextmanager
def _import_path(folders: list[str]):
    saved = list(sys.path)
    sys.path[:0] = folders
    try:
        yield
    finally:
        sys.path[:] = saved


def resolve(reference: str) -> Any:
    """The callable that 'module:attribute' names."""
    module_name, _, attribute = reference.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise FactoryProblem(
            f"cannot import {module_name!r}: no module named {exc.name!r} (install it, or put "
            "its folder on PYTHONPATH; the folders of the spec and of the specs it extends "
            "are searched too)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raised on import
        raise FactoryProblem(f"importing {module_name!r} raised {one_line(exc)}") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise FactoryProblem(f"{getattr(obj, '__name__', obj)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryProblem(f"{reference!r} is a {type(obj).__name__}, not a callable")
    return obj


def call(factory: Any, *args: Any, **kwargs: Any) -> Any:
    """factory(*args, **kwargs); a signature that does not take them is the problem named."""
    shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    try:
        inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as exc:
        raise FactoryProblem(f"cannot be called as factory({shown}): {exc}") from None
    except ValueError:  # no signature to inspect: the call itself will tell
        pass
    try:
        return factory(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code: any error is a message
        raise FactoryProblem(f"factory({shown}) raised {one_line(exc)}") from None


def library(name: str) -> Any:
    """The torchvision or timm package, or the problem saying how to install it. Not
    `pip install torchvision` beside the torch there: PyPI's torchvision is built for PyPI's
    (CUDA) torch, and beside a CPU build of the same torch it installs but does not import."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - missing, or built for another torch
        raise FactoryProblem(
            f"needs the {name} package, which did not import ({one_line(exc)}): install it "
            f"with the torch it was built for, e.g. in a fresh virtual environment: pip install {name}"
        ) from None


def build(spec: Spec) -> Any:
    """The spec's model, made the way the emitted script makes it."""
    shape, classes = input_shape(spec)
    model = spec.model
    if isinstance(model, CustomModel):
        return call(resolve(model.factory), shape, classes, **model.args)
    if isinstance(model, TorchvisionModel):
        torchvision = library("torchvision")
        try:
            builder = torchvision.models.get_model_builder(model.name)
        except ValueError:
            raise FactoryProblem(f"torchvision has no model named {model.name!r}") from None
        return call(builder, weights=None, num_classes=classes, **model.args)
    timm = library("timm")
    if not timm.is_model(model.name):
        raise FactoryProblem(f"timm has no model named {model.name!r}")
    return call(
        timm.create_model,
        model.name,
        pretrained=False,
        num_classes=classes,
        in_chans=shape[0],
        **model.args,
    )


def check_model(spec: Spec) -> None:
    """Build the model once and run a batch of two zero examples through it."""
    import torch

    shape, classes = input_shape(spec)
    model = build(spec)
    if not isinstance(model, torch.nn.Module):
        raise FactoryProblem(f"returned a {type(model).__name__}, not a torch.nn.Module")
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *shape))
    except Exception as exc:  # noqa: BLE001 - the user's forward pass
        raise FactoryProblem(
            f"the model's forward pass on a batch of shape "
            f"{[2, *shape]} raised {one_line(exc)}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FactoryProblem(
            f"the model maps a batch of shape {[2, *shape]} to {got}; "
            f"expected logits of shape [2, {classes}]"
        )


def check_data(spec: Spec) -> None:
    """Make the splits once and check the first example of each."""
    import torch

    data = spec.data
    splits = call(resolve(data.factory), data.root, **data.args)
    if not isinstance(splits, (tuple, list)) or len(splits) not in (2, 3):
        raise FactoryProblem(
            f"returned a {type(splits).__name__}; expected (train, val, test) "
            "or (train, test) datasets"
        )
    if len(splits) == 3 and data.val_size is not None:
        raise FactoryProblem("returns its own val split: drop data.val_size from the spec")
    names = ("train", "val", "test") if len(splits) == 3 else ("train", "test")
    for name, dataset in zip(names, splits):
        if isinstance(dataset, torch.utils.data.IterableDataset) or not (
            hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        ):
            raise FactoryProblem(
                f"its {name} split is a {type(dataset).__name__}, not a "
                "map-style Dataset (__getitem__, __len__)"
            )
        if len(dataset) == 0:
            raise FactoryProblem(f"its {name} split is empty")
        sample = dataset[0]
        where = f"{name} example 0"
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise FactoryProblem(f"{where} is a {type(sample).__name__}, not a pair (x, y)")
        x, y = sample
        try:
            x = torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise FactoryProblem(f"{where}: x is a {type(x).__name__}, not a tensor") from None
        if list(x.shape) != list(data.input_shape):
            raise FactoryProblem(
                f"{where}: x has shape {list(x.shape)}; data.input_shape is "
                f"{list(data.input_shape)}"
            )
        try:
            label = None if isinstance(y, bool) else operator.index(y)
        except TypeError:
            label = None
        if label is None or not 0 <= label < data.num_classes:
            raise FactoryProblem(
                f"{where}: y is {y!r}; expected an int class in " f"0..{data.num_classes - 1}"
            )


def _imports(section: str):
    """A check that the section's factory imports, without calling it."""
    return lambda spec: resolve(getattr(spec, section).factory)


def check(spec: Spec, doc: Located, file: str, call_them: bool = True) -> list[SpecError]:
    """Every factory problem of a spec, each at the line of its `factory` (or library
    model's `name`) key. With `call_them` false, only that each user factory imports (what
    `ablate` and `tune` check before they start a run)."""
    errors = []
    checks = [
        (section, key, checker if call_them else _imports(section))
        for section, kind, key, checker in (
            ("model", CustomModel, "factory", check_model),
            ("model", (TorchvisionModel, TimmModel), "name", check_model),
            ("data", CustomData, "factory", check_data),
        )
        if isinstance(getattr(spec, section), kind) and (call_them or key == "factory")
    ]
    with _import_path(spec_folders(doc)):
        for section, key, checker in checks:
            path = (section, key)
            try:
                checker(spec)
            except FactoryProblem as exc:
                origin_file, line = doc.origin(path, file)
                reference = getattr(getattr(spec, section), key)
                errors.append(SpecError(origin_file, line, dotted(path), f"{reference}: {exc}"))
    return errors


def require(spec: Spec, doc: Located, path) -> None:
    """Refuse (SpecErrors) a spec whose own factories do not import, with the spec's folders
    on the path as its runs will have them: what `ablate` and `tune` check first."""
    problems = check(spec, doc, str(path), call_them=False)
    if problems:
        raise SpecErrors(problems)
