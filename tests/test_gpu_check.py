"""benchmarks/gpu_check.py --dry-run: the GPU readiness check's whole logic on the CPU at
tiny sizes, with Triton's interpreter, so that the script cannot rot before a GPU runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def dry_run(out):
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", out],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_gpu_check_dry_run(tmp_path):
    """Run twice into the same folder: the second run starts afresh (it used to find every
    arm's run folder taken by the first)."""
    pytest.importorskip("triton", reason="the triton package is a test dependency")
    for _ in range(2):
        result = dry_run(tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["dry_run"]
    arms = {(r["arm"], r["kernel"]) for r in report["arms"] if r["ok"]}
    assert len(arms) == len(report["arms"]) == 9  # baseline once, 4 arms x 2 kernels
    assert ("full", "triton") in arms and ("baseline", None) in arms
    assert report["resume"]["exact"] and report["resume"]["kernel"] == "triton"
    assert [r["params"] for r in report["bandwidth"]] == [1000, 5003]
    assert all(v > 0 for r in report["bandwidth"] for v in r["gbs"].values())
    ratios = {r["arm"]: r["ratio_to_baseline"] for r in report["overhead"]}
    assert ratios["baseline"] == 1.0 and ratios["full"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## (c) bandwidth" in table and "| synthetic_mlp | full | triton | 0 | 3 |" in table
