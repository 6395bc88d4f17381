"""The method as plain Python: one source for the scripts, the export module and the tests.

Each module here is importable and tested directly. The generator emits a module into a
script by its body (`source`): the module's docstring and imports are left out, the
script's own imports cover them (the static checks of every emitted file make sure).
One file per eps(t) policy (eps_<name>.py, class Epsilon): a new arm is a new policy file.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent

# The ε policy module of each perturbing arm kind.
POLICIES = {
    "fixed": "eps_fixed",
    "phase_only": "eps_phase",
    "schedule_only": "eps_schedule",
    "full": "eps_full",
    "gradient_noise": "eps_gradient_noise",
    "anti_pgd": "eps_anti_pgd",
}

# The peers whose noise is not added to the parameters as eps(t) * xi: kind -> (the modules
# their class needs after noise.py, in order; the class).
PERTURBATIONS = {
    "gradient_noise": (("drawn", "gradient_noise"), "GradientNoise"),
    "anti_pgd": (("drawn", "anti_pgd"), "AntiPGD"),
}


@cache
def source(name: str) -> str:
    """The body of generator/method/<name>.py: without its docstring, its imports and its
    optional-import blocks (try: import ... except ImportError), which the emitting file
    holds itself."""
    text = (HERE / f"{name}.py").read_text()
    lines = text.splitlines(keepends=True)
    dropped: set[int] = set()
    body = ast.parse(text).body
    for node in body:
        if _emitter_provides(node) or (node is body[0] and _is_docstring(node)):
            dropped.update(range(node.lineno - 1, node.end_lineno))
    kept = "".join(line for i, line in enumerate(lines) if i not in dropped)
    return kept.strip("\n") + "\n"


def _emitter_provides(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, ast.Try):
        return all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in node.body)
    return False


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(getattr(node.value, "value", None), str)


def policy(kind: str) -> type:
    """The Epsilon class of a perturbing arm kind."""
    return importlib.import_module(f"generator.method.{POLICIES[kind]}").Epsilon


def policy_arguments(kind: str) -> tuple[str, ...]:
    """The constructor keywords of a kind's policy; each is a spec constant's lower-case name."""
    return tuple(inspect.signature(policy(kind)).parameters)
