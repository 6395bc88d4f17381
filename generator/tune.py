"""perturbgen tune: Optuna over a spec's `tune:` section; every trial is a real run of one arm.

A trial is the spec with the sampled values applied as `--set` overrides and validated like
any spec (an invalid sample is pruned, never run); its arm is generated into the trial's
folder and run as a process per seed, or (`--launcher slurm`) as one Slurm job array with a
task per seed. The tuner follows each run's metrics.jsonl (on a cluster, through the shared
filesystem), reports every epoch's validation value to Optuna, and stops a trial the pruner
rejects (SIGTERM locally, scancel on Slurm).

Only validation values are read: every JSON object is read without its test keys, and of
metrics.jsonl only `epoch` and the `val_*` fields are kept, so no test value can reach the
objective, the pruner or the report.

Layout of a tune folder:
    DIR/study.db                   the default storage (SQLite)
    DIR/trials/STUDY/NNNN/         one trial: scripts/ (its arm) and seed<S>/ (its runs);
                                   on Slurm also slurm.json (its task ids) and slurm/ (logs)
    DIR/tuned.yaml                 the spec that extends the original with the best values
    DIR/tune_report.md, tune.json  the study, for people and for machines
    DIR/plots/*.png                Optuna's plots
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from generator import forkserver, slurm
from generator.ablate import lock_holder, thread_env
from generator.errors import SpecError, SpecErrors
from generator.factories import python_path, spec_folders
from generator.generate import render
from generator.launch import stop as stop_processes
from generator.loading import Located, changes, merge, parse_override
from generator.output import Rendered, atomic_write, write_folder
from generator.plan import spec_hash
from generator.plots import save_png
from generator.progress import Progress
from generator.runs import outcome
from generator.slurm import SlurmRun
from generator.checks import field_kind, tune_field, validate
from generator.spec import OBJECTIVES, Spec, Tune

POLL_S = 0.25
HEARTBEAT_S = 10  # RDB storages: a trial whose process sent none for 6 of these is failed
MAX_FAILURES_IN_A_ROW = 3
HELD_OUT = "test"  # keys that start with this are test metrics: never read
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def read_json(text: str) -> Any:
    """json.loads without the held-out (test) keys of any object."""
    return json.loads(
        text, object_hook=lambda obj: {k: v for k, v in obj.items() if not k.startswith(HELD_OUT)}
    )


def val_history(run: Path) -> list[dict[str, Any]]:
    """A run's per-epoch records as written so far: `epoch` and the `val_*` fields only."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in lines:
        try:
            record = read_json(line)
        except ValueError:  # torn by a kill mid-write: the lines before it stand
            break
        out.append({k: v for k, v in record.items() if k == "epoch" or k.startswith("val_")})
    return out


