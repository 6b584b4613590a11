"""The compare report: one table (quality with 95% intervals, a paired test against the baseline, the share of
the teacher-student gap each route recovers, latency, tokens, build cost, size), two plots with the Pareto front
marked, one plain recommendation, and a link to each route's own report. `summarise` makes compare.json;
`compare_report` renders it."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

from stillroom.compare.config import CompareConfig
from stillroom.evaluate.stats import bootstrap_recovery, mcnemar, paired_bootstrap
from stillroom.report.html import fig_to_img, page, plt, point_labels, table

ALPHA = 0.05
WITHIN = 0.02
"""'Within 2 points of the teacher': the recommendation's tolerance on macro-F1 (or accuracy)."""
STUDENT_LINE = "zero-shot"
"""Recovery is measured from the student's zero-shot line (the route that changes nothing) to the teacher's."""


def pareto_front(points: Sequence[tuple[str, float, float]]) -> set[str]:
    """Names of the points no other point dominates, for (name, cost, quality): lower cost and higher quality
    are better; a point is dominated when another is at least as good on both and better on one."""
    front = set()
    for name, c, q in points:
        dominated = any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for n2, c2, q2 in points if n2 != name)
        if not dominated:
            front.add(name)
    return front


def _quality(r: dict) -> float | None:
    q = r["quality"]
    return q["macro_f1"] if q.get("macro_f1") is not None else q["accuracy"]


def paired_test(base_preds: list[dict], preds: list[dict], labels: list[str] | None) -> dict | None:
    """Paired bootstrap on macro-F1 (accuracy for free text) and exact McNemar on correctness, over the examples
    both were evaluated on."""
    by_id = {p["id"]: p for p in base_preds}
    pairs = [(by_id[p["id"]], p) for p in preds if p["id"] in by_id]
    if not pairs:
        return None
    gold = [b["gold"] for b, _ in pairs]
    if all(g is None for g in gold):
        return None  # no gold answers: nothing to test
    pb = paired_bootstrap(gold, [p["pred"] for _, p in pairs], [b["pred"] for b, _ in pairs], labels,
                          metric="macro_f1" if labels else "accuracy")
    mc = mcnemar([p["correct"] for _, p in pairs], [b["correct"] for b, _ in pairs])
    return {"n": len(pairs), "metric": "macro_f1" if labels else "accuracy", "diff": pb["diff"], "diff_ci95": pb["ci"],
            "bootstrap_p": pb["p_value"], "mcnemar_p": mc["p_value"], "wins": mc["a_only"], "losses": mc["b_only"],
            "significant": bool(pb["p_value"] is not None and pb["p_value"] < ALPHA)}


def recovery_test(student_preds: list[dict], teacher_preds: list[dict], preds: list[dict],
                  labels: list[str] | None) -> dict | None:
    """The route's recovery of the teacher-student gap (`bootstrap_recovery`) over the examples all three were
    evaluated on, with the route's, the student's and the teacher's predictions resampled together."""
    s_by, t_by = {p["id"]: p for p in student_preds}, {p["id"]: p for p in teacher_preds}
    trip = [(s_by[p["id"]], t_by[p["id"]], p) for p in preds if p["id"] in s_by and p["id"] in t_by]
    if not trip:
        return None
    rec = bootstrap_recovery([s["gold"] for s, _, _ in trip], [p["pred"] for _, _, p in trip],
                             [s["pred"] for s, _, _ in trip], [t["pred"] for _, t, _ in trip], labels,
                             metric="macro_f1" if labels else "accuracy")
    return {"value": rec["recovery"], "ci95": rec["ci"], "defined": rec["defined"], "reason": rec["reason"],
            "gap": rec["gap"], "gap_ci95": rec["gap_ci"], "n": rec["n"], "metric": rec["metric"],
            "dropped_resamples": rec["dropped_resamples"]}


def _recovery_text(r: dict) -> str:
    rec = r.get("recovery")
    if not rec or not rec["defined"]:
        return ""
    lo, hi = rec["ci95"]
    return f", recovering {rec['value']:.2f} [{lo:.2f}, {hi:.2f}] of the teacher's lead over zero-shot"


def _undefined_text(rows: list[dict]) -> str:
    rec = next((r["recovery"] for r in rows if r.get("recovery")), None)
    if rec is None or rec["defined"]:
        return ""
    return f" Recovery is undefined: {rec['reason']}."


