"""Load spec YAML into plain values, remembering where every node came from.

PyYAML composes the node graph (safe loading only); we build the Python values ourselves
so that we can keep each node's line, refuse duplicate keys, refuse tags and resolve
scalars by YAML 1.2's core schema (``1e-3`` is a float, ``no`` is a string, ``010`` is ten).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from generator.errors import SpecError, SpecErrors

Path_ = tuple[str | int, ...]
# Where a value came from: (file as the user named it, 1-based line).
Origin = tuple[str, int | None]

MAX_BYTES = 1 << 20  # a spec is a few kilobytes
MAX_DIGITS = 100
MAX_NODES = 100_000  # bounds alias expansion ("billion laughs") long before memory does
MAX_DEPTH = 64  # a spec is five levels deep; deeper documents are refused, not recursed into
MAX_EXTENDS_DEPTH = 16

# Sections whose options depend on a kind: when a merge changes the kind, the section is
# replaced rather than merged, so that `optimizer: {name: adam, lr: 1e-3}` over an SGD
# section does not inherit `momentum`.
KIND_KEYS = {
    ("optimizer",): "name",
    ("schedule",): "name",
    ("model",): "arch",
    ("data",): "dataset",
}


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalar resolution."""

    yaml_implicit_resolvers: dict = {}


_TAG = "tag:yaml.org,2002:"
for _tag, _regex, _first in [
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+0123456789."),
    ),
]:
    _Loader.add_implicit_resolver(_TAG + _tag, re.compile(_regex), _first)


def _scalar(tag: str, text: str) -> Any:
    if tag == _TAG + "str":
        return text
    if tag == _TAG + "null":
        return None
    if tag == _TAG + "bool":
        return text.lower() == "true"
    if tag == _TAG + "int":
        sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
        base = 16 if digits.startswith("0x") else 8 if digits.startswith("0o") else 10
        if len(digits) > MAX_DIGITS:  # int() of thousands of digits is slow, then refused
            raise ValueError(f"an integer of {len(digits)} digits is too large")
        return sign * int(digits[2:] if base != 10 else digits, base)
    if tag == _TAG + "float":
        low = text.lower()
        if low.endswith(".inf"):
            return -math.inf if low.startswith("-") else math.inf
        if low.endswith(".nan"):
            return math.nan
        return float(text)
    raise ValueError(f"YAML tag {tag!r} is not allowed")


@dataclass
class Located:
    """A loaded document: plain values plus the origin of every path in them."""

    data: Any
    origins: dict[Path_, Origin] = field(default_factory=dict)
    # the spec files it was loaded from, resolved: the spec first, then those it extends
    files: tuple[Path, ...] = ()

    def origin(self, path: Path_, default_file: str) -> Origin:
        """The origin of the deepest prefix of ``path`` that we know."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.origins:
                return self.origins[path[:n]]
        return (default_file, None)


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def changes(old: Any, new: Any, path: Path_ = ()) -> list[str]:
    """`key: old -> new` for each setting that differs between two plain documents, nested
    keys dotted: what a refusal to mix runs or studies made with other settings shows."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(old.keys() | new.keys(), key=str)
        return [c for k in keys for c in changes(old.get(k), new.get(k), path + (k,))]
    return [] if old == new else [f"{dotted(path) or 'value'}: {old!r} -> {new!r}"]


