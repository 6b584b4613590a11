"""Recovery of the teacher-student gap: the paired bootstrap on hand-checkable predictions, the undefined case,
and its place in compare.json, the report table and the recommendation line."""

from __future__ import annotations

import pytest

from stillroom.compare.report import compare_report, recommendation, recovery_test
from stillroom.evaluate.stats import bootstrap_recovery, macro_f1

LABELS = ["a", "b"]
# Blocks of four examples, gold a a b b. The teacher is always right (macro-F1 1). The student says "a" every
# time: F1(a) = 2·2/(2·2+2) = 2/3, F1(b) = 0, macro 1/3. The route gets both a's and one b, and says "a" on the
# other b: F1(a) = 2·2/(2·2+1) = 4/5, F1(b) = 2·1/(2·1+1) = 2/3, macro 11/15. Recovery = (11/15 − 1/3) / (1 − 1/3)
# = (6/15) / (10/15) = 0.6.
GOLD = ["a", "a", "b", "b"] * 15
TEACHER = list(GOLD)
STUDENT = ["a"] * len(GOLD)
ROUTE = ["a", "a", "b", "a"] * 15


def test_recovery_on_hand_checkable_predictions():
    assert macro_f1(GOLD, STUDENT, LABELS) == pytest.approx(1 / 3)
    assert macro_f1(GOLD, ROUTE, LABELS) == pytest.approx(11 / 15)
    rec = bootstrap_recovery(GOLD, ROUTE, STUDENT, TEACHER, LABELS)
    assert rec["defined"] and rec["reason"] is None and rec["n"] == 60
    assert rec["recovery"] == pytest.approx(0.6)
    assert rec["gap"] == pytest.approx(2 / 3) and rec["gap_ci"][0] > 0.5
    lo, hi = rec["ci"]
    assert lo < 0.6 < hi and hi - lo < 0.4
    # The anchors: the teacher's own answers recover all of the gap in every resample, the student's none.
    t = bootstrap_recovery(GOLD, TEACHER, STUDENT, TEACHER, LABELS)
    assert t["recovery"] == 1.0 and t["ci"] == [1.0, 1.0]
    assert bootstrap_recovery(GOLD, STUDENT, STUDENT, TEACHER, LABELS)["ci"] == [0.0, 0.0]
    # Accuracy where there is no label set: route 3/4, student 1/2, teacher 1 -> (3/4 - 1/2) / (1 - 1/2) = 0.5.
    assert bootstrap_recovery(GOLD, ROUTE, STUDENT, TEACHER, None)["recovery"] == pytest.approx(0.5)


def test_recovery_is_undefined_when_the_teacher_is_not_above_the_student():
    # Teacher no better than the student: the ratio would divide by zero.
    same = bootstrap_recovery(GOLD, ROUTE, STUDENT, STUDENT, LABELS)
    assert not same["defined"] and same["recovery"] is None and same["ci"] is None
    assert "not above" in same["reason"] and same["gap"] == 0
    # Teacher below the student: a route better than both would read as a large negative recovery.
    below = bootstrap_recovery(GOLD, TEACHER, ROUTE, STUDENT, LABELS)
    assert not below["defined"] and below["gap"] < 0 and "not above" in below["reason"]
    # Teacher one answer ahead in 60: a lead the interval does not separate from 0. Recovery of the route would
    # be (11/15 - 1/3) / tiny = a two-digit number; it is undefined instead.
    nearly = list(STUDENT)
    nearly[2] = "b"
    tiny = bootstrap_recovery(GOLD, ROUTE, STUDENT, nearly, LABELS)
    assert tiny["gap"] > 0 and tiny["gap_ci"][0] <= 0
    assert not tiny["defined"] and tiny["recovery"] is None and "not clear of 0" in tiny["reason"]


def _preds(preds):
    return [{"id": f"x{i}", "gold": g, "pred": p, "correct": g == p} for i, (g, p) in enumerate(zip(GOLD, preds, strict=True))]


def _row(route, preds, quality, **over):
    return {"route": route, "reference": route == "teacher", "status": "ok", "quality": quality,
            "latency_p50_s": 0.1, "build_seconds": 10, **over}


def test_recovery_in_the_recommendation_and_the_report(tmp_path):
    rec = recovery_test(_preds(STUDENT), _preds(TEACHER), _preds(ROUTE), LABELS)
    assert rec["value"] == pytest.approx(0.6) and rec["defined"]
    rows = [_row("teacher", TEACHER, 1.0), _row("zero-shot", STUDENT, 1 / 3), _row("pld", ROUTE, 11 / 15, recovery=rec)]
    line = recommendation(rows)
    assert "pld (0.733, recovering 0.60 [" in line and "undefined" not in line

    summary = {"task": "t", "teacher": "T", "student": "S", "baseline": "zero-shot", "same_test_examples": True,
               "recovery": {"teacher": 1.0, "student_zero_shot": 1 / 3, "metric": "macro_f1", "gap": 2 / 3,
                            "gap_ci95": rec["gap_ci95"], "defined": True, "reason": None},
               "rows": [], "pareto": {"latency": [], "build_cost": []}, "recommendation": line}
    for r in rows:
        r.update({"condition": r["route"], "n": 60, "macro_f1": r["quality"], "macro_f1_ci95": [0, 1], "accuracy": 0.5,
                  "accuracy_ci95": [0, 1], "invalid_rate": 0.0, "metric": "macro_f1", "is_baseline": r["route"] == "zero-shot",
                  "latency_p95_s": 0.2, "output_tokens": 1, "input_tokens": 10, "system_prompt_tokens": 0,
                  "size_on_disk_bytes": None, "folder": str(tmp_path / r["route"]), "vs_baseline": None,
                  "build": {"teacher_calls": 0, "teacher_input_tokens": 0, "teacher_output_tokens": 0,
                            "teacher_cost_usd": 0.0, "seconds": 10, "training_steps": 0}})
    summary["rows"] = rows
    # Two of the three routes timed one way, one another: each way is written once, with its routes.
    for r, method in zip(rows, ("timed one at a time", "timed one at a time", "the evaluation's own timing"), strict=True):
        r["latency_method"] = method
    html = compare_report(summary, tmp_path)
    assert "recovery [95% CI]" in html and f"0.60 [{rec['ci95'][0]:.2f}, {rec['ci95'][1]:.2f}]" in html
    assert "a lead of +0.667" in html
    assert html.count("timed one at a time") == 1 and "<li>teacher, zero-shot: timed one at a time</li>" in html
    assert "<li>pld: the evaluation&#x27;s own timing</li>" in html

    # The teacher no better than the student: the line and the table say undefined, with no number.
    flat = recovery_test(_preds(STUDENT), _preds(STUDENT), _preds(ROUTE), LABELS)
    rows[0]["quality"] = 1 / 3
    rows[2]["recovery"] = flat
    line = recommendation(rows)
    assert "Recovery is undefined: the teacher (0.333) is not above the student (0.333)" in line
    assert "recovering" not in line
    summary.update(recommendation=line, recovery={**summary["recovery"], "defined": False, "reason": flat["reason"]})
    html = compare_report(summary, tmp_path)
    assert ">undefined<" in html and "Undefined here" in html and "0.60 [" not in html