def recommendation(rows: list[dict]) -> str:
    """One plain line: the cheapest-to-serve route within 2 points of the teacher, else the best route. Routes
    flagged as doubtful (one-class answers) are not recommended; without gold labels nothing is."""
    ok = [r for r in rows if r["status"] == "ok"]
    if ok and not any(r.get("gold_labels", True) for r in ok):
        return ("No gold labels in the test examples: quality cannot be measured, so no route is recommended "
                "(give the task a label column: --label-field).")
    flagged = [r["route"] for r in ok if r.get("warnings") and not r["reference"]]
    ok = [r for r in ok if not (r.get("warnings") and not r["reference"])]
    students = [r for r in ok if not r["reference"]]
    if not students:
        if flagged:
            return (f"Nothing to recommend: every finished route is flagged as doubtful ({', '.join(flagged)}: "
                    "one-class answers; see the warnings).")
        return "No route finished: nothing to recommend yet."
    return _recommend(ok, students) + (f" Not considered (flagged as doubtful): {', '.join(flagged)}." if flagged else "")


def _recommend(ok: list[dict], students: list[dict]) -> str:
    teacher = next((r for r in ok if r["route"] == "teacher"), None)
    best = max(students, key=lambda r: r["quality"])
    if teacher is not None:
        close = [r for r in students if r["quality"] >= teacher["quality"] - WITHIN]
        if close:
            pick = min(close, key=lambda r: (r["latency_p50_s"] or 0.0, r["build_seconds"]))
            return (f"Cheapest route within {WITHIN * 100:.0f} points of the teacher ({teacher['quality']:.3f}): "
                    f"{pick['route']} ({pick['quality']:.3f}{_recovery_text(pick)}, {pick['latency_p50_s']:.3f} s "
                    f"per answer, built in {pick['build_seconds']:.0f} s).{_undefined_text(ok)}")
        return (f"No route comes within {WITHIN * 100:.0f} points of the teacher ({teacher['quality']:.3f}); the best "
                f"is {best['route']} ({best['quality']:.3f}{_recovery_text(best)}){_sig_text(best)}."
                f"{_undefined_text(ok)}")
    return f"Best route: {best['route']} ({best['quality']:.3f}){_sig_text(best)}."


def _sig_text(r: dict) -> str:
    t = r.get("vs_baseline")
    if not t or r.get("is_baseline"):
        return ""
    word = "significantly" if t["significant"] else "not significantly"
    p = _p(t["bootstrap_p"])
    return f", {word} different from the baseline (paired p {p if p.startswith('<') else '= ' + p})"


