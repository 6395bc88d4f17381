"""Load an emitted script in this process, as `python SCRIPT` would find its imports.

A script imports its spec's support module (<spec>_support.py) from its own folder. Folders
generated from specs of one name hold modules of one name, so a process that loads scripts
from several folders must not reuse a support module another folder's script imported:
`beside` puts the script's folder first on sys.path and drops the folder's support module
from sys.modules before and after, so every script gets its own folder's copy.
"""

from __future__ import annotations

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
    names = [p.stem for p in folder.glob("*_support.py")]
    for name in names:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in names:
            sys.modules.pop(name, None)


def load_script(script: str | Path, run_name: str = "perturbgen_test") -> dict[str, Any]:
    """The namespace of `script` run as a module named `run_name` (its main() not called)."""
    with beside(script):
        return runpy.run_path(str(script), run_name=run_name)
