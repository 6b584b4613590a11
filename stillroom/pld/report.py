"""report.html for a PLD run: the comparison, the quality-vs-latency trade-off, build cost, and the rulebook."""

from __future__ import annotations

import html

import yaml

from stillroom.pld.rulebook import Rulebook
from stillroom.report.html import (
    QUALITY_HEADERS,
    confusion_plot,
    latency_legend,
    page,
    per_class_plot,
    quality_latency_plot,
    quality_row,
    table,
)


def pld_report(metrics: dict, rulebook: Rulebook, config: dict) -> str:
    conds = metrics["conditions"]
    rows = [quality_row(n, m) + [m.get("system_prompt_tokens", 0)] for n, m in conds.items()]
    sections = [("Comparison on the test split (same student, same examples)",
                 table(QUALITY_HEADERS + ["system-prompt tokens"], rows) + latency_legend(conds))]
    points = [(n, m["latency_p50_s"], m["macro_f1"] or 0.0) for n, m in conds.items()]
    plots = quality_latency_plot(points)
    classed = {n: m for n, m in conds.items() if m.get("per_class")}
    if classed:
        plots += per_class_plot(classed)
        plots += "".join(confusion_plot(classed[n], f"Confusion: {n}") for n in ("zero-shot", "PLD") if n in classed)
    sections.append(("Trade-off", f"<div class='plots'>{plots}</div>"))
    b = metrics["build"]
    sections.append(("Build cost of the rulebook (teacher)", table(["item", "value"], [
        ["wall time (s)", b["seconds"]], ["teacher calls", b.get("teacher_calls")], ["of them paid by earlier, interrupted runs", b.get("resumed_calls")],
        ["input tokens", b.get("teacher_input_tokens")], ["output tokens", b.get("teacher_output_tokens")],
        ["cost (USD)", b.get("teacher_cost_usd")]])))
    ex, cl = metrics["extraction"], metrics["clustering"]
    dropped = ex.get("dropped", {})
    sections.append(("Extraction and clustering", table(["item", "value"], [
        ["extractions (one per training example)", ex["instructions"]], ["used as instructions", ex["readable"]],
        ["retried once (first reply not usable)", ex.get("retried", 0)],
        ["dropped: unreadable", dropped.get("unreadable", ex["failed"])],
        ["dropped: cut at the token limit", dropped.get("truncated", 0)],
        ["used though cut at the token limit (after a complete instruction line)", ex.get("kept_truncated", 0)],
        ["dropped: copies of the prompt's worked example", dropped.get("copies_example", 0)],
        ["dropped: an answer the task does not have", dropped.get("foreign_label", 0)],
        ["dropped: another answer than the example's", dropped.get("wrong_label", 0)],
        ["dropped: quoting the example's input", dropped.get("quotes_input", 0)],
        ["eps / min_samples", f"{cl['eps']} / {cl['min_samples']}"], ["clusters", cl["clusters"]],
        ["noise (dropped)", f"{cl['noise']} ({cl['noise_share']:.0%})"],
        ["labels with no cluster", ", ".join(map(str, cl["uncovered_labels"])) or "none"],
        *([["labels no rule names", ", ".join(map(str, metrics["rulebook"]["labels_not_named"])) or "none"]]
          if "labels_not_named" in metrics["rulebook"] else [])])))
    if len(cl.get("sweep", [])) > 1:
        sections.append(("eps sweep (validation)", table(["eps", "clusters", "noise share", "val macro-F1"],
                                                         [[s["eps"], s["clusters"], s["noise_share"], s["val_macro_f1"]] for s in cl["sweep"]])))
    if metrics["conflict_rounds"]:
        sections.append(("Conflict-resolution rounds", table(
            ["round", "candidate version", "val F1 before", "val F1 after", "accepted", "failures sent", "successes sent", "note"],
            [[r["round"], r["candidate_version"], r["val_macro_f1_before"], r["val_macro_f1_after"], r["accepted"],
              r["failures_sent"], r["successes_sent"], r["note"]] for r in metrics["conflict_rounds"]])))
    if metrics.get("ablation"):
        sections.append(("Leave-one-rule-out ablation (validation)", table(
            ["rule", "val macro-F1 without it", "effect (drop)", "text"],
            [[a["rule"], a["val_macro_f1_without"], a["effect"], a["text"][:120]] for a in metrics["ablation"]])))
    sections.append(("Rulebook (deployed as the system prompt)", f"<pre>{html.escape(rulebook.to_markdown())}</pre>"))
    sections.append(("Config (no secrets)", f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>"))
    title = f"Stillroom PLD: {metrics['task']} — teacher {metrics['teacher']}, student {metrics['student']}"
    return page(title, sections, metrics.get("notes", []))
