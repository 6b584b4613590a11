"""Task loading: JSONL/CSV/HF/BIG-bench, one clear error per kind of bad input, kind inference, splits."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from stillroom.errors import TaskDataError
from stillroom.tasks import Example, Task, list_bigbench_tasks, load_task, sample
from stillroom.tasks import bigbench as bigbench_mod

SENTIMENT = [
    {"id": "a1", "input": "great film", "label": "pos"},
    {"id": "a2", "input": "dull plot", "label": "neg"},
    {"id": "a3", "input": "loved it", "label": "pos"},
    {"id": "a4", "input": "walked out", "label": "neg"},
]


def write_jsonl(path: Path, rows, raw_lines=()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_error(spec: str | Path, **kw) -> TaskDataError:
    with pytest.raises(TaskDataError) as info:
        load_task(str(spec), **kw)
    return info.value


def assert_names(err: TaskDataError, path: Path, line: int | None, field: str | None):
    msg = str(err)
    assert str(path) in msg
    if line is not None:
        assert err.line == line and f"line {line}" in msg
    if field is not None:
        assert err.field == field and f"'{field}'" in msg


# --- happy paths ---------------------------------------------------------------------------------------------


def test_jsonl_happy_path(tmp_path):
    path = write_jsonl(tmp_path / "sent.jsonl", SENTIMENT[:2], raw_lines=["", json.dumps(SENTIMENT[2])])
    t = load_task(str(path), instruction="Classify the sentiment.")
    assert t.name == "sent" and t.source == str(path)
    assert t.instruction == "Classify the sentiment."
    assert [e.id for e in t.examples] == ["a1", "a2", "a3"]
    assert t.examples[0] == Example(id="a1", input="great film", label="pos")
    assert t.kind == "free_text"  # 2 distinct labels over 3 examples: too few repeats to infer a label set
    t = load_task(str(path), labels=["pos", "neg"])
    assert t.kind == "classification" and t.labels == ("pos", "neg")


def test_jsonl_extra_fields_go_to_meta_and_ids_are_strings(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": 7, "input": "x", "label": "a", "source": "web"},
                                            {"id": 8, "input": "y", "label": "b"}], )
    t = load_task(str(path), kind="classification")
    assert [e.id for e in t.examples] == ["7", "8"]
    assert t.examples[0].meta == {"source": "web"}
    assert t.labels == ("a", "b")


def test_csv_happy_path(tmp_path):
    path = tmp_path / "sent.csv"
    path.write_text(
        'id,text,gold,notes\n1,"great, really",pos,\n2,"multi\nline",neg,x\n\n3,fine,pos,\n4,meh,neg,\n',
        encoding="utf-8",
    )
    t = load_task(str(path), input_field="text", label_field="gold")
    assert t.kind == "classification" and t.labels == ("pos", "neg")
    assert [e.input for e in t.examples] == ["great, really", "multi\nline", "fine", "meh"]
    assert [e.id for e in t.examples] == ["1", "2", "3", "4"]
    assert t.examples[1].meta == {"notes": "x"}


def test_csv_bom_crlf_and_choices_cells(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_bytes(
        '\ufeffinput,label,choices\r\nq1,b,"[""a"", ""b""]"\r\nq2,z,x|y|z\r\n'.encode()
    )
    t = load_task(str(path))
    assert t.kind == "multiple_choice"
    assert t.examples[0].choices == ("a", "b") and t.examples[1].choices == ("x", "y", "z")


def test_hf_local_file_and_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": r["input"], "label": r["label"]} for r in SENTIMENT])
    t = load_task(f"hf:{data}", input_field="text", cache_dir=tmp_path / "cache")
    assert t.kind == "classification" and t.labels == ("pos", "neg") and len(t.examples) == 4

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 1, 1]}, features=features)
    datasets.DatasetDict({"train": ds.select([0, 1]), "test": ds.select([2])}).save_to_disk(tmp_path / "saved")
    t = load_task(f"hf:{tmp_path / 'saved'}", input_field="sentence", cache_dir=tmp_path / "cache")
    assert t.labels == ("neg", "pos")  # ClassLabel order, names instead of indices
    assert [(e.label, e.meta["hf_split"]) for e in t.examples] == [("neg", "train"), ("pos", "train"), ("pos", "test")]

    err = load_error(f"hf:{tmp_path / 'missing'}")
    assert str(tmp_path / "missing") in str(err) and "does not exist" in str(err)


# --- kind inference ------------------------------------------------------------------------------------------


def test_kind_inference(tmp_path):
    # shared choices (any order) -> classification with the first example's order
    same = [{"input": f"q{i}", "label": "yes", "choices": ["yes", "no"] if i % 2 else ["no", "yes"]} for i in range(3)]
    t = load_task(str(write_jsonl(tmp_path / "same.jsonl", same)))
    assert t.kind == "classification" and t.labels == ("no", "yes")
    assert all(e.choices is None for e in t.examples)

    varied = [{"input": "q1", "label": "a", "choices": ["a", "b"]}, {"input": "q2", "label": "c", "choices": ["c", "d"]}]
    t = load_task(str(write_jsonl(tmp_path / "varied.jsonl", varied)))
    assert t.kind == "multiple_choice" and t.labels is None
    assert t.options(t.examples[1]) == ("c", "d")

    # few repeated labels -> classification, labels in order of first appearance
    rows = [{"input": f"x{i}", "label": lab} for i, lab in enumerate(["b", "a", "b", "c", "a", "c"])]
    t = load_task(str(write_jsonl(tmp_path / "cls.jsonl", rows)))
    assert t.kind == "classification" and t.labels == ("b", "a", "c")

    # answers that do not repeat -> free text, with an answer pattern
    rows = [{"input": f"{i}+1?", "label": str(i + 1)} for i in range(5)]
    t = load_task(str(write_jsonl(tmp_path / "free.jsonl", rows)))
    assert t.kind == "free_text" and t.labels is None and t.answer_pattern

    # unlabelled inputs are free text only when chosen explicitly; otherwise the load stops and says how
    unl = str(write_jsonl(tmp_path / "unl.jsonl", [{"input": "a"}, {"input": "b"}]))
    with pytest.raises(TaskDataError, match="--free-text"):
        load_task(unl)
    t = load_task(unl, kind="free_text")
    assert t.kind == "free_text" and all(e.label is None for e in t.examples)

    # an explicit kind wins
    rows = [{"input": f"x{i}", "label": lab} for i, lab in enumerate("abab")]
    assert load_task(str(write_jsonl(tmp_path / "k.jsonl", rows)), kind="free_text").kind == "free_text"
    t = load_task(str(write_jsonl(tmp_path / "k2.jsonl", rows[:2])), kind="classification")
    assert t.kind == "classification" and t.labels == ("a", "b")


def test_explicit_classification_with_differing_choices_is_an_error(tmp_path):
    varied = [{"input": "q1", "label": "a", "choices": ["a", "b"]}, {"input": "q2", "label": "c", "choices": ["c", "d"]}]
    path = write_jsonl(tmp_path / "v.jsonl", varied)
    err = load_error(path, kind="classification")
    assert_names(err, path, 2, "choices")
    assert "multiple_choice" in str(err)


# --- bad input: one clear error each -------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    err = load_error(path)
    assert str(path) in str(err) and "does not exist" in str(err)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x")
    assert ".txt" in str(load_error(path))


def test_non_utf8_names_line_and_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"input": "ok", "label": "a"}\n{"input": "caf\xe9", "label": "b"}\n')
    err = load_error(path)
    assert_names(err, path, 2, None)
    assert "UTF-8" in str(err) and "byte offset 14" in str(err) and "0xe9" in str(err)


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"input,label\nok,a\nok2,b\n\xff\xfe,c\n")
    assert_names(load_error(path), path, 4, None)


def test_malformed_json_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", SENTIMENT[:2], raw_lines=['{"input": "x", "label": }'])
    err = load_error(path)
    assert_names(err, path, 3, None)
    assert "malformed JSON" in str(err) and "Expecting value" in str(err)


def test_json_line_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", SENTIMENT[:1], raw_lines=['["input", "label"]'])
    err = load_error(path)
    assert_names(err, path, 2, None)
    assert "JSON object" in str(err) and "array" in str(err)


@pytest.mark.parametrize("bad", [{"label": "pos"}, {"input": "   ", "label": "pos"}, {"input": None}, {"input": ["x"]}])
def test_missing_or_empty_input(tmp_path, bad):
    path = write_jsonl(tmp_path / "t.jsonl", SENTIMENT[:2] + [bad])
    err = load_error(path)
    assert_names(err, path, 3, "input")


def test_missing_input_column_in_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nx,a\n")
    err = load_error(path)
    assert_names(err, path, 1, "input")
    assert "text" in str(err)  # lists the columns it did find


def test_empty_input_cell_in_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("input,label\nx,a\n,b\n")
    assert_names(load_error(path), path, 3, "input")


def test_missing_label_in_labelled_task(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", SENTIMENT[:2] + [{"id": "z", "input": "no label here"}])
    err = load_error(path)
    assert_names(err, path, 3, "label")
    # with a label set every example must be labelled, even when none is
    path2 = write_jsonl(tmp_path / "u.jsonl", [{"input": "a"}, {"input": "b"}])
    assert_names(load_error(path2, labels=["x", "y"]), path2, 1, "label")
    # explicitly free text: unlabelled inputs are fine
    assert load_task(str(path), kind="free_text").examples[2].label is None


def test_label_outside_label_set(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", SENTIMENT[:2] + [{"id": "z", "input": "meh", "label": "Neutral"}])
    err = load_error(path, labels=["pos", "neg"])
    assert_names(err, path, 3, "label")
    assert "'Neutral'" in str(err) and "'pos'" in str(err) and "'neg'" in str(err)


def test_label_outside_example_choices(tmp_path):
    rows = [{"input": "q1", "label": "a", "choices": ["a", "b"]}, {"input": "q2", "label": "e", "choices": ["c", "d"]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    err = load_error(path)
    assert_names(err, path, 2, "label")
    assert "'e'" in str(err) and "'c', 'd'" in str(err)


def test_bad_choices(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"input": "q1", "label": "a", "choices": ["a"]}])
    assert_names(load_error(path), path, 1, "choices")
    path = write_jsonl(tmp_path / "u.jsonl", [{"input": "q1", "label": "a", "choices": {"a": 1}}])
    assert_names(load_error(path), path, 1, "choices")


def test_duplicate_explicit_ids(tmp_path):
    rows = SENTIMENT[:3] + [{"id": "a2", "input": "another", "label": "neg"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    err = load_error(path)
    assert_names(err, path, 4, "id")
    assert "lines 2 and 4" in str(err) and "'a2'" in str(err)


def test_duplicate_generated_ids_name_both_lines(tmp_path):
    rows = [{"input": "same text", "label": "a"}, {"input": "other", "label": "b"}, {"input": "same text", "label": "b"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    err = load_error(path)
    assert_names(err, path, 3, "id")
    assert "lines 1 and 3" in str(err) and "same input" in str(err)


def test_duplicate_ids_in_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,input,label\n1,a,x\n2,b,y\n1,c,x\n")
    err = load_error(path)
    assert_names(err, path, 4, "id")
    assert "lines 2 and 4" in str(err)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    err = load_error(path)
    assert str(path) in str(err) and "no examples" in str(err)


def test_header_only_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("input,label\n")
    assert "no examples" in str(load_error(path))


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("input,label\nx,a\ny,b,extra\n")
    err = load_error(path)
    assert_names(err, path, 3, None)
    assert "3 fields" in str(err)


def test_csv_unclosed_quote_names_the_row_start(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('input,label\nok,a\n"unclosed,a\nmore,b\n')
    err = load_error(path)
    assert_names(err, path, 3, None)
    assert "malformed CSV" in str(err)


def test_empty_split_is_reported(tmp_path):
    t = load_task(str(write_jsonl(tmp_path / "t.jsonl", SENTIMENT[:1])))
    with pytest.raises(TaskDataError, match="split"):
        t.splits()


# --- ids and splits ------------------------------------------------------------------------------------------


def test_generated_ids_are_stable_under_reordering(tmp_path):
    rows = [{"input": f"text {i}", "label": "ab"[i % 2]} for i in range(6)]
    t1 = load_task(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    t2 = load_task(str(write_jsonl(tmp_path / "t.jsonl", list(reversed(rows)))))
    ids1 = {e.input: e.id for e in t1.examples}
    assert ids1 == {e.input: e.id for e in t2.examples}
    assert all(i.startswith("t-") and len(i) == len("t-") + 12 for i in ids1.values())


def test_deterministic_splits(tmp_path):
    rows = [{"input": f"text {i}", "label": "ab"[i % 2]} for i in range(60)]
    t = load_task(str(write_jsonl(tmp_path / "t.jsonl", rows)))

    def ids(task, seed):
        s = task.splits(seed=seed)
        return {name: [e.id for e in s.get(name)] for name in ("train", "val", "test")}

    assert ids(t, 0) == ids(t, 0)
    assert ids(t, 0) != ids(t, 1)
    s = t.splits(seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 12, 18)
    assert set().union(*map(set, ids(t, 0).values())) == {e.id for e in t.examples}

    # adding examples keeps (almost all) old ones in their split: positions come from hash(seed, id)
    more = rows + [{"input": f"new {i}", "label": "ab"[i % 2]} for i in range(6)]
    t2 = load_task(str(write_jsonl(tmp_path / "t.jsonl", more)))
    where = {i: name for name, part in ids(t, 0).items() for i in part}
    where2 = {i: name for name, part in ids(t2, 0).items() for i in part}
    moved = [i for i in where if where[i] != where2[i]]
    assert len(moved) <= 6  # only boundary examples shift when the split sizes grow


def test_sample_is_deterministic():
    exs = [Example(id=str(i), input=str(i), label=None) for i in range(20)]
    assert sample(exs, 5, seed=3) == sample(exs, 5, seed=3)
    assert sample(exs, None) == exs and sample(exs, 50) == exs


def test_extract_answer(tmp_path):
    rows = [{"input": f"{i}+1?", "label": str(i + 1)} for i in range(4)]
    t = load_task(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert t.extract_answer("  42\nbecause") == "42"
    assert t.extract_answer("Answer: maybe 3?\nI think so.\nAnswer: 5") == "5"  # the last Answer: line
    assert t.extract_answer("the final answer: 7 ") == "7"
    assert t.extract_answer("   ") == ""
    custom = Task(name="x", instruction="", kind="free_text", examples=[], answer_pattern=r"#### (\d+)")
    assert custom.extract_answer("work...\n#### 12") == "12"


# --- BIG-bench -----------------------------------------------------------------------------------------------

FAKE_TASKS = {
    "plausible": {
        "name": "plausible",
        "description": "Decide plausibility",
        "task_prefix": "Is it plausible?",
        "example_input_prefix": "\nStatement: ",
        "example_output_prefix": "\nPlausible? ",
        "examples": [
            {"input": "A dog barked", "target_scores": {"plausible": 1, "implausible": 0}},
            {"input": "A rock sang", "target_scores": {"implausible": 1, "plausible": 0}},
            {"input": "Rain fell", "target_scores": {"plausible": 1, "implausible": 0}},
        ],
    },
    "mc": {
        "name": "mc",
        "description": "Pick one",
        "examples": [
            {"input": "2+2?", "target_scores": {"3": 0, "4": 1, "5": 0}},
            {"input": "Capital of France?", "target_scores": {"Paris": 1, "Rome": 0}},
        ],
    },
    "freeform": {
        "name": "freeform",
        "description": "Unscramble the word",
        "examples": [{"input": "tca", "target": ["cat", "act"]}, {"input": "odg", "target": "dog"}],
    },
    "parent": {"name": "parent", "description": "Has subtasks"},
    "parent/sub_a": {"name": "parent_sub_a", "description": "A",
                     "examples": [{"input": "x", "target": "y"}]},
    "parent/sub_b": {"name": "parent_sub_b", "description": "B",
                     "examples": [{"input": "x", "target": "y"}]},
}


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """A cache holding a tiny archive with the real sdist's member layout; pip must never be called."""
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    with tarfile.open(cache / "downloads" / "bigbench-1.0.0.tar.gz", "w:gz") as tf:
        def add(name: str, data: bytes):
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        add("README.md", b"readme")
        for task, content in FAKE_TASKS.items():
            add(f"{task}/task.json", json.dumps(content).encode())
        add("programmatic_one/task.py", b"# code")

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip must not run when the archive is cached: {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    return cache


def test_bigbench_classification_from_shared_target_scores(fake_cache):
    t = load_task("bigbench:plausible", cache_dir=fake_cache)
    assert t.kind == "classification" and t.labels == ("plausible", "implausible")
    assert [(e.id, e.label) for e in t.examples] == [
        ("plausible-0", "plausible"), ("plausible-1", "implausible"), ("plausible-2", "plausible")]
    assert all(e.choices is None for e in t.examples)
    assert t.instruction == "Is it plausible?"
    assert t.input_prefix == "Statement: " and t.answer_prefix == "\nPlausible?"
    assert t.source == "bigbench:plausible"
    extracted = fake_cache / "bigbench" / "plausible" / "task.json"
    assert json.loads(extracted.read_text()) == FAKE_TASKS["plausible"]
    assert not list(extracted.parent.glob(".*"))  # no temp file left behind
    # instruction override, and a second load reads the extracted file
    assert load_task("bigbench:plausible", cache_dir=fake_cache, instruction="Judge.").instruction == "Judge."


def test_bigbench_multiple_choice_and_free_text(fake_cache):
    t = load_task("bigbench:mc", cache_dir=fake_cache)
    assert t.kind == "multiple_choice" and t.labels is None
    assert t.examples[0].choices == ("3", "4", "5") and t.examples[0].label == "4"
    assert t.instruction == "Pick one"  # no task_prefix: the description
    assert t.input_prefix == Task.input_prefix and t.answer_prefix == Task.answer_prefix

    t = load_task("bigbench:freeform", cache_dir=fake_cache)
    assert t.kind == "free_text"
    assert [(e.id, e.label) for e in t.examples] == [("freeform-0", "cat"), ("freeform-1", "dog")]


def test_bigbench_subtasks(fake_cache):
    t = load_task("bigbench:parent/sub_a", cache_dir=fake_cache)
    assert t.name == "parent_sub_a" and t.examples[0].id == "parent_sub_a-0"
    err = load_error("bigbench:parent", cache_dir=fake_cache)
    assert "bigbench:parent/sub_a" in str(err) and "bigbench:parent/sub_b" in str(err)
    assert "subtasks" in str(err)


def test_bigbench_unknown_and_invalid_names(fake_cache):
    err = load_error("bigbench:plausibel", cache_dir=fake_cache)
    assert "unknown BIG-bench task 'plausibel'" in str(err) and "plausible" in str(err)
    assert "programmatic" in str(load_error("bigbench:programmatic_one", cache_dir=fake_cache))
    assert "invalid" in str(load_error("bigbench:../../etc", cache_dir=fake_cache))
    assert not (fake_cache / "bigbench" / "plausibel").exists()


def test_list_bigbench_tasks(fake_cache):
    assert list_bigbench_tasks(fake_cache) == ["freeform", "mc", "parent", "parent/sub_a", "parent/sub_b", "plausible"]
    assert (fake_cache / "bigbench" / "index.json").is_file()


def test_bigbench_download_failure_is_clear(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "bigbench==1.0.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    err = load_error("bigbench:anything", cache_dir=tmp_path)
    assert "network unreachable" in str(err) and str(tmp_path / "downloads") in str(err)
    assert not list((tmp_path / "downloads").iterdir())  # the pip temp folder is gone


def test_bigbench_download_is_renamed_into_place(tmp_path, monkeypatch):
    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with tarfile.open(dest / "bigbench-1.0.0.tar.gz", "w:gz") as tf:
            data = json.dumps(FAKE_TASKS["freeform"]).encode()
            info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/freeform/task.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    assert bigbench_mod.bigbench_archive(tmp_path) == tmp_path / "downloads" / "bigbench-1.0.0.tar.gz"
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == ["bigbench-1.0.0.tar.gz"]


REAL_ARCHIVE = Path("~/.cache/stillroom/downloads/bigbench-1.0.0.tar.gz").expanduser()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ARCHIVE.is_file(), reason="no BIG-bench sdist in ~/.cache/stillroom/downloads")
def test_real_bigbench_sports_understanding(tmp_path):
    # a fresh cache around the real archive, so extraction and indexing run for real (~10 s)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / REAL_ARCHIVE.name).symlink_to(REAL_ARCHIVE)
    t = load_task("bigbench:sports_understanding", cache_dir=tmp_path)
    assert t.kind == "classification" and set(t.labels) == {"plausible", "implausible"}
    assert len(t.examples) == 1000 and t.examples[0].id == "sports_understanding-0"
    assert "plausible" in t.instruction and not t.answer_prefix.endswith(" ")
    s = t.splits(seed=0)
    assert len(s.train) + len(s.val) + len(s.test) == 1000
    assert "bigbench:bbq_lite_json/age_ambig" in str(load_error("bigbench:bbq_lite_json", cache_dir=tmp_path))
