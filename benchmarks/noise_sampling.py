"""Ways to draw Gaussian parameter noise on the CPU, timed side by side in one process.

    python benchmarks/noise_sampling.py [--numel 11173962] [--repeats 7]

The default size is a CIFAR ResNet-18 (11,173,962 parameters). Each method fills (or adds
to) one flat fp32 buffer of that size; the table gives the median time of each and its
ratio to torch's per-tensor randn + _foreach_add_ (what the emitted scripts did first);
the last row is what they do now.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def per_tensor(params, g, eps):
    noise = [torch.randn(p.shape, generator=g) for p in params]
    torch._foreach_add_(params, noise, alpha=eps)


def flat_randn(flat, g, eps, scratch):
    scratch.normal_(generator=g)
    flat.add_(scratch, alpha=eps)


def flat_normal_inplace(flat, g, eps, scratch):
    torch.randn(flat.shape, generator=g, out=scratch)
    flat.add_(scratch, alpha=eps)


def flat_addcmul(flat, g, eps, scratch):
    scratch.normal_(mean=0.0, std=eps, generator=g)
    flat.add_(scratch)


def threaded(chunks, generators, eps, pool):
    """Independent generators on threads: torch releases the GIL inside randn."""

    def draw(i):
        chunks[i].add_(torch.randn(chunks[i].shape, generator=generators[i]), alpha=eps)

    list(pool.map(draw, range(len(chunks))))


def two_slices(slices, eps, pool):
    """What the emitted scripts do: two fixed slices, a generator and a scratch slice each,
    normal_ + add_ per slice on two threads."""

    def draw(part):
        generator, scratch, target = part
        scratch.normal_(generator=generator)
        target.add_(scratch, alpha=eps)

    list(pool.map(draw, slices))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=11_173_962)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    sizes = [args.numel // 62] * 61
    sizes.append(args.numel - sum(sizes))
    flat = torch.zeros(args.numel)
    params = list(flat.split(sizes))
    scratch = torch.empty(args.numel)
    g = torch.Generator().manual_seed(0)
    chunks = flat.chunk(4)
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    pool = ThreadPoolExecutor(2)
    slices = list(zip(generators[:2], scratch.chunk(2), flat.chunk(2)))
    methods = {
        "per-tensor randn + _foreach_add_": lambda: per_tensor(params, g, 1e-3),
        "flat normal_ into scratch + add_": lambda: flat_randn(flat, g, 1e-3, scratch),
        "flat randn(out=scratch) + add_": lambda: flat_normal_inplace(flat, g, 1e-3, scratch),
        "flat normal_(std=eps) + add_": lambda: flat_addcmul(flat, g, 1e-3, scratch),
        "4 generators on 2 threads": lambda: threaded(chunks, generators, 1e-3, pool),
        "2 slices on 2 threads (the scripts)": lambda: two_slices(slices, 1e-3, pool),
    }
    times = {name: [] for name in methods}
    for _ in range(args.repeats):  # interleaved, so drift hits every method alike
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["per-tensor randn + _foreach_add_"])
    print(
        f"{args.numel:,} fp32 values, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:36s} {1000 * med:8.1f} ms   x{med / base:.2f}")


if __name__ == "__main__":
    main()
