"""Load an emitted script in this process, as `python SCRIPT` would find its imports.

A script imports its spec's support module (<spec>_support.py) from its own folder. Folders
generated from specs of one name hold modules of one name, so a process that loads scripts
from several folders must not reuse a support module another folder's script imported:
load_script puts the script's folder first on sys.path and drops the folder's support
module from sys.modules before and after, so every script gets its own folder's copy.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any


def load_script(script: str | Path, run_name: str = "perturbgen_test") -> dict[str, Any]:
    """The namespace of `script` run as a module named `run_name` (its main() not called)."""
    folder = Path(script).resolve().parent
    names = [p.stem for p in folder.glob("*_support.py")]
    for name in names:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(folder))
    try:
        return runpy.run_path(str(script), run_name=run_name)
    finally:
        sys.path.remove(str(folder))
        for name in names:
            sys.modules.pop(name, None)
