"""The compare table a person reads: every column whole at 80 columns (room left for more at 100), for the
longest route names and wide figures."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def _print_table(monkeypatch, width: int, gap: bool) -> list[str]:
    import stillroom.compare.cli as cli
    from stillroom.compare.config import ALL_ROUTES

    rows = [{"route": name, "status": "ok", "reference": name in ("teacher", "sft-gold"), "macro_f1": 0.5213,
             "macro_f1_ci95": [0.3312, 0.7012], "accuracy_ci95": None, "accuracy": 0.6,
             "vs_baseline": {"diff": -0.123, "significant": True}, "latency_p50_s": 12.34, "build_seconds": 12345.6,
             "is_baseline": name == "zero-shot",
             "recovery": {"value": -0.4567, "ci95": [-1.0, 0.2], "defined": name != "gad", "reason": None}}
            for name in ALL_ROUTES]
    console = Console(width=width, record=True, color_system=None)
    monkeypatch.setattr(cli, "console", console)
    summary = {"task": "bigbench:intent_recognition", "baseline": "zero-shot", "rows": rows, "recommendation": "r"}
    if gap:
        summary["recovery"] = {"teacher": 0.52, "student": 0.03}
    cli.print_compare(summary, Path("/tmp/x"))
    table = [line for line in console.export_text().splitlines() if "0.521" in line or "build s" in line]
    assert len(table) == len(ALL_ROUTES) + 1
    assert all("…" not in line for line in table)
    assert all(line.rstrip().endswith("12346") for line in table[1:])  # the last column whole
    return table


def test_compare_table_fits_80_columns_uncut(monkeypatch):
    assert max(len(line.rstrip()) for line in _print_table(monkeypatch, 80, gap=False)) <= 80
    # With a teacher line at 80 columns: recovery shown whole, accuracy left to the report.
    table = _print_table(monkeypatch, 80, gap=True)
    assert max(len(line.rstrip()) for line in table) <= 80
    assert "recov." in table[0] and " acc " not in table[0]
    assert " undef. " in next(line for line in table if line.split()[0] == "gad")


def test_compare_table_with_a_teacher_line_shows_recovery_within_100_columns(monkeypatch):
    table = _print_table(monkeypatch, 100, gap=True)
    assert max(len(line.rstrip()) for line in table) <= 100
    assert "recovery" in table[0] and " acc " in table[0]
    cells = {line.split()[0]: line for line in table[1:]}
    assert " -0.46 " in cells["seqkd"] and " undefined " in cells["gad"]
    assert " 1 " in cells["teacher"] and " 0 " in cells["zero-shot"]


def test_demo_prints_install_preparation_and_compare_times(tmp_path, monkeypatch):
    import sys

    import stillroom.cli as cli

    console = Console(width=100, record=True, color_system=None)
    monkeypatch.setattr(cli, "console", console)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    cli._print_demo_times(prepare_s=5.0, converted=None, compare_s=61.0)
    assert "not measured" in console.export_text()  # installed without make: said so, no made-up figure
    (tmp_path / ".stillroom-install-seconds").write_text("216\n")  # what `make` records
    cli._print_demo_times(prepare_s=218.4, converted=["Qwen2.5-Coder-0.5B-Instruct"], compare_s=481.0)
    text = console.export_text()
    assert "install            3 min 36 s" in text
    assert "model preparation  3 min 38 s (Qwen2.5-Coder-0.5B-Instruct converted)" in text
    assert "compare            8 min 01 s" in text
