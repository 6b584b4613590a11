"""Run every planned route into its own folder under the compare folder, then put them side by side.

Resuming: a route whose folder holds a `result.json` made from the same route config (its identity digest,
stored in `route.json`) is not run again: no backend call, no training step, the same numbers. Changing one
route's budget changes only that route's digest, so only that route reruns. A spend cap or Ctrl-C stops the
compare cleanly (every paid call is in the route's cache; rerun to continue); any other error in a route is
recorded in the report and the other routes still run.

Spend: the compare's `spend` caps hold for the whole compare (every route's teacher and API student calls
together, earlier invocations included), not for each route on its own; the stop message gives the total and each
route's share, and compare.json records them.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from stillroom.backends.usage import SpendCap, command_ledger
from stillroom.compare.config import CompareConfig
from stillroom.compare.routes import RoutePlan, plan_routes
from stillroom.errors import SpendCapReached, StillroomError
from stillroom.route import load_task_config, read_result, stop_clock
from stillroom.runs import RunFolder, claim_run_folder, digest_of
from stillroom.ui import console

ROUTE_FILE = "route.json"


SELECTION_FIELDS = ("task", "teacher", "student", "eval_split", "eval_limit", "train_limit", "val_limit")
"""What a compare is: its task, teacher, student and the examples selected (test, training pool, validation).
Routes, budgets, shots and the baseline are not: each route keeps its own identity (`route.json`) inside the
compare folder, so changing one route's budget reruns that route only, in the same folder."""


def compare_dir_for(cfg: CompareConfig, root: Path | None = None) -> Path:
    """The default compare folder, `runs/compare-<task>-<hash of SELECTION_FIELDS>`."""
    from stillroom.runs import default_runs_root, digest_of, identity_of, slug

    ident = {k: v for k, v in identity_of(cfg).items() if k in SELECTION_FIELDS}
    return (root or default_runs_root()) / f"compare-{slug(cfg.task.spec)}-{digest_of(ident)[:8]}"


def route_dir(out: Path, name: str) -> Path:
    return Path(out) / "routes" / name


def _deployed_predictions(folder: Path, condition: str) -> list[dict]:
    p = folder / "predictions.jsonl"
    if not p.exists():
        return []
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("condition") == condition]


def run_one(plan: RoutePlan, out: Path) -> dict:
    """Run (or reuse) one route; returns its entry for compare.json."""
    folder = route_dir(out, plan.name)
    entry: dict = {"route": plan.name, "reference": plan.reference, "folder": str(folder)}
    if plan.skip_reason:
        return {**entry, "status": plan.skip_status, "reason": plan.skip_reason}
    digest = digest_of(plan.config)
    previous = json.loads((folder / ROUTE_FILE).read_text()) if (folder / ROUTE_FILE).exists() else {}
    result = read_result(folder)
    if result is not None and previous.get("digest") == digest and previous.get("status") == "ok":
        console.print(f"[green]{plan.name}[/]: unchanged, reusing {folder}")
        return {**entry, "status": "ok", "reused": True, "result": result}
    console.rule(f"route: {plan.name}")
    claim_run_folder(folder)
    RunFolder(folder).write_json(ROUTE_FILE, {"digest": digest, "status": "running"})
    try:
        plan.run(plan.config, folder)
    except (SpendCapReached, KeyboardInterrupt):
        RunFolder(folder).write_json(ROUTE_FILE, {"digest": digest, "status": "stopped"})
        raise
    except Exception as exc:  # a failing route is reported; the others still run
        stop_clock(folder)  # its build clock must not count the next routes' time
        kind = "error" if isinstance(exc, StillroomError) else type(exc).__name__
        RunFolder(folder).write_json(ROUTE_FILE, {"digest": digest, "status": "failed", "error": f"{kind}: {exc}",
                                                  "traceback": traceback.format_exc()})
        console.print(f"[red]{plan.name} failed[/]: {exc}")
        return {**entry, "status": "failed", "error": f"{kind}: {exc}"}
    result = read_result(folder)
    RunFolder(folder).write_json(ROUTE_FILE, {"digest": digest, "status": "ok"})
    return {**entry, "status": "ok", "reused": False, "result": result}


def run_compare(cfg: CompareConfig, out: str | Path, *, plans: list[RoutePlan] | None = None) -> dict:
    """Run every route of `cfg` into `out/routes/<route>/` and write `compare.json` and `report.html`."""
    from stillroom.compare.report import compare_report, summarise
    from stillroom.locking import hold_run_folder

    out = Path(out)
    # The task is loaded once up front: bad data (a missing label column, a malformed line) stops the compare
    # here with one error, before any folder exists, instead of failing every route in turn.
    load_task_config(cfg.task)
    plans = plans if plans is not None else plan_routes(cfg)  # every route's config checked before the folder exists
    hold_run_folder(out)  # one compare per folder (each route's folder is held by its route as well)
    run = RunFolder(out)
    run.save_config(cfg.model_dump(mode="json"))
    entries: list[dict] = []
    stopped = None
    # One ledger for the whole compare: its caps hold for every route together (teacher and API student),
    # across reruns, with the single-run reservation rule (stillroom.backends.usage.Ledger).
    cap = SpendCap(max_tokens=cfg.spend.max_tokens, max_cost_usd=cfg.spend.max_cost_usd)
    ledger = None
    try:
        with command_ledger(cap, out, what="compare") as ledger:
            for plan in plans:
                entries.append(run_one(plan, out))
    except (SpendCapReached, KeyboardInterrupt) as exc:
        stopped = "spend cap reached" if isinstance(exc, SpendCapReached) else "interrupted"
        raise
    finally:
        done = {e["route"] for e in entries}
        for plan in plans:
            if plan.name not in done:
                entries.append({"route": plan.name, "reference": plan.reference, "status": "not run",
                                "reason": stopped or "not reached", "folder": str(route_dir(out, plan.name))})
        for e in entries:
            if e.get("status") == "ok":
                e["predictions"] = _deployed_predictions(Path(e["folder"]), e["result"]["condition"])
        summary = summarise(cfg, entries)
        if ledger is not None:
            summary["spend"] = {"tokens": ledger.spent_tokens, "cost_usd": round(ledger.spent_cost_usd, 8),
                                "cap_max_tokens": cap.max_tokens, "cap_max_cost_usd": cap.max_cost_usd,
                                "by_route": ledger.shares()}
        run.write_json("compare.json", summary)
        run.write_text("report.html", compare_report(summary, out))
    return summary
