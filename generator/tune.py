"""perturbgen tune: every arm of a spec's `tune:` section tuned with Optuna, the same number of
finished trials each, then each arm's best values run on fresh seeds and compared in the
paired report. Every trial is a real run of one arm.

A trial is the spec with the sampled values applied as `--set` overrides and validated like
any spec (an invalid sample is pruned, never run); its arm is generated into the trial's
folder and run as a process per seed, or (`--launcher slurm`) as one Slurm job array with a
task per seed. The tuner follows each run's metrics.jsonl (on a cluster, through the shared
filesystem), reports every epoch's validation value to Optuna, and stops a trial the pruner
rejects (SIGTERM locally, scancel on Slurm).

A trial's runs take --no-test: they evaluate and write no test metric. The tuner reads
validation values only besides: every JSON object is read without its test keys, and of
metrics.jsonl only `epoch` and the `val_*` fields are kept, so no test value can reach the
objective, the pruner or the report.

Layout of a tune folder:
    DIR/study.db                   the default storage (SQLite): a study per arm, NAME-ARM
    DIR/trials/STUDY/NNNN/         one trial: scripts/ (its arm) and seed<S>/ (its runs);
                                   on Slurm also slurm.json (its task ids) and slurm/ (logs)
    DIR/tuned/ARM.yaml             per arm, the spec that extends the original with its best
                                   values (and every --set given to tune)
    DIR/tune_report.md, tune.json  the studies and their budget curves, for people and machines
    DIR/plots/                     budget_curves.png; ARM/: Optuna's plots of each study
    DIR/runs/ARM/seed<S>/          each arm's best values on the fresh seeds (test touched once)
    DIR/report/                    the paired report of those runs (report.md, report.json)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from generator import forkserver, slurm, stats
from generator.ablate import lock_holder, thread_env
from generator.checks import arm_space, field_kind, tune_field, validate
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
from generator.spec import OBJECTIVES, QUESTIONS, SearchDim, Spec, Tune, arm_kind, arm_spec

POLL_S = 0.25
HEARTBEAT_S = 10  # RDB storages: a trial whose process sent none for 6 of these is failed
MAX_FAILURES_IN_A_ROW = 3
HELD_OUT = "test"  # keys that start with this are test metrics: never read
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ZERO = ":zero"  # the on/off switch of a range with zero: true; its value True means 0
NO_TEST = "--no-test"  # a trial's runs evaluate and write no test metric
EDGE = 0.02  # a best value within this share of its range (log range: in log space) of a bound


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
    arm: str = ""  # the arm this study tunes ("" for the whole invocation)
    space: dict[str, SearchDim] = field(default_factory=dict)  # that arm's knobs
    fixed: dict[str, Any] = field(default_factory=dict)  # values another study chose for it

    @property
    def epochs(self) -> int:
        return self.tune.epochs or self.spec.train.epochs

    @property
    def seeds(self) -> list[int]:
        return [self.spec.seed + k for k in range(self.tune.seeds)]

    @property
    def fresh_seeds(self) -> list[int]:
        """The seeds of the final comparison: after the tuning seeds, so never one of them."""
        start = self.spec.seed + self.tune.seeds
        return [start + k for k in range(self.tune.fresh_seeds)]

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.tune.objective]

    def fingerprint(self) -> str:
        """What must match for a rerun to continue a study: all but the budget and the
        arms and fresh seeds of the whole comparison."""
        text = json.dumps({**self.compared(), "spec": spec_hash(self.spec)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def compared(self) -> dict[str, Any]:
        """What the fingerprint covers, as values: a refusal shows what differs."""
        return {
            "spec": self.spec.model_dump(mode="json", exclude={"extends"}),
            "tune": self.tune.model_dump(
                mode="json", exclude={"trials", "arms", "fresh_seeds", "arm_space", "space"}
            ),
            "arm": self.arm,
            "space": {k: v.model_dump(mode="json") for k, v in self.space.items()},
            "fixed": self.fixed,
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
    name = study or spec.name
    folder = out or Path("tune") / spec.name
    return Settings(
        spec_path, spec, doc, list(overrides), tune, folder, name, storage, workers, resources
    )


def for_arm(s: Settings, arm: str, fixed: dict[str, Any]) -> Settings:
    """One arm's study: its knobs, the values fixed for it, and the study NAME-ARM."""
    space = arm_space(s.spec, arm)
    name = f"{s.study_name}-{arm}"
    return dataclasses.replace(s, arm=arm, space=space, fixed=fixed, study_name=name)


