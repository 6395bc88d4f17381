"""The perturbgen command line: generate, validate, schema, variants.

Exit codes: 0 ok; 1 `generate --check` found drift; 2 invalid spec or usage, or an output
folder that cannot be written; 3 the generator itself failed (a bug: please report it).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from generator.errors import SpecError, SpecErrors
from generator.plan import arm_names
from generator.render import GenerationError, drift, load_spec, render_spec, write_folder
from generator.spec import ARMS, Spec

app = typer.Typer(
    name="perturbgen",
    help="Generate standalone PyTorch training scripts for adaptive perturbation training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SpecArgs = Annotated[
    list[Path],
    typer.Argument(
        help="Spec files, or folders whose *.yaml files are specs.", show_default=False
    ),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        metavar="KEY.PATH=VALUE",
        help="Override a spec field (the value is YAML), e.g. --set optimizer.lr=0.05.",
    ),
]

ARM_TABLE = [
    ("baseline", "0 (no perturbation code is emitted)", "-", "-"),
    ("fixed", "eps_fixed", "-", "-"),
    ("phase_only", "eps_phase[p]", "yes", "no"),
    ("schedule_only", "eps_base * exp(-lambda * t)", "-", "yes"),
    ("full", "eps_phase[p] * exp(-lambda * t_p)", "yes", "yes"),
]


def _spec_files(paths: list[Path]) -> tuple[list[Path], list[SpecError]]:
    files, errors = [], []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.glob("*.yaml") if p.is_file())
            if not found:
                errors.append(SpecError(str(path), None, "", "folder holds no *.yaml spec"))
            files += found
        else:
            files.append(path)
    return files, errors


@contextlib.contextmanager
def _exits(what: Path):
    """The commands' one mapping of failures to exit codes: an invalid spec (SpecErrors) or
    an output that cannot be written (OSError) is 2, a generator bug 3."""
    try:
        yield
    except SpecErrors as exc:
        _fail(exc.errors)
    except GenerationError as exc:
        typer.echo(f"internal error while generating {what}: {exc}", err=True)
        raise typer.Exit(3) from None
    except OSError as exc:
        typer.echo(f"{exc.filename or what}: cannot write: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None


def _fail(errors: list[SpecError]) -> None:
    for error in errors:
        typer.echo(str(error), err=True)
    typer.echo(f"{len(errors)} error(s); nothing was written.", err=True)
    raise typer.Exit(2)


@app.command()
def generate(
    specs: SpecArgs,
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Folder that receives one folder per spec.")
    ] = Path("generated"),
    variant: Annotated[
        Optional[list[str]],
        typer.Option("--variant", help="Emit only this arm (repeatable), e.g. --variant fixed."),
    ] = None,
    set_: SetOpt = None,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if the output folder differs.")
    ] = False,
) -> None:
    """Render every arm of each spec into OUT/<spec name>/."""
    files, errors = _spec_files(specs)
    rendered = []
    for path in files:
        with _exits(path):
            try:
                rendered.append(render_spec(path, set_ or [], variant or []))
            except SpecErrors as exc:  # collected: every spec's errors print together
                errors += exc.errors
    names = [r.name for r in rendered]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(SpecError(str(out / name), None, "", "two specs share this name"))
    if errors:
        _fail(errors)
    if check:
        problems = [p for r in rendered for p in drift(r, out)]
        if problems:
            for problem in problems:
                typer.echo(f"drift: {problem}")
            command = " ".join(["perturbgen generate", *map(str, specs), "-o", str(out)])
            typer.echo(f"{out}/ is out of date; refresh it with: {command}")
            raise typer.Exit(1)
        typer.echo(f"{out}/ is up to date ({len(rendered)} spec(s)).")
        return
    for r in rendered:
        with _exits(out / r.name):  # on failure the folder stays as it was
            target = write_folder(r, out)
        typer.echo(f"wrote {target}/ ({', '.join(r.files)})")


@app.command()
def diff(
    spec: Annotated[Path, typer.Argument(help="The spec file.", show_default=False)],
    arm_a: Annotated[str, typer.Argument(help="The arm to diff from, e.g. fixed.")],
    arm_b: Annotated[str, typer.Argument(help="The arm to diff to, e.g. full.")],
    set_: SetOpt = None,
) -> None:
    """Print the unified diff between two arms' scripts: the ablation, as code."""
    with _exits(spec):
        rendered = render_spec(spec, set_ or [], [arm_a, arm_b])
    a, b = (f"train_{arm}.py" for arm in (arm_a, arm_b))
    lines = difflib.unified_diff(
        rendered.files[a].decode().splitlines(keepends=True),
        rendered.files[b].decode().splitlines(keepends=True),
        a,
        b,
    )
    sys.stdout.write("".join(lines))


