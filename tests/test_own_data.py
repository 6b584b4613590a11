"""A new user's own data: columns named on the command line and in YAML, a missing label column stopping the load
(never a silent free-text task), labels that differ only in case, the task instruction and where it comes from,
and the warnings a report gives when a result is doubtful."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from stillroom.cli import app
from stillroom.config import EvalConfig, TaskConfig, validate_config
from stillroom.errors import ConfigError, TaskDataError
from stillroom.evaluate.metrics import one_class_warning
from stillroom.route import load_task_config
from stillroom.tasks import load_task

CATEGORIES = ["billing", "technical", "account"]


def _support_csv(path, header=("id", "text", "category"), n=24, labels=CATEGORIES):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(n):
            w.writerow([f"m{i}", f"message number {i} about {labels[i % len(labels)]} things", labels[i % len(labels)]])
    return path


def test_columns_named_on_the_command_line_and_in_yaml(tmp_path):
    path = _support_csv(tmp_path / "support.csv")
    # without the options: one error at load, naming the label column found and the options to use
    with pytest.raises(TaskDataError) as e:
        load_task(str(path))
    msg = str(e.value)
    assert "category" in msg and "--label-field category" in msg and "--input-field text" in msg and "--free-text" in msg
    t = load_task_config(TaskConfig(spec=str(path), input_field="text", label_field="category"))
    assert t.kind == "classification" and set(t.labels) == set(CATEGORIES)
    assert t.examples[0].id == "m0" and t.examples[0].input.startswith("message number 0")
    # the same through the command line
    out = CliRunner().invoke(app, ["tasks", "show", str(path), "--input-field", "text", "--label-field", "category"])
    assert out.exit_code == 0, out.output
    assert "classification" in out.output and "billing" in out.output
    bad = CliRunner().invoke(app, ["tasks", "show", str(path)])
    assert bad.exit_code == 2 and "category" in bad.output and "--label-field" in bad.output


def test_input_present_label_renamed_is_an_error_not_free_text(tmp_path):
    path = _support_csv(tmp_path / "s.csv", header=("id", "input", "category"))
    with pytest.raises(TaskDataError, match=r"no 'label' column.*category.*--label-field category"):
        load_task(str(path))
    # JSONL the same way
    rows = [{"input": f"q{i}", "category": CATEGORIES[i % 3]} for i in range(9)]
    jl = tmp_path / "s.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskDataError, match=r"no 'label' field.*--label-field category"):
        load_task(str(jl))
    # free text is chosen explicitly
    t = load_task_config(TaskConfig(spec=str(path), free_text=True))
    assert t.kind == "free_text" and all(ex.label is None for ex in t.examples)
    with pytest.raises(ConfigError, match="free_text and labels"):
        validate_config(TaskConfig, {"spec": str(path), "free_text": True, "labels": ["a"]})


def test_empty_label_column_is_an_error(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("input,label\nhello,\nworld,\n")
    with pytest.raises(TaskDataError, match="has no value in any line"):
        load_task(str(path))


def test_labels_differing_only_in_case_or_space_are_an_error_naming_both(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("input,label\n" + "".join(f"x{i},{lab}\n" for i, lab in
                                               enumerate(["Technical", "billing", "technical", "billing", "Technical", "billing"])))
    with pytest.raises(TaskDataError) as e:
        load_task(str(path))
    msg = str(e.value)
    assert "'Technical' (line 2)" in msg and "'technical' (line 4)" in msg and "--labels" in msg
    # an explicit label set keeps them apart on purpose
    t = load_task(str(path), labels=["Technical", "technical", "billing"])
    assert t.labels == ("Technical", "technical", "billing")
    spaced = tmp_path / "s.csv"
    spaced.write_text('input,label\na,yes\nb,"yes "\nc,no\nd,no\ne,yes\nf,no\n')
    with pytest.raises(TaskDataError, match="differ only in case or surrounding space"):
        load_task(str(spaced))


def test_instruction_from_option_file_and_yaml(tmp_path):
    path = _support_csv(tmp_path / "support.csv")
    ins = tmp_path / "instruction.txt"
    ins.write_text("Classify the customer message as billing, technical or account.\n")
    cfg = TaskConfig(spec=str(path), input_field="text", label_field="category", instruction_file=str(ins))
    assert load_task_config(cfg).instruction.startswith("Classify the customer message")
    assert cfg.instruction_source() == f"instruction_file {ins}"
    # a dump of the config re-validates to the same thing (compare hands its task block to every route)
    assert TaskConfig.model_validate(cfg.model_dump()).instruction == cfg.instruction
    with pytest.raises(ConfigError, match="not both"):
        validate_config(TaskConfig, {"spec": str(path), "instruction": "other", "instruction_file": str(ins)})
    with pytest.raises(ConfigError, match="does not exist"):
        validate_config(TaskConfig, {"spec": str(path), "instruction_file": str(tmp_path / "nope.txt")})
    shown = CliRunner().invoke(app, ["tasks", "show", str(path), "--input-field", "text", "--label-field", "category",
                                     "--instruction-file", str(ins)])
    assert shown.exit_code == 0 and "Classify the customer" in shown.output and "from: instruction_file" in shown.output
    empty = CliRunner().invoke(app, ["tasks", "show", str(path), "--input-field", "text", "--label-field", "category"])
    assert "none set" in empty.output and "--instruction" in empty.output
    # eval's options reach the config
    ec = validate_config(EvalConfig, {"task": {"spec": str(path), "input_field": "text", "label_field": "category",
                                               "instruction": "Be brief."}})
    assert load_task_config(ec.task).instruction == "Be brief."


def test_one_class_warning_threshold():
    gold = ["a", "b", "c"] * 6
    assert "18 of 18" in one_class_warning(gold, ["a"] * 18, name="zero-shot")
    assert one_class_warning(gold, ["a"] * 17 + ["b"]) is not None  # 94%: nearly one class
    assert one_class_warning(gold, ["a"] * 15 + ["b", "c", "b"]) is None  # 83%: below the 90% threshold
    assert one_class_warning(["a"] * 18, ["a"] * 18) is None  # the gold labels are one class too
    assert one_class_warning(gold, [None] * 18) is None  # all invalid: reported elsewhere


def test_missing_model_folder_says_no_such_folder(tmp_path, monkeypatch):
    from stillroom.backends import load_backend

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no such folder ./no-such-model.*resolved: " + str(tmp_path)):
        load_backend("hf:./no-such-model")


def test_route_typo_on_the_command_line_suggests_the_route(tmp_path):
    path = _support_csv(tmp_path / "support.csv")
    out = CliRunner().invoke(app, ["compare", "--task", str(path), "--input-field", "text", "--label-field",
                                   "category", "--routes", "zero-shot,kshot", "--run-dir", str(tmp_path / "cmp")])
    assert out.exit_code == 2
    assert "--routes" in out.output and "did you mean 'k-shot'" in out.output and "yaml" not in out.output.lower()
    assert not (tmp_path / "cmp").exists()


def test_merge_slerp_factor_does_not_clash_with_task_short_option():
    import re

    out = CliRunner().invoke(app, ["merge", "slerp", "--help"], terminal_width=200)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.output)
    assert "--factor" in text and "--task" in text and "-t" in text
    assert not re.search(r"--t\s", text)  # no '--t' option beside '-t' (= --task)


def test_latency_is_measured_alone_warm_and_replayed_from_the_cache(tmp_path):
    """Every condition's latency comes from the same separate measurement on a local model (batch 1, after a
    warm-up, prefix store off and restored); a rerun on the same cache reports the same figures with no call."""
    pytest.importorskip("torch")
    from conftest import tiny_gemma, tiny_tokenizer

    from stillroom.backends.cache import CachedBackend, ResponseCache
    from stillroom.backends.hf import HFBackend
    from stillroom.evaluate.latency import LOCAL_METHOD, SCORE_SAMPLE
    from stillroom.evaluate.runner import evaluate
    from stillroom.tasks import Example, Task

    corpus = [f"Input: thing {i}\nAnswer: {lab}" for i in range(10) for lab in ("yes", "no")]
    tok = tiny_tokenizer(corpus, vocab_size=120)
    inner = HFBackend.from_objects(tiny_gemma(tok), tok, name="tiny", batch_size=4)
    exs = [Example(id=f"e{i}", input=f"thing {i}", label=("yes", "no")[i % 2]) for i in range(12)]
    task = Task(name="t", instruction="Yes or no?", kind="classification", examples=exs, labels=("yes", "no"))

    def run(name):
        return evaluate(task, exs, CachedBackend(inner, ResponseCache(tmp_path / "cache.sqlite")), description=name)

    calls = []
    real_score = inner.score
    inner.score = lambda reqs: (calls.append(len(reqs)), real_score(reqs))[1]
    first = run("first")
    assert first.metrics["latency_method"] == LOCAL_METHOD.format(n=SCORE_SAMPLE)
    # 12 examples evaluated in chunks, then 1 warm-up and 8 answers timed one at a time
    assert calls[-SCORE_SAMPLE - 1:] == [1] * (SCORE_SAMPLE + 1) and first.metrics["latency_p50_s"] > 0
    assert inner.prefix_cache is True  # switched back on after the measurement
    inner.score = lambda reqs: pytest.fail("a replayed evaluation called the model")
    again = run("again")
    assert (again.metrics["latency_p50_s"], again.metrics["latency_p95_s"]) == (
        first.metrics["latency_p50_s"], first.metrics["latency_p95_s"])


def test_compare_without_the_column_options_stops_at_load_naming_category(tmp_path):
    path = _support_csv(tmp_path / "support.csv")
    out = CliRunner().invoke(app, ["compare", "--task", str(path), "--routes", "zero-shot",
                                   "--run-dir", str(tmp_path / "cmp")])
    assert out.exit_code == 2 and "category" in out.output and "--label-field" in out.output
    assert not (tmp_path / "cmp").exists()  # stopped before any folder or model


def test_no_route_is_recommended_without_gold_labels():
    from stillroom.compare.report import recommendation

    rows = [{"route": r, "reference": False, "status": "ok", "quality": None, "latency_p50_s": 0.1,
             "build_seconds": 0, "gold_labels": False, "warnings": []} for r in ("zero-shot", "k-shot")]
    assert recommendation(rows).startswith("No gold labels") and "--label-field" in recommendation(rows)


def test_coinciding_plot_points_share_one_label():
    from stillroom.report.html import point_labels

    pts = [("zero-shot", 0.20, 0.40), ("pld", 0.21, 0.40), ("kd-logits", 0.20, 0.401), ("k-shot", 0.90, 0.70)]
    labels = {text for _, _, text in point_labels(pts)}
    assert labels == {"zero-shot, pld, kd-logits", "k-shot"}  # never 'pld' printed over 'kd-logits'
    assert len(point_labels([("a", 1.0, 0.1), ("b", 100.0, 0.1)], log_x=True)) == 2
