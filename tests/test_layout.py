"""The package's layout: no import cycles, lazy imports included (docs/design.md, Layout)."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "generator"


def imports(path, package=PACKAGE) -> set[str]:
    """The package modules a module imports anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from generator import x` imports generator.x where x is a module
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "generator" and len(parts) > 1:
                if (package / f"{parts[1]}.py").exists():
                    found.add(parts[1])
    return found - {path.stem}


def graph(package=PACKAGE) -> dict[str, set[str]]:
    return {p.stem: imports(p, package) for p in sorted(package.glob("*.py"))}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_cycle_finder_names_a_lazy_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from generator import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from generator.c import x\n")
    (tmp_path / "c.py").write_text("import generator.a\n")
    assert cycle(graph(tmp_path)) == ["a", "b", "c", "a"]


def test_only_the_command_line_imports_typer():
    """cli.py holds the arguments, messages and exit codes (progress.py prints lines too)."""
    users = {p.stem for p in PACKAGE.glob("*.py") if "import typer" in p.read_text()}
    assert users <= {"cli", "progress"}
