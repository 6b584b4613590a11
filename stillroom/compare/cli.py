"""`stillroom compare`: every route on one task, one report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from stillroom.options import NO_OPTIONS, Shared, TaskOpt, shared_options
from stillroom.ui import console, library_output_to, run_guarded

LIBRARY_LOG = "library.log"
"""What the libraries print during a compare (progress bars, warnings), in the compare folder."""


def print_compare(summary: dict, out: Path) -> None:
    """The compare table in the terminal (finished routes), the others listed with their reason, then the
    recommendation and the report's path."""
    # Light borders, no edge padding: the table fits 80 columns with every route name, so a terminal of 100
    # still has room for more columns without rich cutting the last one.
    # With a teacher line, a recovery column (its interval is in the report and compare.json): 90 columns, so on a
    # console narrower than that (80, or output to a file) accuracy gives it its place (it stays in the report).
    t = Table(title=f"compare: {summary['task']}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    gap = summary.get("recovery") is not None
    acc = not gap or console.width >= 90
    for col in ("route", "macro-F1", "95% CI", *(["acc"] if acc else []), "Δ " + summary["baseline"],
                *([("recovery" if acc else "recov.")] if gap else []), "p50 s", "build s"):
        t.add_column(col, justify="right", no_wrap=True)
    others = []
    for r in summary["rows"]:
        if r["status"] != "ok":
            others.append(f"{r['route']}: {r['status']}: {r.get('error') or r.get('reason') or ''}")
            continue
        v = r.get("vs_baseline") or {}
        ci = r["macro_f1_ci95"] or r["accuracy_ci95"] or [None, None]
        d = "-" if r.get("is_baseline") or v.get("diff") is None else f"{v['diff']:+.3f}{' *' if v['significant'] else ''}"
        t.add_row(r["route"] + (" (ref)" if r["reference"] else ""), "-" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}",
                  "-" if ci[0] is None else f"{ci[0]:.2f}-{ci[1]:.2f}",
                  *(["-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"] if acc else []), d,
                  *([_recovery(r, short=not acc)] if gap else []),
                  f"{r['latency_p50_s']:.2f}", f"{r['build_seconds']:.0f}")
    console.print(t)
    console.print("* paired bootstrap p < 0.05 against the baseline on the same examples; other gaps may be noise.")
    for line in others:
        console.print(f"[yellow]{line}[/]", soft_wrap=True)
    for r in summary["rows"]:
        for w in r.get("warnings") or ():
            console.print(f"[bold yellow]warning[/] (route {r['route']}): {w}", soft_wrap=True)
    for w in summary.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {w}", soft_wrap=True)
    console.print(f"[bold]{summary['recommendation']}[/]", soft_wrap=True)
    console.print(f"report: [bold]{out / 'report.html'}[/]", soft_wrap=True)


def no_route_finished(summary: dict, out: Path) -> str | None:
    """The error line of a compare in which no route finished (every one failed, was skipped or was not run):
    what became of each route and where its error is. None when at least one route finished."""
    rows = summary["rows"]
    if any(r["status"] == "ok" for r in rows):
        return None
    what = ", ".join(f"{r['route']} {r['status']}" for r in rows) or "no route planned"
    where = f"the reasons are listed above and in {Path(out) / 'report.html'}"
    if any(r["status"] == "failed" for r in rows):
        where += f"; a failed route's traceback is in {Path(out) / 'routes' / '<route>' / 'route.json'}"
    return f"no route finished ({what}): {where}"


def _recovery(r: dict, short: bool = False) -> str:
    """A route's recovery of the teacher's lead, as the table shows it (the interval is in the report)."""
    if r["route"] == "teacher":
        return "1"
    if r.get("is_baseline"):
        return "0"
    rec = r.get("recovery")
    if not rec:
        return "-"
    return f"{rec['value']:.2f}" if rec["defined"] else ("undef." if short else "undefined")


def _check_routes(names: list[str]) -> None:
    """Route names given on the command line, checked here so a typo is reported as the command line's (with the
    nearest known route), not as an error in the YAML file."""
    import difflib

    from stillroom.compare.config import ALL_ROUTES

    for name in names:
        if name not in ALL_ROUTES:
            close = difflib.get_close_matches(name, ALL_ROUTES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise typer.BadParameter(f"unknown route {name!r}{hint} (known: {', '.join(ALL_ROUTES)})",
                                     param_hint="'--routes'")


@shared_options(labels=True)
def compare(
    config: Annotated[Path | None, typer.Argument(help="YAML config: task, teacher, student, routes, budgets (CompareConfig).")] = None,
    task: TaskOpt = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher model spec (default: the embedded gemma3-270m).")] = None,
    student: Annotated[str | None, typer.Option(help="Student model spec (default: the embedded gemma3-270m).")] = None,
    routes: Annotated[str | None, typer.Option(help="Comma-separated routes to run (overrides the config).")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Evaluated examples, the same for every route.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Compare folder (default: runs/compare-<task>-<hash of task, teacher, student and selection>; rerun resumes).")] = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """Run every route that applies to one teacher → student pair on the same task and the same test examples,
    and write one report: quality with 95% intervals and a paired test against zero-shot, latency, tokens, build
    cost and size, the Pareto fronts, and a recommendation. Each route keeps its own run folder under
    <run-dir>/routes/. Rerunning with nothing changed makes no model call and no training step; changing one
    route's budget reruns that route only. Exits with status 2 when no route finished (the failed and skipped ones
    are listed with their reasons)."""

    def body():
        from stillroom.locking import wait_for_holders

        wait_for_holders(opts.wait)  # the compare folder and every route folder in it
        from stillroom.compare.config import CompareConfig
        from stillroom.compare.run import compare_dir_for, run_compare
        from stillroom.options import load_config

        names = [r.strip() for r in routes.split(",") if r.strip()] if routes else None
        if names:
            _check_routes(names)
        over = {"task": opts.task(task),
                "teacher": {"spec": teacher}, "student": {"spec": student},
                "routes": names, "eval_limit": eval_limit}
        cfg = load_config(config, CompareConfig, over, "--task", bool(task))
        out = run_dir or compare_dir_for(cfg)
        # Library progress bars, warnings and log lines go to the run folder; the terminal keeps ours.
        with library_output_to(Path(out) / LIBRARY_LOG, training_bars=True):
            summary = run_compare(cfg, out)
        print_compare(summary, out)
        if (Path(out) / LIBRARY_LOG).exists():
            console.print(f"library output: {Path(out) / LIBRARY_LOG}", soft_wrap=True)
        nothing = no_route_finished(summary, out)
        if nothing:
            from stillroom.errors import StillroomError

            raise StillroomError(nothing)  # exit status 2, like every other failed command

    run_guarded(body)


def register(app: typer.Typer) -> None:
    """Add `stillroom compare` to the main app."""
    app.command("compare")(compare)
