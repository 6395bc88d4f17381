"""GPU readiness in one prepared run: every arm on the GPU, exact resume, kernel bandwidth
and the step-time cost of the method.

    python benchmarks/gpu_check.py [--out DIR]   # on a CUDA machine: about 5, at most 8 minutes
    python benchmarks/gpu_check.py --dry-run     # the same logic on the CPU at tiny sizes,
                                                 # Triton under its interpreter (the test suite)

  (a) arms       every arm of every example spec for a few --smoke steps, with --kernel torch
                 and --kernel triton (baselines have no noise kernel: they run once)
  (b) resume     the full arm of cifar10_resnet18 with train.deterministic: true, a straight
                 run and one stopped after 2 steps and resumed: the same bits at the end
  (c) bandwidth  the noise-add kernel and torch's SGD step against the device's copy
                 bandwidth and against torch's randn_like + add_, at 1M, 16M and 128M params
  (d) overhead   step time of every arm over baseline's, ResNet-18 on CIFAR-shaped data,
                 batch 128, each noise kernel (arms interleaved in rounds, medians)

It writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: runs/gpu_check) and exits
1 if any run failed or a resume was not exact. Each run starts afresh: the scripts and run
folders of an earlier check in DIR (OUTPUTS) are removed first, so it can be run again. The dry run uses synthetic_mlp for (a) and
(b), sizes of a few thousand for (c) and ResNet-18 at batch 2 with the torch kernel for (d).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = ("scripts", "arms", "deterministic", "resume")  # what a check writes under DIR
SPECS = sorted((REPO / "specs").glob("*.yaml"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny sizes, the Triton interpreter"
    )
    return parser.parse_args(argv)


def generate(specs, out, *overrides):
    """The CLI's own generate of some specs into `out`, in a subprocess."""
    sets = [a for o in overrides for a in ("--set", o)]
    command = [sys.executable, "-m", "generator", "generate", *map(str, specs), "-o", str(out)]
    subprocess.run([*command, *sets], check=True, capture_output=True, cwd=REPO)