def run_status(run: Path) -> str | None:
    try:
        return read_json((run / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def score(history: list[dict[str, Any]], objective: str, target: float) -> float:
    """The objective over the epochs in `history`; epochs_to_target not yet reached counts
    as one epoch more than were run (a lower bound while running, the penalty at the end)."""
    accs = [r["val_acc"] for r in history]
    if objective == "best_val_acc":
        return max(accs)
    if objective == "final_val_acc":
        return accs[-1]
    reached = next((r["epoch"] for r in history if r["val_acc"] >= target), None)
    return float(reached if reached is not None else len(history) + 1)


# --- settings, storage, study ------------------------------------------------------------


@dataclass
class Settings:
    """One `perturbgen tune` invocation, resolved."""

    spec_path: Path
    spec: Spec
    doc: Located
    overrides: list[str]
    tune: Tune
    out: Path
    study_name: str
    storage: str | None  # None: DIR/study.db
    workers: int
    resources: slurm.Resources | None = None  # None: local processes; else Slurm tasks

    @property
    def epochs(self) -> int:
        return self.tune.epochs or self.spec.train.epochs

    @property
    def seeds(self) -> list[int]:
        return [self.spec.seed + k for k in range(self.tune.seeds)]

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.tune.objective]

    def fingerprint(self) -> str:
        """What must match for a rerun to continue a study: all but the budget."""
        tune = self.tune.model_dump(mode="json", exclude={"trials"})
        text = json.dumps({"spec": spec_hash(self.spec), "tune": tune}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def compared(self) -> dict[str, Any]:
        """What the fingerprint covers, as values: a refusal shows what differs."""
        return {
            "spec": self.spec.model_dump(mode="json", exclude={"extends"}),
            "tune": self.tune.model_dump(mode="json", exclude={"trials"}),
        }


def settings(
    spec: Spec,
    doc: Located,
    spec_path: Path,
    overrides: list[str],
    trials: int | None,
    workers: int,
    storage: str | None,
    study: str | None,
    out: Path | None,
    resources: slurm.Resources | None = None,
) -> Settings:
    if spec.tune is None:
        raise SpecErrors(
            [SpecError(str(spec_path), None, "tune", "the spec has no tune section to run")]
        )
    tune = spec.tune if trials is None else spec.tune.model_copy(update={"trials": trials})
    name = study or f"{spec.name}-{tune.arm}"
    folder = out or Path("tune") / f"{spec.name}_{tune.arm}"
    return Settings(
        spec_path, spec, doc, list(overrides), tune, folder, name, storage, workers, resources
    )


def distributions(s: Settings) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space as Optuna distributions, in a fixed order."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, dim in sorted(s.tune.space.items()):
        section, name = tune_field(s.spec, key)
        if dim.choices is not None:
            out[key] = optuna.distributions.CategoricalDistribution(dim.choices)
        elif field_kind(type(section).model_fields[name].annotation) == "int":
            out[key] = optuna.distributions.IntDistribution(
                dim.low, dim.high, log=dim.log, step=dim.step or 1
            )
        else:
            out[key] = optuna.distributions.FloatDistribution(
                float(dim.low), float(dim.high), log=dim.log, step=dim.step
            )
    return out


def open_storage(s: Settings) -> tuple[Any, Path | None, str]:
    """(the storage, the local file it lives in or None, its URL as shown to people)."""
    url = s.storage or f"sqlite:///{(s.out / 'study.db').resolve()}"
    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:")).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.JournalStorage(backend), path, url
        if "://" not in url:
            raise ValueError("expected an Optuna storage URL or journal:FILE")
        from sqlalchemy.engine import make_url

        shown = make_url(url).render_as_string(hide_password=True)
        local = None
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite:///"):
            local = Path(url.removeprefix("sqlite:///")).resolve()
            local.parent.mkdir(parents=True, exist_ok=True)
            kwargs = {"connect_args": {"timeout": 60}}  # several processes take turns
        with file_lock(local):  # two processes creating one database's tables collide
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=6 * HEARTBEAT_S,
            )
        return storage, local, shown
    except Exception as exc:  # sqlalchemy and the drivers raise many types
        message = f"cannot open {url!r}: {exc}".splitlines()[0]
        raise SpecErrors([SpecError("--storage", None, "", message)]) from None


@contextlib.contextmanager
def file_lock(storage_file: Path | None):
    """An exclusive lock beside a storage file (none for a server's database)."""
    if storage_file is None:
        yield
        return
    with exclusive(Path(f"{storage_file}.claims")):  # not .lock: a journal uses that one
        yield


@contextlib.contextmanager
def exclusive(path: Path):
    """An exclusive flock on `path` (created if missing), held for the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def make_pruner(s: Settings) -> optuna.pruners.BasePruner:
    if s.tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=s.tune.startup_trials, n_warmup_steps=s.tune.warmup_epochs
        )
    if s.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, s.tune.warmup_epochs), max_resource=s.epochs
        )
    return optuna.pruners.NopPruner()


def sampler(s: Settings, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """TPE seeded from the spec seed and the trial's number: a serial tune is reproducible,
    and a resumed or second process does not replay the first one's random start."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=(s.spec.seed * 1_000_003 + trials_so_far) % 2**32, constant_liar=True
        )


# --- one trial -----------------------------------------------------------------------------


