"""GPU readiness in one prepared run: every arm on the GPU, exact resume, kernel bandwidth,
the generated loop's speed against a hand-written one, and host syncs per step.

    python benchmarks/gpu_check.py [--out DIR]   # on a CUDA machine: about 5, at most 10 minutes
    python benchmarks/gpu_check.py --dry-run     # the same logic on the CPU at tiny sizes,
                                                 # Triton under its interpreter (the test suite)

  (a) arms       every arm of every example spec for a few --smoke steps, with --kernel torch
                 and --kernel triton (baselines have no noise kernel: they run once); the
                 custom-factory spec with its folder on the path; a spec whose experiment
                 trackers are not installed is skipped, and listed
  (b) resume     the full arm of cifar10_resnet18 with train.deterministic: true and the
                 detector sampling every 2 steps: a straight run and one stopped mid-epoch and
                 resumed, with each kernel; model, optimizer, noise generators, detector and
                 epoch sums must be the same bits
  (c) bandwidth  triton.testing.do_bench (L2 flushed before every call) of the noise-add
                 kernel, torch's randn_like + add_, and fused and foreach SGD against a copy,
                 at 16M, 64M and 256M parameters (64 MB and up: beyond any L2)
  (d) loop       the generated baseline and full arms (each kernel) on CIFAR-format data,
                 through their own loop and data path: images/s from their train_s over the
                 epochs after the first; the peer is a hand-written CIFAR ResNet-18 GPU loop
                 (same model, data, batch, AMP; data held and augmented on the device,
                 channels-last, fused SGD, no sync in the loop)
  (e) syncs      host-device syncs per step of baseline and full, counted with
                 torch.cuda.set_sync_debug_mode("warn") as the difference of two runs of
                 different lengths (set-up and the final checkpoint cancel out)

The CIFAR-format data are random images written as CIFAR-10's python batches under DIR/data
(no download). It writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR:
runs/gpu_check) and exits 1 if any run failed or a resume was not exact. Each check starts
afresh: what an earlier check wrote under DIR (OUTPUTS) is removed first, so it can be run
again. The dry run uses synthetic_mlp and custom_stripes for (a), synthetic_mlp for (b), a few
thousand parameters for (c), and ResNet-18 at batch 8 on 32 images with the torch kernel for
(d) and (e) (the interpreter over 11M parameters would take hours); syncs are counted on CUDA
only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from generator.scriptload import arm_data, load_script

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's generator, not an installed one
OUTPUTS = ("scripts", "arms", "deterministic", "resume", "loop", "data")  # written under DIR
SPECS = sorted((REPO / "specs").glob("*.yaml"))
CIFAR = REPO / "specs" / "cifar10_resnet18.yaml"


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
    """A script's main() in this process (no interpreter start-up per run):
    (code, error, syncs), syncs the warnings of torch.cuda's sync debug mode."""
    ns = load_script(str(script), run_name="gpu_check")
    err = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not the first per place
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = ns["main"]([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # a GPU-only failure is a result of this check, not a crash
            code, err = 1, io.StringIO(f"{type(exc).__name__}: {exc}")
    lines = err.getvalue().strip().splitlines()
    syncs = sum("synchronizing" in str(w.message) for w in caught)
    return code, (lines[-1][:300] if code and lines else ""), syncs


def missing_trackers(spec):
    """The experiment trackers a spec logs to that this environment cannot import."""
    from generator.render import load_spec

    loaded, _ = load_spec(spec, [])
    return [name for name in loaded.train.loggers if importlib.util.find_spec(name) is None]


def check_arms(out, device, kernels, specs):
    """(a) a few --smoke steps of every arm, with each noise kernel."""
    rows, skipped = [], []
    for spec in specs:
        missing = missing_trackers(spec)
        if missing:
            skipped.append({"spec": spec.stem, "missing": missing})
            continue
        sys.path.insert(0, str(spec.parent))  # a spec's factories are found beside it
        try:
            rows += [
                arm_row(out, spec, script, kernel, device)
                for script in sorted((out / "scripts" / spec.stem).glob("train_*.py"))
                for kernel in ([None] if script.stem.startswith("train_baseline") else kernels)
            ]
        finally:
            sys.path.remove(str(spec.parent))
    return rows, skipped


def arm_row(out, spec, script, kernel, device):
    arm = script.stem.removeprefix("train_")
    run = out / "arms" / spec.stem / f"{arm}-{kernel or 'none'}"
    argv = ["--smoke", "--max-steps", "3", "--device", device, "--out", run]
    argv += ["--kernel", kernel] if kernel else []
    started = time.perf_counter()
    code, error, _ = run_inprocess(script, argv)
    summary = run / "summary.json"
    steps = json.loads(summary.read_text())["steps"] if summary.exists() else None
    return {
        "spec": spec.stem,
        "arm": arm,
        "kernel": kernel,
        "code": code,
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 2),
        "error": error,
        "ok": code == 0 and steps == 3,
    }


def write_cifar(root, per_file):
    """Random uint8 images and labels as CIFAR-10's python batches: 5 train files, 1 test."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_file).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def same(a, b):
    """Equal to the bit, through nested checkpoint state."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def check_resume(out, device, kernels, data_root, steps, stop_at):
    """(b) deterministic: true, straight vs stopped mid-epoch and resumed, each run in a fresh
    process (the switch is process-wide and cuBLAS reads its workspace setting when CUDA
    starts); the detector samples every 2 steps, so its window and phases are in the state."""
    import torch

    spec = CIFAR if data_root else REPO / "specs" / "synthetic_mlp.yaml"
    detector = ["phase_detector.every=2", "phase_detector.window=4", "phase_detector.patience=1"]
    generate([spec], out / "deterministic", "train.deterministic=true", *detector)
    script = out / "deterministic" / spec.stem / "train_full.py"
    common = ["--epochs", "1", "--device", device, "--no-test"]
    common += ["--data-root", str(data_root)] if data_root else []
    runs = {
        "straight": ["--out", "straight", "--max-steps", steps],
        "stopped": ["--out", "split", "--max-steps", stop_at],
        "resumed": ["--out", "split", "--max-steps", steps, "--resume"],
    }
    codes = {kernel: {} for kernel in kernels}
    for wave in (("straight", "stopped"), ("resumed",)):  # independent runs side by side
        started = {}
        for kernel, name in [(k, n) for k in kernels for n in wave]:
            folder = out / "resume" / kernel
            folder.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, script, *common, "--kernel", kernel, *runs[name]]
            with open(folder / f"{name}.log", "w") as log:
                started[kernel, name] = subprocess.Popen(
                    list(map(str, command)), stdout=log, stderr=subprocess.STDOUT, cwd=folder
                )
        for (kernel, name), process in started.items():
            codes[kernel][name] = process.wait()
    rows = []
    for kernel in kernels:
        folder = out / "resume" / kernel
        a, b = (
            torch.load(p, weights_only=True, map_location="cpu") if p.exists() else None
            for p in (folder / "straight" / "last.pt", folder / "split" / "last.pt")
        )
        compared = ("model", "optimizer", "perturbation")
        exact = (
            a is not None
            and b is not None
            and all(same(a[k], b[k]) for k in compared)
            and all(same(a["state"][k], b["state"][k]) for k in ("step", "sums", "phases"))
        )
        mid_epoch = b is not None and b["state"]["batch"] > 0
        rows.append(
            {
                "spec": spec.stem,
                "arm": "full",
                "kernel": kernel,
                "steps": steps,
                "stopped_at": stop_at,
                "codes": codes[kernel],
                "mid_epoch": mid_epoch,
                "samples": len(a["perturbation"]["detector"]["samples"]) if a else None,
                "exact": exact,
                "ok": exact and mid_epoch and all(code == 0 for code in codes[kernel].values()),
            }
        )
    return rows


