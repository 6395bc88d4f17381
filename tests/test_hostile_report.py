"""The report over damaged run folders: each damage is listed, the rest is still reported."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from conftest import cli
from hypothesis import given, settings
from hypothesis import strategies as st
from robustness import TALLY
from test_report import write_run

from generator import report

ACCS, LOSSES = [0.5, 0.7, 0.85, 0.9], [2.0, 1.0, 2.0, 3.0]


def three_runs(root: Path) -> None:
    for seed in range(3):
        write_run(root, "baseline", seed, ACCS, LOSSES)
    write_run(root, "full", 0, ACCS, LOSSES, phases=True)


def build(root: Path, cls: str):
    """`perturbgen report` on root: exit 0, no traceback, report.md written."""
    result = cli("report", root, "-o", root / "out")
    traceback = not (result.exception is None or isinstance(result.exception, SystemExit))
    TALLY.record(
        cls,
        "exit 0, reported" if result.exit_code == 0 else f"exit {result.exit_code}",
        traceback=traceback,
    )
    assert not traceback and "Traceback" not in result.output, repr(result.exception)
    assert result.exit_code == 0, result.output
    return (root / "out" / "report.md").read_text()


def test_named_damage_is_listed_and_the_rest_reported(tmp_path):
    three_runs(tmp_path)
    write_run(tmp_path, "full", 1, ACCS, LOSSES, phases=True, torn=True)  # killed mid-write
    write_run(tmp_path, "full", 2, ACCS[:2], LOSSES[:2], status=None)  # no summary.json
    garbage = write_run(tmp_path, "full", 3, ACCS, LOSSES, phases=True)
    (garbage / "summary.json").write_bytes(b"\x00\xff not json")
    nameless = write_run(tmp_path, "full", 4, ACCS, LOSSES)
    (nameless / "config.json").write_text('{"spec": "../../etc", "arm": "full", "seed": 4}')
    nan = write_run(tmp_path, "full", 5, ACCS, LOSSES, phases=True)
    text = (nan / "metrics.jsonl").read_text().replace('"val_acc": 0.85', '"val_acc": NaN')
    (nan / "metrics.jsonl").write_text(text)
    other = write_run(tmp_path / "other", "baseline", 0, ACCS, LOSSES)  # another spec
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "spec": "second"}))
    text = build(tmp_path, "damaged run folders")
    assert "## demo" in text and "## second" in text  # each spec on its own
    assert "| baseline | 3 | 3 | 0/3 | 0 | 0 | 0 | — | — | — | — |" in text  # undamaged, whole
    assert "seed1: completed (metrics.jsonl line 4 is truncated)" in text
    assert "seed2: incomplete (no summary.json)" in text
    assert "seed3: incomplete (no summary.json) (summary.json is unreadable" in text
    assert "seed4: incomplete (no summary.json) (config.json lacks a spec name" in text
    assert "seed5: completed (metrics.jsonl line 3 val_acc is 'NaN', not a finite number)" in text
    assert not any(p.name.startswith("..") for p in (tmp_path / "out").iterdir())
    demo = json.loads((tmp_path / "out" / "report.json").read_text())["specs"]["demo"]
    arms = demo["sections"][0]["arms"]
    assert arms["full"]["counts"]["completed"] == 1 and arms["baseline"]["counts"]["completed"] == 3


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def damage(draw):
    """One file of one run: cut at a random length, a key's value replaced, bytes, or gone."""
    run = draw(st.sampled_from(["baseline/seed0", "baseline/seed1", "full/seed0"]))
    name = draw(st.sampled_from(["config.json", "metrics.jsonl", "summary.json"]))
    how = draw(st.sampled_from(["cut", "value", "bytes", "delete", "line"]))
    if how == "cut":
        return run, name, how, draw(st.integers(0, 400))
    if how == "value":
        return run, name, how, (draw(st.text(max_size=12)), draw(JSON_VALUES))
    if how == "bytes":
        return run, name, how, draw(st.binary(max_size=60))
    if how == "line":
        return run, name, how, json.dumps(draw(JSON_VALUES), allow_nan=True)
    return run, name, how, None


def _apply(root: Path, run: str, name: str, how: str, arg) -> None:
    path = root / run / name
    if how == "cut":
        path.write_bytes(path.read_bytes()[:arg])
    elif how == "bytes":
        path.write_bytes(arg)
    elif how == "delete":
        path.unlink()
    elif how == "line":
        path.write_bytes(path.read_bytes() + arg.encode() + b"\n")
    else:  # set one key (of every record, in metrics.jsonl) to another value
        key, value = arg
        key = key or ("val_acc" if name == "metrics.jsonl" else "status")
        try:
            records = [json.loads(line) for line in path.read_text().splitlines()]
        except ValueError:  # damaged already
            return
        path.write_text("".join(json.dumps({**r, key: value}) + "\n" for r in records))


@settings(max_examples=20)  # each builds the report and two plots (~0.5 s)
@given(st.lists(damage(), min_size=1, max_size=3))
def test_random_damage_never_stops_the_report(damages):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        three_runs(root)
        for run, name, how, arg in damages:
            if (root / run / name).exists():
                _apply(root, run, name, how, arg)
        found = report.find_runs(root)
        text = build(root, "damaged run folders")
        for run in found:  # every run folder appears, averaged or listed with its problem
            assert run.complete or f"{run.path.name}: {run.status}" in text
        shutil.rmtree(root / "out")


def test_a_damaged_ablation_record_loses_nothing(tmp_path):
    three_runs(tmp_path)
    expected = [["full", "x"], ["../up", 1], 7, ["baseline", 9], ["full", True]]
    (tmp_path / "ablation.json").write_text(json.dumps({"spec": "demo", "expected": expected}))
    text = build(tmp_path, "damaged run folders")
    assert "seed9: missing (no run folder)" in text  # the one well-formed expectation
    assert "../up" not in text.split("## demo")[1].split("### Primary endpoint")[0]
    (tmp_path / "ablation.json").write_bytes(b"\x00\xff not json")
    text = build(tmp_path, "damaged run folders")
    assert "| baseline | 3 | 3 | 0/3 | 0 | 0 |" in text
