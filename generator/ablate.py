"""Run every arm of a spec over seeds, as separate processes, and report.

Layout of an ablation folder:
    OUT/ablation.json        what these runs are (spec hash, epochs, smoke): a rerun must match
    OUT/scripts/             the generated arms (train_<arm>.py, README.md, manifest.json)
    OUT/<arm>/seed<S>/       one run folder per arm and seed, with its train.log
    OUT/report/              report.md, report.json and the plots
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from generator.errors import SpecError, SpecErrors
from generator.plan import arm_names
from generator.loading import Located
from generator.render import Rendered, check_arms, render, write_folder
from generator.spec import Spec

POLL_S = 0.5


@dataclass
class Job:
    """One arm at one seed."""

    arm: str
    seed: int
    script: Path
    folder: Path
    outcome: str = "pending"  # pending, running, completed, diverged, failed, skipped
    returncode: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0
    import_path: str | None = None  # the spec's folder, where its factories' modules may be

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    def recorded_status(self) -> str | None:
        try:
            return json.loads((self.folder / "summary.json").read_text()).get("status")
        except (OSError, ValueError):
            return None

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
        if changed:
            raise SpecErrors(
                [
                    SpecError(
                        str(out),
                        None,
                        "",
                        (
                            f"holds runs made with other settings ({', '.join(changed)}); "
                            "rerun with the same ones, or choose another --out"
                        ),
                    )
                ]
            )
    return rendered, arms or arm_names(spec), record


def make_jobs(
    out: Path, arms: list[str], seeds: list[int], import_path: Path | None = None
) -> list[Job]:
    """One job per arm and seed; `import_path` goes first on each run's PYTHONPATH."""
    path = None if import_path is None else str(import_path.resolve())
    return [
        Job(
            arm,
            seed,
            out / "scripts" / f"train_{arm}.py",
            out / arm / f"seed{seed}",
            import_path=path,
        )
        for arm in arms
        for seed in seeds
    ]


def start(job: Job, extra: list[str], threads: int, nproc: int = 1) -> None:
    job.folder.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable]
    if nproc > 1:  # DDP: torchrun on this node, with a free port of its own per run
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [
        *launcher,
        str(job.script),
        "--seed",
        str(job.seed),
        "--out",
        str(job.folder),
        *extra,
    ]
    if (job.folder / "last.pt").exists():
        command.append("--resume")  # an interrupted or failed run continues where it stopped
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }
    if job.import_path:  # a custom factory's module may sit next to the spec
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (job.import_path, os.environ.get("PYTHONPATH")) if p
        )
    log = open(job.folder / "train.log", "a")
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    # a session of its own: Ctrl-C reaches perturbgen, which then stops the children itself
    job.process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    log.close()
    job.outcome, job.started = "running", time.time()


def finish(job: Job) -> None:
    job.returncode = job.process.returncode
    status = job.recorded_status()
    if job.returncode == 0 and status == "completed":
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
) -> None:
    """Run the pending jobs, `parallel` at a time; Ctrl-C stops them and re-raises."""
    for job in jobs:
        if job.recorded_status() in ("completed", "diverged"):
            job.outcome = "skipped"
    queue = [j for j in jobs if j.outcome == "pending"]
    try:
        while queue or any(j.outcome == "running" for j in jobs):
            while queue and sum(j.outcome == "running" for j in jobs) < parallel:
                job = queue.pop(0)
                start(job, extra, threads, nproc)
                on_change(jobs, job)
            for job in jobs:
                if job.outcome == "running" and job.process.poll() is not None:
                    finish(job)
                    on_change(jobs, job)
            on_change(jobs, None)
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        stop(jobs)
        raise


def write_scripts(rendered: Rendered, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_folder(Rendered("scripts", rendered.files), out)
    (out / "ablation.json").write_text(json.dumps(record, indent=2) + "\n")