def _owner() -> str:
    """host:pid:start time of this process (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the name


def _alive(owner: str) -> bool:
    """Whether the process that wrote `owner` still runs; True when that cannot be told."""
    host, pid, started = (owner.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started in ("?", _start_time(int(pid)))


def run_command(script: Path, run: Path, seed: int, epochs: int) -> list[str]:
    command = [sys.executable, str(script), "--seed", str(seed), "--out", str(run)]
    return command + ["--epochs", str(epochs)]


def launch(
    script: Path, run: Path, seed: int, epochs: int, threads: int, folders: list[str] = ()
) -> subprocess.Popen:
    """One run of a generated script, as its own process (and session: Ctrl-C reaches the
    tuner, which stops its runs itself); it gets SIGTERM if the tuner dies, so no run
    outlives a killed tune; `folders` (the spec's) go first on its PYTHONPATH."""
    run.mkdir(parents=True, exist_ok=True)
    command = run_command(script, run, seed, epochs)
    env = {**os.environ, **thread_env(threads), **python_path(folders)}
    with open(run / "train.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.Popen(
            forkserver.guarded(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def stop(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM: each run finishes its step, checkpoints and exits 143; then wait."""
    stop_processes(procs, grace_s)


@dataclass
class Running:
    """A trial this process runs: its runs (one per seed) and what was reported of them."""

    trial: optuna.Trial
    folder: Path
    runs: list[Path]
    procs: list[subprocess.Popen | SlurmRun]
    started: float = field(default_factory=time.time)
    epoch: int = 0  # epochs reported to Optuna
    value: float | None = None  # the latest reported value
    beat: float = 0.0

    @property
    def number(self) -> int:
        return self.trial.number


def cancel_tasks(folder: Path) -> None:
    """scancel the Slurm tasks a lost trial left behind (a tuner killed without Ctrl-C)."""
    if (folder / slurm.RECORD).exists():
        with contextlib.suppress(slurm.SlurmError):
            launcher = slurm.Launcher(folder, slurm.Resources())
            launcher.cancel(list(launcher.record["tasks"]))


# --- the study -----------------------------------------------------------------------------


class Tuner:
    def __init__(self, s: Settings, show: Callable[[str], None]):
        self.s = s
        self.show = show
        self.space = distributions(s)
        self.owner = _owner()
        self.storage, self.local, self.shown_storage = open_storage(s)
        self.failures_in_row = 0
        s.out.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with self.lock():
            self.study = optuna.create_study(
                storage=self.storage,
                study_name=s.study_name,
                direction=s.direction,
                pruner=make_pruner(s),
                load_if_exists=True,
            )
            made_from = self.study.user_attrs.get("fingerprint")
            if made_from is None:
                self.study.set_user_attr("fingerprint", s.fingerprint())
                self.study.set_user_attr("spec", str(s.spec_path))
                self.study.set_user_attr("settings", s.compared())
            elif made_from != s.fingerprint():
                before = self.study.user_attrs.get("settings")  # none in studies made earlier
                shown = "; ".join(changes(before, s.compared())) if before else ""
                raise SpecErrors(
                    [
                        SpecError(
                            str(s.spec_path),
                            None,
                            "tune",
                            f"study {s.study_name!r} in {self.shown_storage} was made from "
                            f"another spec or search space{f' ({shown})' if shown else ''}; "
                            "use another --study or -o",
                        )
                    ]
                )

    def lock(self):
        """Processes on this machine that share a file storage claim trials in turn."""
        return file_lock(self.local)

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def counts(self, trials=None) -> dict[str, int]:
        trials = self.trials() if trials is None else trials
        states = [t.state for t in trials]
        return {
            "complete": states.count(TrialState.COMPLETE),
            "pruned": states.count(TrialState.PRUNED),
            "failed": states.count(TrialState.FAIL),
            "running": states.count(TrialState.RUNNING),
        }

    def reap(self, mine: list[Running]) -> None:
        """Fail the running trials whose process is gone (killed tune, lost machine)."""
        with contextlib.suppress(Exception):  # a storage without heartbeats: nothing to do
            optuna.storages.fail_stale_trials(self.study)
        own = {r.number for r in mine}
        me = f"{socket.gethostname()}:{os.getpid()}:"
        for t in self.trials():
            owner = t.user_attrs.get("owner", "")
            if t.state != TrialState.RUNNING or t.number in own or not owner:
                continue
            if owner.startswith(me) or not _alive(owner):  # mine but not running: a crash
                self.finish(optuna.Trial(self.study, t._trial_id), TrialState.FAIL, "lost")
                cancel_tasks(Path(t.user_attrs.get("folder", "")))

    def finish(self, trial, state, outcome: str, value=None, reason: str = "") -> None:
        trial.set_user_attr("outcome", outcome)
        if reason:
            trial.set_user_attr("reason", reason)
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)

    def claim(self) -> Running | None | bool:
        """Start a trial: a Running, None if the sample was invalid (pruned at once) or its
        folder is another process's (failed at once), False
        if the budget is claimed (finished and running trials reach it)."""
        with self.lock():
            trials = self.trials()
            taken = sum(t.state in (*FINISHED, TrialState.RUNNING) for t in trials)
            if taken >= self.s.tune.trials:
                return False
            self.study.sampler = sampler(self.s, len(trials))
            trial = self.study.ask(self.space)
            trial.set_user_attr("owner", self.owner)
        if self.local is None:  # no lock across machines: a trial past the budget stands down
            ahead = [
                t
                for t in self.trials()
                if t.number < trial.number and t.state in (*FINISHED, TrialState.RUNNING)
            ]
            if len(ahead) >= self.s.tune.trials:
                self.finish(trial, TrialState.FAIL, "surplus", reason="the budget was claimed")
                return False
        folder = self.s.out / "trials" / self.s.study_name / f"{trial.number:04d}"
        trial.set_user_attr("folder", str(folder))
        runs = [folder / f"seed{seed}" for seed in self.s.seeds]
        held = [f"{run} is in use by {who}" for run in runs if (who := lock_holder(run))]
        if held:  # another study's trial in the same folder: its process owns it, we touch none
            self.finish(trial, TrialState.FAIL, "failed", reason=held[0])
            self.show(f"trial {trial.number}: not started: {held[0]}")
            return None
        doc = self.s.doc
        for key, value in sorted(trial.params.items()):
            doc = merge(doc, parse_override(f"{key}={json.dumps(value)}"))
        try:
            spec = validate(doc, str(self.s.spec_path))
        except SpecErrors as exc:
            reason = str(exc.errors[0])
            self.finish(trial, TrialState.PRUNED, "invalid", reason=reason)
            self.show(f"trial {trial.number}: invalid sample, pruned: {reason}")
            return None
        rendered = render(spec, doc, self.s.spec_path, [self.s.tune.arm])
        write_folder(Rendered("scripts", rendered.files), folder)
        script = folder / "scripts" / f"train_{self.s.tune.arm}.py"
        try:
            procs = self.start(trial.number, folder, script, runs)
        except slurm.SlurmError as exc:
            self.finish(trial, TrialState.FAIL, "failed", reason=str(exc))
            raise
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(trial.params.items()))
        self.show(f"trial {trial.number}: start ({params})")
        return Running(trial, folder, runs, procs)

    def start(self, number: int, folder: Path, script: Path, runs: list[Path]) -> list:
        """A trial's runs: local processes, or one Slurm job array (a task per seed, with
        --resume auto so that a requeued task continues) whose record is folder/slurm.json."""
        seeds, epochs, resources = self.s.seeds, self.s.epochs, self.s.resources
        folders = spec_folders(self.s.doc)
        if resources is None:
            threads = max(1, (os.cpu_count() or 1) // (len(seeds) * self.s.workers))
            return [
                launch(script, run, seed, epochs, threads, folders)
                for run, seed in zip(runs, seeds)
            ]
        name = f"pgen-tune-{self.s.study_name}-{number}"
        launcher = slurm.Launcher(folder, resources, name=name)
        env = {**thread_env(resources.cpus_per_run), **python_path(folders)}
        tasks = [
            slurm.Task(
                f"trial{number}/seed{seed}",
                run_command(script, run, seed, epochs) + ["--resume", "auto"],
                run,
                env,
            )
            for run, seed in zip(runs, seeds)
        ]
        return slurm.Slurm(launcher).start(tasks)

    def follow(self, r: Running) -> bool:
        """Report the new epochs of a trial; stop it if pruned; True once it has ended."""
        codes = [p.poll() for p in r.procs]
        histories = [val_history(run) for run in r.runs]
        target = self.s.spec.train.target_accuracy
        pruning = self.s.tune.pruner != "none" and None in codes
        while r.epoch < min(len(h) for h in histories):
            r.epoch += 1
            r.value = statistics.fmean(
                score(h[: r.epoch], self.s.tune.objective, target) for h in histories
            )
            r.trial.report(r.value, r.epoch)
            if pruning and r.trial.should_prune():
                stop(r.procs)
                self.finish(r.trial, TrialState.PRUNED, "pruned", reason=f"epoch {r.epoch}")
                self.show(f"trial {r.number}: pruned at epoch {r.epoch} ({_fmt(r.value)})")
                return self.ended(r)
        bad = [c for c in codes if c not in (None, 0)]
        if not bad and None in codes:
            if time.time() - r.beat > HEARTBEAT_S:  # RDB storages: this trial's process lives
                with contextlib.suppress(Exception):
                    self.storage.record_heartbeat(r.trial._trial_id)
                r.beat = time.time()
            return False
        stop(r.procs)  # a failed seed ends its trial
        outcomes = [outcome(code, run_status(run)) for code, run in zip(codes, r.runs)]
        if all(o == "completed" for o in outcomes) and r.epoch == self.s.epochs:
            self.failures_in_row = 0
            self.finish(r.trial, TrialState.COMPLETE, "completed", value=r.value)
            self.show(f"trial {r.number}: {self.s.tune.objective} {_fmt(r.value)}")
        elif "diverged" in outcomes:  # a bad region, a result: not a failure
            self.failures_in_row = 0
            self.finish(r.trial, TrialState.PRUNED, "diverged", reason="non-finite loss")
            self.show(f"trial {r.number}: diverged, pruned")
        else:
            self.failures_in_row += 1
            logs = ", ".join(str(run / "train.log") for run in r.runs)
            reason = f"exit codes {[p.returncode for p in r.procs]}; logs: {logs}"
            reason += "".join(f"; {p.note}" for p in r.procs if getattr(p, "note", ""))
            self.finish(r.trial, TrialState.FAIL, "failed", reason=reason)
            self.show(f"trial {r.number}: failed ({reason}); it does not count")
        return self.ended(r)

    def ended(self, r: Running) -> bool:
        for run in r.runs:  # only a resume reads last.pt, and trials are never resumed
            with contextlib.suppress(OSError):
                (run / "last.pt").unlink()
        return True

    def run(self, on_poll: Callable[[Tuner, list[Running]], None]) -> str:
        """Run trials until the study holds the budget; the reason it stopped."""
        mine: list[Running] = []
        try:
            while True:
                self.reap(mine)
                budget_left = True
                while len(mine) < self.s.workers and budget_left:
                    if self.failures_in_row >= MAX_FAILURES_IN_A_ROW:
                        budget_left = False
                    elif (started := self.claim()) is False:
                        budget_left = False
                    elif started is not None:  # None: an invalid sample, pruned at once
                        mine.append(started)
                if not mine and not budget_left:
                    break
                mine = [r for r in mine if not self.follow(r)]
                on_poll(self, mine)
                if mine:
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            stop([p for r in mine for p in r.procs])
            for r in mine:
                self.finish(r.trial, TrialState.FAIL, "interrupted")
            raise
        if self.failures_in_row >= MAX_FAILURES_IN_A_ROW:
            return "failures"
        counts = self.counts()
        if counts["complete"] + counts["pruned"] < self.s.tune.trials:
            return "others"  # the rest of the budget runs in other processes
        return "done"


# --- outputs -----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summarize(tuner: Tuner) -> dict[str, Any]:
    s, study = tuner.s, tuner.study
    trials = sorted(tuner.trials(), key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    rows = []
    for t in trials:
        end = t.datetime_complete
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "outcome": t.user_attrs.get("outcome", t.state.name.lower()),
                "reason": t.user_attrs.get("reason", ""),
                "value": t.value,
                "params": dict(sorted(t.params.items())),
                "epochs": max(t.intermediate_values, default=0),
                "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "duration_s": (end - t.datetime_start).total_seconds() if end else None,
                "folder": t.user_attrs.get("folder"),
            }
        )
    ended = [t for t in trials if t.datetime_start and t.datetime_complete]
    span = (
        (max(t.datetime_complete for t in ended) - min(t.datetime_start for t in ended))
        if ended
        else None
    )
    return {
        "spec": str(s.spec_path),
        "spec_name": s.spec.name,
        "arm": s.tune.arm,
        "study": s.study_name,
        "storage": tuner.shown_storage,
        "objective": s.tune.objective,
        "direction": s.direction,
        "budget": {"trials": s.tune.trials, "seeds": s.seeds, "epochs": s.epochs},
        "pruner": s.tune.pruner,
        "space": {k: v.model_dump(exclude_none=True) for k, v in sorted(s.tune.space.items())},
        "counts": tuner.counts(trials),
        "trial_seconds": sum(r["duration_s"] or 0.0 for r in rows),
        "span_seconds": span.total_seconds() if span else None,
        "best": (
            {
                "number": best.number,
                "value": best.value,
                "params": dict(sorted(best.params.items())),
            }
            if best
            else None
        ),
        "importances": _importances(study, len(complete)),
        "trials": rows,
    }


def _importances(study: optuna.Study, complete: int) -> dict[str, float] | None:
    if complete < 2 or len(study.best_trial.params) < 1:
        return None
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None


def tuned_yaml(tuner: Tuner, info: dict[str, Any]) -> str:
    """A spec that extends the tuned one and sets the best values (and the run's --set ones)."""
    s, best = tuner.s, info["best"]
    values = Located({})
    for text in s.overrides:
        values = merge(values, parse_override(text))
    for key, value in best["params"].items():
        values = merge(values, parse_override(f"{key}={json.dumps(value)}"))
    spec_file, out = s.spec_path.resolve(), s.out.resolve()
    related = os.path.commonpath([spec_file, out]) != os.path.sep  # else the absolute path
    parent = os.path.relpath(spec_file, out) if related else str(spec_file)
    seeds = ", ".join(map(str, s.seeds))
    header = (
        f"# Made by `perturbgen tune` (study {s.study_name}): the best of "
        f"{info['counts']['complete']} completed trials,\n"
        f"# trial {best['number']}: {s.tune.objective} {_fmt(best['value'])} ({s.direction}d), "
        f"the mean over seeds {seeds} at {s.epochs} epochs.\n"
        "# Tuning picked these values on those seeds: compare arms on fresh ones, e.g.\n"
        f"# perturbgen ablate THIS_FILE --set seed={s.spec.seed + 100}\n"
    )
    body = yaml.safe_dump({"extends": parent, **values.data}, sort_keys=False)
    return header + body


def write_outputs(tuner: Tuner) -> dict[str, Any]:
    """DIR/tune.json, DIR/tune_report.md, DIR/plots/ and, once a trial completed, tuned.yaml.

    Under a lock in DIR: processes that share the study write them one at a time, each from
    the storage as it is then, so that the last writer leaves the latest state."""
    from generator.render import load_spec

    out = tuner.s.out
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".outputs.lock"):
        info = summarize(tuner)
        if info["best"] is not None:
            text = tuned_yaml(tuner, info)
            atomic_write(out / "tuned.yaml", text)
            load_spec(out / "tuned.yaml")  # it must be a valid spec: a failure here is a bug
        info["plots"] = _plots(tuner.study, out / "plots", info["counts"]["complete"])
        atomic_write(out / "tune.json", json.dumps(info, indent=2) + "\n")
        atomic_write(out / "tune_report.md", report_markdown(info))
    return info


def _plots(study: optuna.Study, folder: Path, complete: int) -> dict[str, str]:
    """Optuna's matplotlib plots, by file name; each one that cannot be drawn is skipped."""
    if complete < 1:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    plots = {
        "optimization_history.png": ("optimization history", ovm.plot_optimization_history),
        "slice.png": ("each parameter against the objective", ovm.plot_slice),
        "parallel_coordinate.png": ("parallel coordinates", ovm.plot_parallel_coordinate),
    }  # the importances are a table in the report; each plot costs about a second
    made = {}
    for name, (title, draw) in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        save_png(figure, folder / name, dpi=100)
        plt.close(figure)
        made[name] = title
    return made


def report_markdown(info: dict[str, Any]) -> str:
    counts, budget, best = info["counts"], info["budget"], info["best"]
    params = list(info["space"])
    lines = [
        f"# Tuning `{info['spec_name']}`, arm `{info['arm']}`",
        "",
        f"Study `{info['study']}` in `{info['storage']}`, from `{info['spec']}`. Objective: "
        f"`{info['objective']}` ({info['direction']}d) on the validation split, the mean over "
        f"seeds {budget['seeds']} at {budget['epochs']} epochs per run; TPE sampler, "
        f"{info['pruner']} pruner. The tuner reads validation metrics only: no test value "
        "reaches the objective, the pruner or this report.",
        "",
        f"Trials: {counts['complete'] + counts['pruned']} finished of a budget of "
        f"{budget['trials']} ({counts['complete']} completed, {counts['pruned']} pruned), "
        f"{counts['failed']} failed or interrupted (not counted), {counts['running']} running. "
        f"Time in trials: {info['trial_seconds']:.0f} s"
        + (
            f"; first start to last end: {info['span_seconds']:.0f} s."
            if info["span_seconds"] is not None
            else "."
        ),
        "",
        "## Best trial",
        "",
    ]
    if best is None:
        lines.append("No trial has completed yet.")
    else:
        lines += [
            f"Trial {best['number']}: `{info['objective']}` = {_fmt(best['value'])}. "
            "`tuned.yaml` is the spec with these values:",
            "",
            "| parameter | value |",
            "|---|---|",
            *(f"| `{k}` | {_fmt(v)} |" for k, v in best["params"].items()),
        ]
    lines += ["", "## Parameter importances", ""]
    if info["importances"] is None:
        lines.append("Not computed: it needs at least two completed trials.")
    else:
        lines += [
            "PED-ANOVA over the completed trials (Optuna's default); they sum to 1.",
            "",
            "| parameter | importance |",
            "|---|---|",
            *(f"| `{k}` | {v:.3f} |" for k, v in info["importances"].items()),
        ]
    if info.get("plots"):
        lines += ["", "## Plots", ""]
        lines += [f"![{title}](plots/{name})" for name, title in info["plots"].items()]
    lines += [
        "",
        "## Trials",
        "",
        "| # | state | value | epochs | seconds | "
        + " | ".join(f"`{p}`" for p in params)
        + " | note |",
        "|---" * (len(params) + 6) + "|",
    ]
    for row in info["trials"]:
        cells = [
            str(row["number"]),
            row["outcome"],
            "-" if row["value"] is None else _fmt(row["value"]),
            str(row["epochs"]),
            "-" if row["duration_s"] is None else f"{row['duration_s']:.0f}",
            *(_fmt(row["params"][p]) if p in row["params"] else "-" for p in params),
            row["reason"].replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- progress ------------------------------------------------------------------------------


class Display(Progress):
    """A live table of the running trials on a terminal (ablate's display); plain lines
    otherwise."""

    def __init__(self, s: Settings):
        super().__init__(s.tune.trials)
        self.s = s

    def line(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def poll(self, tuner: Tuner, mine: list[Running]) -> None:
        if self.live is None:
            return
        from rich.table import Table

        trials = tuner.trials()
        counts = tuner.counts(trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = tuner.study.best_trial if complete else None
        title = (
            f"{counts['complete'] + counts['pruned']}/{self.s.tune.trials} trials "
            f"({counts['complete']} completed, {counts['pruned']} pruned, "
            f"{counts['failed']} failed)"
            + (f"; best {_fmt(best.value)} (trial {best.number})" if best else "")
        )
        table = Table(title=title)
        for column in ("trial", "epoch", self.s.tune.objective, "time"):
            table.add_column(column)
        for r in mine:
            value = "-" if r.value is None else _fmt(r.value)
            elapsed = f"{time.time() - r.started:.0f}s"
            table.add_row(str(r.number), f"{r.epoch}/{self.s.epochs}", value, elapsed)
        self.live.update(table)


def tune(s: Settings) -> tuple[str, dict[str, Any]]:
    """Run the study to its budget and write its outputs: (why it stopped, tune.json's data).
    Ctrl-C (KeyboardInterrupt) stops the running trials, marks them failed, writes the
    outputs and re-raises."""
    with warnings.catch_warnings(), Display(s) as display:
        # Optuna warns that heartbeats and ask/tell are experimental together: they work
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        warnings.filterwarnings("ignore", "Target and region quantiles", UserWarning)
        tuner = Tuner(s, display.line)
        display.line(
            f"study {s.study_name} in {tuner.shown_storage}: {s.tune.trials} trials of "
            f"{s.tune.arm} ({len(s.seeds)} seed(s), {s.epochs} epochs), "
            f"{s.workers} at a time"
        )
        try:
            why = tuner.run(display.poll)
        finally:
            info = write_outputs(tuner)
    return why, info