def order(tune: Tune) -> list[str]:
    """The arms in the order they are tuned: baseline first when the others build on it."""
    if tune.question == "added_to_tuned_baseline":
        return ["baseline", *(a for a in tune.arms if a != "baseline")]
    return list(tune.arms)


def values(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters as spec values: a range whose zero switch is on is 0."""
    out = {k: v for k, v in params.items() if not k.endswith(ZERO)}
    out.update({k.removesuffix(ZERO): 0.0 for k, v in params.items() if k.endswith(ZERO) and v})
    return dict(sorted(out.items()))


def arm_overrides(s: Settings, chosen: dict[str, Any]) -> list[str]:
    """--set texts that give the arm these values: an extra baseline's go to its override."""
    prefix = "" if s.arm in s.spec.variants else f"baselines.{s.arm.removeprefix('baseline_')}."
    return [f"{prefix}{key}={json.dumps(value)}" for key, value in sorted(chosen.items())]


def distributions(s: Settings) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space as Optuna distributions, in a fixed order; a range with zero: true
    gets an on/off switch KEY:zero beside it."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    spec = arm_spec(s.spec, s.arm)
    for key, dim in sorted(s.space.items()):
        section, name = tune_field(spec, key)
        if dim.zero:
            out[key + ZERO] = optuna.distributions.CategoricalDistribution([False, True])
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
        if s.storage is None:  # the default: as the -o given, not this machine's absolute path
            shown = str(s.out / "study.db")
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


def prune_from(s: Settings) -> int:
    """The first epoch at which a trial may be pruned: none before tune.prune_after of them."""
    return max(1, math.ceil(s.tune.prune_after * s.epochs))


def make_pruner(s: Settings) -> optuna.pruners.BasePruner:
    if s.tune.pruner == "median":  # Optuna prunes from step n_warmup_steps on
        return optuna.pruners.MedianPruner(
            n_startup_trials=s.tune.startup_trials, n_warmup_steps=prune_from(s)
        )
    if s.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=prune_from(s), max_resource=s.epochs)
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
    return command + ["--epochs", str(epochs), NO_TEST]


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
    procs: list[subprocess.Popen | slurm.SlurmRun]
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

    def trial_id(self, number: int) -> int:
        """The storage's id of a trial of this study (Optuna's public storage API)."""
        study_id = self.storage.get_study_id_from_name(self.s.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

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
                lost = optuna.Trial(self.study, self.trial_id(t.number))
                self.finish(lost, TrialState.FAIL, "lost")
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
        for text in arm_overrides(self.s, {**self.s.fixed, **values(trial.params)}):
            doc = merge(doc, parse_override(text))
        try:
            spec = validate(doc, str(self.s.spec_path))
        except SpecErrors as exc:
            reason = str(exc.errors[0])
            self.finish(trial, TrialState.PRUNED, "invalid", reason=reason)
            self.show(f"trial {trial.number}: invalid sample, pruned: {reason}")
            return None
        rendered = render(spec, doc, self.s.spec_path, [self.s.arm])
        write_folder(Rendered("scripts", rendered.files), folder)
        script = folder / "scripts" / f"train_{self.s.arm}.py"
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
            if pruning and r.epoch < self.s.epochs and r.trial.should_prune():  # not the last
                stop(r.procs)
                self.finish(r.trial, TrialState.PRUNED, "pruned", reason=f"epoch {r.epoch}")
                self.show(f"trial {r.number}: pruned at epoch {r.epoch} ({_fmt(r.value)})")
                return self.ended(r)
        bad = [c for c in codes if c not in (None, 0)]
        if not bad and None in codes:
            if time.time() - r.beat > HEARTBEAT_S:  # RDB storages: this trial's process lives
                with contextlib.suppress(Exception):
                    self.storage.record_heartbeat(self.trial_id(r.number))
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


def trial_score(row: dict[str, Any], direction: str, epochs: int) -> float | None:
    """A finished trial's score on its budget curve: a completed trial's value; a pruned one's
    last reported value (where it was stopped), or, with none (an invalid sample or a
    divergence), the worst value there is; None for a trial that does not count."""
    if row["state"] == "complete":
        return row["value"]
    if row["state"] != "pruned":
        return None
    reported = row["intermediate"]
    if reported:
        return reported[max(reported, key=int)]
    return 0.0 if direction == "maximize" else float(epochs + 1)


def edges(space: dict[str, SearchDim], chosen: dict[str, Any]) -> dict[str, str]:
    """The chosen values at an edge of their range ("low" or "high"): within EDGE of the
    range from a bound (in log space for a log range); 0 from a zero switch is no edge."""
    out = {}
    for key, dim in sorted(space.items()):
        value = chosen.get(key)
        if dim.choices is not None or value is None or (dim.zero and value == 0):
            continue
        scale = math.log if dim.log else float
        low, high, x = scale(dim.low), scale(dim.high), scale(value)
        share = (x - low) / (high - low)
        if share <= EDGE:
            out[key] = "low"
        elif share >= 1 - EDGE:
            out[key] = "high"
    return out


def summarize(tuner: Tuner) -> dict[str, Any]:
    """One arm's study: counts, best trial, every trial, and its budget curve's scores."""
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
                "params": values(t.params),
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
    scores = [trial_score(r, s.direction, s.epochs) for r in rows]
    chosen = values(best.params) if best else {}
    return {
        "arm": s.arm,
        "study": s.study_name,
        "space": {k: v.model_dump(exclude_none=True) for k, v in s.space.items()},
        "fixed": s.fixed,
        "counts": tuner.counts(trials),
        "trial_seconds": sum(r["duration_s"] or 0.0 for r in rows),
        "span_seconds": span.total_seconds() if span else None,
        "best": ({"number": best.number, "value": best.value, "params": chosen} if best else None),
        "edges": edges(s.space, chosen),
        "importances": _importances(study, len(complete)),
        "scores": [x for x in scores if x is not None],
        "trials": rows,
    }


def _importances(study: optuna.Study, complete: int) -> dict[str, float] | None:
    if complete < 2 or len(study.best_trial.params) < 1:
        return None
    try:
        found = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
    return {k: float(v) for k, v in found.items()}


def budget_curves(arms: dict[str, dict[str, Any]], direction: str) -> dict[str, Any]:
    """Per arm with scores: the expected best value after k = 1..N trials and its 95 %
    bootstrap band (for a minimized objective, the expected lowest)."""
    sign = 1.0 if direction == "maximize" else -1.0
    out = {}
    for arm, info in arms.items():
        scores = [sign * x for x in info["scores"]]
        if not scores:
            continue
        low, high = stats.expected_max_band(scores)
        out[arm] = {
            "n": len(scores),
            "expected": [sign * x for x in stats.expected_max(scores)],
            "low": [sign * x for x in (low if sign > 0 else high)],
            "high": [sign * x for x in (high if sign > 0 else low)],
        }
    return out


def ranking(curves: dict[str, Any], direction: str) -> dict[str, Any] | None:
    """The arms ranked by expected best at the largest budget all of them reached, and the
    budgets k at which the ranking of the point estimates is another one."""
    if len(curves) < 2:
        return None
    top = min(c["n"] for c in curves.values())

    def ranked(k: int) -> list[str]:
        return sorted(
            curves, key=lambda a: curves[a]["expected"][k - 1], reverse=direction == "maximize"
        )

    final = ranked(top)
    leads = [k for k in range(1, top + 1) if ranked(k)[0] != final[0]]
    return {
        "k": top,
        "order": final,
        "differs_at": [k for k in range(1, top) if ranked(k) != final],
        "leader_from": max(leads, default=0) + 1,
    }


def tuned_yaml(s: Settings, info: dict[str, Any], path: Path) -> str:
    """A spec that extends the tuned one and sets every --set given to tune, the values fixed
    for this arm (the tuned baseline's, when the method is added to it) and its best ones."""
    best = info["best"]
    doc = Located({})
    chosen = {**s.fixed, **best["params"]}
    for text in [*s.overrides, *arm_overrides(s, chosen)]:
        doc = merge(doc, parse_override(text))
    if "tune" in doc.data:  # a tune: of a child replaces its parent's: the whole one, as run
        doc.data["tune"] = s.doc.data["tune"]
    spec_file, folder = s.spec_path.resolve(), path.parent.resolve()
    related = os.path.commonpath([spec_file, folder]) != os.path.sep  # else the absolute path
    parent = os.path.relpath(spec_file, folder) if related else str(spec_file)
    seeds = ", ".join(map(str, s.seeds))
    header = (
        f"# Made by `perturbgen tune` (study {s.study_name}): arm {s.arm}, the best of "
        f"{info['counts']['complete']} completed trials,\n"
        f"# trial {best['number']}: {s.tune.objective} {_fmt(best['value'])} ({s.direction}d), "
        f"the mean over seeds {seeds} at {s.epochs} epochs.\n"
        "# Tuning picked these values on those seeds: compare arms on fresh ones (tune does).\n"
    )
    body = yaml.safe_dump({"extends": parent, **doc.data}, sort_keys=False)
    return header + body


def write_outputs(s: Settings, tuners: dict[str, Tuner]) -> dict[str, Any]:
    """DIR/tune.json, DIR/tune_report.md, DIR/plots/ and, per arm with a completed trial,
    DIR/tuned/ARM.yaml.

    Under a lock in DIR: processes that share the studies write them one at a time, each from
    the storage as it is then, so that the last writer leaves the latest state."""
    from generator.render import load_spec

    out = s.out
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".outputs.lock"):
        arms = {}
        for arm, tuner in tuners.items():
            info = arms[arm] = summarize(tuner)
            info["tuned"] = None
            if info["best"] is not None:
                path = out / "tuned" / f"{arm}.yaml"
                path.parent.mkdir(exist_ok=True)
                atomic_write(path, tuned_yaml(tuner.s, info, path))
                load_spec(path)  # it must be a valid spec: a failure here is a bug
                info["tuned"] = f"tuned/{arm}.yaml"
            complete = info["counts"]["complete"]
            info["plots"] = _plots(tuner.study, out / "plots" / arm, complete)
        curves = budget_curves(arms, s.direction)
        shown = next(iter(tuners.values())).shown_storage if tuners else None
        combined = {
            "spec": str(s.spec_path),
            "spec_name": s.spec.name,
            "question": s.tune.question,
            "storage": shown,
            "objective": s.tune.objective,
            "direction": s.direction,
            "budget": {
                "trials": s.tune.trials,
                "seeds": s.seeds,
                "epochs": s.epochs,
                "fresh_seeds": s.fresh_seeds,
            },
            "pruner": s.tune.pruner,
            "prune_from": prune_from(s) if s.tune.pruner != "none" else None,
            "arms": arms,
            "curves": curves,
            "ranking": ranking(curves, s.direction),
            "budget_plot": None,
        }
        if curves:
            _budget_plot(combined, out / "plots" / "budget_curves.png")
            combined["budget_plot"] = "plots/budget_curves.png"
        atomic_write(out / "tune.json", json.dumps(combined, indent=2) + "\n")
        atomic_write(out / "tune_report.md", report_markdown(combined))
    return combined


