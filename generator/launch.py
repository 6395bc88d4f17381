"""One launcher protocol: a driver (ablate, tune) hands `Task`s to a `Launcher` and gets back
one `Process` per task, which it polls, signals and waits for like a subprocess.Popen.

Implementations:
    Local   a process of its own per run (subprocess.Popen: fork and exec at once)
    Forked  forked by a forkserver.Server that imported torch once (one process per run only)
    Slurm   one array task per run, through submitit (generator/slurm.py: slurm.Slurm)

A new launcher is one class with `start`, `wait` and `close`; `stop` ends any launcher's
processes the same way (SIGTERM: each run checkpoints and exits; SIGKILL after a grace).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from generator import forkserver


@dataclass(frozen=True)
class Task:
    """One unit of work: `command` runs in its own process, output appended to folder/log."""

    key: str  # unique within one driver, e.g. "fixed/seed0"
    command: list[str]
    folder: Path
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    log: str = "train.log"


class Process(Protocol):
    """The part of subprocess.Popen a driver uses."""

    returncode: int | None

    def poll(self) -> int | None: ...

    def send_signal(self, signum: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    def start(self, tasks: list[Task]) -> list[Process]:
        """Start every task (Slurm: as one array); one Process per task, in order."""

    def wait(self, timeout_s: float) -> None:
        """Until one of the processes may have ended, or `timeout_s` seconds pass."""

    def close(self) -> None:
        """Release what the launcher holds (a fork server); processes stop with it."""


def command(script: Path, seed: int, folder: Path, extra: list[str], nproc: int = 1) -> list[str]:
    """A run's command line, for any launcher: an interrupted, failed or requeued run
    continues where it stopped (--resume auto), a new one starts fresh."""
    launcher = [sys.executable]
    if nproc > 1:  # DDP: torchrun on this node, with a free port of its own per run
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [
        *launcher,
        str(script),
        "--seed",
        str(seed),
        "--out",
        str(folder),
        *extra,
        "--resume",
        "auto",
    ]


def thread_env(threads: int) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


def threads_per_run(jobs: int, nproc: int = 1) -> int:
    """CPU threads for each process of `jobs` runs side by side of `nproc` processes each:
    the machine's cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // (jobs * nproc))


def _announce(task: Task) -> Path:
    """Create the task's folder and write its command line at the end of its log."""
    task.folder.mkdir(parents=True, exist_ok=True)
    log = task.folder / task.log
    with open(log, "a") as out:
        out.write(f"$ {' '.join(task.command)}\n")
    return log


class Local:
    """Each task a process of its own, in a session of its own: Ctrl-C reaches the driver,
    which then stops the runs itself; and SIGTERM when the driver dies (forkserver.guarded)."""

    def start(self, tasks: list[Task]) -> list[Process]:
        processes = []
        for task in tasks:
            with open(_announce(task), "a") as log:
                processes.append(
                    subprocess.Popen(
                        forkserver.guarded(task.command),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, **task.env},
                        start_new_session=True,
                    )
                )
        return processes

    def wait(self, timeout_s: float) -> None:
        time.sleep(timeout_s)

    def close(self) -> None:
        pass


class Forked:
    """Each task forked by a fork server (generator/forkserver.py): the server runs the
    script itself, so a task's command is `python SCRIPT ARGS...` and no torchrun."""

    def __init__(self, server: forkserver.Server, threads: int):
        self.server, self.threads = server, threads

    def start(self, tasks: list[Task]) -> list[Process]:
        return [
            self.server.start(
                str(task.command[1]),
                task.command[2:],
                str(_announce(task)),
                task.env,
                self.threads,
            )
            for task in tasks
        ]

    def wait(self, timeout_s: float) -> None:
        self.server.wait(timeout_s)  # returns as soon as a run ends

    def close(self) -> None:
        self.server.close()


def interrupt(signum, frame) -> None:
    """A signal handler: SIGTERM or a terminal's hang-up stops a driver like Ctrl-C does
    (its runs are stopped with checkpoints)."""
    raise KeyboardInterrupt


def stop(processes: list[Process], grace_s: float = 10.0) -> None:
    """SIGTERM: each run finishes its step, checkpoints and exits 143; SIGKILL after the
    grace period."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
