"""benchmarks/mutants.py's list stays valid: a refactor of a mutated line or a renamed test
fails here, in the default suite, instead of when someone next runs the (slow) script."""

from __future__ import annotations

import runpy
from types import SimpleNamespace

import pytest
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
