"""The live display of runs (ablate) and trials (tune, which extends it)."""

from __future__ import annotations

import time

import typer


class Progress:
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
                if job.outcome in ("running", "elsewhere"):
                    epoch, acc = job.progress()
                    table.add_row(
                        job.name,
                        str(epoch),
                        "-" if acc is None else f"{acc:.4f}",
                        (
                            f"{time.time() - job.started:.0f}s"
                            if job.outcome == "running"
                            else f"elsewhere: {job.reason}"
                        ),
                    )
            self.live.update(table)
        elif changed is not None:
            if changed.outcome == "running":
                typer.echo(f"[{done}/{self.total}] start {changed.name}")
            elif changed.outcome == "elsewhere":
                typer.echo(
                    f"[{done}/{self.total}] waiting for {changed.name}: running elsewhere "
                    f"({changed.reason})"
                )
            else:
                epoch, acc = changed.progress()
                result = "" if acc is None else f", epoch {epoch}, val acc {acc:.4f}"
                typer.echo(f"[{done}/{self.total}] {changed.outcome} {changed.name}{result}")
