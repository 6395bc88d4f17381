"""Run an ablation's runs on a Slurm cluster: one job array through submitit, one task a run.

Each array task runs one command (an emitted script, or torchrun around it when a run has
more than one GPU) with `--resume auto`, so a task that Slurm requeues after a pre-emption,
or that submitit requeues before its time limit (on SIGUSR1), continues from its last.pt.
The task's output goes to the run folder's train.log; submitit's own logs (the Python
wrapper's, useful when a task dies before the script starts) go to OUT/slurm/TASK_0_log.*.

OUT/slurm.json records which array task holds which run, so a rerun attaches to tasks that
are still queued or running, and resubmits only the runs that are neither done nor active.
Nothing here knows about arms: a launcher takes `Task`s (a key, a command, a folder), so
other drivers (`tune`'s trials) can submit through it. `Slurm` is the launch.Launcher over
it, each run's Process a `SlurmRun`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from generator import runs
from generator.factories import python_path
from generator.launch import Task, command, thread_env
from generator.output import atomic_write

# Checkpoint-and-requeue signal: the emitted scripts checkpoint on SIGUSR1 (see StopSignals),
# so submitit must ask Slurm for USR1 before the time limit, not its default USR2 (which would
# kill the script). Read by submitit when it is imported, and exported to the jobs.
os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"

RECORD = "slurm.json"
# Scheduler states in which a task still holds (or will hold) its run folder.
ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "RESIZING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "PREEMPTED",
}
QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}  # not started
POLL_S = 2.0
CHECKPOINT_WAIT_S = 60.0  # how long a requeue waits for the script's checkpoint


class SlurmError(RuntimeError):
    """A scheduler command failed; the message is one line."""


@dataclass(frozen=True)
class Resources:
    """What every array task asks for (sbatch's own words in the comments)."""

    partition: str | None = None  # --partition
    time_min: int = 60  # --time, minutes per attempt (a requeued task starts a new one)
    gpus_per_run: int = 0  # --gpus-per-node; > 1 starts torchrun with one process per GPU
    cpus_per_run: int = 1  # --cpus-per-task; shared by the run's processes
    mem: str | None = None  # --mem, e.g. 16G
    account: str | None = None  # --account
    qos: str | None = None  # --qos
    sbatch: dict[str, str] = field(default_factory=dict)  # any other --KEY=VALUE
    max_parallel: int = 256  # --array=...%N: tasks running at once
    signal_delay_s: int = 120  # SIGUSR1 this long before the time limit: time to checkpoint

    def executor_parameters(self) -> dict:
        """submitit.SlurmExecutor's parameters for these resources."""
        # requeue on pre-emption instead of failing; run where ablate runs (relative paths)
        extra = {"requeue": True, "chdir": os.getcwd(), **self.sbatch}
        optional = {
            "partition": self.partition,
            "mem": self.mem,
            "account": self.account,
            "qos": self.qos,
        }
        params = {
            "time": self.time_min,
            "cpus_per_task": self.cpus_per_run,
            "nodes": 1,
            "ntasks_per_node": 1,  # one launcher per run; torchrun starts the processes
            "signal_delay_s": self.signal_delay_s,
            "array_parallelism": self.max_parallel,
            "additional_parameters": extra,
            **{k: v for k, v in optional.items() if v is not None},
        }
        if self.gpus_per_run:
            params["gpus_per_node"] = self.gpus_per_run
        return params


def parse_sbatch(options: list[str]) -> dict[str, str]:
    """`KEY=VALUE` options as a dict; ValueError names the malformed one."""
    out = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ValueError(f"--sbatch {option!r}: expected KEY=VALUE, e.g. constraint=a100")
        out[key] = value
    return out


def resources(gpus, cpus, partition, time_min, mem, account, qos, sbatch) -> Resources:
    """The command line's slurm options as Resources; ValueError names a malformed one."""
    return Resources(
        partition=partition,
        time_min=time_min,
        gpus_per_run=gpus or 0,
        cpus_per_run=cpus,
        mem=mem,
        account=account,
        qos=qos,
        sbatch=parse_sbatch(sbatch),
    )


class RunTask:
    """What an array task executes (pickled by submitit, run on the node).

    Exit codes 0 and 3 (the run diverged: a result, not a failure) are results; any other
    raises, so that Slurm marks the task FAILED. On submitit's checkpoint signal (SIGUSR1,
    before the time limit or on pre-emption) the script has received the same signal and
    is saving last.pt; `checkpoint` waits for it before submitit requeues the task."""

    RESULTS = (0, 3)

    def __call__(self, command: list[str], folder: str, env: dict, log: str) -> int:
        import submitit

        Path(folder).mkdir(parents=True, exist_ok=True)
        task = submitit.JobEnvironment().job_id
        with open(Path(folder) / log, "a") as out:
            out.write(f"# slurm task {task} on {os.uname().nodename}\n$ {' '.join(command)}\n")
            out.flush()
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
            while (code := self.process.poll()) is None:
                time.sleep(0.5)  # polling, not wait(): a signal handler may poll too
            out.write(f"# exit {code}\n")
        if code not in self.RESULTS:
            raise RuntimeError(f"the run exited {code}; log: {Path(folder) / log}")
        return code

    def checkpoint(self, command: list[str], folder: str, env: dict, log: str):
        import submitit

        process = getattr(self, "process", None)
        deadline = time.time() + CHECKPOINT_WAIT_S
        while process is not None and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if process is not None:  # submitit exits from its signal handler: log it here
            with open(Path(folder) / log, "a") as out:
                out.write(f"# exit {process.poll()}, requeued\n")
        return submitit.helpers.DelayedSubmission(RunTask(), command, folder, env, log)


class Launcher:
    """Submits Tasks as job arrays and tracks them through OUT/slurm.json."""

    def __init__(self, folder: Path, resources: Resources, name: str = "perturbgen"):
        self.folder, self.resources, self.name = folder, resources, name
        self.record_path = folder / RECORD
        self.record = self._load()

    def _load(self) -> dict:
        try:
            record = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return {"arrays": [], "tasks": {}}
        except ValueError as exc:
            raise SlurmError(
                f"{self.record_path}: not valid JSON ({exc}); delete it to "
                "forget the submitted jobs"
            ) from None
        return record

    def _save(self) -> None:
        atomic_write(self.record_path, json.dumps(self.record, indent=2, sort_keys=True) + "\n")

    def task_id(self, key: str) -> str | None:
        return self.record["tasks"].get(key)

    def submit(self, tasks: list[Task]) -> str:
        """Submit `tasks` as one job array; record and return its job id."""
        import submitit

        submitit.JobEnvironment.USR_SIG = "USR1"  # in case submitit was imported before us
        executor = submitit.SlurmExecutor(folder=self.folder / "slurm")
        executor.update_parameters(job_name=self.name, **self.resources.executor_parameters())
        for task in tasks:
            task.folder.mkdir(parents=True, exist_ok=True)
        try:
            jobs = executor.map_array(
                RunTask(),
                [t.command for t in tasks],
                [str(t.folder) for t in tasks],
                [t.env for t in tasks],
                [t.log for t in tasks],
            )
        except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError) as exc:
            raise SlurmError(f"sbatch failed: {' '.join(str(exc).split())[:300]}") from None
        array = jobs[0].job_id.split("_")[0]
        self.record["arrays"].append(
            {"job_id": array, "resources": asdict(self.resources), "submitted": time.time()}
        )
        for task, job in zip(tasks, jobs):
            self.record["tasks"][task.key] = job.job_id
        self._save()
        return array

    def states(self) -> dict[str, str]:
        """The scheduler state of each recorded task ("" once Slurm has forgotten it)."""
        ids = sorted({t.split("_")[0] for t in self.record["tasks"].values()})
        if not ids:
            return {}
        seen = squeue(ids)
        return {key: seen.get(task, "") for key, task in self.record["tasks"].items()}

    def cancel(self, keys: list[str]) -> list[str]:
        """scancel the recorded tasks of `keys`; return the task ids cancelled."""
        ids = [self.record["tasks"][k] for k in keys if k in self.record["tasks"]]
        if ids:
            _run(["scancel", *ids])
        return ids


