"""Bandwidth of the Triton noise kernels on a CUDA GPU, next to torch doing the same work.

    python benchmarks/kernels.py [--sizes 1,4,16,64,256] [--repeats 20]

For each size (millions of fp32 parameters) it times, with CUDA events, in one process:
  copy          dst.copy_(src): the device's practical bandwidth (8 bytes per element)
  sgd_noise     the fused SGD(momentum) + noise kernel: reads p, g, m, writes p, m (20 B)
  torch sgd     torch.optim.SGD(foreach) step, then randn_like + add_ for the noise
  noise_add     the noise-add kernel: reads and writes p (8 B)
  torch noise   randn_like + add_ (16 B and a materialised noise tensor)
and prints GB/s (bytes above / time), the fraction of copy bandwidth, and the speed-up of
each kernel over its torch sequence. The kernels are those of an emitted script
(generated/mnist1d_cnn/train_fixed.py). Needs CUDA and triton; it says so and stops otherwise.
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def timed(fn, repeats):
    fn()  # compile / warm up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,4,16,64,256", help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU; none is visible here")
    ns = runpy.run_path(str(REPO / "generated" / "mnist1d_cnn" / "train_fixed.py"), run_name="b")
    if ns["triton"] is None:
        sys.exit("benchmarks/kernels.py needs the triton package")
    triton, block = ns["triton"], ns["BLOCK"]
    print(f"{torch.cuda.get_device_name()}, median of {args.repeats}, GB/s = bytes moved / time")
    print(
        f"{'M params':>9} {'copy':>8} {'sgd_noise':>10} {'torch sgd':>10} {'x':>6} "
        f"{'noise_add':>10} {'torch noise':>12} {'x':>6} {'sgd/copy':>9}"
    )
    for millions in [int(s) for s in args.sizes.split(",")]:
        n = millions * 2**20
        p, g, m = (torch.randn(n, device="cuda") for _ in range(3))
        stats, key = torch.zeros(2, device="cuda"), (1 << 32) | 7
        grid = (triton.cdiv(n, block),)
        src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
        param = torch.nn.Parameter(torch.randn(n, device="cuda"))
        param.grad = torch.randn(n, device="cuda")
        sgd = torch.optim.SGD([param], lr=0.1, momentum=0.9, foreach=True)

        def torch_sgd_noise():
            sgd.step()
            with torch.no_grad():
                param.add_(torch.randn_like(param), alpha=1e-3)

        def torch_noise():
            p.add_(torch.randn_like(p), alpha=1e-3)

        t_copy = timed(lambda: dst.copy_(src), args.repeats)
        t_sgd = timed(
            lambda: ns["sgd_noise_kernel"][grid](
                p,
                g,
                m,
                stats,
                n,
                n,
                0.1,
                0.9,
                0.0,
                1e-4,
                1e-3,
                key,
                0,
                NESTEROV=False,
                MOMENTUM=True,
                STATS=False,
                BLOCK=block,
            ),
            args.repeats,
        )
        t_torch_sgd = timed(torch_sgd_noise, args.repeats)
        t_add = timed(
            lambda: ns["noise_add_kernel"][grid](p, n, 1e-3, key, BLOCK=block), args.repeats
        )
        t_torch_add = timed(torch_noise, args.repeats)
        gbs = lambda nbytes, t: nbytes * n / t / 1e9  # noqa: E731
        print(
            f"{millions:>9} {gbs(8, t_copy):>8.0f} {gbs(20, t_sgd):>10.0f} "
            f"{gbs(20, t_torch_sgd):>10.0f} {t_torch_sgd / t_sgd:>6.2f} "
            f"{gbs(8, t_add):>10.0f} {gbs(8, t_torch_add):>12.0f} "
            f"{t_torch_add / t_add:>6.2f} {gbs(20, t_sgd) / gbs(8, t_copy):>9.2f}"
        )


if __name__ == "__main__":
    main()