def summarise(cfg: CompareConfig, entries: list[dict]) -> dict:
    """compare.json: one row per route, paired tests against the baseline, Pareto fronts, the recommendation."""
    base = next((e for e in entries if e["status"] == "ok" and e["route"] == cfg.baseline), None)
    teacher = next((e for e in entries if e["status"] == "ok" and e["route"] == "teacher"), None)
    student = next((e for e in entries if e["status"] == "ok" and e["route"] == STUDENT_LINE), None)
    if teacher is None or student is None or None in (_quality(teacher["result"]), _quality(student["result"])):
        teacher = student = None  # recovery needs both lines measured (gold labels)
    rows = []
    for e in entries:
        row = {k: e.get(k) for k in ("route", "reference", "status", "reason", "error", "folder", "reused")}
        if e["status"] == "ok":
            res = e["result"]
            labels = list(res["quality"]["per_class_f1"]) or None
            row.update({
                "condition": res["condition"], "quality": _quality(res), "metric": "macro_f1" if labels else "accuracy",
                **{k: res["quality"][k] for k in ("n", "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95",
                                                   "invalid_rate")},
                "latency_p50_s": res["latency"]["p50_s"], "latency_p95_s": res["latency"]["p95_s"],
                "input_tokens": res["tokens"]["input_per_answer"], "output_tokens": res["tokens"]["output_per_answer"],
                "system_prompt_tokens": res["deployment"]["system_prompt_tokens"],
                "parameters": res["deployment"]["parameters"], "size_on_disk_bytes": res["deployment"]["size_on_disk_bytes"],
                "build": res["build"], "build_seconds": res["build"]["seconds"], "examples": res["examples"],
                "is_baseline": e is base, "notes": res.get("notes", []),
                "warnings": list(res.get("warnings", [])), "instruction": res["deployment"].get("instruction"),
                "latency_method": res["latency"].get("method"), "gold_labels": res["quality"].get("gold_labels", True),
            })
            if base is not None:
                row["vs_baseline"] = paired_test(base.get("predictions", []), e.get("predictions", []), labels)
            if (teacher is not None and e is not teacher and e is not student
                    and row["quality"] is not None):
                row["recovery"] = recovery_test(student.get("predictions", []), teacher.get("predictions", []),
                                                e.get("predictions", []), labels)
        rows.append(row)
    done = [r for r in rows if r["status"] == "ok"]
    same = len({tuple(r["examples"]) for r in done}) <= 1
    measured = [r for r in done if r["quality"] is not None]
    latency_points = [(r["route"], r["latency_p50_s"] or 0.0, r["quality"]) for r in measured]
    cost_points = [(r["route"], r["build_seconds"], r["quality"]) for r in measured]
    gap = None
    if teacher is not None and student is not None:
        t_row = next(r for r in rows if r["route"] == "teacher")
        s_row = next(r for r in rows if r["route"] == STUDENT_LINE)
        # The gap itself, from any route's paired resampling (identical in each: same examples, same seed).
        rec = next((r["recovery"] for r in rows if r.get("recovery")), None)
        gap = {"teacher": t_row["quality"], "student_zero_shot": s_row["quality"],
               "metric": t_row["metric"], "gap": rec["gap"] if rec else t_row["quality"] - s_row["quality"],
               "gap_ci95": rec["gap_ci95"] if rec else None,
               "defined": bool(rec and rec["defined"]),
               "reason": rec["reason"] if rec else "no route besides the teacher and zero-shot finished"}
    return {
        "task": cfg.task.spec, "teacher": cfg.teacher.spec, "student": cfg.student.spec, "baseline": cfg.baseline,
        "same_test_examples": same, "recovery": gap, "rows": rows,
        "pareto": {"latency": sorted(pareto_front(latency_points)), "build_cost": sorted(pareto_front(cost_points))},
        "recommendation": recommendation(rows),
    }


def _scatter(points, front: set[str], xlabel: str, title: str, ylabel: str, log: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for name, x, y in points:
        on = name in front
        ax.scatter([x], [y], s=55 if on else 30, c="#c0392b" if on else "#7f8c8d", zorder=3)
    for x, y, text in point_labels(points, log_x=log):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    fr = sorted((x, y) for n, x, y in points if n in front)
    if len(fr) > 1:
        ax.step([p[0] for p in fr], [p[1] for p in fr], where="post", c="#c0392b", lw=1, alpha=.6, zorder=2)
    if log and all(x > 0 for _, x, _ in points):
        ax.set_xscale("log")
    ax.margins(x=0.18)  # room for the rightmost point's label inside the axes
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # Zoomed to the routes' range (weak students all sit near the floor of a 0-1 axis); the axis says so.
    top = max((y for _, _, y in points), default=1.0)
    # Headroom above the best point, so its name does not run into the title.
    ax.set_ylim(0, max(min(1.0, top * 1.25 + 0.05), top + 0.08))
    ax.set_title(title)
    ax.grid(alpha=.3)
    return fig_to_img(fig)


def _ci(v, ci) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.3f}"


def _p(p) -> str:
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _unescape_links(table_html: str) -> str:
    """`table` escapes cell text; the report links are ours, so they are put back as links."""
    import re

    return re.sub(r"&lt;a href=&#x27;(.*?)&#x27;&gt;(.*?)&lt;/a&gt;", r"<a href='\1'>\2</a>", table_html)


def _spend_paragraph(spend: dict | None) -> str:
    """The compare's one ledger: its total against its caps, and each route's share."""
    if not spend:
        return ""
    caps = [f"{spend['cap_max_tokens']:,} tokens" if spend.get("cap_max_tokens") is not None else "",
            f"${spend['cap_max_cost_usd']:.4f}" if spend.get("cap_max_cost_usd") is not None else ""]
    caps_text = " and ".join(c for c in caps if c)
    shares = ", ".join(f"{html.escape(k)} {v['tokens']:,} tokens / ${v['cost_usd']:.4f}"
                       for k, v in sorted(spend.get("by_route", {}).items(), key=lambda kv: -kv[1]["tokens"]))
    return (f"<p>Spend of the whole compare (every route's teacher and API student calls, earlier invocations "
            f"included): {spend['tokens']:,} tokens / ${spend['cost_usd']:.4f}"
            + (f" of a cap of {caps_text}" if caps_text else "") + (f"; by route: {shares}" if shares else "") + ".</p>")