class SlurmRun:
    """One run as a Slurm task, with the part of Popen's interface that a driver uses
    (launch.Process): it is followed and stopped like a local process. The exit code is the
    script's, as the task wrote it in train.log; a task cancelled before its script ended
    has -SIGTERM."""

    def __init__(self, launcher: Launcher, key: str, run: Path):
        self.launcher, self.key, self.run = launcher, key, run
        self.returncode: int | None = None
        self.checked = 0.0
        self.note = ""  # why it failed, for the driver's reason

    def poll(self) -> int | None:
        if self.returncode is not None or time.time() - self.checked < POLL_S:
            return self.returncode
        self.checked = time.time()
        try:
            state = self.launcher.states().get(self.key, "")
        except SlurmError:  # squeue did not answer this time: ask again later
            return None
        if state not in ACTIVE:
            code = exit_code(self.run / "train.log")
            self.returncode = -signal.SIGTERM if code is None else code
            task = self.launcher.task_id(self.key)
            log = self.launcher.folder / "slurm" / f"{task}_0_log.err"
            self.note = f"slurm task {task} ended {state or 'gone from squeue'} ({log})"
        return self.returncode

    def send_signal(self, sig: int) -> None:  # scancel: SIGTERM, then SIGKILL after KillWait
        with contextlib.suppress(SlurmError):
            self.launcher.cancel([self.key])
        self.checked = 0.0

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.time() + (timeout or 0)
        while self.poll() is None:
            if time.time() > deadline:
                raise subprocess.TimeoutExpired(self.key, timeout or 0)
            time.sleep(0.2)
        return self.returncode

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        if self.returncode is None:  # cancelled twice: the scheduler ends it
            self.returncode = -signal.SIGKILL


