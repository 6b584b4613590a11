"""The compare table a person reads: every column whole at 80 columns (room left for more at 100), for the
longest route names and wide figures."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def test_compare_table_fits_80_columns_uncut(monkeypatch):
    import stillroom.compare.cli as cli
    from stillroom.compare.config import ALL_ROUTES

    rows = [{"route": name, "status": "ok", "reference": name in ("teacher", "sft-gold"), "macro_f1": 0.5213,
             "macro_f1_ci95": [0.3312, 0.7012], "accuracy_ci95": None, "accuracy": 0.6,
             "vs_baseline": {"diff": -0.123, "significant": True}, "latency_p50_s": 12.34, "build_seconds": 12345.6,
             "is_baseline": name == "zero-shot"} for name in ALL_ROUTES]
    console = Console(width=80, record=True, color_system=None)
    monkeypatch.setattr(cli, "console", console)
    cli.print_compare({"task": "bigbench:intent_recognition", "baseline": "zero-shot", "rows": rows,
                       "recommendation": "r"}, Path("/tmp/x"))
    table = [line for line in console.export_text().splitlines() if "0.521" in line or "build s" in line]
    assert len(table) == len(ALL_ROUTES) + 1
    assert all(len(line.rstrip()) <= 80 and "…" not in line for line in table)
    assert all(line.rstrip().endswith("12346") for line in table[1:])  # the last column whole
