"""Load an emitted script in this process, as `python SCRIPT` would find its imports.

A script imports its spec's support module (<spec>_support.py) from its own folder. Folders
generated from specs of one name hold modules of one name, so a process that loads scripts
from several folders must not reuse a support module another folder's script imported:
`beside` puts the script's folder first on sys.path and drops the folder's support module
from sys.modules before and after, so every script gets its own folder's copy.
"""

from __future__ import annotations

import ast
import contextlib
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def beside(script: str | Path) -> Iterator[None]:
    """Imports made meanwhile find the script's own folder first, its support module afresh."""
    folder = Path(script).resolve().parent
    names = _support_names(script)
    for name in names:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in names:
            sys.modules.pop(name, None)


def load_script(
    script: str | Path, run_name: str = "perturbgen_test", support: bool = False
) -> dict[str, Any]:
    """The namespace of `script` run as a module named `run_name` (its main() not called).
    With `support`, beneath the script's own names those of the support module it imported:
    what every arm shares, reached through one arm."""
    with beside(script):
        namespace = runpy.run_path(str(script), run_name=run_name)
        if not support:
            return namespace
        shared = [vars(sys.modules[n]) for n in _support_names(script) if n in sys.modules]
    return {**shared[0], **namespace} if shared else namespace


def _support_names(script: str | Path) -> list[str]:
    return [p.stem for p in Path(script).resolve().parent.glob("*_support.py")]


def data_settings(ns: dict[str, Any]) -> dict[str, Any]:
    """The keywords the script loaded as `ns` passes load_data in its own call: its data
    settings, the values of its constants."""
    tree = ast.parse(Path(ns["__file__"]).read_text())
    (call,) = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_data"
    ]
    return {k.arg: ns[k.value.id] for k in call.keywords}


def arm_data(
    ns: dict[str, Any],
    root: str | Path,
    smoke: bool,
    seed: int,
    device: Any,
    rank: int = 0,
    world: int = 1,
) -> Any:
    """The data of the script loaded as `ns`, as its train() loads it: the support module's
    load_data with the script's data settings."""
    return ns["load_data"](str(root), smoke, seed, device, rank, world, **data_settings(ns))
