"""Every route's happy path from the command line, on tiny random models and a scripted teacher: each writes the
shared run-folder layout (config.yaml, predictions.jsonl, metrics.json, result.json, report.html)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from conftest import tiny_gemma, tiny_tokenizer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from stillroom.backends import SCRIPTS  # noqa: E402
from stillroom.cli import app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["red", "green", "blue", "apple", "pear", "car", "bus", "plum"]
LABELS = ["fruit", "colour", "vehicle"]
LAYOUT = ("config.yaml", "predictions.jsonl", "metrics.json", "result.json", "report.html")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from stillroom.backends.embedded import save_model_folder

    root = tmp_path_factory.mktemp("routes")
    corpus = [f"Input: {w} {i}\nAnswer: {lab}" for w in WORDS for i in range(4) for lab in LABELS]
    tok = tiny_tokenizer(corpus, vocab_size=300)
    save_model_folder(tiny_gemma(tok, layers=3, seed=1), tok, root / "student")
    rows = [{"id": f"x{i}", "input": f"{WORDS[i % len(WORDS)]} {i}", "label": LABELS[i % 3]} for i in range(48)]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gold = {r["input"]: r["label"] for r in rows}

    def teacher(prompt, params):  # answers with the gold label of the input it was shown
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        for inp, lab in gold.items():
            if inp in text:
                return lab
        return "fruit"

    SCRIPTS["gold-teacher"] = teacher
    yield root
    SCRIPTS.pop("gold-teacher", None)


def _layout(folder):
    missing = [f for f in LAYOUT if not (folder / f).exists()]
    assert not missing, missing
    return json.loads((folder / "result.json").read_text())


def test_kd_data_from_the_cli(dirs, tmp_path):
    args = ["kd", "data", "--task", str(dirs / "task.jsonl"), "--teacher", "scripted:gold-teacher", "--student",
            str(dirs / "student"), "--max-steps", "2", "--batch-size", "4", "--train-limit", "12", "--eval-limit", "6",
            "--run-dir", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = _layout(tmp_path)
    assert res["route"] == "kd-data-answers" and res["quality"]["n"] == 6 and res["build"]["training_steps"] == 2
    assert res["build"]["teacher_calls"] == 12 and res["deployment"]["parameters"] > 0
    r2 = CliRunner().invoke(app, args)
    assert r2.exit_code == 0, r2.output
    again = json.loads((tmp_path / "result.json").read_text())
    assert again["build"] == res["build"]  # resumed: the first build's cost is kept, nothing re-paid
    assert json.loads((tmp_path / "usage.json").read_text())["calls"] == 0


def test_gad_from_the_cli(dirs, tmp_path):
    args = ["gad", "--task", str(dirs / "task.jsonl"), "--teacher", "scripted:gold-teacher", "--student",
            str(dirs / "student"), "-G", "2", "--prompts-per-step", "2", "--adversarial-steps", "1",
            "--disc-warmup-steps", "1", "--warmup-steps", "1", "--batch-size", "4", "--max-completion-length", "4",
            "--train-limit", "8", "--eval-limit", "4", "--run-dir", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = _layout(tmp_path)
    assert res["route"] == "gad" and res["build"]["training_steps"] == 2 and res["build"]["teacher_calls"] == 8
    assert (tmp_path / "discriminator" / "config.json").exists()


def test_selfdistill_from_the_cli(dirs, tmp_path):
    r = CliRunner().invoke(app, ["selfdistill", "--teacher", "scripted:gold-teacher", "--task", str(dirs / "task.jsonl"),
                                 "--limit", "10", "--run-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "selfdistill.json").read_text())
    assert summary["examples"] == 10 and summary["backend_calls"] == 10
    assert len((tmp_path / "sft_self_data.jsonl").read_text().splitlines()) == 10
    assert (tmp_path / "config.yaml").exists()


def test_prune_heal_from_the_cli(dirs, tmp_path):
    r = CliRunner().invoke(app, ["prune-heal", "--task", str(dirs / "task.jsonl"), "--student", str(dirs / "student"),
                                 "--drop", "1", "--max-steps", "2", "--train-limit", "8", "--eval-limit", "6",
                                 "--run-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = _layout(tmp_path)
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["parameters"]["after"] < train["parameters"]["before"] and len(train["removed_layers"]) == 1
    assert res["deployment"]["parameters"] == train["parameters"]["after"]
    assert res["build"]["training_steps"] == 2 and (tmp_path / "angular.json").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "student")).config.num_hidden_layers == 2


def test_eval_takes_its_config_as_the_first_argument(dirs, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"task: {{spec: {dirs / 'task.jsonl'}}}\nmodel: {{spec: scripted:gold-teacher}}\nmethod: generate\neval_limit: 5\n")
    r = CliRunner().invoke(app, ["eval", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    res = _layout(tmp_path / "run")
    assert res["quality"]["accuracy"] == 1.0 and res["quality"]["n"] == 5


def test_merge_and_heal_evaluate_their_result_with_a_task(dirs, tmp_path):
    student = str(dirs / "student")
    r = CliRunner().invoke(app, ["merge", "slerp", student, student, "--factor", "0.5", "--task", str(dirs / "task.jsonl"),
                                 "--eval-limit", "6", "--run-dir", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    merged = _layout(tmp_path / "m")
    assert merged["route"] == "merge-slerp" and merged["quality"]["n"] == 6
    data = tmp_path / "heal.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Input: red {i}\nAnswer:", "completion": " colour"}) + "\n"
                            for i in range(4)))
    r = CliRunner().invoke(app, ["heal", "--model", student, "--data", str(data), "--max-steps", "2", "--batch-size", "2",
                                 "--task", str(dirs / "task.jsonl"), "--eval-limit", "6", "--run-dir", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    healed = _layout(tmp_path / "h")
    assert healed["build"]["training_steps"] == 2
    # Merging a model with itself gives the same model: the same predictions as the student.
    a = [json.loads(x)["pred"] for x in (tmp_path / "m" / "predictions.jsonl").read_text().splitlines()]
    r = CliRunner().invoke(app, ["eval", "--task", str(dirs / "task.jsonl"), "--model", f"hf:{student}", "--limit", "6",
                                 "--run-dir", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert a == [json.loads(x)["pred"] for x in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]


def test_merge_with_a_bad_task_fails_before_merging(dirs, tmp_path):
    student = str(dirs / "student")
    r = CliRunner().invoke(app, ["merge", "slerp", student, student, "--task", str(tmp_path / "missing.jsonl"),
                                 "--run-dir", str(tmp_path / "m")])
    assert r.exit_code == 2 and "missing.jsonl" in r.output
    assert not (tmp_path / "m").exists()
