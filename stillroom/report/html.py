"""Run folder -> one self-contained report.html (plots embedded as PNG), readable offline."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # reports are written on headless machines
import matplotlib.pyplot as plt  # noqa: E402

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.86em} td,th{border:1px solid #ccc;padding:.25em .45em;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
td{white-space:nowrap} td:last-child{white-space:normal}
.note{background:#fff8e0;border-left:4px solid #e0b000;padding:.5em 1em;margin:.8em 0}
.plots img{max-width:48%;margin:.5%} pre{background:#f7f7f7;padding:.8em;overflow-x:auto;white-space:pre-wrap}
"""


def fig_to_img(fig) -> str:
    """An <img> tag holding the figure as base64 PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def confusion_plot(metrics: Mapping, title: str = "Confusion matrix") -> str:
    """Heat-map of the confusion matrix (rows gold, columns predicted, last column invalid answers)."""
    cm = metrics.get("confusion") or []
    rows = metrics.get("labels") or []
    cols = metrics.get("confusion_columns") or rows
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cols), 1.0 + 0.6 * len(rows)))
    if cm:
        ax.imshow(cm, cmap="Blues")
        top = max((v for row in cm for v in row), default=0)
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                # white on the dark half of the colour map, black on the light half: readable on every cell
                ax.text(j, i, str(v), ha="center", va="center", fontsize=9,
                        color="white" if top and v > top / 2 else "black")
    ax.set_xticks(range(len(cols)), [str(c)[:18] for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [str(r)[:18] for r in rows])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    return fig_to_img(fig)


def per_class_plot(named_metrics: Mapping[str, Mapping], title: str = "Per-class F1") -> str:
    """Grouped bars: per-class F1 for each condition (zero-shot, k-shot, PLD, ...)."""
    names = list(named_metrics)
    labels = list(next(iter(named_metrics.values())).get("labels") or [])
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels) * max(1, len(names)) / 2), 3.2))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        pc = named_metrics[name].get("per_class", {})
        ax.bar([i + k * width for i in range(len(labels))], [pc.get(lab, {}).get("f1", 0.0) for lab in labels], width, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(labels))], [str(lab)[:18] for lab in labels])
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig_to_img(fig)


def point_labels(points: Sequence[tuple[str, float, float]], log_x: bool = False, near: float = 0.06):
    """(x, y, text) annotations for named points, one per group of points that sit close together (within `near`
    of the axis ranges): their names joined, so labels of coinciding points never print over each other."""
    import math

    if not points:
        return []
    xs = [math.log10(x) if log_x and x > 0 else x for _, x, _ in points]
    ys = [y for _, _, y in points]
    sx = (max(xs) - min(xs)) or 1.0
    sy = (max(ys) - min(ys)) or 1.0
    groups: list[list[int]] = []
    for i in range(len(points)):
        for g in groups:
            j = g[0]
            if abs(xs[i] - xs[j]) / sx < near and abs(ys[i] - ys[j]) / sy < near:
                g.append(i)
                break
        else:
            groups.append([i])
    return [(points[g[0]][1], points[g[0]][2], ", ".join(points[i][0] for i in g)) for g in groups]


def quality_latency_plot(points: Sequence[tuple[str, float, float]], title: str = "Quality vs latency") -> str:
    """Scatter of (name, latency p50 s, macro-F1): the trade-off a user picks a route from."""
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for _name, lat, f1 in points:
        ax.scatter([lat], [f1], s=40)
    for x, y, text in point_labels(points):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.margins(x=0.18)  # room for the rightmost point's label inside the axes
    ax.set_xlabel("latency per answer, p50 (s)")
    ax.set_ylabel("macro-F1")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    return fig_to_img(fig)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """An HTML table; floats shown with 3 decimals."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, sections: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> str:
    """A full HTML page from (heading, html) sections; notes are shown as highlighted boxes at the top."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<div class='note'>{html.escape(n)}</div>" for n in notes]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    return "".join(parts)


QUALITY_HEADERS = ["condition", "n", "accuracy", "macro-F1", "invalid", "in tok/ex", "out tok/ex", "latency p50 s", "latency p95 s"]


def quality_row(name: str, m: Mapping) -> list:
    """One row of the comparison table."""
    return [name, m.get("n"), m.get("accuracy"), m.get("macro_f1"), m.get("invalid_rate"), m.get("input_tokens_mean"),
            m.get("output_tokens_mean"), m.get("latency_p50_s"), m.get("latency_p95_s")]


def latency_legend(named_metrics: Mapping[str, Mapping]) -> str:
    """A paragraph saying how the latency columns were measured (one method for all, or each condition's)."""
    methods = {n: m.get("latency_method") for n, m in named_metrics.items()}
    distinct = set(methods.values())
    if distinct == {None}:
        return ""
    if len(distinct) == 1:
        return f"<p>Latency per answer, measured the same way for every condition: {html.escape(distinct.pop())}.</p>"
    return ("<p>Latency was measured differently across conditions, so compare it with care: "
            + "; ".join(f"{html.escape(n)}: {html.escape(v or 'not recorded')}" for n, v in methods.items()) + ".</p>")


def eval_report(title: str, named_metrics: Mapping[str, Mapping], config: Mapping, usage: Mapping | None = None,
                notes: Sequence[str] = ()) -> str:
    """Report for `stillroom eval`/`demo`: comparison table, confusion matrices, per-class F1, usage, config."""
    import yaml

    sections = [("Results", table(QUALITY_HEADERS, [quality_row(n, m) for n, m in named_metrics.items()])
                 + latency_legend(named_metrics))]
    classed = {n: m for n, m in named_metrics.items() if m.get("per_class")}
    if classed:
        plots = "".join(confusion_plot(m, f"Confusion: {n}") for n, m in classed.items())
        plots += per_class_plot(classed)
        sections.append(("Plots", f"<div class='plots'>{plots}</div>"))
    if usage:
        # The meter's latency counts generation calls only; the latency that answers cost is in Results.
        rows = [[k, v] for k, v in usage.items() if not k.startswith("latency_")]
        sections.append(("Usage (model calls of this run folder)", table(["item", "value"], rows)))
    sections.append(("Config (no secrets)", f"<pre>{html.escape(yaml.safe_dump(dict(config), sort_keys=False))}</pre>"))
    return page(title, sections, notes)
