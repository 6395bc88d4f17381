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
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from generator import factories, forkserver, launch, report_md, runs, slurm
from generator import report as reporting
from generator.errors import SpecError, SpecErrors
from generator.factories import python_path
from generator.generate import render
from generator.launch import Task, command, thread_env
from generator.loading import Located, changes
from generator.output import Rendered, atomic_write, write_folder
from generator.progress import Progress
from generator.render import check_arms, load_spec
from generator.runs import FINISHED, lock_holder
from generator.spec import Spec, arm_names

POLL_S = 0.5
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
    process: launch.Process | None = field(default=None, repr=False)
    started: float = 0.0
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES of the run, where GPUs are handed out
    reason: str = ""  # why it failed (or who runs it elsewhere), where the code does not say
    import_paths: list[str] = field(default_factory=list)  # spec_folders: first on PYTHONPATH

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    def recorded_status(self) -> str | None:
        return runs.recorded_status(self.folder)

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


def log_flags(spec: Spec, out: Path) -> list[str]:
    """The scripts' experiment-logging flags (where the spec logs): the runs of one
    ablation form one group (W&B group, MLflow experiment), named after its folder, and
    share one MLflow store, OUT/mlflow.db; TensorBoard's event files sit in each run folder,
    so `tensorboard --logdir OUT` shows every arm."""
    loggers = spec.train.loggers
    group = ["--log-group", out.resolve().name] if {"wandb", "mlflow"} & set(loggers) else []
    return group + (["--log-root", str(out.resolve())] if "mlflow" in loggers else [])


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


def task(job: Job, extra: list[str], threads: int, nproc: int = 1) -> Task:
    """The run as a launcher's task: its command line, and its threads, GPUs and
    PYTHONPATH (a factory's module may sit next to the spec)."""
    env = thread_env(threads)
    env.update({} if job.gpus is None else {"CUDA_VISIBLE_DEVICES": job.gpus})
    env.update(python_path(job.import_paths))
    return Task(job.name, command(job.script, job.seed, job.folder, extra, nproc), job.folder, env)


def finish(job: Job) -> None:
    job.returncode = job.process.returncode
    if job.returncode == 2 and (holder := job.holder()):
        job.outcome, job.reason = "elsewhere", holder  # another process took the folder first
    else:
        job.outcome = runs.outcome(job.returncode, job.recorded_status())


def stop(jobs: list[Job], grace_s: float = 10.0) -> None:
    running = [j for j in jobs if j.outcome == "running"]
    launch.stop([j.process for j in running], grace_s)
    for job in running:
        job.outcome = "interrupted"


def run_all(
    jobs: list[Job],
    parallel: int,
    extra: list[str],
    threads: int,
    on_change: Callable[[list[Job], Job | None], None],
    nproc: int = 1,
    slots: list[str] = (),
    launcher: launch.Launcher | None = None,
) -> None:
    """Run the pending jobs through `launcher` (default: each a process of its own),
    `parallel` at a time (each in a GPU slot of its own when there are `slots`); Ctrl-C
    stops them and re-raises. The launcher is closed at the end."""
    launcher = launcher or launch.Local()
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
                    job.process = launcher.start([task(job, extra, threads, nproc)])[0]
                    job.outcome, job.started = "running", time.time()
                on_change(jobs, job)
            ended = [j for j in jobs if j.outcome == "running" and j.process.poll() is not None]
            for job in ended:
                finish(job)
                on_change(jobs, job)
            on_change(jobs, None)
            if ended:
                continue  # their slots are free now
            launcher.wait(POLL_S)
    except KeyboardInterrupt:
        stop(jobs)
        raise
    finally:
        launcher.close()


def write_scripts(rendered: Rendered, out: Path, record: dict) -> None:
    """OUT/scripts, unless it holds these very files (another ablate on OUT may be starting
    runs from them), and ablation.json, replaced whole (another ablate may be reading it)."""
    out.mkdir(parents=True, exist_ok=True)
    scripts = out / "scripts"
    same = scripts.is_dir() and {p.name for p in scripts.iterdir()} == set(rendered.files)
    if not (same and all((scripts / n).read_bytes() == b for n, b in rendered.files.items())):
        write_folder(Rendered("scripts", rendered.files), out)
    atomic_write(out / "ablation.json", json.dumps(record, indent=2) + "\n")


# --- the ablate command: render, run through a launcher, report ----------------------------


@dataclass
class Options:
    """One `perturbgen ablate` invocation, as given (see its --help)."""

    seeds: int = 5
    jobs: int = 1
    jobs_given: bool = False  # --jobs on the command line: GPU slots do not replace it
    arms: str | None = None  # comma-separated; None: every arm
    epochs: int | None = None
    out: Path | None = None
    smoke: bool = False
    nproc: int = 1
    fork: bool = True
    overrides: list[str] = field(default_factory=list)
    gpus_per_run: int | None = None
    resources: slurm.Resources | None = None  # the runs are Slurm array tasks; None: local
    no_wait: bool = False
    cancel: bool = False
    precision: float | None = None  # points of the 95 % CI's half-width (Stein's design)
    max_seeds: int | None = None


class Busy(Exception):
    """The ablation folder's runs are queued or running elsewhere (one line says where)."""


def placement(o: Options) -> tuple[int, int, list[str]]:
    """(runs at a time, CPU threads per process, GPU slots) for the local launcher; the
    default --jobs on a GPU machine is one run per GPU slot."""
    jobs, slots = o.jobs, []
    if o.resources is None:
        per_run = o.nproc if o.gpus_per_run is None else o.gpus_per_run
        slots = gpu_slots(visible_gpus(), per_run) if per_run else []
        if slots and not o.jobs_given:
            jobs = len(slots)
        jobs = min(jobs, len(slots)) if slots else jobs
    return jobs, launch.threads_per_run(jobs, o.nproc), slots


