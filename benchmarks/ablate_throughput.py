"""Wall time of `perturbgen ablate` against the training compute of its runs.

    python benchmarks/ablate_throughput.py                        # the README's main job
    python benchmarks/ablate_throughput.py --seeds 1 --epochs 20  # a quicker look

Runs `perturbgen ablate SPEC --seeds N --jobs J` into a temporary folder, once forking the
runs from the fork server and once (with --compare) starting a fresh python per run, and
reports for each: the study's wall time, Σ elapsed_s (each run's training and evaluation
time, from the last line of its metrics.jsonl), and the ratio
wall / (Σ elapsed_s / J): 1.0 would be a study that costs nothing but its runs' compute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def study(spec, seeds, jobs, epochs, fork, out):
    cmd = [sys.executable, "-m", "generator", "ablate", str(spec), "--seeds", str(seeds)]
    cmd += ["--jobs", str(jobs), "-o", str(out), "--fork" if fork else "--no-fork"]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=out.parent, check=True, capture_output=True)
    wall = time.perf_counter() - start
    elapsed = [
        json.loads(path.read_text().splitlines()[-1])["elapsed_s"]
        for path in sorted(out.glob("*/seed*/metrics.jsonl"))
    ]
    return wall, sum(elapsed), len(elapsed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO / "specs" / "mnist1d_cnn.yaml")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--compare", action="store_true", help="also run with --no-fork")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "warm").mkdir()  # the studies' working folder: data/ is made there once
        modes = [True, False] if args.compare else [True]
        print(f"{args.spec.name}: --seeds {args.seeds} --jobs {args.jobs} --epochs {args.epochs}")
        print(f"{'launch':<10}{'runs':>6}{'wall s':>10}{'sum elapsed s':>15}{'ratio':>8}")
        study(args.spec, 1, 1, 1, True, Path(tmp) / "warm" / "ab")  # makes the data cache
        for fork in modes:
            out = Path(tmp) / "warm" / f"ab-{'fork' if fork else 'process'}"
            wall, total, runs = study(args.spec, args.seeds, args.jobs, args.epochs, fork, out)
            ratio = wall / (total / args.jobs)
            label = "fork" if fork else "process"
            print(f"{label:<10}{runs:>6}{wall:>10.1f}{total:>15.1f}{ratio:>8.3f}")


if __name__ == "__main__":
    main()