class Slurm:
    """The launch.Launcher on a cluster: `start` submits its tasks as one job array."""

    def __init__(self, launcher: Launcher):
        self.launcher = launcher

    def start(self, tasks: list[Task]) -> list[SlurmRun]:
        self.launcher.submit(tasks)
        return [SlurmRun(self.launcher, task.key, task.folder) for task in tasks]

    def wait(self, timeout_s: float) -> None:
        time.sleep(timeout_s)

    def close(self) -> None:
        pass


def active_runs(folder: Path) -> list[str]:
    """The runs of OUT/slurm.json that Slurm still queues or runs (none without a record,
    or where Slurm cannot be asked): a local launcher must not write into them."""
    if not (folder / RECORD).exists():
        return []
    try:
        states = Launcher(folder, Resources()).states()
    except SlurmError:
        return []
    return sorted(key for key, state in states.items() if state in ACTIVE)


def squeue(job_ids: list[str]) -> dict[str, str]:
    """{array task id: state} for every task of these jobs that Slurm still knows."""
    done = _run(
        ["squeue", "-h", "-r", "--states=all", "-o", "%i %T", "-j", ",".join(job_ids)],
        ok_errors=("Invalid job id",),
    )
    states = {}
    for line in done.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def _run(command: list[str], ok_errors: tuple[str, ...] = ()) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{command[0]}: {exc}") from None
    if done.returncode != 0:
        why = " ".join(done.stderr.split())
        if any(text in why for text in ok_errors):
            return ""
        raise SlurmError(f"{' '.join(command[:2])} exited {done.returncode}: {why[:300]}")
    return done.stdout


# --- an ablation's runs as array tasks -------------------------------------------------


def run_ablation(
    jobs: list,
    launcher: Launcher,
    extra: list[str],
    processes: int,
    on_change,
    on_submit=lambda array: None,
    wait: bool = True,
) -> str | None:
    """Attach to the runs' recorded tasks, submit one array for the runs that are neither
    done nor queued/running, and (if `wait`) follow them until every run has ended.
    A run whose folder another process writes (a local run: see runs.lock_holder) is
    waited for, and submitted in an array of its own if that process leaves it unfinished.
    Returns the first new array's job id, or None when nothing needed submitting.
    Ctrl-C while waiting raises KeyboardInterrupt and leaves the cluster jobs alone."""
    states = launcher.states()
    todo = []
    for job in jobs:
        if states.get(job.name, "") in ACTIVE:
            _follow(job, states[job.name])
        elif job.recorded_status() in runs.FINISHED:
            job.outcome = "skipped"
        elif holder := job.holder():
            job.outcome, job.reason = "elsewhere", holder
        else:
            todo.append(job)
    threads = max(1, launcher.resources.cpus_per_run // processes)

    def submit(todo: list) -> str:
        tasks = [
            Task(
                job.name,
                command(job.script, job.seed, job.folder, extra, processes),
                job.folder,
                {**thread_env(threads), **python_path(job.import_paths)},
            )
            for job in todo
        ]
        array = launcher.submit(tasks)
        on_submit(array)
        for job in todo:
            job.outcome = "queued"
        return array

    array = submit(todo) if todo else None
    on_change(jobs, None)
    while wait and any(j.outcome in ("queued", "running", "elsewhere") for j in jobs):
        time.sleep(POLL_S)
        states = launcher.states()
        freed = []
        for job in jobs:
            if job.outcome == "elsewhere" and job.holder() is None:
                job.settle()
                freed += [job] if job.outcome == "pending" else []
                on_change(jobs, job)
            if job.outcome not in ("queued", "running"):
                continue
            before = job.outcome
            state = states.get(job.name, "")
            if state in ACTIVE:
                _follow(job, state)
            else:
                _collect(job, launcher.task_id(job.name), state or "gone from squeue")
            if job.outcome != before:
                on_change(jobs, job)
        if freed:
            submit(freed)
        on_change(jobs, None)
    return array


def _follow(job, state: str) -> None:
    outcome = "queued" if state in QUEUED else "running"  # COMPLETING too: still its run
    if outcome == "running" and job.outcome != "running":
        job.started = time.time()
    job.outcome = outcome


def _collect(job, task: str | None, state: str) -> None:
    """A task has ended: its run folder says how."""
    job.returncode = exit_code(job.folder / "train.log")
    job.outcome = runs.outcome(job.returncode, job.recorded_status())
    if job.outcome != "failed":
        return
    said = "" if job.returncode is None else f", exited {job.returncode}"
    log = job.folder.parent.parent / "slurm" / f"{task}_0_log.err"
    job.reason = f"slurm task {task} ended {state}{said}, submitit's log: {log}"


def exit_code(log: Path) -> int | None:
    """The exit code RunTask wrote as the log's last `# exit N` line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("# exit "):
            try:
                return int(line.split()[2].rstrip(","))
            except (IndexError, ValueError):
                return None
    return None
