"""Bandwidth of the Triton noise kernel on a CUDA GPU, next to torch doing the same work.

    python benchmarks/kernels.py [--sizes 1,4,16,64,256] [--repeats 20]

For each size (millions of fp32 parameters) it times, with CUDA events, in one process:
  copy          dst.copy_(src): the device's practical bandwidth (8 bytes per element)
  noise_add     the noise-add kernel: reads and writes p (8 B)
  torch noise   randn_like + add_ (16 B and a materialised noise tensor)
  sgd           torch.optim.SGD(momentum, foreach): reads p, g, m, writes p, m (20 B), the
                optimizer step every arm takes
  sgd + noise   the perturbing arms' whole update with the kernel (28 B) and with torch (36 B)
and prints GB/s (bytes above / time), the kernel's fraction of copy bandwidth, and its
speed-up over the torch sequence. The kernel is that of an emitted script
(generated/mnist1d_cnn/train_fixed.py). Needs CUDA and triton; it says so and stops otherwise.
benchmarks/gpu_check.py measures the kernel with triton.testing.do_bench at 16M, 64M and 256M
parameters (beyond any L2), beside fused and foreach SGD.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from generator.scriptload import load_script

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
    script = load_script(str(REPO / "generated" / "mnist1d_cnn" / "train_fixed.py"), run_name="b")
    ns = script["flatten_parameters"].__globals__  # the kernels live in the support module
    if ns["triton"] is None:
        sys.exit("benchmarks/kernels.py needs the triton package")
    triton, block = ns["triton"], ns["BLOCK"]
    print(f"{torch.cuda.get_device_name()}, median of {args.repeats}, GB/s = bytes moved / time")
    print(
        f"{'M params':>9} {'copy':>8} {'noise_add':>10} {'torch noise':>12} {'x':>6} "
        f"{'sgd':>8} {'sgd+kernel':>11} {'sgd+torch':>10} {'x':>6} {'add/copy':>9}"
    )
    for millions in [int(s) for s in args.sizes.split(",")]:
        n = millions * 2**20
        key = (1 << 32) | 7
        grid = (triton.cdiv(n, block),)
        src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
        param = torch.nn.Parameter(torch.randn(n, device="cuda"))
        param.grad = torch.randn(n, device="cuda")
        sgd = torch.optim.SGD([param], lr=0.1, momentum=0.9, foreach=True)
        p = param.data

        def noise_add():
            ns["noise_add_kernel"][grid](p, n, 1e-3, key, BLOCK=block)

        def torch_noise():
            p.add_(torch.randn_like(p), alpha=1e-3)

        t_copy = timed(lambda: dst.copy_(src), args.repeats)
        t_add = timed(noise_add, args.repeats)
        t_torch_add = timed(torch_noise, args.repeats)
        t_sgd = timed(sgd.step, args.repeats)
        t_sgd_add = timed(lambda: (sgd.step(), noise_add()), args.repeats)
        t_sgd_torch = timed(lambda: (sgd.step(), torch_noise()), args.repeats)
        gbs = lambda nbytes, t: nbytes * n / t / 1e9  # noqa: E731
        print(
            f"{millions:>9} {gbs(8, t_copy):>8.0f} {gbs(8, t_add):>10.0f} "
            f"{gbs(16, t_torch_add):>12.0f} {t_torch_add / t_add:>6.2f} {gbs(20, t_sgd):>8.0f} "
            f"{gbs(28, t_sgd_add):>11.0f} {gbs(36, t_sgd_torch):>10.0f} "
            f"{t_sgd_torch / t_sgd_add:>6.2f} {gbs(8, t_add) / gbs(8, t_copy):>9.2f}"
        )


if __name__ == "__main__":
    main()