def bench(device):
    """seconds(fn): the median time of one call of fn. On a GPU triton.testing.do_bench,
    which flushes L2 before each call and times each with CUDA events; on the CPU (dry run)
    the median over back-to-back calls."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median") / 1000

    def seconds(fn):
        fn()  # compile, warm up
        times = []
        for _ in range(5):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    return seconds


# bytes that must move per fp32 parameter: copy reads and writes; the noise-add kernel reads
# and writes p; torch's noise writes xi (randn_like), then reads p and xi and writes p; SGD
# with momentum and decay reads p, g, m and writes p, m (a foreach SGD moves about 44, but
# GB/s here is the least traffic over the time taken, so its extra traffic shows as less)
MOVED = {"copy": 8, "noise_add": 8, "torch_noise": 16, "sgd_fused": 20, "sgd_foreach": 20}
MOVED["sgd_fused_noise_add"] = MOVED["sgd_fused"] + MOVED["noise_add"]


def check_bandwidth(device, sizes):
    """(c) GB/s = the bytes that must move (MOVED) / the time of one call."""
    import torch

    from generator.method.noise import noise_add

    seconds = bench(device)
    rows = []
    for n in sizes:
        src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
        p = torch.randn(n, device=device)

        def sgd(fused):
            param = torch.nn.Parameter(torch.randn(n, device=device))
            param.grad = torch.randn(n, device=device)
            kind = {"fused": True} if fused else {"foreach": True}
            optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9, weight_decay=1e-4, **kind)
            return optimizer.step

        sgd_fused, sgd_foreach = sgd(True), sgd(False)
        t = {
            "copy": seconds(lambda: dst.copy_(src)),
            "noise_add": seconds(lambda: noise_add(p, n, 1e-3, (1 << 32) | 7)),
            "torch_noise": seconds(lambda: p.add_(torch.randn_like(p), alpha=1e-3)),
            "sgd_fused": seconds(sgd_fused),
            "sgd_foreach": seconds(sgd_foreach),
            "sgd_fused_noise_add": seconds(
                lambda: (sgd_fused(), noise_add(p, n, 1e-3, (1 << 32) | 7))
            ),
        }
        gbs = {k: MOVED[k] * n / t[k] / 1e9 for k in t}
        rows.append(
            {
                "params": n,
                "ms": {k: round(1000 * v, 4) for k, v in t.items()},
                "gbs": {k: float(f"{v:.4g}") for k, v in gbs.items()},
                "noise_add_of_copy": round(gbs["noise_add"] / gbs["copy"], 3),
                "noise_add_speedup_over_torch_noise": round(t["torch_noise"] / t["noise_add"], 2),
                "fused_speedup_over_foreach": round(t["sgd_foreach"] / t["sgd_fused"], 2),
            }
        )
        del src, dst, p
    return rows


def generated_rate(script, argv, run):
    """Images/s of one generated arm through its own loop: the training images of the epochs
    after the first over their train_s (the first holds cuDNN tuning and kernel compilation)."""
    code, error, _ = run_inprocess(script, [*argv, "--out", run])
    if code != 0:
        return {"code": code, "error": error, "images_per_s": None}
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = json.loads((run / "config.json").read_text())["splits"]["train"]
    seconds = history[-1]["train_s"] - history[0]["train_s"]
    return {"code": 0, "error": "", "images_per_s": round(train * (len(history) - 1) / seconds, 1)}


def handwritten_rate(script, data_root, device, epochs, batch):
    """The peer: a hand-written CIFAR loop, the way fast CIFAR code is written. The model is
    the generated script's build_model() (the same network), the data the same files and
    train split; it holds the split on the device, draws each epoch's order, crops and flips
    there at once, runs channels-last with the spec's AMP and a fused SGD, never syncs inside
    an epoch, and is timed over the epochs after the first, synchronised at their edges."""
    import torch
    import torch.nn.functional as F

    ns = load_script(str(script), run_name="gpu_check")
    cuda = device == "cuda"
    data = arm_data(ns, data_root, False, 0, torch.device("cpu"))  # the script's own split
    x, y = data.x_train.to(device), data.y_train.to(device)
    mean = torch.tensor(ns["NORM_MEAN"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(ns["NORM_STD"], device=device).view(1, 3, 1, 1)
    model = ns["build_model"]().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=ns["LR"],
        momentum=ns["MOMENTUM"],
        nesterov=ns["NESTEROV"],
        weight_decay=ns["WEIGHT_DECAY"],
        fused=cuda,
    )
    amp = ns.get("AMP_DTYPE")
    n = len(y)
    steps = torch.arange(32, device=device)

    def epoch():
        order = torch.randperm(n, device=device)
        xs, ys = F.pad(x[order], (4, 4, 4, 4)), y[order]
        rows = torch.randint(0, 9, (n, 1), device=device) + steps
        cols = torch.randint(0, 9, (n, 1), device=device) + steps
        index = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(3, device=device)[None, :, None, None]
        xs = xs[index, channel, rows[:, None, :, None], cols[:, None, None, :]]
        xs = torch.where(torch.rand(n, 1, 1, 1, device=device) < 0.5, xs.flip(3), xs)
        xs = ((xs.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
        for i in range(0, n, batch):
            with torch.autocast(device, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(xs[i : i + batch]), ys[i : i + batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    epoch()
    sync()
    started = time.perf_counter()
    for _ in range(epochs - 1):
        epoch()
    sync()
    return round(n * (epochs - 1) / (time.perf_counter() - started), 1)


def check_loop(out, device, kernels, data_root, epochs, batch):
    """(d) images/s of the generated arms and of the hand-written peer, and the ratios."""
    folder = out / "loop" / CIFAR.stem
    argv = ["--epochs", epochs, "--batch-size", batch, "--device", device, "--no-test"]
    argv += ["--data-root", data_root]
    rows = [
        {
            "arm": "baseline",
            "kernel": None,
            **generated_rate(
                folder / "train_baseline.py", argv, out / "loop" / "runs" / "baseline"
            ),
        }
    ]
    rows += [
        {
            "arm": "full",
            "kernel": kernel,
            **generated_rate(
                folder / "train_full.py",
                [*argv, "--kernel", kernel],
                out / "loop" / "runs" / kernel,
            ),
        }
        for kernel in kernels
    ]
    peer = handwritten_rate(folder / "train_baseline.py", data_root, device, epochs, batch)
    base = rows[0]["images_per_s"]
    for row in rows:
        rate = row["images_per_s"]
        row["of_handwritten"] = round(rate / peer, 3) if rate else None
        row["step_time_over_baseline"] = round(base / rate, 3) if rate and base else None
    return {"handwritten_images_per_s": peer, "batch": batch, "epochs": epochs, "arms": rows}


def check_syncs(out, device, kernel, data_root, short, long):
    """(e) host-device syncs per step: (syncs of a --max-steps `long` run - those of a
    `short` run) / (long - short), both inside the first epoch. Counted on CUDA only."""
    import torch

    folder = out / "loop" / CIFAR.stem
    common = ["--epochs", 1, "--device", device, "--no-test", "--data-root", data_root]
    rows = []
    for arm, extra in (("baseline", []), ("full", ["--kernel", kernel])):
        counts = {}
        for steps in (short, long):
            run = out / "loop" / "syncs" / f"{arm}-{steps}"
            argv = [*common, *extra, "--max-steps", steps, "--out", run]
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                code, error, counts[steps] = run_inprocess(folder / f"train_{arm}.py", argv)
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            if code != 0:
                counts = {"error": error}
                break
        per_step = None
        if "error" not in counts and device == "cuda":
            per_step = round((counts[long] - counts[short]) / (long - short), 2)
        rows.append(
            {
                "arm": arm,
                "kernel": extra[-1] if extra else None,
                "counts": counts,
                "syncs_per_step": per_step,
            }
        )
    return rows


def markdown(report):
    lines = [f"# GPU check: {report['device_name']}", ""]
    lines += [
        f"torch {report['torch']}, triton {report['triton']}, dry run: "
        f"{report['dry_run']}, {report['seconds']:.0f} s in all, ok: {report['ok']}",
        "",
        "seconds per part: " + ", ".join(f"{k} {v}" for k, v in report["part_seconds"].items()),
        "",
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
    lines += [
        f"\nskipped {s['spec']}: {', '.join(s['missing'])} not installed"
        for s in report["skipped"]
    ]
    lines += [
        "",
        "## (b) exact resume mid-epoch, train.deterministic: true, detector every 2 steps",
        "",
        "| spec | kernel | steps | stopped at | mid-epoch | samples | exit codes | bit-identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['spec']} | {r['kernel']} | {r['steps']} | {r['stopped_at']} | {r['mid_epoch']} "
        f"| {r['samples']} | {r['codes']} | {r['exact']} |"
        for r in report["resume"]
    ]
    lines += [
        "",
        "## (c) bandwidth, GB/s (fraction of copy), do_bench medians",
        "",
        "| params | copy | noise_add | torch noise | SGD fused | SGD foreach | SGD fused + "
        "noise_add |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["bandwidth"]:
        g = row["gbs"]
        cells = [
            f"{g[k]:.1f} ({g[k] / g['copy']:.2f})"
            for k in ("noise_add", "torch_noise", "sgd_fused", "sgd_foreach")
            + ("sgd_fused_noise_add",)
        ]
        lines.append(f"| {row['params']:,} | {g['copy']:.1f} | " + " | ".join(cells) + " |")
    loop = report["loop"]
    lines += [
        "",
        f"## (d) the generated loop, CIFAR-format data, batch {loop['batch']}, "
        f"{loop['epochs']} epochs (the first not timed)",
        "",
        f"hand-written peer: {loop['handwritten_images_per_s']} images/s",
        "",
        "| arm | kernel | images/s | of hand-written | step time over baseline | error |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['arm']} | {r['kernel'] or '-'} | {r['images_per_s']} | {r['of_handwritten']} "
        f"| {r['step_time_over_baseline']} | {r['error']} |"
        for r in loop["arms"]
    ]
    lines += ["", "## (e) host-device syncs per step", "", "| arm | syncs/step | counts |"]
    lines += ["|---|---|---|"]
    lines += [f"| {r['arm']} | {r['syncs_per_step']} | {r['counts']} |" for r in report["syncs"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    dry = args.dry_run
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    try:
        import triton
    except ImportError:
        triton = None
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (or --dry-run); none is visible here")
    if triton is None:
        sys.exit("gpu_check needs the triton package")
    device = "cpu" if dry else "cuda"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # an earlier check's runs would refuse a second one
        shutil.rmtree(out / name, ignore_errors=True)
    started = time.perf_counter()
    kernels = ["torch", "triton"]
    report = {
        "device_name": "CPU (dry run)" if dry else torch.cuda.get_device_name(),
        "dry_run": dry,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    parts = report["part_seconds"] = {}  # where the time goes: the budget is 10 minutes

    def part(name, check, *arguments):
        began = time.perf_counter()
        result = check(*arguments)
        parts[name] = round(time.perf_counter() - began, 1)
        return result

    custom = REPO / "specs" / "custom_stripes.yaml"
    specs = [REPO / "specs" / "synthetic_mlp.yaml", custom] if dry else SPECS
    part("generate", generate, specs, out / "scripts")
    report["arms"], report["skipped"] = part("arms", check_arms, out, device, kernels, specs)
    # CIFAR-format data: 5 x 8 train images less 8 for val (dry), or 20,000 less 5,000
    data_root = write_cifar(out / "data", 8 if dry else 4000)
    part("generate_loop", generate, [CIFAR], out / "loop", *(["data.val_size=8"] if dry else []))
    report["resume"] = part(
        "resume",
        check_resume,
        out,
        device,
        kernels,
        None if dry else data_root,
        *((10, 5) if dry else (40, 17)),
    )
    sizes = [1000, 5003] if dry else [2**24, 2**26, 2**28]
    report["bandwidth"] = part("bandwidth", check_bandwidth, device, sizes)
    loop_kernels = ["torch"] if dry else kernels  # the interpreter: hours over 11M params
    report["loop"] = part(
        "loop", check_loop, out, device, loop_kernels, data_root, *((2, 8) if dry else (3, 128))
    )
    report["syncs"] = part(
        "syncs",
        check_syncs,
        out,
        device,
        loop_kernels[-1],
        data_root,
        *((1, 3) if dry else (10, 40)),
    )
    report["ok"] = (
        all(r["ok"] for r in report["arms"])
        and all(r["ok"] for r in report["resume"])
        and all(r["code"] == 0 for r in report["loop"]["arms"])
        and all("error" not in r["counts"] for r in report["syncs"])
    )
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
