"""Per-epoch time of the generated MNIST-1D scripts against a hand-written loop doing the same work.

    python benchmarks/loop.py                       # 3 rounds of 30 epochs, 1 thread
    python benchmarks/loop.py --rounds 5 --epochs 60

Each round runs generated baseline, hand-written baseline (benchmarks/handwritten.py),
generated fixed and hand-written fixed as separate processes with the same threads, the order
rotated between rounds, so that drift of a shared machine hits every variant alike. A run's
time per epoch is its steady state: (elapsed_s at the last epoch - at the first) / (epochs - 1),
taken from metrics.jsonl (generated) or the printed list (hand-written); it includes
everything an epoch does, validation, metrics and checkpoints. The table gives, per arm, the
median over rounds of generated / hand-written and the spread (min..max), and the same for
whole-process wall time. Run it several times: the spread between invocations is the noise.
`--compare DIR` adds the train_<arm>.py scripts in DIR (say, an older generation) to the same
rounds, so a before/after comparison shares the machine's state too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = ("baseline", "fixed")


def per_epoch(elapsed):
    return (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)


def run(cmd, env):
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{result.stderr[-2000:]}")
    return result.stdout, time.perf_counter() - start


def generated(folder, arm, epochs, data, out, env):
    script = folder / f"train_{arm}.py"
    cmd = [sys.executable, script, "--epochs", epochs, "--data-root", data, "--out", out]
    _, wall = run(list(map(str, cmd)), env)
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return per_epoch([json.loads(line)["elapsed_s"] for line in lines]), wall


def handwritten(arm, epochs, data, env):
    cmd = [sys.executable, REPO / "benchmarks" / "handwritten.py", "--arm", arm]
    stdout, wall = run(list(map(str, [*cmd, "--epochs", epochs, "--data-root", data])), env)
    return per_epoch(json.loads(stdout.splitlines()[-1])["elapsed_s"]), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    folders = {"generated": REPO / "generated" / "mnist1d_cnn"}
    if args.compare:
        folders["compare"] = args.compare.resolve()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generated(folders["generated"], "baseline", 2, data, Path(tmp) / "warm", env)  # the data
        variants = [(kind, arm) for arm in ARMS for kind in [*folders, "handwritten"]]
        times = {v: [] for v in variants}
        for r in range(args.rounds):
            for i in range(len(variants)):
                kind, arm = variants[(i + r) % len(variants)]
                if kind in folders:
                    out = Path(tmp) / f"{kind}-{arm}-{r}"
                    times[kind, arm].append(
                        generated(folders[kind], arm, args.epochs, data, out, env)
                    )
                else:
                    times[kind, arm].append(handwritten(arm, args.epochs, data, env))
    print(f"{args.rounds} rounds x {args.epochs} epochs, {args.threads} thread(s)")
    print(
        f"{'scripts':<12}{'arm':<10}{'ms/epoch':>10}{'hand ms/epoch':>15}"
        f"{'epoch ratio (min..max)':>28}{'process ratio (min..max)':>28}"
    )
    for kind, arm in ((k, a) for a in ARMS for k in folders):
        gen, hand = times[kind, arm], times["handwritten", arm]
        epoch = [g[0] / h[0] for g, h in zip(gen, hand)]
        proc = [g[1] / h[1] for g, h in zip(gen, hand)]
        print(
            f"{kind:<12}{arm:<10}{1000 * statistics.median(g[0] for g in gen):>10.1f}"
            f"{1000 * statistics.median(h[0] for h in hand):>15.1f}"
            f"{statistics.median(epoch):>14.3f} ({min(epoch):.3f}..{max(epoch):.3f})"
            f"{statistics.median(proc):>14.3f} ({min(proc):.3f}..{max(proc):.3f})"
        )


if __name__ == "__main__":
    main()