class _Builder:
    def __init__(self, loader: _Loader, file: str):
        self.loader, self.file, self.nodes = loader, file, 0
        self.origins: dict[Path_, Origin] = {}

    def fail(self, node: yaml.Node, path: Path_, message: str) -> SpecErrors:
        return SpecErrors([SpecError(self.file, node.start_mark.line + 1, dotted(path), message)])

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.nodes += 1
        if len(path) > MAX_DEPTH:
            raise self.fail(node, path[:3], f"nested more than {MAX_DEPTH} levels deep")
        if self.nodes > MAX_NODES:
            raise self.fail(
                node,
                path,
                f"document expands to more than {MAX_NODES} nodes " "(aliases nested too deeply?)",
            )
        self.origins.setdefault(path, (self.file, node.start_mark.line + 1))
        if isinstance(node, yaml.MappingNode):
            if node.tag != _TAG + "map":
                raise self.fail(node, path, f"YAML tag {node.tag!r} is not allowed")
            self.loader.flatten_mapping(node)  # `<<: *anchor` merge keys
            out: dict[str, Any] = {}
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _TAG + "str":
                    raise self.fail(key_node, path, "mapping keys must be plain strings")
                key = key_node.value
                if key in out:
                    raise self.fail(
                        key_node,
                        path + (key,),
                        f"duplicate key (first given on line {first_line[key]})",
                    )
                first_line[key] = key_node.start_mark.line + 1
                self.origins[path + (key,)] = (self.file, first_line[key])
                out[key] = self.build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                raise self.fail(node, path, f"YAML tag {node.tag!r} is not allowed")
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        try:
            return _scalar(node.tag, node.value)
        except ValueError as exc:
            raise self.fail(node, path, str(exc)) from None


def parse_yaml(text: str, file: str) -> Located:
    """Parse one YAML document; every problem becomes a SpecErrors with a line."""
    try:
        loader = _Loader(text)  # the reader refuses control characters right here
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        problem = f"control character U+{exc.character:04X} is not allowed in YAML"
        raise SpecErrors([SpecError(file, line, "", problem)]) from None
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # PyYAML composes recursively: a few hundred levels is its end
            line = loader.get_mark().line + 1
            raise SpecErrors(
                [SpecError(file, line, "", f"nested more than {MAX_DEPTH} levels deep")]
            ) from None
        if node is None:
            raise SpecErrors([SpecError(file, 1, "", "the document is empty")])
        builder = _Builder(loader, file)
        return Located(builder.build(node, ()), builder.origins)
    except yaml.MarkedYAMLError as exc:
        raise SpecErrors([_syntax_error(exc, file)]) from None
    except yaml.YAMLError as exc:
        raise SpecErrors([SpecError(file, None, "", f"YAML error: {exc}")]) from None
    finally:
        loader.dispose()


def _syntax_error(exc: yaml.MarkedYAMLError, file: str) -> SpecError:
    """One error naming both lines PyYAML marks: where a construct opened, where it failed.

    An unclosed ``[``, ``{`` or quote is reported at its opening line, where the fix is;
    the parser gives up lines later, at whatever comes next.
    """
    context, problem = exc.context or "", exc.problem or ""
    opened, failed = exc.context_mark, exc.problem_mark
    if not (opened and failed and opened.line != failed.line):
        mark = failed or opened
        text = " ".join(p for p in (context, problem) if p)
        return SpecError(file, mark.line + 1 if mark else None, "", f"YAML syntax error: {text}")
    if context.startswith(("while parsing a flow", "while scanning a quoted")):
        text = f"{context} opened here: {problem} on line {failed.line + 1}"
        return SpecError(file, opened.line + 1, "", f"YAML syntax error: {text}")
    text = f"{context} (line {opened.line + 1}): {problem}"
    return SpecError(file, failed.line + 1, "", f"YAML syntax error: {text}")


def _drop_below(origins: dict[Path_, Origin], path: Path_) -> None:
    for key in [k for k in origins if k[: len(path)] == path and len(k) > len(path)]:
        del origins[key]


