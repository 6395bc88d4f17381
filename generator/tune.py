"""perturbgen tune: every arm of a spec's `tune:` section tuned with Optuna, the same number of
finished trials each, then each arm's best values run on fresh seeds and compared in the
paired report. Every trial is a real run of one arm.

A trial is the spec with the sampled values applied as `--set` overrides and validated like
any spec (an invalid sample is pruned, never run); its arm is generated into the trial's
folder and run as a process per seed, or (`--launcher slurm`) as one Slurm job array with a
task per seed. The tuner follows each run's metrics.jsonl (on a cluster, through the shared
filesystem), reports every epoch's validation value to Optuna, and stops a trial the pruner
rejects (SIGTERM locally, scancel on Slurm). The fresh-seed runs go the same way: local
processes, or one Slurm job array recorded in DIR/runs/slurm.json and followed to the end.

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
import json
import os
import signal
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from generator import factories, launch, slurm
from generator.checks import validate
from generator.errors import SpecError, SpecErrors
from generator.factories import python_path, spec_folders
from generator.generate import render
from generator.launch import Task, thread_env, threads_per_run
from generator.loading import changes, merge, parse_override
from generator.method.summary import first_at_target
from generator.output import Rendered, write_folder
from generator.progress import Progress
from generator.runs import lock_holder, outcome
from generator.spec import QUESTIONS, arm_kind
from generator.tune_report import counts, write_outputs
from generator.tune_report_md import fmt
from generator.tune_space import (
    Settings,
    arm_overrides,
    distributions,
    for_arm,
    make_pruner,
    order,
    sampler,
    settings,
    values,
)
from generator.tune_storage import HEARTBEAT_S, alive, file_lock, open_storage, owner

POLL_S = 0.25
MAX_FAILURES_IN_A_ROW = 3
STOP_GRACE_S = 30.0  # SIGTERM: each run finishes its step, checkpoints and exits 143
HELD_OUT = "test"  # keys that start with this are test metrics: never read
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
NO_TEST = "--no-test"  # a trial's runs evaluate and write no test metric


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
    reached = (first_at_target(history, target) or {}).get("epoch")
    return float(reached if reached is not None else len(history) + 1)


# --- one trial -----------------------------------------------------------------------------


def run_command(script: Path, run: Path, seed: int, epochs: int) -> list[str]:
    command = [sys.executable, str(script), "--seed", str(seed), "--out", str(run)]
    return command + ["--epochs", str(epochs), NO_TEST]


@dataclass
class Running:
    """A trial this process runs: its runs (one per seed) and what was reported of them."""

    trial: optuna.Trial
    folder: Path
    runs: list[Path]
    procs: list[launch.Process]
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
        self.owner = owner()
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
            if owner.startswith(me) or not alive(owner):  # mine but not running: a crash
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
        params = ", ".join(f"{k}={fmt(v)}" for k, v in sorted(trial.params.items()))
        self.show(f"trial {trial.number}: start ({params})")
        return Running(trial, folder, runs, procs)

    def start(self, number: int, folder: Path, script: Path, runs: list[Path]) -> list:
        """A trial's runs: local processes, or one Slurm job array (a task per seed, with
        --resume auto so that a requeued task continues) whose record is folder/slurm.json."""
        seeds, resources = self.s.seeds, self.s.resources
        runner: launch.Launcher
        if resources is None:
            threads, extra, runner = (
                threads_per_run(self.s.workers, len(seeds)),
                [],
                launch.Local(),
            )
        else:
            threads, extra = resources.cpus_per_run, ["--resume", "auto"]
            name = f"pgen-tune-{self.s.study_name}-{number}"
            runner = slurm.Slurm(slurm.Launcher(folder, resources, name=name))
        env = {**thread_env(threads), **python_path(spec_folders(self.s.doc))}
        tasks = [
            Task(
                f"trial{number}/seed{seed}",
                run_command(script, run, seed, self.s.epochs) + extra,
                run,
                env,
            )
            for run, seed in zip(runs, seeds)
        ]
        return runner.start(tasks)

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
                launch.stop(r.procs, STOP_GRACE_S)
                self.finish(r.trial, TrialState.PRUNED, "pruned", reason=f"epoch {r.epoch}")
                self.show(f"trial {r.number}: pruned at epoch {r.epoch} ({fmt(r.value)})")
                return self.ended(r)
        bad = [c for c in codes if c not in (None, 0)]
        if not bad and None in codes:
            if time.time() - r.beat > HEARTBEAT_S:  # RDB storages: this trial's process lives
                with contextlib.suppress(Exception):
                    self.storage.record_heartbeat(self.trial_id(r.number))
                r.beat = time.time()
            return False
        launch.stop(r.procs, STOP_GRACE_S)  # a failed seed ends its trial
        outcomes = [outcome(code, run_status(run)) for code, run in zip(codes, r.runs)]
        if all(o == "completed" for o in outcomes) and r.epoch == self.s.epochs:
            self.failures_in_row = 0
            self.finish(r.trial, TrialState.COMPLETE, "completed", value=r.value)
            self.show(f"trial {r.number}: {self.s.tune.objective} {fmt(r.value)}")
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
            launch.stop([p for r in mine for p in r.procs], STOP_GRACE_S)
            for r in mine:
                self.finish(r.trial, TrialState.FAIL, "interrupted")
            raise
        if self.failures_in_row >= MAX_FAILURES_IN_A_ROW:
            return "failures"
        done = counts(self.trials())
        if done["complete"] + done["pruned"] < self.s.tune.trials:
            return "others"  # the rest of the budget runs in other processes
        return "done"


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
        n = counts(trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = tuner.study.best_trial if complete else None
        title = (
            f"{self.s.arm}: {n['complete'] + n['pruned']}/{self.s.tune.trials} trials "
            f"({n['complete']} completed, {n['pruned']} pruned, {n['failed']} failed)"
            + (f"; best {fmt(best.value)} (trial {best.number})" if best else "")
        )
        table = Table(title=title)
        for column in ("trial", "epoch", self.s.tune.objective, "time"):
            table.add_column(column)
        for r in mine:
            value = "-" if r.value is None else fmt(r.value)
            elapsed = f"{time.time() - r.started:.0f}s"
            table.add_row(str(r.number), f"{r.epoch}/{self.s.epochs}", value, elapsed)
        self.live.update(table)


# --- the comparison ------------------------------------------------------------------------


def prepare(spec_path: Path, overrides: list[str], **options: Any) -> Settings:
    """The spec loaded, its own factories importable (before a trial starts or a task is
    submitted), and the invocation's settings (`options`: those of tune_space.settings)."""
    from generator.render import load_spec

    spec, doc = load_spec(spec_path, overrides)
    factories.require(spec, doc, spec_path)
    return settings(spec, doc, spec_path, overrides, **options)


