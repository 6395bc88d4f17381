"""README.md's commands run as written: the tour here, the rest by tests/readme_commands.py."""

from __future__ import annotations

import json
import re

import readme_commands as rc
from conftest import REPO


def test_every_readme_command_is_run_or_excused():
    assert rc.uncovered(rc.readme()) == []
    # every entry of LONG and NOT_RUN still names a README command
    listed = {rc.bare(c) for c in rc.commands(rc.readme())}
    assert [c for c in [*rc.LONG, *rc.NOT_RUN] if c not in listed] == []


def test_a_new_readme_command_is_caught():
    text = rc.readme().replace(
        "\n## Reading a report\n",
        "\n```sh\nperturbgen report runs/x\n```\n\n## Reading a report\n",
    )
    assert rc.uncovered(text) == ["perturbgen report runs/x"]


def test_the_readme_test_commands_are_the_ones_ci_runs():
    """The main job, then the tests' set-up lines: each a line of .ci/run, the last one too."""
    _, *test_commands = rc.commands(rc.section("The two commands", rc.readme()))
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_commands and all(command in ci for command in test_commands)
    assert ci[-1] == test_commands[-1]


def test_python_blocks_are_the_ones_the_export_tests_run():
    text = rc.readme()
    blocks = len(re.findall(r"^```python\n", text, flags=re.MULTILINE))
    assert blocks == len(
        re.findall(
            r"^```python\n", rc.section("In your own training loop", text), flags=re.MULTILINE
        )
    )


def test_the_tour_runs_as_written(tmp_path):
    rc.tour(tmp_path)
    out = tmp_path / "out" / "my_mlp"
    assert {p.name for p in out.glob("train_*.py")} == {
        f"train_{arm}.py"
        for arm in ("baseline", "fixed", "phase_only", "schedule_only", "full", "baseline_sgd")
    }
    assert [p.name for p in (tmp_path / "out_lr" / "my_mlp").glob("train_*.py")] == [
        "train_fixed.py"
    ]
    assert (
        json.loads((tmp_path / "runs" / "my_mlp" / "fixed-seed1" / "summary.json").read_text())[
            "status"
        ]
        == "completed"
    )
    resumed = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["steps"] > 100
