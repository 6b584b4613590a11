"""`stillroom compare` on tiny random models: several routes side by side, a rerun that does nothing, a failing
route reported while the others finish; the Pareto front and the paired tests on planted numbers."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from conftest import tiny_gemma, tiny_tokenizer  # noqa: E402

from stillroom.compare.config import CompareConfig  # noqa: E402
from stillroom.compare.report import paired_test, pareto_front, recommendation  # noqa: E402
from stillroom.compare.routes import RoutePlan, plan_routes  # noqa: E402
from stillroom.compare.run import run_compare  # noqa: E402
from stillroom.evaluate.stats import bootstrap_ci, macro_f1, mcnemar, paired_bootstrap  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["red", "green", "blue", "apple", "pear", "car", "bus", "plum"]
LABELS = ["fruit", "colour", "vehicle"]


def _lm(tok, seed, layers):
    return tiny_gemma(tok, layers=layers, seed=seed)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from stillroom.backends.embedded import save_model_folder

    root = tmp_path_factory.mktemp("compare")
    corpus = [f"Input: {w} {i}\nAnswer: {lab}" for w in WORDS for i in range(4) for lab in LABELS]
    tok = tiny_tokenizer(corpus, vocab_size=300)
    save_model_folder(_lm(tok, 0, 3), tok, root / "teacher")
    save_model_folder(_lm(tok, 1, 3), tok, root / "student")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"id": f"x{i}", "input": f"{WORDS[i % len(WORDS)]} {i}",
                                        "label": LABELS[i % 3]}) + "\n" for i in range(60)))
    return root


def _cfg(root, **over):
    data = {"task": {"spec": str(root / "task.jsonl")}, "teacher": {"spec": f"hf:{root / 'teacher'}"},
            "student": {"spec": f"hf:{root / 'student'}"},
            "routes": ["zero-shot", "k-shot", "teacher", "kd-logits", "prune-heal-sft", "sft-gold"],
            "eval_limit": 12, "train_limit": 16, "shots": 2,
            "budgets": {"kd-logits": {"max_steps": 2, "top_k": 8}, "prune-heal-sft": {"drop": 1, "max_steps": 2},
                        "sft-gold": {"max_steps": 2}}}
    data.update(over)
    return CompareConfig.model_validate(data)


def test_compare_routes_side_by_side_rerun_free_and_a_failing_route(setup, tmp_path):
    cfg = _cfg(setup)
    plans = plan_routes(cfg)

    def boom(c, out):
        raise RuntimeError("planted failure")

    plans.append(RoutePlan("gad", plans[0].config, boom))
    out = tmp_path / "cmp"
    summary = run_compare(cfg, out, plans=plans)
    rows = {r["route"]: r for r in summary["rows"]}
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 6, rows
    assert rows["gad"]["status"] == "failed" and "planted failure" in rows["gad"]["error"]
    # Same ground: every route on the same 12 test examples.
    assert summary["same_test_examples"] and all(r["n"] == 12 for r in ok)
    assert rows["zero-shot"]["is_baseline"] and rows["kd-logits"]["vs_baseline"]["n"] == 12
    assert rows["kd-logits"]["build"]["training_steps"] == 2 and rows["sft-gold"]["build"]["training_steps"] == 2
    # The pruned model is smaller than the student; its result says so.
    assert rows["prune-heal-sft"]["parameters"] < rows["sft-gold"]["parameters"]
    for r in ok:
        lo, hi = r["accuracy_ci95"]
        assert lo <= r["accuracy"] <= hi
        assert (out / "routes" / r["route"] / "result.json").exists()
    # With a teacher line, every other route carries its recovery of the teacher's lead over zero-shot, from the
    # same paired resampling; the table has the column. Two random tiny models have no clear gap, so it may be
    # undefined: then it is a reason, never a number.
    gap = summary["recovery"]
    assert gap["teacher"] == rows["teacher"]["quality"] and gap["student_zero_shot"] == rows["zero-shot"]["quality"]
    for name in ("k-shot", "kd-logits", "prune-heal-sft", "sft-gold"):
        rec = rows[name]["recovery"]
        assert rec["n"] == 12 and rec["defined"] == gap["defined"]
        assert (rec["value"] is None and rec["reason"]) if not rec["defined"] else rec["ci95"][0] <= rec["value"] <= rec["ci95"][1]
    assert "recovery" not in rows["teacher"] and "recovery" not in rows["zero-shot"]
    html = (out / "report.html").read_text()
    assert "recovery [95% CI]" in html
    assert html.count("<img") == 2 and "planted failure" in html and summary["recommendation"] in html
    assert json.loads((out / "compare.json").read_text())["rows"][0]["route"] == "zero-shot"

    # A rerun with nothing changed runs no route: no model call, no training step, the same numbers.
    for p in plans:
        if p.name != "gad":
            p.run = lambda c, o: pytest.fail("an unchanged route ran again")
    plans[-1] = RoutePlan("gad", plans[0].config, boom)
    again = run_compare(cfg, out, plans=plans)
    rows2 = {r["route"]: r for r in again["rows"]}
    assert all(rows2[n]["reused"] for n in rows if rows[n]["status"] == "ok")
    assert [r.get("macro_f1") for r in again["rows"]] == [r.get("macro_f1") for r in summary["rows"]]

    # Changing one route's budget reruns that route only.
    cfg2 = _cfg(setup, budgets={**cfg.budgets, "sft-gold": {"max_steps": 3}})
    plans2 = [p for p in plan_routes(cfg2)]
    ran = []
    for p in plans2:
        if p.name != "sft-gold":
            p.run = lambda c, o: pytest.fail("an unchanged route ran again")
        else:
            inner = p.run
            p.run = lambda c, o, inner=inner: (ran.append(1), inner(c, o))[1]
    third = run_compare(cfg2, out, plans=plans2)
    assert ran == [1] and {r["route"]: r for r in third["rows"]}["sft-gold"]["build"]["training_steps"] == 3


def test_api_student_gets_prompting_routes_only():
    cfg = CompareConfig.model_validate({"task": {"spec": "x.jsonl"}, "teacher": {"spec": "openai:big"},
                                        "student": {"spec": "openai:small"}})
    plans = {p.name: p for p in plan_routes(cfg)}
    assert plans["zero-shot"].skip_reason is None and plans["pld"].skip_reason is None
    assert "cannot be trained" in plans["seqkd"].skip_reason and "cannot be trained" in plans["kd-logits"].skip_reason


def test_api_teacher_gives_no_logits(setup):
    cfg = CompareConfig.model_validate({"task": {"spec": "x.jsonl"}, "teacher": {"spec": "openai:big"},
                                        "student": {"spec": f"hf:{setup / 'student'}"}})
    plans = {p.name: p for p in plan_routes(cfg)}
    assert "no logits" in plans["kd-logits"].skip_reason and plans["seqkd"].skip_reason is None


def test_teacher_with_another_tokenizer_plans_cross_tokenizer_logit_kd(setup):
    """The demo's pair (Qwen teacher, Gemma student): logit KD runs across tokenizers, decided before anything
    loads; it used to be skipped because the vocabularies differ."""
    cfg = CompareConfig.model_validate({"task": {"spec": "x.jsonl"}, "teacher": {"spec": "qwen2.5-coder-0.5b"},
                                        "student": {"spec": "gemma3-270m"}})
    plans = {p.name: p for p in plan_routes(cfg)}
    assert plans["kd-logits"].skip_reason is None and plans["kd-logits"].run is not None
    assert plans["seqkd"].skip_reason is None and plans["pld"].skip_reason is None


def test_bad_budget_fails_at_load(setup):
    from stillroom.errors import ConfigError

    with pytest.raises(ConfigError, match="kd-logits"):
        plan_routes(_cfg(setup, budgets={"kd-logits": {"max_stepz": 3}}))
    with pytest.raises(ValueError, match="unknown route"):
        _cfg(setup, routes=["zero-shot", "telepathy"])


def test_pareto_front_on_planted_points():
    pts = [("a", 1.0, 0.5), ("b", 2.0, 0.7), ("c", 3.0, 0.6), ("d", 0.5, 0.2), ("e", 2.0, 0.7)]
    assert pareto_front(pts) == {"a", "b", "d", "e"}  # c is dominated by b; b and e tie (neither dominates)
    assert pareto_front([("x", 1.0, 0.1), ("y", 1.0, 0.3)]) == {"y"}


def test_paired_tests_on_planted_predictions():
    gold = ["a", "b"] * 50
    base = [{"id": i, "gold": g, "pred": "a", "correct": g == "a"} for i, g in enumerate(gold)]
    better = [{"id": i, "gold": g, "pred": g, "correct": True} for i, g in enumerate(gold)]
    t = paired_test(base, better, ["a", "b"])
    assert t["significant"] and t["diff"] > 0.6 and t["mcnemar_p"] < 1e-10 and t["wins"] == 50 and t["losses"] == 0
    same = paired_test(base, base, ["a", "b"])
    assert not same["significant"] and same["diff"] == 0 and same["mcnemar_p"] == 1.0
    # One extra right answer in 100 is noise.
    nearly = [dict(p) for p in base]
    nearly[1] = {**nearly[1], "pred": "b", "correct": True}
    assert not paired_test(base, nearly, ["a", "b"])["significant"]
    assert mcnemar([True, False], [True, True]) == {"a_only": 0, "b_only": 1, "p_value": 1.0}


def test_bootstrap_macro_f1_matches_sklearn_and_brackets_the_estimate():
    from sklearn.metrics import f1_score

    gold = ["a", "b", "c"] * 20
    pred = ["a", "b", "b", None, "c", "c"] * 10
    want = f1_score(gold, ["<inv>" if p is None else p for p in pred], labels=["a", "b", "c"], average="macro",
                    zero_division=0)
    assert macro_f1(gold, pred, ["a", "b", "c"]) == pytest.approx(want)
    ci = bootstrap_ci(gold, pred, ["a", "b", "c"])
    assert ci["macro_f1"][0] < want < ci["macro_f1"][1] and ci["accuracy"][1] - ci["accuracy"][0] > 0.1
    assert paired_bootstrap(gold, pred, pred, ["a", "b", "c"])["p_value"] == 1.0


def test_recommendation_names_cheapest_within_two_points_of_the_teacher():
    rows = [
        {"route": "teacher", "reference": True, "status": "ok", "quality": 0.80, "latency_p50_s": 2.0, "build_seconds": 0},
        {"route": "pld", "reference": False, "status": "ok", "quality": 0.79, "latency_p50_s": 0.1, "build_seconds": 50},
        {"route": "kd-logits", "reference": False, "status": "ok", "quality": 0.81, "latency_p50_s": 0.2, "build_seconds": 900},
        {"route": "zero-shot", "reference": False, "status": "ok", "quality": 0.5, "latency_p50_s": 0.05, "build_seconds": 0},
    ]
    assert "pld" in recommendation(rows) and "within 2 points" in recommendation(rows)
    rows[1]["quality"] = 0.70
    assert "kd-logits" in recommendation(rows)


def test_gguf_student_is_refused_for_training_routes_when_planned():
    # A GGUF file is served by llama.cpp but is no transformers folder: the routes that train it (or read its
    # logits) are reported as not applicable, with the reason, instead of failing inside.
    cfg = CompareConfig.model_validate({"task": {"spec": "x.jsonl"}, "teacher": {"spec": "gguf:big.gguf"},
                                        "student": {"spec": "gguf:small.gguf"}})
    plans = {p.name: p for p in plan_routes(cfg)}
    assert plans["zero-shot"].skip_reason is None and plans["pld"].skip_reason is None
    for name in ("seqkd", "kd-logits", "gad", "prune-heal-sft", "sft-gold"):
        assert "GGUF" in plans[name].skip_reason and "hf:PATH" in plans[name].skip_reason


def test_default_folder_is_task_teacher_student_and_selection_one_budget_reruns_one_route(setup, tmp_path, monkeypatch):
    """Under the default compare folder (no --run-dir), changing one route's budget reruns that route only."""
    import yaml
    from typer.testing import CliRunner

    from stillroom.cli import app
    from stillroom.compare.run import compare_dir_for

    monkeypatch.setenv("STILLROOM_RUNS", str(tmp_path / "runs"))
    data = {"task": {"spec": str(setup / "task.jsonl")}, "teacher": {"spec": f"hf:{setup / 'teacher'}"},
            "student": {"spec": f"hf:{setup / 'student'}"}, "routes": ["zero-shot", "k-shot"], "eval_limit": 8,
            "train_limit": 8, "shots": 2, "budgets": {"k-shot": {"max_new_tokens": 8}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    first = CliRunner().invoke(app, ["compare", str(path)])
    assert first.exit_code == 0, first.output
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0] == compare_dir_for(CompareConfig.model_validate(data))

    data["budgets"] = {"k-shot": {"max_new_tokens": 12}}
    path.write_text(yaml.safe_dump(data))
    second = CliRunner().invoke(app, ["compare", str(path)])
    assert second.exit_code == 0, second.output
    assert list((tmp_path / "runs").iterdir()) == folders  # the same compare folder
    rows = {r["route"]: r for r in json.loads((folders[0] / "compare.json").read_text())["rows"]}
    assert rows["zero-shot"]["reused"] is True and rows["k-shot"]["reused"] is False
    assert "zero-shot[/]: unchanged" in second.output or "zero-shot: unchanged" in second.output
    # ... while another selection (more test examples) is another compare
    other = CompareConfig.model_validate({**data, "eval_limit": 9})
    assert compare_dir_for(other) != folders[0]


def test_planted_one_class_route_is_flagged_in_report_and_terminal_and_not_recommended(setup, tmp_path):
    from stillroom.backends.scripted import ScriptedBackend
    from stillroom.compare.cli import print_compare
    from stillroom.prompting.job import Condition, run_eval
    from stillroom.ui import console

    cfg = _cfg(setup, routes=["zero-shot", "k-shot"], eval_limit=12)
    plans = plan_routes(cfg)

    def always_fruit(c, out):  # a planted route: every answer 'fruit'
        backend = ScriptedBackend(lambda prompt, params: "fruit", "always-fruit")
        return run_eval(c, out, conditions=[Condition(name="always fruit", method="generate")], backend=backend,
                        route="k-shot")

    plans[1] = RoutePlan("k-shot", plans[1].config, always_fruit)
    out = tmp_path / "cmp"
    summary = run_compare(cfg, out, plans=plans)
    rows = {r["route"]: r for r in summary["rows"]}
    warned = rows["k-shot"]["warnings"]
    assert len(warned) == 1 and "predicted 'fruit' for 12 of 12" in warned[0] and "90%" in warned[0]
    assert "k-shot" not in summary["recommendation"].split("Not considered")[0]
    assert "Not considered (flagged as doubtful): k-shot" in summary["recommendation"]
    html = (out / "report.html").read_text()
    assert "Warning (route k-shot)" in html and "predicted &#x27;fruit&#x27; for 12 of 12" in html
    assert "measured the same way for every route" in html or "measured in more than one way" in html
    with console.capture() as cap:
        print_compare(summary, out)
    assert "warning" in cap.get() and "predicted 'fruit' for 12 of 12" in cap.get()