def _with_resumed(total: int, resumed: int) -> str:
    """A build figure with the part resumed from an earlier invocation, e.g. '4,454 (3,289 resumed)'."""
    return f"{total:,} ({resumed:,} resumed)" if resumed else f"{total:,}"


def _mb(b) -> str:
    return "-" if not b else f"{b / 1e6:.0f} MB"


def _recovery_cell(r: dict, gap: dict) -> str:
    if r["route"] == "teacher":
        return "1 by definition"
    if r["route"] == STUDENT_LINE:
        return "0 by definition"
    rec = r.get("recovery")
    if not rec:
        return "-"
    if not rec["defined"]:
        return "undefined"
    lo, hi = rec["ci95"]
    return f"{rec['value']:.2f} [{lo:.2f}, {hi:.2f}]"


def _recovery_legend(gap: dict, metric: str) -> str:
    head = (f"<p>Recovery: (route − zero-shot) / (teacher − zero-shot) on {metric}, the share of the teacher's lead "
            "that the route wins back (0: none, 1: all of it); its interval resamples the route's, the student's "
            "and the teacher's answers on the same examples together.")
    if gap["defined"]:
        lo, hi = gap["gap_ci95"]
        return head + (f" Teacher {gap['teacher']:.3f}, zero-shot {gap['student_zero_shot']:.3f}: a lead of "
                       f"{gap['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}].</p>")
    return head + f" <b>Undefined here</b>: {html.escape(str(gap['reason']))}; no route can be said to recover it.</p>"


