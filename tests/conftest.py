"""Shared helpers: the repository layout and ways to drive the real CLI."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from robustness import TALLY
from typer.testing import CliRunner

from generator import scriptload
from generator.cli import app
from generator.scriptload import load_script

REPO = Path(__file__).resolve().parent.parent

# The tests' models are tiny: one thread per process is the fastest, and the suite's two
# workers (pyproject.toml: -n 2) on two cores would only contend for more. The scripts the
# tests start inherit it; `ablate` sets its runs' threads itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# Fuzz tests draw the same examples every run (no flaky CI, nothing stored between runs)
settings.register_profile(
    "perturbgen",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("perturbgen")

# tests/interpret runs only with TRITON_INTERPRET=1, through tests/test_kernels.py
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpret"]
SPECS = sorted((REPO / "specs").glob("*.yaml"))
# specs/custom_stripes.yaml's factories (specs/custom/) are found as a user's would be: their
# folder on the import path, in this process and in the scripts' processes
EXAMPLES = str(REPO / "specs")
sys.path.insert(0, EXAMPLES)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (EXAMPLES, os.environ.get("PYTHONPATH")) if p
)
GENERATED = REPO / "generated"
# Scripts import their support module from their folder: no process the tests start (nor
# this one) may leave bytecode in generated/, which is the golden record, file for file
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
# A probe run in another interpreter starts with these lines to get load_script (stdlib only)
LOADER = f"import runpy\nload_script = runpy.run_path({scriptload.__file__!r})['load_script']\n"
SCRIPTS = sorted(GENERATED.glob("*/train_*.py"))

MINIMAL = """\
name: tiny
data: {dataset: synthetic, shape: [8], num_classes: 3, train_size: 64, val_size: 32}
model: {arch: mlp, hidden: [16]}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
train: {epochs: 2, stability_window: 2}
variants: [baseline, fixed]
"""


TIMING = {"elapsed_s", "train_s", "seconds_to_target"}  # clock readings differ run to run


def without_timing(path: Path) -> list[dict]:
    """The JSON lines of a run's file less the clock readings: what two equal runs share."""
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
        for line in path.read_text().splitlines()
    ]


def cli(*args: str, cwd: Path | None = None):
    """Run the perturbgen CLI in-process; a traceback would show up as result.exception."""
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(old)


