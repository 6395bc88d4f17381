"""The run-folder format as the report reads it: one Run per folder, whatever it holds.

A run folder is any folder holding a config.json written by an emitted script; its
metrics.jsonl and summary.json say how far it got. An ablation folder's ablation.json names
the runs it expected, so a run that never wrote anything is counted as missing. What cannot
be used is named in a run's `problems`; a metrics.jsonl that is not one history (epochs not
be used is named in a run's `problems`; a metrics.jsonl that is not one history (an epoch
arm, seed and fingerprint) is counted once when both copies hold the same metrics and
summary, and refused otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from generator.spec import ARMS, NAME_PATTERN

PHASES = ("exploration", "convergence", "fine_tuning")
FINISHED = ("completed", "diverged")  # a run folder's status that no rerun changes
# config.json keys that do not make two runs different experiments: the run seed (SEED is only
# --seed's default) and where the run was written
NOT_SETTINGS = ("seed", "out")
# settings that may differ between the arms of one comparison: the arm itself and what it
# brings (its constants, its noise kernel, an extra baseline's batch size and optimizer)
ARM_SETTINGS = ("arm", "kernel", "batch_size", "constants", "optimizer")
CORRUPT = "metrics.jsonl is not one history (an epoch repeats or goes back)"
LOCK = "run.lock"  # a run folder's lock, held by the process that writes it (the scripts)


class Refused(Exception):
    """The runs cannot be reported (one line says why)."""


class NoRuns(Refused):
    """The folder holds no run folder: there is nothing to report."""


@dataclass
class Run:
    """One run folder as found on disk (or, with absent=True, one an ablation expected)."""

    path: Path
    spec: str
    arm: str
    seed: int
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)  # config.json's, as written
    config: dict[str, Any] = field(default_factory=dict)
    ablation: dict[str, Any] | None = None  # the record of the ablation folder holding it
    absent: bool = False

    @property
    def status(self) -> str:
        if self.absent:
            return "missing (no run folder)"
        if self.summary is None:
            return "incomplete (no summary.json)"
        status = str(self.summary.get("status"))
        return "incomplete (stopped)" if status == "stopped" else status

    @property
    def complete(self) -> bool:
        return self.status == "completed" and not self.problems

    @property
    def corrupt(self) -> bool:
        return CORRUPT in self.problems

    @property
    def outcome(self) -> str:
        """completed, diverged, stopped, missing (no folder or no summary), corrupt (two
        histories in one metrics.jsonl: in no statistic) or damaged."""
        if self.corrupt:
            return "corrupt"
        if self.absent or self.summary is None:
            return "missing"
        if self.summary.get("status") in ("diverged", "stopped"):
            return self.summary["status"]
        return "completed" if self.complete else "damaged"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config)


def recorded_status(folder: Path) -> str | None:
    """The status a run folder's summary.json records (None: no readable summary yet)."""
    try:
        return json.loads((folder / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def outcome(returncode: int | None, status: str | None) -> str:
    """How a run ended, from its exit code and its summary.json's status: completed (exit 0,
    status completed), diverged (exit 3, status diverged: a result, not a failure), else
    failed. The one rule of every driver and launcher."""
    if returncode == 0 and status == "completed":
        return "completed"
    if returncode == 3 and status == "diverged":
        return "diverged"
    return "failed"


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that make a run the experiment it is: config.json without the seed and
    the output folder (and without the SEED constant, which only supplies --seed's default,
    and the device's index)."""
    out = {k: v for k, v in config.items() if k not in NOT_SETTINGS}
    if isinstance(out.get("device"), str):  # cuda:1 is the same experiment as cuda:0
        out["device"] = out["device"].split(":")[0]
    if isinstance(out.get("constants"), dict):
        out["constants"] = {k: v for k, v in out["constants"].items() if k != "SEED"}
    return out


def fingerprint(config: dict[str, Any]) -> str:
    text = json.dumps(identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"splits": {"val": 500}} -> {"splits.val": 500}."""
    if isinstance(value, dict) and (value or not prefix):
        out: dict[str, Any] = {}
        for key in sorted(value, key=str):
            out.update(flatten(value[key], f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def differing(settings: list[dict[str, Any]]) -> list[str]:
    """The dotted keys whose values are not the same in every one of the flat settings."""
    keys = sorted({k for s in settings for k in s})
    return [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]


def shared_settings(run: Run) -> dict[str, Any]:
    """What every arm of one comparison must share (flat): the run settings without the
    arm's own, and the ablation's spec hash and --set overrides when it ran under ablate."""
    out = flatten({k: v for k, v in identity(run.config).items() if k not in ARM_SETTINGS})
    if run.ablation is not None:
        out["ablation.spec_sha256"] = run.ablation.get("spec_sha256")
        out["ablation.overrides"] = run.ablation.get("overrides")
    return out


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable ({exc.__class__.__name__})"


REQUIRED = ("epoch", "val_acc", "val_loss", "elapsed_s")  # in every metrics.jsonl record
PHASE_KEYS = tuple(f"phase_{p}" for p in PHASES)
NUMBERS = ("eps", "lr", "train_loss", "train_s")  # optional, but numbers where present
# summary.json's test metrics (absent in run folders from before the val/test split)
SUMMARY_ACCS = ("test_acc", "test_acc_at_best_val")
SUMMARY_NUMBERS = ("test_loss", "test_loss_at_best_val", "seconds_to_target")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _record_problem(record: Any, phases: bool) -> str | None:
    """Why one metrics.jsonl record cannot be used, or None."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, value in record.items():
        if key == "val_loss" and value is None:  # a non-finite loss is written as null
            continue
        checked = key in REQUIRED or key in PHASE_KEYS or key in NUMBERS
        if checked and not is_number(value):
            return f"{key} is {value!r}, not a finite number"
    if not isinstance(record["epoch"], int) or not 0 <= record["val_acc"] <= 1:
        return "epoch is not an integer or val_acc not in [0, 1]"
    if phases != all(k in record for k in PHASE_KEYS):
        return "has phase fractions unlike the run's first record"
    return None


def _summary_problem(summary: dict[str, Any]) -> str | None:
    """Why summary.json's test metrics cannot be used, or None (absent ones are fine)."""
    for key in SUMMARY_ACCS + SUMMARY_NUMBERS + ("best_val_epoch",):
        value = summary.get(key)
        if value is None:
            continue
        if key == "best_val_epoch":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"summary.json {key} is {value!r}, not an epoch number"
        elif not is_number(value) or (key in SUMMARY_ACCS and not 0 <= value <= 1):
            return f"summary.json {key} is {value!r}, not a finite number" + (
                " in [0, 1]" if key in SUMMARY_ACCS else ""
            )
    return None


def load_run(folder: Path) -> Run:
    """A run folder as found; whatever cannot be used is named in `problems`."""
    config, problem = _read_json(folder / "config.json")
    problems = [problem] if problem else []
    if not problems and not (
        isinstance(config, dict)
        and isinstance(config.get("arm"), str)
        and re.fullmatch(NAME_PATTERN, str(config.get("spec")))  # it names the plot files
        and isinstance(config.get("seed"), int)
    ):
        problems.append("config.json lacks a spec name, an arm or a seed")
    if problems:
        return Run(folder, "(unreadable)", folder.parent.name, -1, [], None, problems)
    metrics = []
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    phases = None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line, parse_constant=lambda name: name)  # NaN: a string
        except ValueError:  # a run killed while writing leaves a torn last line
            problems.append(f"metrics.jsonl line {number} is truncated")
            continue
        if phases is None and isinstance(record, dict):
            phases = all(k in record for k in PHASE_KEYS)
        why = _record_problem(record, bool(phases))
        if why:
            problems.append(f"metrics.jsonl line {number} {why}")
        else:
            metrics.append(record)
    epochs = [m["epoch"] for m in metrics]
    if epochs != sorted(set(epochs)):  # a repeated or earlier epoch: a second writer
        problems.append(CORRUPT)
    summary, problem = _read_json(folder / "summary.json")
    if problem:
        problems.append(problem)
    elif summary is not None and not isinstance(summary, dict):
        problems.append("summary.json is not a JSON object")
        summary = None
    if isinstance(summary, dict):
        problem = _summary_problem(summary)
        if problem:
            problems.append(problem)
        if summary.get("status") == "completed" and not metrics:
            problems.append("metrics.jsonl holds no epoch")
    constants = config.get("constants")
    constants = constants if isinstance(constants, dict) else {}
    return Run(
        folder,
        config["spec"],
        config["arm"],
        config["seed"],
        metrics,
        summary,
        problems,
        constants,
        config,
        _ablation(folder.parent.parent),
    )


def _ablation(folder: Path) -> dict[str, Any] | None:
    """The ablation.json that `perturbgen ablate` left in folder, if readable."""
    record, _ = _read_json(folder / "ablation.json")
    return record if isinstance(record, dict) and isinstance(record.get("spec"), str) else None


def _expected(record: dict[str, Any]) -> list[tuple[str, int]]:
    """(arm, seed) of every run the ablation record expects in its folder."""
    expected = record.get("expected")
    return [
        (pair[0], pair[1])
        for pair in (expected if isinstance(expected, list) else [])
        if isinstance(pair, list)
        and len(pair) == 2
        and isinstance(pair[0], str)
        and re.fullmatch(NAME_PATTERN, pair[0])
        and isinstance(pair[1], int)
        and not isinstance(pair[1], bool)
    ]


def find_runs(root: Path) -> list[Run]:
    """Every run folder under root (root itself included), in a stable order, and every run
    that an ablation.json under root expected but that has no run folder."""
    folders = sorted(
        {p.parent for p in root.rglob("config.json")}
        | ({root} if (root / "config.json").exists() else set())
    )
    runs = _once([load_run(folder) for folder in folders])
    for stamp in sorted(root.rglob("ablation.json")):
        record = _ablation(stamp.parent)
        if record is None or not re.fullmatch(NAME_PATTERN, record["spec"]):
            continue
        for arm, seed in _expected(record):
            folder = stamp.parent / arm / f"seed{seed}"
            if folder not in folders:
                runs.append(
                    Run(folder, record["spec"], arm, seed, [], None, ablation=record, absent=True)
                )
    return sorted(runs, key=lambda r: (r.spec, arm_rank(r.arm), r.seed, str(r.path)))


def _once(runs: list[Run]) -> list[Run]:
    """The runs with each (spec, arm, seed, fingerprint) once: a second identical copy (same
    metrics and summary) is dropped, a different one refused."""
    kept: dict[tuple, Run] = {}
    for run in runs:
        if run.problems and run.seed < 0:  # unreadable config: nothing identifies it
            kept[(str(run.path),)] = run
            continue
        key = (run.spec, run.arm, run.seed, run.fingerprint)
        first = kept.setdefault(key, run)
        if first is not run and (first.metrics, first.summary) != (run.metrics, run.summary):
            raise Refused(
                f"{first.path} and {run.path} are the same run (arm {run.arm}, seed "
                f"{run.seed}, same settings) with different results: keep one"
            )
    return list(kept.values())


def arm_rank(arm: str) -> tuple[int, str]:
    arm = arm.split(" [")[0]  # "full [fingerprint]": a split arm keeps its place
    return (ARMS.index(arm), "") if arm in ARMS else (len(ARMS), arm)


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