def compare_report(summary: dict, out: Path) -> str:
    """The compare report as one self-contained HTML page: a quality table, a cost table, the routes that did not
    run with their reason, the two trade-off plots and the route notes."""
    rows = summary["rows"]
    gap = summary.get("recovery")
    done = [r for r in rows if r["status"] == "ok"]
    metric = done[0]["metric"] if done else "macro_f1"
    n = done[0]["n"] if done else 0
    quality, cost, others = [], [], []
    for r in rows:
        link_path = Path(r["folder"]) / "report.html"
        link = f"<a href='{html.escape(os.path.relpath(link_path, out))}'>report</a>" if link_path.exists() else ""
        name = r["route"] + (" (reference)" if r["reference"] else "")
        if r["status"] != "ok":
            others.append([r["route"], r["status"], r.get("error") or r.get("reason") or ""])
            continue
        t = r.get("vs_baseline") or {}
        if r.get("is_baseline") or t.get("diff") is None:
            diff, p = "baseline" if r.get("is_baseline") else "-", "-"
        else:
            diff = f"{t['diff']:+.3f}{' *' if t['significant'] else ''}"
            p = f"{_p(t['bootstrap_p'])} / {_p(t['mcnemar_p'])}"
        cells = [name, r["condition"], r["n"], _ci(r["macro_f1"], r["macro_f1_ci95"]),
                 _ci(r["accuracy"], r["accuracy_ci95"]), diff, p]
        if gap is not None:
            cells.append(_recovery_cell(r, gap))
        quality.append(cells + [r["invalid_rate"]])
        b = r["build"]
        cost.append([name, f"{r['latency_p50_s']:.3f} / {r['latency_p95_s']:.3f}", r["output_tokens"], r["input_tokens"],
                     r["system_prompt_tokens"], _with_resumed(b["teacher_calls"], b.get("resumed_calls", 0)),
                     _with_resumed(b["teacher_input_tokens"] + b["teacher_output_tokens"], b.get("resumed_tokens", 0)),
                     f"{b['teacher_cost_usd']:.4f}", f"{b['seconds']:.0f}", b["training_steps"],
                     _mb(r["size_on_disk_bytes"]), link])
    q_table = table(["route", "served as", "n", "macro-F1 [95% CI]", "accuracy [95% CI]",
                     f"Δ {metric} vs {summary['baseline']}", "p: bootstrap / McNemar"]
                    + (["recovery [95% CI]"] if gap is not None else []) + ["invalid"], quality)
    c_table = _unescape_links(table(["route", "latency p50 / p95 s", "output tok / answer", "prompt tok / answer",
                                     "system-prompt tok", "teacher calls", "teacher tokens", "USD", "build wall s",
                                     "training steps", "served size", "route report"], cost))
    legend = (f"<p>Every route on the same {n} test examples. Intervals: 95% percentile bootstrap over the test "
              f"examples. Δ and p: paired bootstrap of {metric} against {html.escape(summary['baseline'])} on the same "
              "examples, and McNemar on correctness; * marks p &lt; 0.05. Any other difference is within what chance "
              "gives on this many examples.</p>")
    if gap is not None:
        legend += _recovery_legend(gap, metric)
    cost_legend = ("<p>Latency and tokens are per answer when the route is served. Build cost counts every teacher "
                   "call and token of the route's own run folder, the same however often the build was interrupted; "
                   "the part paid by an earlier, interrupted invocation and resumed from the cache is shown in "
                   "brackets. Wall seconds include those of interrupted invocations, on this machine.</p>")
    measured = [r for r in done if r["quality"] is not None]
    lat = [(r["route"], r["latency_p50_s"] or 0.0, r["quality"]) for r in measured]
    cost = [(r["route"], max(r["build_seconds"], 0.1), r["quality"]) for r in measured]
    ylabel = "macro-F1" if metric == "macro_f1" else "accuracy"
    plots = ""
    if measured:
        plots = (_scatter(lat, set(summary["pareto"]["latency"]), "latency per answer, p50 (s)", "Quality vs latency", ylabel)
                 + _scatter(cost, set(summary["pareto"]["build_cost"]), "build cost: wall seconds (log)",
                            "Quality vs build cost", ylabel, log=True))
    notes = [summary["recommendation"]]
    if not summary["same_test_examples"]:
        notes.append("Warning: the routes were not all evaluated on the same test examples.")
    notes += [f"Warning (route {r['route']}): {w}" for r in done for w in r.get("warnings", [])]
    notes += summary.get("warnings", [])
    methods = {r.get("latency_method") for r in done}
    if len(methods) == 1 and None not in methods:
        cost_legend += f"<p>Latency, measured the same way for every route: {html.escape(methods.pop())}</p>"
    elif done:
        # One line per way of measuring, naming its routes (most routes share one way: it is not repeated).
        by_method: dict[str, list[str]] = {}
        for r in done:
            by_method.setdefault(r.get("latency_method") or "not recorded (an older run)", []).append(r["route"])
        cost_legend += "<p>Latency was measured in more than one way:</p><ul>" + "".join(
            f"<li>{html.escape(', '.join(routes))}: {html.escape(method)}</li>"
            for method, routes in sorted(by_method.items(), key=lambda kv: -len(kv[1]))) + "</ul>"
    sections = [("Quality", q_table + legend), ("Cost", c_table + cost_legend + _spend_paragraph(summary.get("spend")))]
    instructions = {r["route"]: r.get("instruction") for r in done}
    if done:
        distinct = set(instructions.values())
        if len(distinct) == 1:
            text = distinct.pop()
            body = (f"<p>Every route used the same task instruction:</p><pre>{html.escape(text)}</pre>" if text else
                    "<p>Every route used no task instruction (none set: task.instruction or --instruction).</p>")
        else:
            body = table(["route", "instruction"], [[k, v or "(none)"] for k, v in instructions.items()])
        sections.append(("Task instruction", body))
    if others:
        sections.append(("Not run", table(["route", "status", "why"], others)))
    sections.append(("Trade-offs (red: the Pareto front)", f"<div class='plots'>{plots}</div>"))
    route_notes = [f"<li><b>{html.escape(r['route'])}</b>: {html.escape(n)}</li>" for r in done for n in r.get("notes", [])
                   if n not in r.get("warnings", [])]  # the warnings are already at the top
    if route_notes:
        sections.append(("Route notes", "<ul>" + "".join(route_notes) + "</ul>"))
    title = f"Stillroom compare: {summary['task']} — teacher {summary['teacher']}, student {summary['student']}"
    return page(title, sections, notes)