def merge(base: Located, over: Located) -> Located:
    """Deep-merge ``over`` into ``base`` (``over`` wins), origins included; inputs untouched."""
    origins = dict(base.origins)

    def walk(b: Any, o: Any, path: Path_) -> Any:
        kind = KIND_KEYS.get(path)
        same_kind = (
            kind is None
            or not isinstance(o, dict)
            or kind not in o
            or (isinstance(b, dict) and b.get(kind) == o[kind])
        )
        if isinstance(b, dict) and isinstance(o, dict) and same_kind:
            out = dict(b)
            for key, value in o.items():
                out[key] = walk(b[key], value, path + (key,)) if key in b else value
                if key not in b:
                    _drop_below(origins, path + (key,))
            return out
        _drop_below(origins, path)
        return o

    data = walk(base.data, over.data, ())
    origins.update({k: v for k, v in over.origins.items() if k})
    files = over.files + tuple(f for f in base.files if f not in over.files)
    return Located(data, origins, files)


def _not_a_spec_file(path: Path) -> str | None:
    """Why ``path`` cannot be opened as a spec, or None.

    A folder, a FIFO or /dev/zero is not a spec (and must not be read forever).
    """
    if path.is_file():
        return None
    return "is not a regular file" if path.exists() else "file not found"


def load_file(path: Path, display: str | None = None, _stack: tuple[Path, ...] = ()) -> Located:
    """Load a spec file and resolve its ``extends:`` chain (path relative to the file)."""
    display = display or str(path)
    try:
        if problem := _not_a_spec_file(path):
            raise SpecErrors([SpecError(display, None, "", problem)])
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise SpecErrors([SpecError(display, None, "", f"larger than {MAX_BYTES} bytes")])
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problem = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        raise SpecErrors([SpecError(display, line, "", problem)]) from None
    except OSError as exc:
        raise SpecErrors([SpecError(display, None, "", f"cannot read: {exc}")]) from None
    doc = parse_yaml(text, display)
    if not isinstance(doc.data, dict):
        raise SpecErrors(
            [
                SpecError(
                    display, doc.origin((), display)[1], "", "a spec must be a mapping of sections"
                )
            ]
        )
    doc.files = (path.resolve(),)
    parent = doc.data.pop("extends", None)
    if parent is None:
        return doc
    line = doc.origins.get(("extends",), (display, None))[1]
    if not isinstance(parent, str) or not parent:
        raise SpecErrors([SpecError(display, line, "extends", "must be a path to a spec file")])
    resolved = (path.parent / parent).resolve()
    chain = _stack + (path.resolve(),)
    if resolved in chain or len(chain) > MAX_EXTENDS_DEPTH:
        names = " -> ".join(p.name for p in chain + (resolved,))
        raise SpecErrors([SpecError(display, line, "extends", f"cycle in extends: {names}")])
    parent_display = str(Path(display).parent / parent)
    if problem := _not_a_spec_file(resolved):  # said where the child names it
        raise SpecErrors([SpecError(display, line, "extends", f"{parent_display}: {problem}")])
    base = load_file(resolved, parent_display, chain)
    if "tune" in doc.data:  # a child's search replaces its parent's whole, never merges into it
        _drop_below(base.origins, ("tune",))
        base = Located(
            {k: v for k, v in base.data.items() if k != "tune"}, base.origins, base.files
        )
    return merge(base, doc)


def parse_override(text: str) -> Located:
    """Turn one ``--set a.b=value`` into a nested document; the value is YAML."""
    where = f"--set {text}"
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise SpecErrors(
            [SpecError(where, None, "", "expected KEY.PATH=VALUE, e.g. optimizer.lr=0.05")]
        )
    value = parse_yaml(raw, where).data if raw.strip() else None
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    path = tuple(parts)
    origins = {path[:n]: (where, None) for n in range(1, len(path) + 1)}
    return Located(nested, origins)


def spec_files(paths: list[Path]) -> tuple[list[Path], list[SpecError]]:
    """The spec files that command-line paths name: a file, or a folder's *.yaml files."""
    files, errors = [], []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.glob("*.yaml") if p.is_file())
            if not found:
                errors.append(SpecError(str(path), None, "", "folder holds no *.yaml spec"))
            files += found
        else:
            files.append(path)
    return files, errors
