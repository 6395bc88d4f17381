"""The package: a built wheel carries the templates and generates outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import REPO, SPECS


def test_wheel_generates_outside_the_checkout(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("perturbgen-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "generator/templates/train.py.jinja" in names
        assert any(n.endswith("entry_points.txt") for n in names)
        zf.extractall(tmp_path / "site")
    # run from the extracted wheel alone, in a folder far from the repository's templates/
    work = tmp_path / "elsewhere"
    work.mkdir()
    spec = SPECS[0]
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    where = subprocess.run(
        [sys.executable, "-c", "from generator import render; print(render.templates_dir())"],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert where.stdout.strip() == str(tmp_path / "site" / "generator" / "templates")
    result = subprocess.run(
        [sys.executable, "-m", "generator", "generate", str(spec), "-o", "out"],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert (work / "out" / spec.stem / "manifest.json").exists()
    generated = (REPO / "generated" / spec.stem / "train_baseline.py").read_bytes()
    assert (work / "out" / spec.stem / "train_baseline.py").read_bytes() == generated
