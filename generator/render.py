"""Render: a template and its model → source, formatted by black and parsed; the only user of
Jinja and black (generator/output.py makes folders of it). Also where a spec file is loaded."""

from __future__ import annotations

import ast
import math
import multiprocessing as mp
import os
from dataclasses import replace
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import black
import jinja2

from generator.checks import validate
from generator.errors import SpecError, SpecErrors
from generator.loading import Located, load_file, merge, parse_override
from generator.messages import did_you_mean
from generator.method import source as method_source
from generator.plan import ReadmeModel, RenderModel, support_model
from generator.spec import Spec, arm_names

BLACK_MODE = black.Mode(line_length=99, target_versions={black.TargetVersion.PY311})


class GenerationError(Exception):
    """The generator itself produced something wrong (a bug, not a bad spec)."""


def templates_dir() -> Path:
    """Templates ship inside the wheel as generator/templates; a checkout has them at the top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "train.py.jinja").is_file():
            return candidate
    raise GenerationError(f"templates not found next to {here}")


def pyrepr(value: Any) -> str:
    """The one way a value enters emitted source: the repr of a plain, finite value."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise GenerationError(f"refusing to emit the non-finite number {value!r}")
        return repr(value)
    if isinstance(value, tuple):
        inner = ", ".join(pyrepr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(pyrepr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{pyrepr(k)}: {pyrepr(v)}" for k, v in value.items()) + "}"
    raise GenerationError(f"cannot emit a value of type {type(value).__name__}")


def keywords(names: tuple[str, ...]) -> str:
    """Keyword arguments that pass constants of the same names: ("lr", "decay") ->
    "lr=LR, decay=DECAY, " (the trailing comma lets black put one per line)."""
    return "".join(f"{name}={name.upper()}, " for name in names)


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pyrepr"] = pyrepr
    env.filters["keywords"] = keywords
    # the method's own Python (generator/method/), emitted as it is: the generator's source,
    # never user text
    env.globals["method_source"] = method_source
    return env


def _render(template: str, model: Any) -> str:
    try:
        return environment().get_template(template).render(m=model)
    except jinja2.TemplateError as exc:
        raise GenerationError(f"template {template} failed: {exc}") from exc


# What black made of each top-level block it has seen in this process (see format_sources).
_FORMATTED: dict[str, str] = {}
# Below this many unformatted lines a process pool costs more than it saves.
POOL_MIN_LINES = 3000


def formatter_id() -> str:
    """Names black and its mode: a manifest's recorded sources are reusable only under it."""
    return f"black {black.__version__} line_length={BLACK_MODE.line_length} target=py311"


def blocks(source: str) -> list[str]:
    """Cut a module into runs of top-level statements that black formats independently.

    black decides everything inside a top-level statement from that statement alone; only
    the blank lines between statements depend on their neighbours. After a top-level
    `def`/`class` (one whose body is more than `...`, which black may keep hugging its
    neighbour) the next top-level statement always gets exactly two blank lines, whatever
    the source had. So the module is cut just after such a definition, where only blank
    lines and column-0 comments (which black moves with the statement after them) follow:
    black(source) == "\n\n".join(black(block) for block in blocks(source)). The golden
    tests check that identity against whole-file black.
    """
    body = ast.parse(source).body
    lines = source.splitlines(keepends=True)
    cuts = [0]
    for stmt, following in pairwise(body):
        if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if len(stmt.body) == 1 and _is_ellipsis(stmt.body[0]):
            continue
        start = min(
            [following.lineno] + [d.lineno for d in getattr(following, "decorator_list", ())]
        )
        between = lines[stmt.end_lineno : start - 1]
        if all(not line.strip() or line.startswith("#") for line in between):
            cuts.append(stmt.end_lineno)
    cuts.append(len(lines))
    return ["".join(lines[a:b]) for a, b in pairwise(cuts)]


def _is_ellipsis(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and getattr(stmt.value, "value", None) is Ellipsis


def format_sources(sources: dict[str, str]) -> dict[str, str]:
    """black for many modules at once, byte-identical to formatting each whole file.

    Arms and specs share most of their top-level blocks, so each distinct block is
    formatted once (and remembered for this process); when there is much to do, the
    distinct blocks are spread over a process pool, one worker per core.
    """
    cut = {}
    for name, source in sources.items():
        try:
            cut[name] = blocks(source)
        except SyntaxError as exc:
            raise GenerationError(f"{name} is not valid Python: {exc}") from exc
    todo = sorted({b for parts in cut.values() for b in parts} - _FORMATTED.keys())
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 8)
    lines = sum(b.count("\n") for b in todo)
    if workers > 1 and lines >= POOL_MIN_LINES and "forkserver" in mp.get_all_start_methods():
        with _pool(workers) as pool:
            results = pool.map(_guarded_format, todo, chunksize=max(1, len(todo) // (4 * workers)))
        done = dict(zip(todo, results))
    else:
        done = {b: _guarded_format(b) for b in todo}
    for name, parts in cut.items():
        for part in parts:
            if part in done and done[part][0] == "error":  # any black failure is our bug
                raise GenerationError(f"black could not format {name}: {done[part][1]}")
    if len(_FORMATTED) > 20_000:  # a long-lived process (the tests) keeps memory bounded
        _FORMATTED.clear()
    _FORMATTED.update((b, text) for b, (_, text) in done.items())
    formatted = {**_FORMATTED, **{b: text for b, (_, text) in done.items()}}
    return {name: "\n\n".join(formatted[b] for b in parts) for name, parts in cut.items()}


def _pool(workers: int) -> mp.pool.Pool:
    """Formatting workers that never inherit a thread.

    Forking the calling process would copy whatever threads hold at that moment (a tracker's
    lock, a logging lock) into children that can never release them, and a child blocked on
    one hangs the pool forever. So the workers are forked by multiprocessing's fork server: a
    fresh, single-threaded interpreter, started once per process, that has imported this
    module (black included) and forks each worker from there.
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context.Pool(workers)


def _guarded_format(block: str) -> tuple[str, str]:
    """("ok", formatted) or ("error", message): a pool worker reports, never raises."""
    try:
        formatted = black.format_str(block, mode=BLACK_MODE)
        ast.parse(formatted)  # black parses too, so this guards the formatter's output
        return "ok", formatted
    except Exception as exc:  # black raises several types
        return "error", f"{type(exc).__name__}: {exc}"


def support_source(models: list[RenderModel]) -> str:
    """The spec's support module before black: one file for all its arms (`models`: every arm
    of the spec, whichever are written)."""
    return _render("support.py.jinja", support_model(models))


def script_source(model: RenderModel, support: str) -> str:
    """An arm's script before black (format_sources formats many at once): it imports from
    the support module (source `support`) exactly the names its own code uses."""
    shared = {target.id for node in ast.parse(support).body for target in _bound(node)}
    draft = ast.parse(_render("train.py.jinja", replace(model, support_imports=tuple(sorted(shared)))))
    own = {target.id for node in draft.body for target in _bound(node)}
    used = {n.id for n in ast.walk(draft) if isinstance(n, ast.Name)} & shared - own
    return _render("train.py.jinja", replace(model, support_imports=tuple(sorted(used))))


def _bound(node: ast.stmt) -> list[ast.Name]:
    """The names a top-level statement binds (defs, classes, assignments)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [ast.Name(node.name)]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def render_readme(model: ReadmeModel) -> str:
    return _render("README.md.jinja", model)


def load_spec(path: Path, overrides: list[str] = ()) -> tuple[Spec, Located]:
    """Load, extend, override and validate one spec file."""
    doc = load_file(path, str(path))
    for text in overrides:
        doc = merge(doc, parse_override(text))
    return validate(doc, str(path)), doc


def check_arms(spec: Spec, path: Path, arms: list[str]) -> None:
    """Every name in `arms` must be an arm of the spec."""
    known = arm_names(spec)
    unknown = [a for a in arms if a not in known]
    if unknown:
        raise SpecErrors(
            [
                SpecError(
                    str(path),
                    None,
                    "",
                    f"no arm named {a!r}{did_you_mean(a, known)} (this spec has: "
                    f"{', '.join(known)})",
                )
                for a in unknown
            ]
        )
