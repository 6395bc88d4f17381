"""Generated folders under failure: an error mid-write or two writers at once lose nothing."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MINIMAL, REPO, cli
from robustness import TALLY

from generator.generate import render_spec


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class Faults:
    """Counts file writes, chmods and renames of the generator; raises ENOSPC at call `at`."""

    def __init__(self, monkeypatch, at: int):
        self.at, self.calls, self.fired = at, 0, False
        real_replace, real_chmod, real_write = os.replace, os.chmod, Path.write_bytes

        def tick():
            self.calls += 1
            if self.calls == self.at:
                self.fired = True
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def replace(*args, **kwargs):
            tick()
            return real_replace(*args, **kwargs)

        def chmod(*args, **kwargs):
            tick()
            return real_chmod(*args, **kwargs)

        def write_bytes(self_, data):
            tick()
            return real_write(self_, data)

        monkeypatch.setattr("generator.output.os.replace", replace)
        monkeypatch.setattr("generator.output.os.chmod", chmod)
        monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_failure_at_any_write_leaves_the_previous_folder(write_spec, tmp_path, monkeypatch):
    spec, out = write_spec(), tmp_path / "out"
    assert cli("generate", spec, "-o", out).exit_code == 0
    before = snapshot(out / "tiny")
    at = 0
    while True:  # fail the 1st, 2nd, ... write or rename until the command gets through
        at += 1
        with monkeypatch.context() as patch:
            faults = Faults(patch, at)
            result = cli("generate", spec, "-o", out, "--set", "optimizer.lr=0.2")
        if not faults.fired:
            break
        kept = snapshot(out / "tiny") == before
        clean = sorted(p.name for p in out.iterdir()) == ["tiny"]  # no temporary folder left
        TALLY.record("generate interrupted", "exit 2, kept" if kept else "lost", lost=not kept)
        assert result.exit_code == 2 and kept and clean, (at, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert f"{out / 'tiny'}: cannot write: No space left on device" in result.output
    assert result.exit_code == 0 and at > 10  # every file, chmod and both renames were hit
    assert snapshot(out / "tiny") != before


def test_failure_while_putting_the_new_folder_in_place_restores_the_old(tmp_path, monkeypatch):
    """The one window where the target is absent: between its two renames."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(MINIMAL)
    out = tmp_path / "out"
    assert cli("generate", spec, "-o", out).exit_code == 0
    before = snapshot(out / "tiny")
    real = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr("generator.output.os.replace", second_rename_fails)
    result = cli("generate", spec, "-o", out, "--set", "optimizer.lr=0.2")
    assert result.exit_code == 2 and len(calls) == 3  # target aside, new in (fails), back
    assert snapshot(out / "tiny") == before
    TALLY.record("generate interrupted", "exit 2, kept")


def test_concurrent_generates_end_with_one_whole_folder(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MINIMAL)
    out = tmp_path / "out"
    lrs = ("0.2", "0.3")
    whole = [render_spec(spec, [f"optimizer.lr={lr}"]).files for lr in lrs]
    for round_ in range(3):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "generator", "generate", str(spec), "-o", str(out)]
                + ["--set", f"optimizer.lr={lr}"],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for lr in lrs
        ]
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        folder = snapshot(out / "tiny")
        consistent = folder in whole
        clean = sorted(p.name for p in out.iterdir()) == ["tiny"]
        ok = all(code == 0 and "Traceback" not in err for code, _, err in results)
        TALLY.record("concurrent generate", "exit 0, consistent" if consistent else "mixed")
        assert ok and consistent and clean, (round_, results)


@pytest.mark.parametrize("target", ["schema", "report"])
def test_unwritable_outputs_of_other_commands(target, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    if target == "schema":
        result = cli("schema", "-o", blocker / "schema.json")
    else:
        run = tmp_path / "runs" / "a"
        run.mkdir(parents=True)
        (run / "config.json").write_text('{"spec": "s", "arm": "baseline", "seed": 0}')
        result = cli("report", tmp_path / "runs", "-o", blocker / "report")
    TALLY.record("generate interrupted", f"exit {result.exit_code}")
    assert result.exit_code == 2 and "cannot write" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