def run_inprocess(script, argv):
    """A script's main() in this process (no interpreter start-up per run): (code, error)."""
    ns = runpy.run_path(str(script), run_name="gpu_check")
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = ns["main"](argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # a GPU-only failure is a result of this check, not a crash
        code, err = 1, io.StringIO(f"{type(exc).__name__}: {exc}")
    lines = err.getvalue().strip().splitlines()
    return code, (lines[-1][:300] if code and lines else "")


def check_arms(out, device, kernels, specs):
    """(a) a few --smoke steps of every arm, with each noise kernel."""
    rows = []
    for spec in specs:
        for script in sorted((out / "scripts" / spec.stem).glob("train_*.py")):
            arm = script.stem.removeprefix("train_")
            for kernel in [None] if arm.startswith("baseline") else kernels:
                run = out / "arms" / spec.stem / f"{arm}-{kernel or 'none'}"
                argv = ["--smoke", "--max-steps", "3", "--device", device, "--out", str(run)]
                argv += ["--kernel", kernel] if kernel else []
                started = time.perf_counter()
                code, error = run_inprocess(script, argv)
                summary = run / "summary.json"
                steps = json.loads(summary.read_text())["steps"] if summary.exists() else None
                rows.append(
                    {
                        "spec": spec.stem,
                        "arm": arm,
                        "kernel": kernel,
                        "code": code,
                        "steps": steps,
                        "seconds": round(time.perf_counter() - started, 2),
                        "error": error,
                        "ok": code == 0 and steps == 3,
                    }
                )
    return rows


def check_resume(out, device, kernel, dry):
    """(b) deterministic: true, straight vs stopped-and-resumed, each run in a fresh process
    (the switch is process-wide and cuBLAS reads its workspace setting when CUDA starts)."""
    import torch

    spec = REPO / "specs" / ("synthetic_mlp.yaml" if dry else "cifar10_resnet18.yaml")
    generate([spec], out / "deterministic", "train.deterministic=true")
    script = out / "deterministic" / spec.stem / "train_full.py"
    common = ["--smoke", "--device", device, "--kernel", kernel]
    runs = {"straight": [], "stopped": ["--max-steps", "2"], "resumed": ["--resume"]}
    codes = {}
    for name, extra in runs.items():
        target = out / "resume" / ("straight" if name == "straight" else "split")
        command = [sys.executable, str(script), *common, "--out", str(target), *extra]
        result = subprocess.run(command, capture_output=True, text=True, cwd=out)
        codes[name] = result.returncode
    a, b = (
        (
            torch.load(out / "resume" / n / "last.pt", weights_only=True, map_location="cpu")
            if (out / "resume" / n / "last.pt").exists()
            else None
        )
        for n in ("straight", "split")
    )
    exact = (
        a is not None
        and b is not None
        and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        and a["state"]["step"] == b["state"]["step"]
    )
    ok = exact and all(code == 0 for code in codes.values())
    return {
        "spec": spec.stem,
        "arm": "full",
        "kernel": kernel,
        "codes": codes,
        "exact": exact,
        "ok": ok,
    }


def timer(device):
    """seconds(fn, repeats): the median time of fn, with CUDA events on a GPU."""
    import torch

    def seconds(fn, repeats):
        fn()  # compile, warm up
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    return seconds


def check_bandwidth(out, device, sizes, repeats):
    """(c) GB/s = bytes that must move / time, per fp32 parameter:
    copy 8 (read, write), noise_add kernel 8 (read p, write p), torch noise 16 (randn_like
    writes xi, add_ reads p and xi, writes p), torch SGD with momentum 20 (reads p, g, m,
    writes p, m); the two whole updates: SGD + kernel 28, SGD + torch noise 36."""
    import torch

    ns = runpy.run_path(str(out / "scripts" / "synthetic_mlp" / "train_fixed.py"), run_name="b")
    triton, block, kernel = ns["triton"], ns["BLOCK"], ns["noise_add_kernel"]
    seconds = timer(device)
    rows = []
    for n in sizes:
        src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
        param = torch.nn.Parameter(torch.randn(n, device=device))
        param.grad = torch.randn(n, device=device)
        sgd = torch.optim.SGD([param], lr=0.1, momentum=0.9, foreach=True)
        p = param.data
        grid = (triton.cdiv(n, block),)

        def noise_add():
            kernel[grid](p, n, 1e-3, (1 << 32) | 7, BLOCK=block)

        def torch_noise():
            p.add_(torch.randn_like(p), alpha=1e-3)

        t = {
            "copy": seconds(lambda: dst.copy_(src), repeats),
            "noise_add": seconds(noise_add, repeats),
            "torch_noise": seconds(torch_noise, repeats),
            "sgd": seconds(sgd.step, repeats),
            "sgd_noise_add": seconds(lambda: (sgd.step(), noise_add()), repeats),
            "sgd_torch_noise": seconds(lambda: (sgd.step(), torch_noise()), repeats),
        }
        moved = {
            "copy": 8,
            "noise_add": 8,
            "torch_noise": 16,
            "sgd": 20,
            "sgd_noise_add": 28,
            "sgd_torch_noise": 36,
        }
        gbs = {k: moved[k] * n / t[k] / 1e9 for k in t}
        rows.append(
            {
                "params": n,
                "ms": {k: round(1000 * v, 4) for k, v in t.items()},
                "gbs": {k: float(f"{v:.4g}") for k, v in gbs.items()},
                "noise_add_of_copy": round(gbs["noise_add"] / gbs["copy"], 3),
                "noise_add_speedup_over_torch_noise": round(t["torch_noise"] / t["noise_add"], 2),
                "step_speedup": round(t["sgd_torch_noise"] / t["sgd_noise_add"], 2),
            }
        )
    return rows


def check_overhead(out, device, kernels, batch, rounds, steps, arms):
    """(d) per-step time of each arm over baseline's: ResNet-18, CIFAR-shaped random data."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from overhead import Arm

    rows = []
    for kernel in kernels:
        built = {
            arm: Arm("cifar10_resnet18", arm, batch, kernel, device, out / "scripts")
            for arm in arms
        }
        times = {arm: [] for arm in built}
        for arm in built.values():  # warm-up: allocator, cuDNN, kernel compilation
            arm.step()
        for _ in range(rounds):
            for name, arm in built.items():
                started = time.perf_counter()
                for _ in range(steps):
                    arm.step()  # each step ends in loss.item(): the GPU has caught up
                times[name].append((time.perf_counter() - started) / steps)
        base = statistics.median(times["baseline"])
        for name, values in times.items():
            median = statistics.median(values)
            rows.append(
                {
                    "kernel": kernel,
                    "arm": name,
                    "ms_per_step": round(1000 * median, 3),
                    "ratio_to_baseline": round(median / base, 3),
                }
            )
    return rows


def markdown(report):
    lines = [f"# GPU check: {report['device_name']}", ""]
    lines += [
        f"torch {report['torch']}, triton {report['triton']}, dry run: "
        f"{report['dry_run']}, {report['seconds']:.0f} s in all, ok: {report['ok']}",
        "",
    ]
    lines += [
        "## (a) every arm, a few --smoke steps",
        "",
        "| spec | arm | kernel | exit | steps | s | error |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['spec']} | {r['arm']} | {r['kernel'] or '-'} | {r['code']} | {r['steps']} "
        f"| {r['seconds']} | {r['error']} |"
        for r in report["arms"]
    ]
    r = report["resume"]
    lines += [
        "",
        "## (b) exact resume with train.deterministic: true",
        "",
        f"{r['spec']} / {r['arm']}, kernel {r['kernel']}: exit codes {r['codes']}, "
        f"bit-identical: {r['exact']}",
        "",
        "## (c) bandwidth, GB/s (fraction of copy)",
        "",
        "| params | copy | noise_add | torch noise | sgd | sgd+noise_add | sgd+torch noise "
        "| step speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["bandwidth"]:
        g = row["gbs"]
        cells = [
            f"{g[k]:.1f} ({g[k] / g['copy']:.2f})"
            for k in ("noise_add", "torch_noise", "sgd", "sgd_noise_add", "sgd_torch_noise")
        ]
        lines.append(
            f"| {row['params']:,} | {g['copy']:.1f} | "
            + " | ".join(cells)
            + f" | {row['step_speedup']} |"
        )
    lines += [
        "",
        "## (d) step time over baseline, ResNet-18, CIFAR shape",
        "",
        "| kernel | arm | ms/step | ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['kernel']} | {r['arm']} | {r['ms_per_step']} | {r['ratio_to_baseline']} |"
        for r in report["overhead"]
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    try:
        import triton
    except ImportError:
        triton = None
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (or --dry-run); none is visible here")
    if triton is None:
        sys.exit("gpu_check needs the triton package")
    device = "cpu" if args.dry_run else "cuda"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # an earlier check's runs would refuse a second one
        shutil.rmtree(out / name, ignore_errors=True)
    started = time.perf_counter()
    kernels = ["torch", "triton"]
    report = {
        "device_name": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(),
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    specs = [REPO / "specs" / "synthetic_mlp.yaml"] if args.dry_run else SPECS
    generate(sorted({*specs, REPO / "specs" / "cifar10_resnet18.yaml"}), out / "scripts")
    report["arms"] = check_arms(out, device, kernels, specs)
    report["resume"] = check_resume(out, device, "triton", args.dry_run)
    sizes = [1000, 5003] if args.dry_run else [2**20, 2**24, 2**27]
    report["bandwidth"] = check_bandwidth(out, device, sizes, 2 if args.dry_run else 20)
    if args.dry_run:  # the interpreter over 11M parameters would take hours: torch alone
        report["overhead"] = check_overhead(out, device, ["torch"], 2, 1, 1, ["baseline", "full"])
    else:
        arms = ["baseline", "fixed", "phase_only", "schedule_only", "full"]
        report["overhead"] = check_overhead(out, device, kernels, 128, 5, 20, arms)
    report["ok"] = all(r["ok"] for r in report["arms"]) and report["resume"]["ok"]
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
