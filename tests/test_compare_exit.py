"""`stillroom compare`'s exit status: non-zero with one line saying so when no route finished (every route failed
or was skipped), 0 when at least one finished (the failed ones still listed). Scripted models: no weights."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stillroom.backends import SCRIPTS
from stillroom.cli import app

LABELS = ["fruit", "colour"]


def _boom(prompt, params):
    raise RuntimeError("planted failure")


@pytest.fixture
def task(tmp_path, monkeypatch):
    monkeypatch.setitem(SCRIPTS, "fruit", lambda prompt, params: "fruit")
    monkeypatch.setitem(SCRIPTS, "boom", _boom)
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "input": f"word {i}", "label": LABELS[i % 2]}) + "\n"
                            for i in range(20)))
    return path


def _compare(task, out, teacher, student, routes):
    return CliRunner().invoke(app, ["compare", "--task", str(task), "--teacher", teacher, "--student", student,
                                    "--routes", routes, "--eval-limit", "6", "--run-dir", str(out)])


def test_compare_with_no_finished_route_exits_non_zero_and_says_where_the_errors_are(task, tmp_path):
    out = tmp_path / "cmp"
    # zero-shot fails (its student raises), sft-gold is not applicable (a scripted student has no weights)
    res = _compare(task, out, "scripted:fruit", "scripted:boom", "zero-shot,sft-gold")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "no route finished" in lines[0] and "zero-shot failed" in lines[0] and "sft-gold not applicable" in lines[0]
    assert str(out / "report.html") in lines[0] and "route.json" in lines[0]
    # the failed route's error is where the line says: listed above it, in the report, in its route.json
    assert "zero-shot: failed" in res.output and "planted failure" in res.output
    assert "planted failure" in (out / "report.html").read_text()
    assert "planted failure" in json.loads((out / "routes" / "zero-shot" / "route.json").read_text())["traceback"]


def test_compare_with_one_finished_route_exits_zero_and_lists_the_failed_ones(task, tmp_path):
    out = tmp_path / "cmp"
    res = _compare(task, out, "scripted:fruit", "scripted:boom", "zero-shot,teacher,sft-gold")
    assert res.exit_code == 0, res.output
    assert "no route finished" not in res.output and "error:" not in res.output
    assert "zero-shot: failed" in res.output and "planted failure" in res.output
    assert "sft-gold: not applicable" in res.output
    rows = {r["route"]: r["status"] for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert rows == {"zero-shot": "failed", "teacher": "ok", "sft-gold": "not applicable"}
