"""What the user sees in the terminal: the console, the progress bar of every long loop, the error guard of
every command, and the results table. Route CLIs import this module, never `stillroom.cli`."""

from __future__ import annotations

from collections.abc import Mapping

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from stillroom.errors import StillroomError

console = Console()


def progress_bar(transient: bool = False) -> Progress:
    """The progress bar every long loop in Stillroom uses."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
        console=console,
    )


def fail(exc: BaseException) -> None:
    """Print one clear error line and exit with status 2."""
    # soft_wrap: an error line is never broken at the terminal width (logs and tests read it whole).
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    raise typer.Exit(2)


def run_guarded(fn):
    """Run a command body: one clear message for user errors, a resumable stop on Ctrl-C."""
    try:
        return fn()
    except StillroomError as exc:
        fail(exc)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: every completed call is in the run's cache; rerun the same command to resume.")
        raise typer.Exit(130) from None


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_results(named_metrics: Mapping[str, Mapping]) -> None:
    """A short table of the main figures, one row per evaluated condition."""
    t = Table(title="results")
    for col in ("condition", "n", "accuracy", "macro-F1", "invalid", "latency p50 s"):
        t.add_column(col, justify="right")
    for name, m in named_metrics.items():
        t.add_row(name, str(m["n"]), _f(m.get("accuracy")), _f(m.get("macro_f1")), _f(m.get("invalid_rate")),
                  _f(m.get("latency_p50_s")))
    console.print(t)


def print_notes(notes, report_path=None) -> None:
    """The run's notes, then the path of its report."""
    for n in notes or ():
        console.print(f"[yellow]note:[/] {n}")
    if report_path is not None:
        console.print(f"report: [bold]{report_path}[/]")