@app.command()
def ablate(
    spec: Annotated[Path, typer.Argument(help="The spec file.", show_default=False)],
    seeds: Annotated[
        int, typer.Option(min=1, help="Runs per arm, at seeds spec.seed, spec.seed + 1, ...")
    ] = 5,
    jobs: Annotated[
        int, typer.Option(min=1, help="Runs at a time; each gets cores / jobs CPU threads.")
    ] = max(1, os.cpu_count() or 1),
    arms: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated arms to run (default: all, extra baselines too)."),
    ] = None,
    epochs: Annotated[
        Optional[int], typer.Option(min=1, help="Override the spec's epochs for every run.")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("-o", "--out", help="Ablation folder (default runs/NAME).")
    ] = None,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Tiny synthetic data, a few steps per run.")
    ] = False,
    nproc: Annotated[
        int, typer.Option(min=1, help="Processes per run: >1 runs each under torchrun (DDP).")
    ] = 1,
    set_: SetOpt = None,
) -> None:
    """Run every arm over seeds as separate processes, then write the report.

    Rerunning the same command skips finished runs and resumes interrupted ones.
    """
    from generator import ablate as runner
    from generator import report as reporting

    settings = {"epochs": epochs, "smoke": smoke, "overrides": sorted(set_ or [])}
    with _exits(spec):
        loaded, doc = load_spec(spec, set_ or [])
        folder = out or Path("runs") / loaded.name
        chosen_arms = [a for a in (arms or "").split(",") if a]
        rendered, chosen, record = runner.prepare(loaded, doc, spec, folder, chosen_arms, settings)
    with _exits(folder):
        runner.write_scripts(rendered, folder, record)
    seed_list = [loaded.seed + k for k in range(seeds)]
    all_jobs = runner.make_jobs(folder, chosen, seed_list, spec.parent)
    extra = (["--epochs", str(epochs)] if epochs else []) + (["--smoke"] if smoke else [])
    threads = max(1, (os.cpu_count() or 1) // (jobs * nproc))
    typer.echo(
        f"{len(all_jobs)} runs ({len(chosen)} arms x {seeds} seeds) in {folder}/, "
        f"{jobs} at a time, {threads} thread(s) each"
    )
    display = _Progress(len(all_jobs))
    # SIGTERM stops the children like Ctrl-C does, instead of orphaning them
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with display:
            runner.run_all(all_jobs, jobs, extra, threads, display.update, nproc)
    except KeyboardInterrupt:
        typer.echo(
            "interrupted: finished runs are kept, interrupted ones resume from their "
            "last checkpoint; rerun the same command to continue",
            err=True,
        )
        raise typer.Exit(130) from None
    failed = [j for j in all_jobs if j.outcome == "failed"]
    for job in failed:
        typer.echo(
            f"failed: {job.name} exited {job.returncode}; log: " f"{job.folder / 'train.log'}",
            err=True,
        )
    try:
        with _exits(folder):
            report_dir, report = reporting.build(folder)
    except reporting.NoRuns:
        typer.echo("no run wrote any output: no report", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"report: {report_dir / 'report.md'}")
    for arm, data in report["specs"].get(loaded.name, {}).get("arms", {}).items():
        typer.echo(f"  {arm:24s} final val acc {reporting._cell(data['final_acc'], '.2f', 100)}")
    if failed:
        raise typer.Exit(1)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class _Progress:
    """A live table on a terminal; one line per start and end of a run otherwise."""

    def __init__(self, total: int):
        from rich.console import Console

        self.console = Console()
        self.total = total
        self.live = None

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, jobs, changed) -> None:
        counts = {
            k: sum(j.outcome == k for j in jobs)
            for k in ("completed", "diverged", "failed", "skipped", "running")
        }
        done = counts["completed"] + counts["diverged"] + counts["failed"] + counts["skipped"]
        if self.live is not None:
            from rich.table import Table

            table = Table(
                title=f"{done}/{self.total} runs done "
                f"({counts['skipped']} skipped as already finished, "
                f"{counts['failed']} failed)"
            )
            for column in ("run", "epoch", "val acc", "time"):
                table.add_column(column)
            for job in jobs:
                if job.outcome == "running":
                    epoch, acc = job.progress()
                    table.add_row(
                        job.name,
                        str(epoch),
                        "-" if acc is None else f"{acc:.4f}",
                        f"{time.time() - job.started:.0f}s",
                    )
            self.live.update(table)
        elif changed is not None:
            if changed.outcome == "running":
                typer.echo(f"[{done}/{self.total}] start {changed.name}")
            else:
                epoch, acc = changed.progress()
                result = "" if acc is None else f", epoch {epoch}, val acc {acc:.4f}"
                typer.echo(f"[{done}/{self.total}] {changed.outcome} {changed.name}{result}")


