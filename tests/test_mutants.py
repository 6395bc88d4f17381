"""benchmarks/mutants.py's list stays valid: a refactor of a mutated line or a renamed test
fails here, in the default suite, instead of when someone next runs the (slow) script."""

from __future__ import annotations

import runpy
from types import SimpleNamespace

import pytest
import tomllib
from conftest import REPO

mutants = SimpleNamespace(
    **runpy.run_path(str(REPO / "benchmarks" / "mutants.py"), run_name="mutants")
)


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_changes_one_line_that_occurs_once(mutant):
    text = (REPO / mutant.path).read_text()
    changed = mutants.mutated(mutant, text)
    assert len(changed.splitlines()) == len(text.splitlines())
    assert sum(a != b for a, b in zip(changed.splitlines(), text.splitlines())) == 1
    for node in mutant.tests:
        path, name = node.split("::")
        assert f"\ndef {name}(" in (REPO / path).read_text(), node


def test_a_pattern_found_twice_or_never_is_an_error():
    mutant = mutants.MUTANTS[0]
    for text in ("", mutant.old + "\n" + mutant.old):
        with pytest.raises(mutants.BadMutant, match=f"{mutant.name}: .* not once"):
            mutants.mutated(mutant, text)
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)


mutation = SimpleNamespace(
    **runpy.run_path(str(REPO / "benchmarks" / "mutation.py"), run_name="mutation")
)


@pytest.mark.parametrize("name", sorted(mutation.TARGETS))
def test_each_mutmut_target_names_files_and_tests_that_exist(name):
    target = mutation.TARGETS[name]
    assert all((REPO / path).is_file() for path in target.files)
    for node in target.tests:
        path, _, test = node.partition("::")
        assert (REPO / path).is_file(), node
        assert not test or f"\ndef {test}(" in (REPO / path).read_text(), node


def test_a_mutmut_target_replaces_only_the_mutmut_section(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text((REPO / "pyproject.toml").read_text())
    target = mutation.TARGETS["method"]
    mutation.configure(pyproject, target)
    changed, original = (
        tomllib.loads(p.read_text()) for p in (pyproject, REPO / "pyproject.toml")
    )
    assert changed["tool"]["mutmut"] == {
        "source_paths": ["generator"],
        "only_mutate": list(target.files),
        "pytest_add_cli_args_test_selection": list(target.tests),
        "pytest_add_cli_args": ["-n", "0", "-p", "no:cacheprovider"],
    }
    assert {k: v for k, v in changed["tool"].items() if k != "mutmut"} == {
        k: v for k, v in original["tool"].items() if k != "mutmut"
    }
    assert changed["project"] == original["project"]


def test_the_mutmut_section_of_pyproject_is_the_stats_target():
    """`python -m mutmut run` from the repository root and `benchmarks/mutation.py stats`
    run the same thing."""
    ours = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]
    section = mutation.mutmut_section(mutation.TARGETS["stats"])
    assert ours == tomllib.loads(section)["tool"]["mutmut"]