def ablate(spec_path: Path, o: Options, say: Callable[[str], None], warn) -> int:
    """Render the arms, run arms x seeds, write the report; the exit code (1: a run failed).
    Ctrl-C stops the local runs (KeyboardInterrupt); SpecErrors, OSError, Busy,
    slurm.SlurmError and report.Refused are for the caller to say."""
    settings = {  # everything that changes a run; a rerun into the same folder must repeat it
        "epochs": o.epochs,
        "smoke": o.smoke,
        "nproc": o.nproc,
        "overrides": sorted(o.overrides),
    }
    spec, doc = load_spec(spec_path, o.overrides)
    factories.require(spec, doc, spec_path)  # before a run starts or a task is submitted
    folder = o.out or Path("runs") / spec.name
    local_fork = o.resources is None and o.fork and o.nproc == 1 and hasattr(os, "fork")
    # it imports torch while we render; run_all forks the runs from it and closes it
    server = forkserver.Server() if local_fork else None
    try:
        arms = [a for a in (o.arms or "").split(",") if a]
        rendered, chosen, record = prepare(spec, doc, spec_path, folder, arms, settings)
        seed_list = [spec.seed + k for k in range(o.seeds)]
        jobs, threads, slots = placement(o)
        # what the last call ran with (timings depend on it; results do not): not checked
        record["launch"] = {"jobs": jobs, "threads": threads}
        record["expected"] = expected(folder, chosen, seed_list)
        write_scripts(rendered, folder, record)
        all_jobs = make_jobs(folder, chosen, seed_list, factories.spec_folders(doc))
        extra = (["--epochs", str(o.epochs)] if o.epochs else []) + (["--smoke"] * o.smoke)
        extra += log_flags(spec, folder)
        display = Progress(len(all_jobs))
        if o.resources is not None:
            if not _on_slurm(all_jobs, folder, spec.name, o, extra, display, say):
                return 0
        else:
            if active := slurm.active_runs(folder):
                raise Busy(
                    f"{folder}: {len(active)} run(s) are queued or running on Slurm "
                    f"({', '.join(active[:3])}{', ...' if len(active) > 3 else ''}); rerun "
                    "with --launcher slurm to follow them, or add --cancel there first"
                )
            say(
                f"{len(all_jobs)} runs ({len(chosen)} arms x {o.seeds} seeds) in {folder}/, "
                f"{jobs} at a time, {threads} thread(s) each"
                + (f", GPUs {' | '.join(slots[:jobs])}" if slots else "")
            )
            # SIGTERM or a terminal's hang-up stops the children like Ctrl-C does
            signal.signal(signal.SIGTERM, launch.interrupt)
            signal.signal(signal.SIGHUP, launch.interrupt)
            threading.Thread(target=reporting.preload, daemon=True).start()  # while they train
            launcher = launch.Forked(server, threads) if server else launch.Local()
            server = None  # run_all closes it
            with display:
                run_all(all_jobs, jobs, extra, threads, display.update, o.nproc, slots, launcher)
    finally:
        if server is not None:
            server.close()
    failed = [j for j in all_jobs if j.outcome == "failed"]
    for job in failed:
        why = job.reason or f"exited {job.returncode}"
        warn(f"failed: {job.name} {why}; log: {job.folder / 'train.log'}")
    report_dir, report = reporting.build(folder)
    if o.precision is not None and not failed:
        stage = reporting.stein_seeds(folder, spec.name, seed_list, o.precision / 100)
        total = min(stage["n"], o.max_seeds or stage["n"])
        say(
            f"Stein: pilot of {o.seeds} seeds, sd of the differences {100 * stage['sd']:.2f} "
            f"points: {stage['n']} seeds give ±{o.precision:g}"
            + (f"; capped at --max-seeds {total}" if total < stage["n"] else "")
        )
        if total > o.seeds:  # the second stage: the same runs, more seeds (finished ones skip)
            second = Options(**{**o.__dict__, "seeds": total, "precision": None})
            return ablate(spec_path, second, say, warn)
    say(f"report: {report_dir / 'report.md'}")
    for line in report_md.headline(report, spec.name):
        say(line)
    return 1 if failed else 0


def _on_slurm(jobs, folder, name, o: Options, extra, display, say) -> bool:
    """The runs as Slurm array tasks; True when every run has ended (report next)."""
    launcher = slurm.Launcher(folder, o.resources, name=f"pgen-{name}")
    processes = o.resources.gpus_per_run if o.resources.gpus_per_run > 1 else o.nproc
    if o.cancel:
        states = launcher.states()
        ids = launcher.cancel([j.name for j in jobs if states.get(j.name) in slurm.ACTIVE])
        say(
            f"cancelled {len(ids)} task(s){': ' + ' '.join(ids) if ids else ''}; "
            "their checkpoints stay, and a rerun resubmits them"
        )
        return False
    with display:
        slurm.run_ablation(
            jobs,
            launcher,
            extra,
            processes,
            display.update,
            wait=not o.no_wait,
            on_submit=lambda array: say(
                f"submitted job array {array}: tasks recorded in {folder / slurm.RECORD}"
            ),
        )
    waiting = [j for j in jobs if j.outcome in ("queued", "running", "elsewhere")]
    if waiting:
        say(
            f"{len(waiting)} run(s) queued or running on the cluster or elsewhere; rerun the "
            "same command to follow and collect them, or add --cancel"
        )
        return False
    return True
