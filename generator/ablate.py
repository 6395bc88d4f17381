"""Run every arm of a spec over seeds, each run a process of its own, and report.

Layout of an ablation folder:
    OUT/ablation.json        what these runs are (spec hash and every setting that changes a
                             run: a rerun must match), and which runs (arm, seed) it expects
    OUT/scripts/             the generated arms (train_<arm>.py, README.md, manifest.json)
    OUT/<arm>/seed<S>/       one run folder per arm and seed, with its train.log
    OUT/report/              report.md, report.json and the plots
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from generator import forkserver
from generator.errors import SpecError, SpecErrors
from generator.factories import python_path
from generator.plan import arm_names
from generator.loading import Located, changes
from generator.render import Rendered, check_arms, render, write_folder
from generator.spec import Spec

POLL_S = 0.5
LOCK = "run.lock"  # a run folder's lock, held by the process that writes it (the scripts)
FINISHED = ("completed", "diverged")  # a run folder's status that no rerun changes
# What a loaded NVIDIA, ROCm or WSL GPU driver puts in the file system (Linux).
GPU_DRIVERS = ("/proc/driver/nvidia/gpus", "/dev/kfd", "/dev/dxg")


@dataclass
class Job:
    """One arm at one seed."""

    arm: str
    seed: int
    script: Path
    folder: Path
    # pending, queued (slurm), running, elsewhere (another process writes its folder: waited
    # for), completed, diverged, failed, skipped
    outcome: str = "pending"
    returncode: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES of the run, where GPUs are handed out
    reason: str = ""  # why it failed (or who runs it elsewhere), where the code does not say
    import_paths: list[str] = field(default_factory=list)  # spec_folders: first on PYTHONPATH

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    def recorded_status(self) -> str | None:
        try:
            return json.loads((self.folder / "summary.json").read_text()).get("status")
        except (OSError, ValueError):
            return None

    def holder(self) -> str | None:
        return lock_holder(self.folder)

    def settle(self) -> None:
        """Its folder has just been freed by another process: take the outcome it left
        (skipped: finished there), or run it here (pending: a rerun resumes it)."""
        self.outcome = "skipped" if self.recorded_status() in FINISHED else "pending"
        self.reason = ""

    def progress(self) -> tuple[int, float | None]:
        """(epochs done, last validation accuracy) from the run's metrics.jsonl."""
        try:
            lines = (self.folder / "metrics.jsonl").read_text().splitlines()
            last = json.loads(lines[-1]) if lines else {}
        except (OSError, ValueError, IndexError):
            return 0, None
        return int(last.get("epoch", 0)), last.get("val_acc")


def lock_holder(folder: Path) -> str | None:
    """Who writes a run folder now ("pid N on HOST since T"), or None when no process holds
    its lock (the one place launchers ask). It takes a shared lock and drops it at once; a
    script that starts at that instant tries its own lock again, so it never sees it."""
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return None  # never locked: no run has started there
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # closing the file drops it
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held
            pass
        except OSError:
            return None  # a file system without locks: nothing can be told
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
        except (OSError, ValueError, TypeError, KeyError):  # locked, not yet written
            return "another process"
    finally:
        os.close(fd)


def prepare(
    spec: Spec, doc: Located, spec_path: Path, out: Path, arms: list[str], settings: dict
) -> tuple[Rendered, list[str], dict]:
    """Render the arms and check that OUT holds nothing made from other settings."""
    check_arms(spec, spec_path, arms)
    rendered = render(spec, doc, spec_path)  # every arm: OUT/scripts is the whole spec
    manifest = json.loads(rendered.files["manifest.json"])
    record = {"spec": spec.name, "spec_sha256": manifest["spec_sha256"], **settings}
    stamp = out / "ablation.json"
    if stamp.exists():
        previous = json.loads(stamp.read_text())
        changed = sorted(k for k in record if previous.get(k) != record[k])
        before = {k: previous.get(k) for k in changed}
        after = {k: record[k] for k in changed}
        if "spec_sha256" in changed and (made := _resolved_spec(out)) is not None:
            del before["spec_sha256"], after["spec_sha256"]  # the settings, not their hashes
            before["spec"], after["spec"] = made, manifest["resolved_spec"]
        if changed:
            raise SpecErrors(
                [
                    SpecError(
                        str(out),
                        None,
                        "",
                        (
                            "holds runs made with other settings "
                            f"({'; '.join(changes(before, after))}); "
                            "rerun with the same ones, or choose another --out"
                        ),
                    )
                ]
            )
    return rendered, arms or arm_names(spec), record


