"""The perturbgen command line: generate, validate, schema, variants, export, ...

Exit codes: 0 ok; 1 `generate --check` found drift; 2 invalid spec or usage, or an output
folder that cannot be written; 3 the generator itself failed (a bug: please report it).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from generator import factories
from generator.errors import SpecError, SpecErrors
from generator.generate import render_all, render_spec
from generator.loading import spec_files
from generator.output import atomic_write, drift, write_folder
from generator.render import GenerationError, check_arms, load_spec
from generator.spec import ARMS, arm_names, schema_text

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
# the slurm launcher's resources, shared by ablate and tune (see _slurm_resources)
CpusOpt = Annotated[int, typer.Option(min=1, help="slurm: CPUs per run.")]
PartitionOpt = Annotated[Optional[str], typer.Option(help="slurm: partition.")]
TimeOpt = Annotated[int, typer.Option(min=1, help="slurm: time limit per attempt, minutes.")]
MemOpt = Annotated[Optional[str], typer.Option(help="slurm: memory per run, e.g. 16G.")]
AccountOpt = Annotated[Optional[str], typer.Option(help="slurm: account.")]
QosOpt = Annotated[Optional[str], typer.Option(help="slurm: quality of service.")]
SbatchOpt = Annotated[
    Optional[list[str]],
    typer.Option(metavar="KEY=VALUE", help="slurm: any other sbatch option, repeatable."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        metavar="KEY.PATH=VALUE",
        help="Override a spec field (the value is YAML), e.g. --set optimizer.lr=0.05.",
    ),
]

EPS_TEXT = {  # arm: (eps(t), phase detector, decay in phase), for `variants`
    "baseline": ("0 (no perturbation code is emitted)", "-", "-"),
    "fixed": ("eps_fixed", "-", "-"),
    "phase_only": ("eps_phase[p]", "yes", "no"),
    "schedule_only": ("eps_base * exp(-lambda * t)", "-", "yes"),
    "full": ("eps_phase[p] * exp(-lambda * t_p)", "yes", "yes"),
    "gradient_noise": ("sqrt(eta / (1 + t)^gamma), in the gradient", "-", "-"),
    "anti_pgd": ("sigma; theta gets xi_{t+1} - xi_t", "-", "-"),
}


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
        typer.Option(
            "--variant",
            help="Emit this arm (repeatable), e.g. --variant fixed; the arms already in "
            "OUT/NAME stay there, made again from this spec.",
        ),
    ] = None,
    set_: SetOpt = None,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if the output folder differs.")
    ] = False,
) -> None:
    """Render every arm of each spec into OUT/<spec name>/."""
    files, errors = spec_files(specs)
    loaded = []
    for path in files:
        with _exits(path):
            try:
                spec, doc = load_spec(path, set_ or [])
                check_arms(spec, path, variant or [])
                loaded.append((spec, doc, path))
            except SpecErrors as exc:  # collected: every spec's errors print together
                errors += exc.errors
    names = [spec.name for spec, _, _ in loaded]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(SpecError(str(out / name), None, "", "two specs share this name"))
    if errors:
        _fail(errors)
    with _exits(out):  # all specs at once: black formats their shared blocks once
        # --variant adds or updates arms: the other arms of a spec's folder stay
        rendered = render_all(loaded, variant or [], previous=out, keep_arms=True)
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
def export(
    spec: Annotated[Path, typer.Argument(help="The spec file.", show_default=False)],
    arm: Annotated[
        str,
        typer.Argument(
            help="A perturbing arm: fixed, phase_only, schedule_only, full, gradient_noise or "
            "anti_pgd."
        ),
    ],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="The module to write (its name is imported).")
    ] = Path("adaptive_perturbation.py"),
    set_: SetOpt = None,
) -> None:
    """Write ARM of SPEC as one standalone module for your own training loop:
    AdaptivePerturbation, and callbacks for Lightning and Hugging Face."""
    from generator.export import export as export_module

    if out.suffix != ".py" or not out.stem.isidentifier():
        typer.echo(
            f"{out}: the module is imported, so name it NAME.py with NAME an identifier", err=True
        )
        raise typer.Exit(2)
    with _exits(out):
        atomic_write(out, export_module(spec, arm, set_ or [], module=out.name))
    typer.echo(f"wrote {out} (arm {arm} of {spec})")


@app.command()
def ablate(
    ctx: typer.Context,
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
    fork: Annotated[
        bool,
        typer.Option(
            help="Fork each run from a server that imported torch once (saves seconds per "
            "run); --no-fork starts a fresh python per run. torchrun runs never fork."
        ),
    ] = True,
    set_: SetOpt = None,
    launcher: Annotated[
        str,
        typer.Option(help="local: processes on this machine; slurm: one job array (submitit)."),
    ] = "local",
    gpus_per_run: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            help="GPUs per run (default: --nproc where GPUs are visible, else 0). Locally each "
            "concurrent run gets its own via CUDA_VISIBLE_DEVICES; on slurm >1 starts torchrun.",
        ),
    ] = None,
    cpus_per_run: CpusOpt = 1,
    partition: PartitionOpt = None,
    time_min: TimeOpt = 60,
    mem: MemOpt = None,
    account: AccountOpt = None,
    qos: QosOpt = None,
    sbatch: SbatchOpt = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="slurm: submit and return; rerun to collect.")
    ] = False,
    cancel: Annotated[
        bool,
        typer.Option("--cancel", help="slurm: cancel this ablation's queued and running tasks."),
    ] = False,
    precision: Annotated[
        Optional[float],
        typer.Option(
            help="Stein's two-stage design: --seeds is the pilot; then run as many more seeds "
            "as make each 95 % CI of final test accuracy against baseline at most ±D points.",
        ),
    ] = None,
    max_seeds: Annotated[
        Optional[int], typer.Option(min=1, help="With --precision: at most this many seeds.")
    ] = None,
) -> None:
    """Run every arm over seeds as separate processes (or Slurm array tasks), then report.

    Rerunning the same command skips finished runs and resumes interrupted ones; on slurm it
    attaches to the submitted tasks and resubmits only failed or missing runs.
    """
    from generator import ablate as runner
    from generator import report as reporting
    from generator import slurm

    _check_launcher(launcher)
    if precision is not None and (seeds < 3 or precision <= 0):
        typer.echo("error: --precision D needs D > 0 and a pilot of --seeds 3 or more", err=True)
        raise typer.Exit(2)
    resources = None
    if launcher == "slurm":
        resources = _slurm_resources(
            gpus_per_run, cpus_per_run, partition, time_min, mem, account, qos, sbatch
        )
    given = {k for k in ctx.params if ctx.get_parameter_source(k).name != "DEFAULT"}
    shared = {k: v for k, v in ctx.params.items() if k in runner.Options.__dataclass_fields__}
    options = runner.Options(
        **shared, jobs_given="jobs" in given, overrides=set_ or [], resources=resources
    )
    try:
        with _exits(spec):
            code = runner.ablate(
                spec, options, typer.echo, lambda line: typer.echo(line, err=True)
            )
    except KeyboardInterrupt:
        typer.echo(
            (
                "stopped waiting: the cluster jobs keep running; rerun the same command to "
                "attach and collect them, or add --cancel to cancel them"
                if resources
                else "interrupted: finished runs are kept, interrupted ones resume from their "
                "last checkpoint; rerun the same command to continue"
            ),
            err=True,
        )
        raise typer.Exit(130) from None
    except reporting.NoRuns:
        typer.echo("no run wrote any output: no report", err=True)
        raise typer.Exit(1) from None
    except (reporting.Refused, runner.Busy, slurm.SlurmError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if code:
        raise typer.Exit(code)


def _check_launcher(launcher: str) -> None:
    if launcher not in ("local", "slurm"):
        typer.echo(f"error: --launcher {launcher!r}: choose local or slurm", err=True)
        raise typer.Exit(2)


def _slurm_resources(gpus, cpus, partition, time_min, mem, account, qos, sbatch):
    from generator import slurm

    try:
        return slurm.resources(gpus, cpus, partition, time_min, mem, account, qos, sbatch or [])
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def tune(
    spec: Annotated[Path, typer.Argument(help="A spec with a tune: section.", show_default=False)],
    trials: Annotated[
        Optional[int],
        typer.Option(min=1, help="Finished trials to reach per arm (default tune.trials)."),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1, help="Trials (or fresh runs) at a time here; each gets cores / workers threads."
        ),
    ] = 1,
    storage: Annotated[
        Optional[str],
        typer.Option(
            help="Optuna storage: sqlite:///FILE, postgresql://..., mysql://... or journal:FILE "
            "(default: DIR/study.db). Processes sharing one storage share the study."
        ),
    ] = None,
    study: Annotated[
        Optional[str],
        typer.Option(help="Study name prefix: each arm's is PREFIX-ARM (default NAME)."),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("-o", "--out", help="Tune folder (default tune/NAME).")
    ] = None,
    set_: SetOpt = None,
    launcher: Annotated[
        str,
        typer.Option(help="local: processes on this machine; slurm: a job array per trial."),
    ] = "local",
    gpus_per_run: Annotated[
        int, typer.Option(min=0, max=1, help="slurm: GPUs per run (a run is one process).")
    ] = 0,
    cpus_per_run: CpusOpt = 1,
    partition: PartitionOpt = None,
    time_min: TimeOpt = 60,
    mem: MemOpt = None,
    account: AccountOpt = None,
    qos: QosOpt = None,
    sbatch: SbatchOpt = None,
) -> None:
    """Tune every arm of the spec's tune: section with the same budget, then compare them.

    Each arm gets a study of its own on the validation split (its trials evaluate no test
    metric); DIR/tuned/ARM.yaml is the spec with its best values, DIR/tune_report.md and
    DIR/tune.json hold the studies and their budget curves. Then each arm's best values run
    on fresh seeds (DIR/runs) and DIR/report/report.md is the paired report. Rerunning the
    same command continues. With --launcher slurm each trial's runs are Slurm tasks: a pruned
    trial's are cancelled, and so are the running ones on Ctrl-C.
    """
    from generator import slurm
    from generator import tune as tuning

    _check_launcher(launcher)
    resources = None
    if launcher == "slurm":
        resources = _slurm_resources(
            gpus_per_run, cpus_per_run, partition, time_min, mem, account, qos, sbatch
        )
    with _exits(spec):
        options = dict(trials=trials, workers=workers, storage=storage, study=study, out=out)
        chosen = tuning.prepare(spec, set_ or [], resources=resources, **options)
    try:
        with _exits(chosen.out):
            why, info = tuning.tune(chosen)
    except KeyboardInterrupt:
        typer.echo(
            "interrupted: finished trials are kept, running ones are marked failed and do not "
            "count"
            + ("; their Slurm tasks are cancelled" if resources else "")
            + "; rerun the same command to continue",
            err=True,
        )
        raise typer.Exit(130) from None
    except slurm.SlurmError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for arm, a in info["arms"].items():
        if a["best"] is not None:
            typer.echo(
                f"{arm}: best trial {a['best']['number']}, {info['objective']} "
                f"{a['best']['value']:.4g}; spec: {chosen.out / a['tuned']}"
            )
    typer.echo(f"tuning report: {chosen.out / 'tune_report.md'}")
    if "report" in info:
        typer.echo(f"report: {Path(info['report']) / 'report.md'}")
    if why == "others":
        typer.echo(
            "the rest of a budget is running in other processes on these studies; rerun the "
            "same command for the fresh seeds once they end"
        )
    if why == "no baseline":
        typer.echo("stopped: the baseline has no completed trial to add the method to", err=True)
        raise typer.Exit(1)
    if why == "failures":
        typer.echo(
            f"stopped: {tuning.MAX_FAILURES_IN_A_ROW} trials in a row failed; see their "
            "train.log (listed in the report)",
            err=True,
        )
        raise typer.Exit(1)


@app.command()
def report(
    runs: Annotated[
        Optional[Path], typer.Argument(help="A folder of run folders, e.g. runs/NAME.")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("-o", "--out", help="Report folder (default RUNS/report).")
    ] = None,
    from_: Annotated[
        Optional[Path],
        typer.Option(
            "--from",
            help="Re-render report.md and the plots from this report.json (default -o: its "
            "folder) instead of reading run folders.",
        ),
    ] = None,
) -> None:
    """Rebuild the ablation report (tables, statistics, plots) from run folders alone."""
    from generator import report as reporting

    if (runs is None) == (from_ is None):
        typer.echo("error: give either RUNS or --from REPORT_JSON", err=True)
        raise typer.Exit(2)
    if from_ is not None:
        report_dir = out or from_.parent
        try:
            with _exits(report_dir):
                reporting.rerender(from_, report_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            typer.echo(f"error: {from_}: not a report.json ({exc.__class__.__name__})", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wrote {report_dir / 'report.md'}")
        return
    try:
        with _exits(out or runs / "report"):
            report_dir, _ = reporting.build(runs, out)
    except reporting.Refused as exc:
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
            "once on the spec's shape, with the folders of the spec and of the specs it extends "
            "on the import path.",
        ),
    ] = False,
) -> None:
    """Check specs and print every problem as FILE:LINE: path: message."""
    files, errors = spec_files(specs)
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
            atomic_write(out, text)
        typer.echo(f"wrote {out}")


@app.command()
def variants() -> None:
    """List the ablation arms and the noise std eps(t) each adds after an optimizer step."""
    rows = [("arm", "eps(t)", "phase detector", "decay in phase")]
    rows += [(arm, *EPS_TEXT[arm]) for arm in ARMS]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    typer.echo("t: optimizer steps since the start; t_p: steps since the last phase change;")
    typer.echo("p: the phase (exploration, convergence, fine_tuning) the detector reports.")


def main() -> None:
    app()
