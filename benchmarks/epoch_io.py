"""What an epoch of a generated MNIST-1D run spends on its files, before and after #18.

    python benchmarks/epoch_io.py --old DIR     # DIR: train_fixed.py of an older generation

Times, in one process and interleaved over rounds, the end-of-epoch bookkeeping of the
current generated/mnist1d_cnn/train_fixed.py (append one metrics line; replace best.pt
without fsync when validation accuracy improved; last.pt only every --checkpoint-every
seconds, so not in a typical epoch) and, with --old, of an older script (metrics.jsonl
rewritten whole, last.pt and best.pt written and fsynced every epoch), on the run's real
checkpoint after 60 epochs. Medians in ms per epoch; these are the costs the loop
benchmark (benchmarks/loop.py) sees on top of the training itself.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from generator.scriptload import load_script

REPO = Path(__file__).resolve().parent.parent


def fixture(ns):
    model = ns["build_model"]()
    optimizer = ns["build_optimizer"](model)
    history = [
        {
            "epoch": e,
            "step": 32 * e,
            "train_loss": 0.5,
            "train_acc": 0.8,
            "val_loss": 0.6,
            "val_acc": 0.8,
            "lr": 0.05,
            "eps": 0.001,
            "elapsed_s": 0.14 * e,
        }
        for e in range(1, 61)
    ]
    ckpt = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": {"history": history},
    }
    return ckpt, history


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    new = load_script(str(REPO / "generated" / "mnist1d_cnn" / "train_fixed.py"), run_name="b")
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt, history = fixture(new)
        log = new["MetricsLog"](folder / "new.jsonl", history[:-1])

        def after():
            log.append(history[-1])
            new["save_atomic"](ckpt, folder / "new-best.pt", False)

        variants["current (improved epoch)"] = after
        variants["current (other epoch)"] = lambda: log.append(history[-1])
        if args.old:
            old = load_script(str(args.old / "train_fixed.py"), run_name="b")

            def before():
                old["write_jsonl"](folder / "old.jsonl", history)
                old["save_atomic"](ckpt, folder / "old-last.pt")
                old["save_atomic"](ckpt, folder / "old-best.pt")

            variants["before (improved epoch)"] = before
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, work in variants.items():
                start = time.perf_counter()
                work()
                times[name].append(time.perf_counter() - start)
    for name, samples in times.items():
        q = statistics.quantiles(samples, n=4)
        print(
            f"{name:<28}{1000 * statistics.median(samples):8.2f} ms/epoch "
            f"(quartiles {1000 * q[0]:.2f}..{1000 * q[2]:.2f})"
        )


if __name__ == "__main__":
    main()