def _budget_plot(info: dict[str, Any], path: Path) -> None:
    """The budget curves of every arm in one plot, each with its bootstrap band."""
    from generator.plots import pyplot

    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, c in info["curves"].items():
        ks = range(1, c["n"] + 1)
        (line,) = ax.plot(ks, c["expected"], marker=".", label=f"{arm} (N={c['n']})")
        ax.fill_between(ks, c["low"], c["high"], alpha=0.15, color=line.get_color())
    label = info["objective"].replace("_", " ")
    ax.set(
        xlabel="trials k (finished, per arm)",
        ylabel=f"expected best {label}",
        title=f"{info['spec_name']}: expected best after k trials, 95 % bootstrap band",
    )
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plots(study: optuna.Study, folder: Path, complete: int) -> dict[str, str]:
    """Optuna's matplotlib plots, by file name; each one that cannot be drawn is skipped."""
    if complete < 1:
        return {}
    from optuna.visualization import matplotlib as ovm

    from generator.plots import pyplot

    plt = pyplot()
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
        if hasattr(axes, "flat"):  # one panel per parameter: room for each one's labels
            _spread(figure, list(axes.flat))
        save_png(figure, folder / name, dpi=100)
        plt.close(figure)
        made[name] = title
    return made


def _spread(figure: Any, panels: list[Any]) -> None:
    """Optuna's slice plot puts a panel per parameter side by side in a fixed width, so that
    the dotted names and tick labels overprint: give each panel 3.2 inches, wrap the names
    at their dots, label the major ticks only and tilt them."""
    from matplotlib.ticker import NullFormatter

    figure.set_size_inches(3.2 * len(panels) + 2.0, 4.5)
    for ax in panels:
        ax.set_xlabel(ax.get_xlabel().replace(".", ".\n"), fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelrotation=35, labelsize=7)