def run_script(script: Path, *args: str, cwd: Path, timeout: int = 300, env=None):
    """Run an emitted script as a user would: its own process, its own folder."""
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_inside_epoch_2(proc: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    """Return once the run in `proc` has written epoch 1's metrics and is 0.3 s into epoch 2;
    fail if it ends first."""
    metrics, deadline = run / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") == 1:
            time.sleep(0.3)
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"


def evaluate_on_test(script: Path, checkpoint: Path, data_root: Path) -> tuple[float, float]:
    """(mean loss, accuracy) on the test split of the model in a checkpoint: in this process,
    in one batch, apart from the script's own evaluation loop and from DDP."""
    ns = load_script(str(script), run_name="perturbgen_test")
    model = ns["build_model"]()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    model.eval()
    x, y = scriptload.arm_data(ns, data_root, False, 0, torch.device("cpu")).eval_sets["test"]
    with torch.no_grad():
        logits = model(x)
    return (
        torch.nn.functional.cross_entropy(logits, y).item(),
        (logits.argmax(1) == y).sum().item() / len(y),  # as the script divides: exact
    )


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_inprocess(script: Path, *args: str) -> Finished:
    """Run an emitted script's main() in this process: the same code path as `python script`
    minus a fresh interpreter, which saves seconds of torch start-up per run."""
    namespace = load_script(str(script), run_name="perturbgen_test")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = namespace["main"]([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Finished(code, out.getvalue(), err.getvalue())


def generate(tmp_path: Path, spec_text: str = MINIMAL, *overrides: str) -> Path:
    """Generate a spec's arms into tmp_path; return the folder of scripts."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "spec.yaml").write_text(spec_text)
    args = [arg for o in overrides for arg in ("--set", o)]
    result = cli("generate", tmp_path / "spec.yaml", "-o", tmp_path / "gen", *args)
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "gen").iterdir()
    return folder


def check_step_semantics(tmp_path: Path, kernel: str) -> None:
    """One definition of the step, for either noise kernel: the noise of optimizer step t
    takes the eps decided after step t's detector sample. The detector is made to adopt
    fine-tuning at step 4 (eps 2.5e-4 instead of exploration's 2e-3 * exp(-4 lambda)), and
    each step's noise is measured against the standard normal draw it was made from."""
    import torch

    text = MINIMAL.replace("[baseline, fixed]", "[full]")
    folder = generate(tmp_path, text, "phase_detector.every=2", "phase_detector.window=3")
    ns = load_script(str(folder / "train_full.py"), run_name="perturbgen_test")
    torch.manual_seed(0)
    model = ns["build_model"]()
    ns["flatten_parameters"](model)
    optimizer = ns["build_optimizer"](model)
    perturbation = ns["make_perturbation"](model, 0, torch.device("cpu"), kernel)

    def adopt_fine_tuning_at_4(step, g, d, loss):
        if step != 4:
            return None
        detector.phase, detector.phase_start = ns["FINE_TUNING"], step
        return {"step": step}

    detector = perturbation.detector
    detector.observe = adopt_fine_tuning_at_4
    flat = perturbation.flat
    x, y = torch.randn(16, *ns["INPUT_SHAPE"]), torch.randint(0, ns["NUM_CLASSES"], (16,))
    for step in range(7):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        stepped = []

        def optimizer_step():
            optimizer.step()
            stepped.append(flat.clone())

        eps, change = perturbation.step(optimizer_step, step, 0.1, 1.0)
        if kernel == "torch":  # the draws are still in the scratch slices
            z = torch.cat([part[1] for part in perturbation.slices])
        else:  # the same Philox stream at eps = 1 onto zeros
            z = torch.zeros(perturbation.n_noise)
            shared = ns["flatten_parameters"].__globals__  # the folder's support module
            grid = (shared["triton"].cdiv(len(z), shared["BLOCK"]),)
            shared["noise_add_kernel"][grid](
                z, len(z), 1.0, perturbation.key_base | step, BLOCK=shared["BLOCK"]
            )
        noise = (flat - stepped[0])[: perturbation.n_noise]
        start = 4 if step >= 4 else 0
        phase = ns["FINE_TUNING"] if step >= 4 else ns["EXPLORATION"]
        expected = ns["EPS_PHASE"][phase] * math.exp(-ns["DECAY"] * (step - start))
        assert (change is not None) == (step == 4)
        assert eps == pytest.approx(expected, rel=1e-12), step
        # the noise measured as a difference of fp32 parameters of size ~0.1: its error is
        # about one ulp of 0.1 (7e-9), far below the gap between the two eps (1.7e-3)
        measured = float((noise.double() @ z.double()) / (z.double() @ z.double()))
        assert measured == pytest.approx(expected, rel=1e-3), step


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec file into tmp_path and return its path."""

    def write(text: str = MINIMAL, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node Slurm (tests/slurm_cluster.py) for the whole session; SLURM_CONF
    points at it while it runs. Skips where Slurm is not installed or cannot start, except
    under CI=true, where that fails the tests with the reason."""
    import slurm_cluster as cluster_tools

    ci = os.environ.get("CI") == "true"
    started = time.time()
    try:
        cluster = cluster_tools.start(tmp_path_factory.mktemp("slurm"))
    except cluster_tools.ClusterError as exc:
        if ci:
            pytest.fail(f"the test Slurm did not start: {exc}", pytrace=False)
        pytest.skip(f"no test Slurm: {exc}")
    print(f"\ntest Slurm up in {time.time() - started:.1f} s", file=sys.stderr)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()


def pytest_addoption(parser):
    parser.addoption(
        "--robustness-tally",
        metavar="PATH",
        help="write the tally of hostile inputs tried (docs/robustness.md) after the run",
    )


def pytest_configure(config):
    if config.getoption("--robustness-tally") and config.getoption("numprocesses", None):
        raise pytest.UsageError("--robustness-tally counts in one process: add -n 0")


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--robustness-tally")
    if path:
        command = f"python -m pytest tests -n 0 --robustness-tally {path}"
        Path(path).write_text(TALLY.markdown(command))


def readme_snippets(section: str, doc: str = "README.md") -> list[str]:
    """The ```python blocks of one section (## SECTION) of README.md or another doc, in order."""
    text = (REPO / doc).read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def load_module(path: Path, name: str):
    """Import the Python file at `path` as a module called `name` (an exported module, or a
    script with its own folder's support module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with scriptload.beside(path):
        spec.loader.exec_module(module)
    return module


def exported_peer(folder: Path, arm: str, name: str):
    """`perturbgen export specs/mnist1d_cnn.yaml ARM` (a peer of the method), imported."""
    out = folder / f"{name}.py"
    result = cli("export", REPO / "specs" / "mnist1d_cnn.yaml", arm, "-o", out)
    assert result.exit_code == 0, result.output
    return load_module(out, name)
