"""End to end: `stillroom eval` on a JSONL task with a scripted backend writes a complete run folder,
resumes with zero new calls, and never writes a secret."""

import json

from typer.testing import CliRunner

from stillroom.backends import SCRIPTS
from stillroom.cli import app

CALLS = {"n": 0}


def keyword_classifier(prompt, params):
    """Answers from a keyword in the user's last message: a student that follows a planted rule."""
    CALLS["n"] += 1
    text = prompt[-1]["content"].lower() if isinstance(prompt, list) else prompt.lower()
    if "great" in text or "love" in text:
        return "positive"
    if "awful" in text:
        return "Negative."
    return "I am not sure"


def write_task(path, n=40):
    rows = []
    for i in range(n):
        kind = i % 3
        text = ["I love this, great", "awful service", "it was fine I guess"][kind] + f" #{i}"
        label = ["positive", "negative", "positive"][kind]
        rows.append({"id": f"r{i}", "input": text, "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_writes_run_folder_and_resumes_without_calls(tmp_path, monkeypatch):
    SCRIPTS["kw"] = keyword_classifier
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-never-appear-777")
    data = tmp_path / "sent.jsonl"
    write_task(data)
    run_dir = tmp_path / "run"
    args = ["eval", "--task", str(data), "--model", "scripted:kw", "--run-dir", str(run_dir), "--split", "test"]
    runner = CliRunner()
    CALLS["n"] = 0
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    first_calls = CALLS["n"]
    assert first_calls > 0
    for name in ("config.yaml", "predictions.jsonl", "metrics.json", "usage.json", "report.html", "cache.sqlite"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())["conditions"]["zero-shot"]
    preds = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == metrics["n"] == first_calls
    # "it was fine" examples get an unparseable answer: counted invalid, not crashed on.
    assert 0 < metrics["invalid_rate"] < 1
    assert metrics["accuracy"] == sum(p["correct"] for p in preds) / len(preds)
    assert "<img src=\"data:image/png;base64," in (run_dir / "report.html").read_text()

    CALLS["n"] = 0
    res2 = runner.invoke(app, args)
    assert res2.exit_code == 0, res2.output
    assert CALLS["n"] == 0, "rerunning the same command must make zero new backend calls"
    assert json.loads((run_dir / "metrics.json").read_text())["conditions"]["zero-shot"]["accuracy"] == metrics["accuracy"]

    for p in run_dir.iterdir():
        if p.is_file():
            assert b"sk-should-never-appear-777" not in p.read_bytes(), p.name


def test_eval_bad_task_file_gives_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "input": "x", "label": "y"}\n{not json\n')
    res = CliRunner().invoke(app, ["eval", "--task", str(bad), "--model", "scripted:echo", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "bad.jsonl" in res.output and "line 2" in res.output
    assert "Traceback" not in res.output


def test_help_explains_commands():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for word in ("eval", "demo", "openai:MODEL"):
        assert word in res.output