def _resolved_spec(out: Path) -> dict | None:
    """The spec OUT's runs were made from, as its scripts' manifest resolved it."""
    try:
        return json.loads((out / "scripts" / "manifest.json").read_text())["resolved_spec"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def expected(out: Path, arms: list[str], seeds: list[int]) -> list[list]:
    """[arm, seed] of every run OUT should hold: this call's and those of earlier calls, so
    that the report counts a run that never wrote anything as missing."""
    try:
        previous = json.loads((out / "ablation.json").read_text()).get("expected", [])
    except (OSError, ValueError, AttributeError):
        previous = []
    pairs = {
        (p[0], p[1])
        for p in (previous if isinstance(previous, list) else [])
        if isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int
    }
    return sorted([list(p) for p in pairs | {(arm, seed) for arm in arms for seed in seeds}])


def make_jobs(
    out: Path, arms: list[str], seeds: list[int], import_paths: list[str] = ()
) -> list[Job]:
    """One job per arm and seed; `import_paths` go first on each run's PYTHONPATH."""
    return [
        Job(
            arm,
            seed,
            out / "scripts" / f"train_{arm}.py",
            out / arm / f"seed{seed}",
            import_paths=list(import_paths),
        )
        for arm in arms
        for seed in seeds
    ]


def command(job: Job, extra: list[str], nproc: int = 1) -> list[str]:
    """The run's command line, for any launcher: an interrupted, failed or requeued run
    continues where it stopped (--resume auto), a new one starts fresh."""
    launcher = [sys.executable]
    if nproc > 1:  # DDP: torchrun on this node, with a free port of its own per run
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [
        *launcher,
        str(job.script),
        "--seed",
        str(job.seed),
        "--out",
        str(job.folder),
        *extra,
        "--resume",
        "auto",
    ]


def log_flags(spec: Spec, out: Path) -> list[str]:
    """The scripts' experiment-logging flags (where the spec logs): the runs of one
    ablation form one group (W&B group, MLflow experiment), named after its folder, and
    share one MLflow store, OUT/mlflow.db; TensorBoard's event files sit in each run folder,
    so `tensorboard --logdir OUT` shows every arm."""
    loggers = spec.train.loggers
    group = ["--log-group", out.resolve().name] if {"wandb", "mlflow"} & set(loggers) else []
    return group + (["--log-root", str(out.resolve())] if "mlflow" in loggers else [])


def thread_env(threads: int) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


def visible_gpus(environ: dict | None = None, count: int | None = None) -> list[str]:
    """The GPU ids this process may hand out: CUDA_VISIBLE_DEVICES when set, else 0..N-1
    for the N GPUs torch sees (none on a CPU-only machine)."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    if count is None and sys.platform == "linux" and not any(map(os.path.exists, GPU_DRIVERS)):
        count = 0  # no GPU driver loaded: no need to import torch (seconds) to learn it
    if count is None:
        import torch

        count = torch.cuda.device_count()
    return [str(i) for i in range(count)]


def gpu_slots(gpus: list[str], per_run: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES values for runs side by side, each with `per_run` GPUs of its own:
    8 GPUs, 2 per run -> "0,1", "2,3", "4,5", "6,7". GPUs that do not fill a slot stay idle."""
    return [",".join(gpus[i : i + per_run]) for i in range(0, len(gpus) - per_run + 1, per_run)]


def free_slot(slots: list[str], jobs: list[Job]) -> str | None:
    """A slot no running job holds (None without GPUs: the child sees what we see)."""
    taken = {j.gpus for j in jobs if j.outcome == "running"}
    return next((s for s in slots if s not in taken), None)


@contextlib.contextmanager
def deferred_interrupts():
    """Ctrl-C or SIGTERM while a run starts takes effect once it is recorded as running, so
    that stop() stops it: a run forked but not yet recorded would outlive ablate."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread, which gets the signals
        return
    received = []
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {
        s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signals
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt


def start(job: Job, extra: list[str], threads: int, nproc: int = 1, server=None) -> None:
    """Launch one run: forked by the fork server where there is one (torch is imported
    there once), else as a process of its own (always for torchrun runs)."""
    job.folder.mkdir(parents=True, exist_ok=True)
    command_line = command(job, extra, nproc)
    env = thread_env(threads)
    env.update({} if job.gpus is None else {"CUDA_VISIBLE_DEVICES": job.gpus})
    env.update(python_path(job.import_paths))  # a factory's module may sit next to the spec
    log_path = job.folder / "train.log"
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command_line)}\n")
    if server is not None:  # the server runs the script itself: no interpreter or torchrun
        job.process = server.start(str(job.script), command_line[2:], str(log_path), env, threads)
    else:
        with open(log_path, "a") as log:
            # a session of its own: Ctrl-C reaches perturbgen, which then stops the children;
            # and SIGTERM when perturbgen dies (forkserver.guarded)
            job.process = subprocess.Popen(
                forkserver.guarded(command_line),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )
    job.outcome, job.started = "running", time.time()


def finish(job: Job) -> None:
    job.returncode = job.process.returncode
    status = job.recorded_status()
    if job.returncode == 2 and (holder := job.holder()):
        job.outcome, job.reason = "elsewhere", holder  # another process took the folder first
    elif job.returncode == 0 and status == "completed":
        job.outcome = "completed"
    elif job.returncode == 3 and status == "diverged":
        job.outcome = "diverged"  # a result, not a failure: the arm diverged at this seed
    else:
        job.outcome = "failed"


def stop(jobs: list[Job], grace_s: float = 10.0) -> None:
    running = [j for j in jobs if j.outcome == "running"]
    for job in running:
        job.process.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for job in running:
        try:
            job.process.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()
        job.outcome = "interrupted"


def run_all(
    jobs: list[Job],
    parallel: int,
    extra: list[str],
    threads: int,
    on_change: Callable[[list[Job], Job | None], None],
    nproc: int = 1,
    slots: list[str] = (),
    server: forkserver.Server | None = None,
) -> None:
    """Run the pending jobs, `parallel` at a time (each in a GPU slot of its own when there
    are `slots`); Ctrl-C stops them and re-raises.

    With a `server` (one process per run only) the runs are forked by it: it imported torch
    once, which saves each run seconds of start-up (generator/forkserver.py). It is closed
    at the end; without one each run is a process of its own.
    """
    for job in jobs:
        if job.recorded_status() in FINISHED:
            job.outcome = "skipped"
    queue = [j for j in jobs if j.outcome == "pending"]
    try:
        while queue or any(j.outcome in ("running", "elsewhere") for j in jobs):
            for job in jobs:  # runs another process wrote: finished there, or ours to resume
                if job.outcome == "elsewhere" and job.holder() is None:
                    job.settle()
                    queue += [job] if job.outcome == "pending" else []
                    on_change(jobs, job)
            while queue and sum(j.outcome == "running" for j in jobs) < parallel:
                job = queue.pop(0)
                holder = job.holder()
                if holder:  # never a second writer: wait for that process to let it go
                    job.outcome, job.reason = "elsewhere", holder
                    on_change(jobs, job)
                    continue
                job.gpus = free_slot(slots, jobs)
                with deferred_interrupts():
                    start(job, extra, threads, nproc, server)
                on_change(jobs, job)
            ended = [j for j in jobs if j.outcome == "running" and j.process.poll() is not None]
            for job in ended:
                finish(job)
                on_change(jobs, job)
            on_change(jobs, None)
            if ended:
                continue  # their slots are free now
            if server is not None:
                server.wait(POLL_S)  # returns as soon as a run ends
            else:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        stop(jobs)
        raise
    finally:
        if server is not None:
            server.close()


def write_scripts(rendered: Rendered, out: Path, record: dict) -> None:
    """OUT/scripts, unless it holds these very files (another ablate on OUT may be starting
    runs from them), and ablation.json, replaced whole (another ablate may be reading it)."""
    out.mkdir(parents=True, exist_ok=True)
    scripts = out / "scripts"
    same = scripts.is_dir() and {p.name for p in scripts.iterdir()} == set(rendered.files)
    if not (same and all((scripts / n).read_bytes() == b for n, b in rendered.files.items())):
        write_folder(Rendered("scripts", rendered.files), out)
    tmp = out / f".ablation.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / "ablation.json")
