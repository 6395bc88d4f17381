"""benchmarks/gpu_check.py --dry-run: the GPU readiness check's whole logic on the CPU at
tiny sizes, with Triton's interpreter, so that the script cannot rot before a GPU runs it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_module


def dry_run(out):
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", out],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.timeout(600)  # a whole dry run, 2 min on a busy 2-core machine
def test_gpu_check_dry_run(tmp_path):
    """Into a folder an earlier check wrote: the run starts afresh (a second check used to
    find every arm's run folder taken by the first, and refused)."""
    pytest.importorskip("triton", reason="the triton package is a test dependency")
    earlier = tmp_path / "arms" / "synthetic_mlp" / "baseline-none"
    earlier.mkdir(parents=True)
    (earlier / "last.pt").write_bytes(b"an earlier check's checkpoint")
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["dry_run"]
    arms = {(r["spec"], r["arm"], r["kernel"]) for r in report["arms"] if r["ok"]}
    # synthetic_mlp: baseline once, 4 arms x 2 kernels; custom_stripes (its factories found
    # beside the spec): baseline once, 2 arms x 2 kernels
    assert len(arms) == len(report["arms"]) == 9 + 5
    assert ("custom_stripes", "full", "triton") in arms
    assert ("synthetic_mlp", "baseline", None) in arms
    resume = {r["kernel"]: r for r in report["resume"]}
    assert set(resume) == {"torch", "triton"}
    for row in resume.values():  # stopped inside the epoch, after detector samples
        assert row["exact"] and row["mid_epoch"] and row["samples"] >= 2
    assert [r["params"] for r in report["bandwidth"]] == [1000, 5003]
    assert all(v > 0 for r in report["bandwidth"] for v in r["gbs"].values())
    loop = report["loop"]
    assert loop["handwritten_images_per_s"] > 0
    assert [(r["arm"], r["kernel"]) for r in loop["arms"]] == [
        ("baseline", None),
        ("full", "torch"),
    ]
    assert all(r["images_per_s"] > 0 and r["of_handwritten"] > 0 for r in loop["arms"])
    assert loop["arms"][0]["step_time_over_baseline"] == 1.0
    # syncs are counted on CUDA only; the runs themselves went through on the CPU
    assert [r["arm"] for r in report["syncs"]] == ["baseline", "full"]
    assert all(set(r["counts"]) == {"1", "3"} for r in report["syncs"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| custom_stripes | full | triton | 0 | 3 |" in table
    for section in ("## (b) exact resume mid-epoch", "## (c) bandwidth", "## (d) the gen"):
        assert section in table
    assert "## (e) host-device syncs per step" in table


def test_specs_whose_trackers_are_missing_are_skipped(monkeypatch, tmp_path):
    """mnist1d_cnn_toolkit logs to tensorboard: without it the spec is listed, not run."""
    gpu_check = load_module(REPO / "benchmarks" / "gpu_check.py", "gpu_check")
    toolkit = REPO / "specs" / "mnist1d_cnn_toolkit.yaml"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "tensorboard" else find_spec(name),
    )
    assert gpu_check.missing_trackers(toolkit) == ["tensorboard"]
    assert gpu_check.missing_trackers(REPO / "specs" / "synthetic_mlp.yaml") == []
    rows, skipped = gpu_check.check_arms(tmp_path, "cpu", ["torch"], [toolkit])
    assert rows == [] and skipped == [{"spec": "mnist1d_cnn_toolkit", "missing": ["tensorboard"]}]
