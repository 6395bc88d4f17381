"""The robustness tally: every class of hostile input the suite tries, and what came of it.

Hardening tests record each case they try with `TALLY.record(cls, outcome)` before they
assert on it; `python -m pytest tests -n 0 --robustness-tally docs/robustness.md` writes the tally
there at the end of the session (see conftest.py), so the document is made by the suite,
not by hand. tests/test_robustness_doc.py keeps the document and CLASSES in step.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

# class name → what is tried; the order is the order of the document
CLASSES = {
    "random text as a spec": "hypothesis text, any unicode, as a spec file (validate)",
    "binary garbage as a spec": "hypothesis bytes as a spec file (validate)",
    "mutated example specs": (
        "the five example specs with keys deleted, values swapped for other types, "
        "unicode, huge and non-finite numbers, deep nesting (validate)"
    ),
    "mutated numbers, generated": (
        "numbers of the example specs replaced by extreme values, then `generate` "
        "(nothing written on error; a folder of valid Python on success)"
    ),
    "YAML features": (
        "tags (python/object, binary, set, custom), anchors, aliases, merge keys, "
        "multi-document streams, deep nesting, control characters, not UTF-8, huge integers, "
        "NaN and infinities, a folder, a FIFO, /dev/zero"
    ),
    "alias bomb": "a billion-laughs document: refused in bounded time and memory",
    "--set overrides": "hypothesis KEY=VALUE texts given to `validate --set`",
    "hostile strings in string fields": (
        "quotes, newlines, triple quotes, #, backslashes, NUL, look-alikes and template "
        "syntax in name, description, baseline names, data.root and extends (generate)"
    ),
    "generate interrupted": (
        "an OSError injected at each file write and each rename of `generate`: the "
        "previous folder stays byte-identical"
    ),
    "concurrent generate": "two `generate` processes on one spec and one folder at once",
    "damaged checkpoint": (
        "last.pt truncated at several lengths, emptied, replaced by random bytes, by a "
        "pickle that runs code, by foreign torch files, by another arm's checkpoint, with "
        "keys missing or a weight of the wrong shape (--resume)"
    ),
    "checkpoint write fails": (
        "ENOSPC halfway through writing last.pt or metrics.jsonl: the previous file kept "
        "and loadable, then a resume to the uninterrupted result"
    ),
    "broken dataset": (
        "data root is a file, corrupt or foreign MNIST-1D cache, labels out of range, "
        "missing, truncated, code-running and malformed CIFAR batches, an image folder "
        "with a non-image (0 and 2 workers) or without its val split"
    ),
    "signals": (
        "SIGTERM and SIGINT mid-epoch: checkpoint saved, exit 143/130, exact resume; "
        "SIGTERM to one of two DDP ranks: both stop at the same step"
    ),
    "damaged run folders": (
        "torn metrics.jsonl, missing or garbage summary.json and config.json, values of "
        "the wrong type, runs of two specs in one folder (report)"
    ),
}


@dataclass
class Tally:
    cases: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    tracebacks: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)

    def record(self, cls: str, outcome: str, traceback: bool = False, lost: bool = False):
        """One case of class `cls` ended in `outcome` (e.g. "exit 2")."""
        assert cls in CLASSES, f"unknown robustness class {cls!r}: add it to CLASSES"
        self.cases[cls][outcome] += 1
        self.tracebacks[cls] += traceback
        self.lost[cls] += lost

    def markdown(self, command: str) -> str:
        rows = [
            "# Robustness tally",
            "",
            "Every class of hostile or broken input the test suite tries, how many cases it",
            "tried in the last full run, how each case ended, and how many ended in a Python",
            "traceback or lost a result (a previous output, checkpoint or run). Written by",
            "the test suite itself:",
            "",
            f"    {command}",
            "",
            "| class | what is tried | cases | outcomes | tracebacks | results lost |",
            "|---|---|---:|---|---:|---:|",
        ]
        for cls, what in CLASSES.items():
            counts = self.cases.get(cls, Counter())
            outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            rows.append(
                f"| {cls} | {what} | {sum(counts.values())} | {outcomes or 'not run'} "
                f"| {self.tracebacks[cls]} | {self.lost[cls]} |"
            )
        total = sum(sum(c.values()) for c in self.cases.values())
        rows += [
            "",
            f"In all: {total} cases, {sum(self.tracebacks.values())} tracebacks, "
            f"{sum(self.lost.values())} results lost.",
            "",
            "Outcomes: `exit N` is the command's exit status (0 ok, 2 a clear one-line error,",
            "130/143 stopped by a signal with a checkpoint saved); `kept` the previous output",
            "or checkpoint left byte-identical; `resumed exactly` a run that continued to the",
            "same parameters and metrics as an uninterrupted one; `consistent` a folder equal",
            "to one whole generation; `reported` a report built with every damaged run folder",
            "listed by name and problem.",
            "",
        ]
        return "\n".join(rows)


TALLY = Tally()