QUESTION_TEXT = {
    "same_budget": "(a) each arm tuned with the same budget (the benchmark view): every arm "
    "searched the shared knobs and its own",
    "added_to_tuned_baseline": "(b) the method added to a tuned baseline (the ablation view): "
    "baseline tuned first; each method arm searched its own knobs only, on the baseline's "
    "tuned values, with the same budget",
}


def report_markdown(info: dict[str, Any]) -> str:
    budget, arms = info["budget"], info["arms"]
    pruning = (
        "no pruner"
        if info["prune_from"] is None
        else f"{info['pruner']} pruner, no trial pruned before epoch {info['prune_from']}"
    )
    lines = [
        f"# Tuning `{info['spec_name']}`: {', '.join(f'`{a}`' for a in arms)}",
        "",
        f"Question: {QUESTION_TEXT[info['question']]}.",
        "",
        f"From `{info['spec']}`, studies in `{info['storage']}`. Objective: "
        f"`{info['objective']}` ({info['direction']}d) on the validation split, the mean over "
        f"seeds {budget['seeds']} at {budget['epochs']} epochs per run; TPE sampler, "
        f"{pruning}. Budget: {budget['trials']} finished trials per arm, a pruned trial "
        "counted as finished for every arm alike. Trials' runs evaluate no test metric "
        "(`--no-test`) and the tuner reads validation metrics only.",
        "",
        "| arm | finished | completed | pruned | failed | best trial | "
        f"`{info['objective']}` | at an edge of its range |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in arms.items():
        c, best = a["counts"], a["best"]
        flagged = ", ".join(f"`{k}` ({v}): widen the range" for k, v in a["edges"].items())
        lines.append(
            f"| `{arm}` | {c['complete'] + c['pruned']} | {c['complete']} | {c['pruned']} | "
            f"{c['failed']} | {'-' if best is None else best['number']} | "
            f"{'-' if best is None else _fmt(best['value'])} | {flagged or '-'} |"
        )
    lines += ["", "## Budget curves", ""]
    if info["budget_plot"]:
        lines += [
            "The expected best validation value after k finished trials, from each arm's "
            "trials (Dodge et al. 2019; a pruned trial scores the value it was stopped at), "
            "with a 95 % bootstrap band over the trials.",
            "",
            f"![budget curves]({info['budget_plot']})",
            "",
        ]
        lines.append(_ranking_text(info["ranking"]))
    else:
        lines.append("No trial has finished yet.")
    fresh = budget["fresh_seeds"]
    lines += ["", "## Fresh seeds", ""]
    lines.append(
        f"Each arm's best values ran on seeds {fresh}, none of them a tuning seed, each run "
        "evaluating the test split once: [report/report.md](report/report.md)."
        if fresh
        else "None: tune.fresh_seeds is 0 (tuning only)."
    )
    for arm, a in arms.items():
        lines += _arm_markdown(arm, a, info["objective"])
    return "\n".join(lines) + "\n"


def _ranking_text(rank: dict[str, Any] | None) -> str:
    if rank is None:
        return "One arm: no ranking."
    order = " > ".join(f"`{a}`" for a in rank["order"])
    if not rank["differs_at"]:
        return f"Ranking at k = {rank['k']}: {order}; it holds at every budget k = 1..{rank['k']}."
    ks = ", ".join(map(str, rank["differs_at"]))
    return (
        f"Ranking at k = {rank['k']}: {order}; it does not hold across budgets: at k = {ks} the "
        f"ranking is another one. `{rank['order'][0]}` leads from k = {rank['leader_from']} on "
        "(point estimates; see the bands)."
    )


def _arm_markdown(arm: str, info: dict[str, Any], objective: str) -> list[str]:
    counts, best = info["counts"], info["best"]
    params = list(info["space"])
    lines = [
        "",
        f"## Arm `{arm}` (study `{info['study']}`)",
        "",
        f"Trials: {counts['complete'] + counts['pruned']} finished ({counts['complete']} "
        f"completed, {counts['pruned']} pruned), {counts['failed']} failed or interrupted "
        f"(not counted), {counts['running']} running. Time in trials: "
        f"{info['trial_seconds']:.0f} s"
        + (
            f"; first start to last end: {info['span_seconds']:.0f} s."
            if info["span_seconds"] is not None
            else "."
        ),
    ]
    if info["fixed"]:
        fixed = ", ".join(f"`{k}` = {_fmt(v)}" for k, v in info["fixed"].items())
        lines += ["", f"Fixed at the tuned baseline's values: {fixed}."]
    lines += ["", "### Best trial", ""]
    if best is None:
        lines.append("No trial has completed yet.")
    else:
        lines += [
            f"Trial {best['number']}: `{objective}` = {_fmt(best['value'])}. "
            f"`{info['tuned']}` is the spec with these values:",
            "",
            "| parameter | value | range |",
            "|---|---|---|",
        ]
        for k, v in best["params"].items():
            edge = info["edges"].get(k)
            note = f"at its {edge} edge: widen the range" if edge else ""
            lines.append(f"| `{k}` | {_fmt(v)} | {note} |")
    lines += ["", "### Parameter importances", ""]
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
        lines += ["", "### Plots", ""]
        lines += [f"![{title}](plots/{arm}/{name})" for name, title in info["plots"].items()]
    lines += [
        "",
        "### Trials",
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
    return lines


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
            f"{self.s.arm}: {counts['complete'] + counts['pruned']}/{self.s.tune.trials} trials "
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


# --- the comparison ------------------------------------------------------------------------


def tune(s: Settings) -> tuple[str, dict[str, Any]]:
    """Run every arm's study to its budget, write the outputs, then run each arm's best
    values on the fresh seeds and write the paired report: (why it stopped, tune.json's
    data). Ctrl-C (KeyboardInterrupt) stops the running trials or runs, marks the trials
    failed, writes the outputs and re-raises."""
    tuners: dict[str, Tuner] = {}
    why = "done"
    with warnings.catch_warnings():
        # Optuna warns that heartbeats and ask/tell are experimental together: they work
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        warnings.filterwarnings("ignore", "Target and region quantiles", UserWarning)
        try:
            for arm in order(s.tune):
                fixed = {}
                if s.tune.question == QUESTIONS[1] and arm_kind(s.spec, arm) != "baseline":
                    base = tuners["baseline"].study
                    if not any(t.state == TrialState.COMPLETE for t in base.get_trials()):
                        why = "no baseline"
                        break
                    fixed = values(base.best_trial.params)
                a = for_arm(s, arm, fixed)
                with Display(a) as display:
                    tuner = tuners[arm] = Tuner(a, display.line)
                    display.line(
                        f"study {a.study_name} in {tuner.shown_storage}: {a.tune.trials} trials "
                        f"of {arm} ({len(a.seeds)} seed(s), {a.epochs} epochs), "
                        f"{a.workers} at a time"
                    )
                    ended = tuner.run(display.poll)
                if ended == "failures":
                    why = ended
                    break
                if ended == "others" and why == "done":
                    why = ended  # the next arm meanwhile; no fresh seeds from this process
        finally:
            info = write_outputs(s, tuners)
    if why == "done" and s.fresh_seeds:
        info["report"] = str(fresh_comparison(s, info))
    return why, info


def fresh_comparison(s: Settings, info: dict[str, Any]) -> Path:
    """Each arm's tuned spec on the fresh seeds, DIR/runs/ARM/seed<S> (a finished run is
    kept, an interrupted one resumed), then the paired report in DIR/report."""
    from generator import ablate
    from generator import report as reporting
    from generator.render import load_spec

    runs = s.out / "runs"
    jobs = []
    for arm in s.tune.arms:
        tuned = s.out / info["arms"][arm]["tuned"]
        spec, doc = load_spec(tuned)
        write_folder(Rendered(arm, render(spec, doc, tuned, [arm]).files), runs / "scripts")
        script = runs / "scripts" / arm / f"train_{arm}.py"
        folders = spec_folders(doc)
        jobs += [
            ablate.Job(arm, seed, script, runs / arm / f"seed{seed}", import_paths=folders)
            for seed in s.fresh_seeds
        ]
    threads = max(1, (os.cpu_count() or 1) // s.workers)
    print(f"fresh seeds {s.fresh_seeds}: {len(jobs)} runs, {s.workers} at a time", flush=True)
    with Progress(len(jobs)) as progress:
        ablate.run_all(jobs, s.workers, [], threads, progress.update)
    context = {
        "question": s.tune.question,
        "trials_per_arm": s.tune.trials,
        "tuning_seeds": s.seeds,
        "tune_report": "../tune_report.md",
    }
    out, _ = reporting.build(runs, s.out / "report", tuning=context)
    return out
