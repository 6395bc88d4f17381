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


def test_the_gate_passes_only_the_known_equivalents():
    """Exit 0 needs the survivors to be exactly the listed equivalents: an unlisted survivor
    (or a mutant no test reached) fails, and so does a listed one that was killed or is no
    longer made (a stale list). A timeout is detected."""
    known = {"m.x_f__mutmut_1": "why", "m.x_f__mutmut_2": "why"}
    status = {"m.x_f__mutmut_1": "survived", "m.x_f__mutmut_2": "survived"}
    assert mutation.judge({**status, "m.x_f__mutmut_3": "timeout"}, known) == ([], [])
    for other in ("survived", "no tests", "suspicious"):
        unknown = mutation.judge({**status, "m.x_f__mutmut_3": other}, known)
        assert unknown == (["m.x_f__mutmut_3"], []), other
    killed = mutation.judge({**status, "m.x_f__mutmut_2": "killed"}, known)
    assert killed == ([], ["m.x_f__mutmut_2"])
    assert mutation.judge({"m.x_f__mutmut_1": "survived"}, known) == ([], ["m.x_f__mutmut_2"])


@pytest.mark.parametrize("name", sorted(mutation.TARGETS))
def test_the_docs_tables_of_equivalents_are_the_list(name):
    """docs/mutation.md shows each target's equivalents as benchmarks/mutation_equivalents.toml
    lists them; `python benchmarks/mutation.py TARGET --doc` rewrites the table."""
    known = mutation.equivalents()[name]
    assert known and all(why.strip() and "|" not in why for why in known.values())
    text = (REPO / "docs" / "mutation.md").read_text()
    assert mutation.with_table(text, name, known) == text, (
        f"python benchmarks/mutation.py {name} --doc"
    )


def test_equivalents_of_an_unknown_target_are_refused(tmp_path):
    listed = tmp_path / "equivalents.toml"
    listed.write_text('[stat]\n"generator.stats.x_f__mutmut_1" = "why"\n')
    with pytest.raises(ValueError, match="stat is not a target"):
        mutation.equivalents(listed)


def test_a_malformed_list_of_equivalents_is_refused_with_its_path(tmp_path):
    listed = tmp_path / "equivalents.toml"
    listed.write_text("[method\n")
    with pytest.raises(ValueError, match=f"^{listed}: "):
        mutation.equivalents(listed)
