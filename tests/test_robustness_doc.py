"""docs/robustness.md is the suite's own tally: every class tried, no traceback, nothing lost."""

from __future__ import annotations

from conftest import REPO
from robustness import CLASSES

COMMAND = "python -m pytest tests -n 0 --robustness-tally docs/robustness.md"


def test_robustness_doc_names_every_class_with_no_traceback_and_nothing_lost():
    text = (REPO / "docs" / "robustness.md").read_text()
    assert COMMAND in text, f"refresh it with: {COMMAND}"
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| class")
    ]
    assert [row[0] for row in rows] == list(CLASSES), f"out of date; refresh with: {COMMAND}"
    for name, _, cases, _, tracebacks, lost in rows:
        assert int(cases) > 0 and tracebacks == "0" and lost == "0", name
    assert ", 0 tracebacks, 0 results lost." in text