def tune(s: Settings) -> tuple[str, dict[str, Any]]:
    """Run every arm's study to its budget, write the outputs, then run each arm's best
    values on the fresh seeds and write the paired report: (why it stopped, tune.json's
    data). Ctrl-C (KeyboardInterrupt) stops the running trials or runs, marks the trials
    failed, writes the outputs and re-raises."""
    tuners: dict[str, Tuner] = {}
    why = "done"
    signal.signal(signal.SIGTERM, launch.interrupt)  # stops the trials like Ctrl-C does
    signal.signal(signal.SIGHUP, launch.interrupt)
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
            studies = {arm: (t.s, t.study) for arm, t in tuners.items()}
            shown = next(iter(tuners.values())).shown_storage if tuners else None
            info = write_outputs(s, studies, shown)
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
    if s.resources is None:
        threads = threads_per_run(s.workers)
        print(f"fresh seeds {s.fresh_seeds}: {len(jobs)} runs, {s.workers} at a time", flush=True)
        with Progress(len(jobs)) as progress:
            ablate.run_all(jobs, s.workers, [], threads, progress.update)
    else:  # one job array, as ablate --launcher slurm submits it; followed to the end
        launcher = slurm.Launcher(runs, s.resources, name=f"pgen-tune-{s.study_name}-fresh")
        print(f"fresh seeds {s.fresh_seeds}: {len(jobs)} runs as Slurm tasks", flush=True)
        with Progress(len(jobs)) as progress:
            slurm.run_ablation(
                jobs,
                launcher,
                [],
                1,
                progress.update,
                on_submit=lambda array: print(f"submitted job array {array}", flush=True),
            )
    context = {
        "question": s.tune.question,
        "trials_per_arm": s.tune.trials,
        "tuning_seeds": s.seeds,
        "tune_report": "../tune_report.md",
    }
    out, _ = reporting.build(runs, s.out / "report", tuning=context)
    return out
