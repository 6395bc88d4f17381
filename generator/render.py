"""Render: RenderModels → Jinja → black → ast check → files, written atomically."""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import black
import jinja2

from generator import __version__
from generator.errors import SpecError, SpecErrors
from generator.loading import Located, load_file, merge, parse_override
from generator.plan import ReadmeModel, RenderModel, arm_names, plan, spec_hash
from generator.spec import Spec, validate

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
    return env


def _render(template: str, model: Any) -> str:
    try:
        return environment().get_template(template).render(m=model)
    except jinja2.TemplateError as exc:
        raise GenerationError(f"template {template} failed: {exc}") from exc


@lru_cache(maxsize=512)
def _black(source: str) -> str:
    """black is pure and costs ~0.2 s a script: remember what it made of the same input."""
    return black.format_str(source, mode=BLACK_MODE)


def render_script(model: RenderModel) -> str:
    source = _render("train.py.jinja", model)
    try:
        source = _black(source)
    except Exception as exc:  # black raises several types; any of them is a generator bug
        raise GenerationError(f"black could not format {model.script}: {exc}") from exc
    try:
        ast.parse(source, filename=model.script)
    except SyntaxError as exc:  # black parses too, so this guards the formatter's output
        raise GenerationError(f"{model.script} is not valid Python: {exc}") from exc
    return source


def render_readme(model: ReadmeModel) -> str:
    return _render("README.md.jinja", model)


@dataclass(frozen=True)
class Rendered:
    """One spec's output folder, in memory: file name → bytes."""

    name: str
    files: dict[str, bytes]


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
                    str(path), None, "", f"no arm named {a!r} (this spec has: {', '.join(known)})"
                )
                for a in unknown
            ]
        )


def render_spec(path: Path, overrides: list[str] = (), arms: list[str] = ()) -> Rendered:
    spec, doc = load_spec(path, overrides)
    return render(spec, doc, path, arms)


def render(spec: Spec, doc: Located, path: Path, arms: list[str] = ()) -> Rendered:
    """A loaded spec's arms (all, or those named), README and manifest, in memory."""
    check_arms(spec, path, arms)
    models = [m for m in plan(spec, doc) if not arms or m.arm in arms]
    files = {m.script: render_script(m).encode() for m in models}
    from generator.export import golden_module  # it renders with this module's environment

    files.update(golden_module(models))
    readme = ReadmeModel(spec.name, spec.description, __version__, tuple(models))
    files["README.md"] = render_readme(readme).encode()
    manifest = {
        "generator": "perturbgen",
        "version": __version__,
        "spec": spec.name,
        "spec_sha256": spec_hash(spec),
        "resolved_spec": spec.model_dump(mode="json", exclude={"extends"}),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return Rendered(spec.name, dict(sorted(files.items())))


def write_folder(rendered: Rendered, out_dir: Path) -> Path:
    """Write to a temporary sibling, then swap it in.

    A failure at any point leaves the previous folder in place, byte for byte, and no
    temporary folder behind; concurrent writers of the same folder take turns (a lock on
    OUT), so the folder is always one whole generation.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / rendered.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{rendered.name}.", dir=out_dir))
    try:
        for name, data in rendered.files.items():
            (tmp / name).write_bytes(data)
            os.chmod(tmp / name, 0o644)
        os.chmod(tmp, 0o755)
        with _locked(out_dir):
            if not target.exists():
                os.replace(tmp, target)
                return target
            old = Path(tempfile.mkdtemp(prefix=f".{rendered.name}.old.", dir=out_dir))
            try:
                os.replace(target, old / rendered.name)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old / rendered.name, target)  # put the previous one back
                    raise
            finally:
                if target.exists():  # else the previous folder is in `old`: keep it there
                    shutil.rmtree(old, ignore_errors=True)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on a folder (flock on its descriptor), released on exit."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def drift(rendered: Rendered, out_dir: Path) -> list[str]:
    """How the folder on disk differs from what the generator emits now."""
    target = out_dir / rendered.name
    if not target.is_dir():
        return [f"{target}/ is missing"]
    on_disk = {p.name for p in target.iterdir() if p.is_file()}
    problems = [
        f"{target / n} is not generated by this spec"
        for n in sorted(on_disk - set(rendered.files))
    ]
    for name, data in rendered.files.items():
        path = target / name
        if name not in on_disk:
            problems.append(f"{path} is missing")
        elif path.read_bytes() != data:
            problems.append(f"{path} differs")
    return problems