@app.command()
def report(
    runs: Annotated[Path, typer.Argument(help="A folder of run folders, e.g. runs/NAME.")],
    out: Annotated[
        Optional[Path], typer.Option("-o", "--out", help="Report folder (default RUNS/report).")
    ] = None,
) -> None:
    """Rebuild the ablation report (tables, statistics, plots) from run folders alone."""
    from generator import report as reporting

    try:
        with _exits(out or runs / "report"):
            report_dir, _ = reporting.build(runs, out)
    except reporting.NoRuns as exc:
        typer.echo(f"{runs}: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {report_dir / 'report.md'}")


@app.command()
def validate(
    specs: SpecArgs,
    set_: SetOpt = None,
    import_: Annotated[
        bool,
        typer.Option(
            "--import",
            help="Also import the spec's own factories (arch/dataset: custom) and call them "
            "once on the spec's shape, with the spec's folder on the import path.",
        ),
    ] = False,
) -> None:
    """Check specs and print every problem as FILE:LINE: path: message."""
    from generator import factories

    files, errors = _spec_files(specs)
    for path in files:
        try:
            spec, doc = load_spec(path, set_ or [])
            if import_:
                problems = factories.check(spec, doc, str(path))
                if problems:
                    raise SpecErrors(problems)
            arms = arm_names(spec)
            typer.echo(f"{path}: ok ({spec.name}: {', '.join(arms)})")
        except SpecErrors as exc:
            errors += exc.errors
    if errors:
        _fail(errors)


@app.command()
def schema(
    out: Annotated[
        Optional[Path], typer.Option("-o", "--out", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Print the spec's JSON Schema (committed as specs/spec.schema.json)."""
    text = schema_text()
    if out is None:
        sys.stdout.write(text)
    else:
        with _exits(out):
            out.write_text(text)
        typer.echo(f"wrote {out}")


def schema_text() -> str:
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **Spec.model_json_schema(),
    }
    return json.dumps(document, indent=2) + "\n"


@app.command()
def variants() -> None:
    """List the ablation arms and the noise std eps(t) each adds after an optimizer step."""
    assert [row[0] for row in ARM_TABLE] == list(ARMS)
    header = ("arm", "eps(t)", "phase detector", "decay in phase")
    widths = [max(len(row[i]) for row in [header, *ARM_TABLE]) for i in range(4)]
    for row in [header, *ARM_TABLE]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    typer.echo("t: optimizer steps since the start; t_p: steps since the last phase change;")
    typer.echo("p: the phase (exploration, convergence, fine_tuning) the detector reports.")


def main() -> None:
    app()
