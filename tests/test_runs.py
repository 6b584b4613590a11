import json

import pytest
import yaml

from stillroom.runs import RunFolder, atomic_write_text, redact, run_dir_for


def test_redact_removes_secret_env_values(monkeypatch):
    monkeypatch.setenv("MY_TEAM_API_KEY", "sk-very-secret-value-42")
    cfg = {"model": {"api_key_env": "MY_TEAM_API_KEY", "note": "key sk-very-secret-value-42 leaked"}}
    out = redact(cfg)
    assert "sk-very-secret-value-42" not in json.dumps(out)
    assert out["model"]["api_key_env"] == "MY_TEAM_API_KEY"  # the *name* stays


def test_run_folder_files_never_hold_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-abcdef123456")
    run = RunFolder(tmp_path / "r")
    run.save_config({"x": "sk-test-abcdef123456"})
    run.write_json("m.json", {"y": ["sk-test-abcdef123456"]})
    for p in (tmp_path / "r").iterdir():
        assert "sk-test-abcdef123456" not in p.read_text()
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text()) == {"x": "***"}


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")

    class Boom(str):
        pass

    with pytest.raises(TypeError):
        atomic_write_text(p, 123)  # type: ignore[arg-type]
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_run_dir_is_deterministic(tmp_path):
    a = run_dir_for("eval", {"task": {"spec": "x.jsonl"}, "k": 1}, root=tmp_path)
    b = run_dir_for("eval", {"task": {"spec": "x.jsonl"}, "k": 1}, root=tmp_path)
    c = run_dir_for("eval", {"task": {"spec": "x.jsonl"}, "k": 2}, root=tmp_path)
    assert a == b != c
