"""Reliability II, against a fake OpenAI-compatible server that counts every request
(tests/helpers_fake_server.py): garbage replies are refused before anything is cached or scored, run folders
that are not Stillroom's are never written into, the small ones (--wait everywhere, regular task files, label
length, a default context window), and one spend ledger for a whole compare."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stillroom.backends.openai_logprobs import PROBE_TEXT
from stillroom.cli import app

try:  # tests/ may or may not be a package
    from tests.helpers_fake_server import FakeOpenAIServer, fake_tokenize, interruptible
except ImportError:  # pragma: no cover
    from helpers_fake_server import FakeOpenAIServer, fake_tokenize, interruptible


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def write_task(path: Path, n: int = 6, labels=("yes", "no")) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"ex{i}", "input": f"Is claim {i} plausible?", "label": labels[i % 2]}) + "\n")
    return path


def score_rows(run_dir: Path) -> int:
    if not (run_dir / "cache.sqlite").exists():
        return 0
    with sqlite3.connect(run_dir / "cache.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]


# --- item 2: garbage from servers is refused before it is cached ---------------------------------------------------
def _is_scoring(path: str, body: dict) -> bool:
    # The probe sends one flat list of ids; scoring sends a batch (a list of id lists).
    return path.endswith("/completions") and isinstance(body.get("prompt"), list) and isinstance(body["prompt"][0], list)


def _set_lp(value):
    def f(p):
        p["choices"][0]["logprobs"]["token_logprobs"][3] = value
        return p
    return f


def _lps(fn):
    def f(p):
        lp = p["choices"][0]["logprobs"]
        lp["token_logprobs"] = fn(lp["token_logprobs"])
        return p
    return f


CUT = object()
SCORING_GARBAGE = {
    # mode: (change to the scoring reply, words the error must contain)
    "NaN": (_set_lp(math.nan), "token_logprobs[3] is NaN"),
    "+Infinity": (_set_lp(math.inf), "token_logprobs[3] is Infinity"),
    "-Infinity": (_set_lp(-math.inf), "token_logprobs[3] is -Infinity"),
    "null value": (_set_lp(None), "token_logprobs[3] is null"),
    "null list": (_lps(lambda v: None), "token_logprobs is null"),
    "empty list": (_lps(lambda v: []), "token_logprobs has 0 entries"),
    "string": (_set_lp("abc"), 'token_logprobs[3] is "abc"'),
    "numeric string": (_set_lp("-0.5"), 'token_logprobs[3] is "-0.5"'),
    "above zero": (_set_lp(2.5), "token_logprobs[3] is 2.5, above 0"),
    "too few": (_lps(lambda v: v[:3]), "token_logprobs has 3 entries"),
    "missing choice": (lambda p: {**p, "choices": p["choices"][:-1]}, "choices has"),
    "cut-off JSON": (CUT, "the body is cut off"),
    "HTML": (("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"), "is not JSON but an HTML page"),
    "empty body": (("application/json", b""), "the body is empty"),
}
TOKENIZE_GARBAGE = {
    "tokenize strings": (lambda p: {**p, "tokens": ["Is", " claim"]}, 'tokens[0] is "Is"'),
    "tokenize empty": (lambda p: {**p, "tokens": []}, "tokens has 0 entries"),
}


def _corrupter(mode: str):
    if mode in TOKENIZE_GARBAGE:
        change = TOKENIZE_GARBAGE[mode][0]
        return lambda path, body, payload: (change(payload) if path == "/tokenize" and body["prompt"] != PROBE_TEXT
                                            else None)
    change = SCORING_GARBAGE[mode][0]

    def corrupt(path, body, payload):
        if not _is_scoring(path, body):
            return None
        if change is CUT:
            data = json.dumps(payload).encode()
            return "application/json", data[: len(data) // 2]
        return change if isinstance(change, tuple) else change(json.loads(json.dumps(payload)))
    return corrupt


def eval_loglik(tmp_path: Path, srv: FakeOpenAIServer, run_dir: Path, task: Path):
    cfg = tmp_path / "eval.yaml"
    # One retry: transient garbage (cut off, HTML, empty) goes through the backend's retry loop once.
    cfg.write_text(f"task: {{spec: {task}, val_fraction: 0.0, test_fraction: 0.0}}\neval_split: train\nmethod: loglik\n"
                   f"model: {{spec: 'openai:fake', base_url: '{srv.base_url}', max_retries: 1}}\n", encoding="utf-8")
    return CliRunner().invoke(app, ["eval", str(cfg), "--run-dir", str(run_dir)])


def predictions(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("id", "pred", "loglik")} for r in rows]


@pytest.mark.parametrize("mode", [*SCORING_GARBAGE, *TOKENIZE_GARBAGE])
def test_garbage_reply_is_one_clear_error_nothing_cached_and_a_sane_rerun_is_sane(tmp_path, mode):
    task = write_task(tmp_path / "task.jsonl")
    expected = {**SCORING_GARBAGE, **TOKENIZE_GARBAGE}[mode][1]
    with FakeOpenAIServer(scoring=True) as srv:
        sane = eval_loglik(tmp_path, srv, tmp_path / "sane", task)
        assert sane.exit_code == 0, sane.output
        srv.corrupt = _corrupter(mode)
        n_before = srv.posts
        bad = eval_loglik(tmp_path, srv, tmp_path / "run", task)
        out = bad.output
        assert bad.exit_code == 2, out
        assert out.count("error:") == 1 and "Traceback" not in out, out
        assert bad.exception is None or isinstance(bad.exception, SystemExit), repr(bad.exception)
        # One error naming the server, the request and the field.
        assert "openai:" + srv.base_url in out and "bad reply to" in out and expected in out, out
        assert ("tokenizing" if mode in TOKENIZE_GARBAGE else "the scoring request for") in out
        assert score_rows(tmp_path / "run") == 0 and not (tmp_path / "run" / "metrics.json").exists()
        scoring_sent = [r for r in srv.requests[n_before:] if _is_scoring(r["path"], r["body"])]
        transient = mode in ("cut-off JSON", "HTML", "empty body")
        if mode not in TOKENIZE_GARBAGE:
            # Transient garbage is retried (once here) through the backend's retry loop; the rest is not.
            assert len(scoring_sent) >= (2 if transient else 1)
            assert ("retry 1 of 1" in out) == transient
        srv.corrupt = None
        rerun = eval_loglik(tmp_path, srv, tmp_path / "run", task)
        assert rerun.exit_code == 0, rerun.output
    got, want = predictions(tmp_path / "run"), predictions(tmp_path / "sane")
    assert got == want and all(math.isfinite(x) for r in got for x in r["loglik"])


def test_transient_garbage_once_then_sane_succeeds_through_the_retry_loop(capsys):
    from stillroom.backends.base import ScoreRequest
    from stillroom.backends.openai_compat import OpenAIBackend

    sent = []

    def once(path, body, payload):
        if _is_scoring(path, body) and not sent:
            sent.append(1)
            return "application/json", json.dumps(payload).encode()[:40]
        return None

    with FakeOpenAIServer(scoring=True, corrupt=once) as srv:
        b = OpenAIBackend("fake", base_url=srv.base_url, max_retries=2, timeout_s=5)
        got = b.score([ScoreRequest("Is it", (" yes", " no"))])
    ids = fake_tokenize("Is it yes")
    assert sent and got[0][0] == pytest.approx(sum(-(0.1 + (t % 13) / 10) for t in ids[len(fake_tokenize("Is it")):]))
    assert "a malformed reply, retry 1 of 2" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["NaN", "missing token", "cut-off JSON", "short"])
def test_topk_garbage_is_refused_before_the_logit_cache(mode):
    from stillroom.backends.openai_compat import OpenAIBackend
    from stillroom.backends.openai_logprobs import ServerScorer, teacher_forced_topk
    from stillroom.errors import BadReply

    def corrupt(path, body, payload):
        if not body.get("prompt_logprobs"):
            return None
        plp = payload["choices"][0]["prompt_logprobs"]
        if mode == "NaN":
            next(iter(plp[2].values()))["logprob"] = math.nan
        elif mode == "missing token":
            plp[2] = {"601": {"logprob": -1.0, "rank": 1}}
        elif mode == "short":
            payload["choices"][0]["prompt_logprobs"] = plp[:2]
        else:
            return "application/json", json.dumps(payload).encode()[:-5]
        return payload

    with FakeOpenAIServer(scoring=True, corrupt=corrupt) as srv:
        b = OpenAIBackend("fake", base_url=srv.base_url, max_retries=0, timeout_s=5)
        with pytest.raises(BadReply) as ei:
            teacher_forced_topk(ServerScorer(b), [[1, 5, 6, 7]], 4, lambda i: range(1, 4))
    msg = str(ei.value)
    assert "top-4 request" in msg and "choices[0].prompt_logprobs" in msg or "body is cut off" in msg, msg
    with FakeOpenAIServer(scoring=True) as srv:  # the same request against a sane server
        b = OpenAIBackend("fake", base_url=srv.base_url, max_retries=0, timeout_s=5)
        top = teacher_forced_topk(ServerScorer(b), [[1, 5, 6, 7]], 4, lambda i: range(1, 4))
    assert [row[0][0] for row in top[0]] == [5, 6, 7] and len(top[0][0]) == 4


# --- item 3: only our folders ----------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict:
    """Every file under `folder` (not following links) with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def eval_generate(tmp_path: Path, srv: FakeOpenAIServer, run_dir: Path, *extra: str):
    task = tmp_path / "task.jsonl"
    if not task.exists():
        write_task(task)
    return CliRunner().invoke(app, ["eval", "--task", str(task), "--model", "openai:fake", "--base-url", srv.base_url,
                                    "--method", "generate", "--run-dir", str(run_dir), *extra])


def foreign_folder(tmp_path: Path) -> Path:
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "config.yaml").write_text("their: settings\n")
    (other / "report.html").write_text("<html>their report</html>")
    (other / "notes.txt").write_text("do not touch")
    return other


@pytest.mark.parametrize("how", ["symlink", "foreign files", "symlink to an empty folder", "a file"])
def test_a_folder_that_is_not_ours_is_refused_with_nothing_written(tmp_path, how):
    other = foreign_folder(tmp_path)
    if how == "symlink to an empty folder":
        other = tmp_path / "empty"
        other.mkdir()
    run_dir = other
    if how.startswith("symlink"):
        run_dir = tmp_path / "link"
        run_dir.symlink_to(other, target_is_directory=True)
    if how == "a file":
        run_dir = other / "notes.txt"
    write_task(tmp_path / "task.jsonl")
    before = snapshot(tmp_path)
    with FakeOpenAIServer() as srv:
        result = eval_generate(tmp_path, srv, run_dir)
        assert srv.posts == 0
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "Traceback" not in result.output
    out = " ".join(result.output.split())
    assert f"run folder {run_dir}" in out
    expected = {"symlink": "is a symbolic link", "symlink to an empty folder": "is a symbolic link",
                "foreign files": "holds config.yaml, notes.txt, report.html and no .stillroom-run",
                "a file": "is a file, not a folder"}[how]
    assert expected in out, out
    assert snapshot(tmp_path) == before  # nothing written, nothing touched


def test_new_empty_and_earlier_version_folders_are_ours(tmp_path):
    from stillroom.runs import MARKER

    empty = tmp_path / "empty"
    empty.mkdir()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.yaml").write_text("task: {spec: x}\n")
    (legacy / ".lock").write_text("")
    with FakeOpenAIServer() as srv:
        for folder in (tmp_path / "new" / "deeper", empty, legacy):
            result = eval_generate(tmp_path, srv, folder)
            assert result.exit_code == 0, result.output
            assert (folder / MARKER).is_file() and (folder / "metrics.json").is_file()
        posts = srv.posts
        assert eval_generate(tmp_path, srv, empty).exit_code == 0 and srv.posts == posts  # ours: resumed


def test_unwritable_run_folder_is_one_clear_error(tmp_path):
    target = Path("/sys/stillroom-run-test")
    try:
        target.mkdir()
    except OSError:
        pass
    else:  # pragma: no cover - a writable /sys: nothing to test here
        target.rmdir()
        pytest.skip("/sys is writable on this machine")
    with FakeOpenAIServer() as srv:
        result = eval_generate(tmp_path, srv, target)
        assert srv.posts == 0
    assert result.exit_code == 2 and "Traceback" not in result.output and result.exception is not None
    out = " ".join(result.output.split())
    assert f"run folder {target} cannot be written" in out and "--run-dir" in out, out


# --- item 5: the small ones ------------------------------------------------------------------------------------
LOCKING_COMMANDS = (["eval"], ["pld"], ["kd", "logits"], ["kd", "hints"], ["kd", "data"], ["gad"], ["prune-heal"],
                    ["compare"], ["demo"])


@pytest.mark.parametrize("command", LOCKING_COMMANDS, ids=" ".join)
def test_every_command_that_takes_the_lock_has_wait_and_run_dir(command):
    # The lock's refusal suggests exactly these two options: every command that can meet it must have them.
    from stillroom.locking import RunFolderBusy, run_folder_lock  # noqa: F401 - the message below is theirs

    out = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
    assert "--wait" in out and "--run-dir" in out, out


def _compare_cfg(tmp_path: Path, srv_t: FakeOpenAIServer, srv_s: FakeOpenAIServer, routes, **extra) -> Path:
    task = tmp_path / "task.jsonl"
    if not task.exists():
        write_task(task, n=40)
    cfg = {"task": {"spec": str(task)}, "teacher": {"spec": "openai:teacher", "base_url": srv_t.base_url},
           "student": {"spec": "openai:student", "base_url": srv_s.base_url}, "routes": list(routes),
           "eval_limit": 6, "train_limit": 8, "val_limit": 4, "shots": 2, **extra}
    path = tmp_path / "compare.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return path


def test_compare_refused_while_held_suggests_only_its_options_and_wait_queues(tmp_path):
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in __import__("os").environ.items() if not k.lower().endswith("_proxy")}
    env.update(PYTHONPATH=str(root), NO_PROXY="127.0.0.1,localhost", COLUMNS="200")
    out = tmp_path / "cmp"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from stillroom.locking import run_folder_lock\n"
         "with run_folder_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.readline()", str(out)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with FakeOpenAIServer() as t, FakeOpenAIServer() as s:
            cfg = _compare_cfg(tmp_path, t, s, ["zero-shot"])
            refused = CliRunner().invoke(app, ["compare", str(cfg), "--run-dir", str(out)])
            assert refused.exit_code == 2 and s.posts == 0, refused.output
            msg = " ".join(refused.output.split())
            assert f"process {holder.pid}" in msg
            help_text = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "200"}).output
            for option in ("--wait", "--run-dir"):
                assert option in msg and option in help_text
            log = tmp_path / "wait.log"
            waiting = subprocess.Popen([sys.executable, "-m", "stillroom.cli", "compare", str(cfg), "--run-dir", str(out),
                                        "--wait"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 120
            while "waiting" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "waiting" in log.read_text() and s.posts == 0
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert waiting.wait(120) == 0, log.read_text()
            rows = json.loads((out / "compare.json").read_text())["rows"]
            assert [r["status"] for r in rows] == ["ok"] and s.posts >= 6  # 6 test answers (and the scoring probe)
    finally:
        holder.kill()


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_task_file_must_be_a_regular_file(tmp_path, kind):
    import os

    from stillroom.errors import TaskDataError
    from stillroom.tasks import load_task

    path = tmp_path / "task.jsonl"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    else:
        path.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(TaskDataError) as ei:
        load_task(str(path))
    assert str(path) in str(ei.value) and "is not a regular file" in str(ei.value)
    with FakeOpenAIServer() as srv:
        result = CliRunner().invoke(app, ["eval", "--task", str(path), "--model", "openai:fake", "--base-url",
                                          srv.base_url, "--run-dir", str(tmp_path / "run")])
        assert result.exit_code == 2 and "is not a regular file" in result.output and srv.posts == 0
    assert not (tmp_path / "run").exists()


def test_a_label_over_the_limit_is_refused_with_file_line_and_field(tmp_path):
    from stillroom.errors import TaskDataError
    from stillroom.tasks import load_task
    from stillroom.tasks.loaders import MAX_LABEL_CHARS

    long = "L" * 10_000
    path = tmp_path / "t.jsonl"
    rows = [{"input": f"q{i}", "label": ["yes", "no"][i % 2]} for i in range(8)]
    rows[5]["label"] = long
    rows[7]["label"] = long
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskDataError) as ei:
        load_task(str(path))
    msg = str(ei.value)
    assert f"{path}, line 6, field 'label'" in msg and "10,000 characters" in msg and f"at most {MAX_LABEL_CHARS}" in msg
    with pytest.raises(TaskDataError, match="field 'labels'.*10,000 characters"):
        load_task(str(write_task(tmp_path / "ok.jsonl")), labels=["yes", "no", long])
    edge = "E" * MAX_LABEL_CHARS  # exactly the limit is fine
    ok = tmp_path / "edge.jsonl"
    ok.write_text("".join(json.dumps({"input": f"q{i}", "label": [edge, "no"][i % 2]}) + "\n" for i in range(8)))
    assert load_task(str(ok)).labels == (edge, "no")


def test_default_context_window_applies_when_the_server_states_none(tmp_path):
    from stillroom.backends.openai_compat import DEFAULT_CONTEXT_TOKENS

    inputs = [f"short input {i}" for i in range(6)]
    inputs[2] = "z" * 1_000_000  # 1 MB: sent whole before, when the server said nothing about its window
    task = tmp_path / "big.jsonl"
    task.write_text("".join(json.dumps({"id": f"e{i}", "input": x, "label": ["yes", "no"][i % 2]}) + "\n"
                            for i, x in enumerate(inputs)))
    with FakeOpenAIServer() as srv:  # no /props, no max_model_len
        refused = CliRunner().invoke(app, ["eval", "--task", str(task), "--model", "openai:fake", "--base-url",
                                           srv.base_url, "--method", "generate", "--run-dir", str(tmp_path / "r1")])
        assert refused.exit_code == 2 and srv.posts == 0
        msg = " ".join(refused.output.split())
        assert "line 3" in msg and f"default of {DEFAULT_CONTEXT_TOKENS:,} tokens" in msg and "max_input_tokens" in msg
        cfg = tmp_path / "skip.yaml"
        cfg.write_text(f"task: {{spec: {task}, overlong: skip, val_fraction: 0.0, test_fraction: 0.0}}\neval_split: train\n"
                       f"method: generate\nmodel: {{spec: 'openai:fake', base_url: '{srv.base_url}'}}\n")
        skipped = CliRunner().invoke(app, ["eval", str(cfg), "--run-dir", str(tmp_path / "r2")])
        assert skipped.exit_code == 0, skipped.output
        assert srv.posts == 5 and max(len(json.dumps(r["body"])) for r in srv.requests) < 4 * DEFAULT_CONTEXT_TOKENS
        metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
        assert metrics["overlong"]["skipped"] == 1


# --- item 1: one ledger for the whole compare ------------------------------------------------------------------
def bytes_over_three(content) -> int:
    """The server's count: a token per 3 UTF-8 bytes (below Stillroom's byte bound, as real tokenizers are)."""
    msgs = content if isinstance(content, list) else [content]
    return sum(len(json.dumps(m).encode()) // 3 + 4 for m in msgs)


def _billed_by_model(srv: FakeOpenAIServer) -> dict:
    out: dict = {}
    for a in srv.answered:
        out[a["body"]["model"]] = out.get(a["body"]["model"], 0) + a["usage"]["total_tokens"]
    return out


ROUTES_3 = ["zero-shot", "teacher", "pld"]
ROUTES_5 = ["zero-shot", "k-shot", "cot", "teacher", "pld"]


@pytest.mark.parametrize(("routes", "cap"), [(ROUTES_3, "tokens"), (ROUTES_5, "tokens"), (ROUTES_3, "usd")],
                         ids=["3 routes, tokens", "5 routes, tokens", "3 routes, USD"])
def test_a_compare_cap_holds_for_the_whole_compare(tmp_path, routes, cap):
    # Both models on one server that counts what it bills. USD: $1,000 per million tokens in and out, so a cap of
    # $3.00 is 3,000 tokens. Without one ledger these runs billed 3,856 tokens (3 routes) against a cap of 3,000.
    price = {"price_in_per_mtok": 1000.0, "price_out_per_mtok": 1000.0} if cap == "usd" else {}
    spend = {"max_tokens": 3000} if cap == "tokens" else {"max_cost_usd": 3.0}
    with FakeOpenAIServer(count_tokens=bytes_over_three, completion_tokens=20) as srv:
        # Default methods ('auto'): each evaluated model's capability probe is billed too, and counted.
        cfg = _compare_cfg(tmp_path, srv, srv, routes, spend=spend, eval_limit=30, train_limit=32)
        data = json.loads(cfg.read_text())
        data["teacher"].update(price)
        data["student"].update(price)
        cfg.write_text(json.dumps(data))
        first = CliRunner().invoke(app, ["compare", str(cfg), "--run-dir", str(tmp_path / "cmp")])
        billed = srv.billed_tokens
        assert first.exit_code == 2 and "spend cap reached" in first.output, first.output
        assert 0 < billed <= 3000, _billed_by_model(srv)
        msg = " ".join(first.output.split())
        ledger = json.loads((tmp_path / "cmp" / "compare.json").read_text())["spend"]
        assert ledger["tokens"] == billed
        assert "Spend of the whole compare (every route" in (tmp_path / "cmp" / "report.html").read_text()
        if cap == "tokens":
            assert f"{billed:,} tokens spent of the compare's cap of 3,000" in msg
        else:
            assert f"${billed / 1000:.4f} spent of the compare's cap of $3.0000" in msg
        for route, share in ledger["by_route"].items():  # each route's share is in the message
            if share["tokens"]:
                assert f"{route} {share['tokens']:,} tokens" in msg
        # A rerun with the same cap pays nothing more; a higher cap resumes under the same whole-compare rule.
        again = CliRunner().invoke(app, ["compare", str(cfg), "--run-dir", str(tmp_path / "cmp")])
        assert again.exit_code == 2 and srv.billed_tokens == billed, again.output
        data["spend"] = {"max_tokens": 4500} if cap == "tokens" else {"max_cost_usd": 4.5}
        cfg.write_text(json.dumps(data))
        CliRunner().invoke(app, ["compare", str(cfg), "--run-dir", str(tmp_path / "cmp")])
        assert billed < srv.billed_tokens <= 4500


# --- item 4: build cost is a property of the build ---------------------------------------------------------------
def _pld_cfg(tmp_path: Path, srv: FakeOpenAIServer) -> Path:
    task = tmp_path / "task.jsonl"
    if not task.exists():
        write_task(task, n=40)
    cfg = {"task": {"spec": str(task)}, "embedder": "hash", "train_limit": 16, "val_limit": 4, "eval_limit": 4,
           "max_rounds": 1, "compare_baselines": False, "cot": False, "shots": 0, "student_method": "generate",
           "teacher": {"spec": "openai:teacher", "base_url": srv.base_url, "max_concurrency": 1},
           "student": {"spec": "openai:student", "base_url": srv.base_url}}
    path = tmp_path / "pld.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _teacher_extractions(srv: FakeOpenAIServer) -> int:
    return sum(1 for a in srv.answered if a["body"]["model"] == "teacher")


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_build_cost_is_the_same_however_often_the_build_was_interrupted(tmp_path, how):
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in __import__("os").environ.items() if not k.lower().endswith("_proxy")}
    env.update(PYTHONPATH=str(root), NO_PROXY="127.0.0.1,localhost", COLUMNS="200")
    with FakeOpenAIServer(count_tokens=bytes_over_three, completion_tokens=20) as srv:
        cfg = _pld_cfg(tmp_path, srv)
        whole = CliRunner().invoke(app, ["pld", str(cfg), "--run-dir", str(tmp_path / "whole")])
        assert whole.exit_code == 0, whole.output
        want = json.loads((tmp_path / "whole" / "result.json").read_text())["build"]
        assert want["teacher_calls"] > 6 and want["resumed_calls"] == 0

        # The same build, interrupted during extraction (6 teacher answers cached), then rerun to the end.
        srv.answered.clear()
        srv.delay_s = 0.05
        log = tmp_path / "cut.log"
        proc = subprocess.Popen([sys.executable, "-m", "stillroom.cli", "pld", str(cfg), "--run-dir",
                                 str(tmp_path / "cut")], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                preexec_fn=interruptible)
        deadline = time.monotonic() + 120
        while _teacher_extractions(srv) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
        assert proc.wait(120) != 0, log.read_text()
        srv.delay_s = 0.0
        assert not (tmp_path / "cut" / "result.json").exists()
        paid_before = _teacher_extractions(srv)
        rerun = CliRunner().invoke(app, ["pld", str(cfg), "--run-dir", str(tmp_path / "cut")])
        assert rerun.exit_code == 0, rerun.output
        got = json.loads((tmp_path / "cut" / "result.json").read_text())["build"]
        for key in ("teacher_calls", "teacher_input_tokens", "teacher_output_tokens", "teacher_cost_usd"):
            assert got[key] == want[key], (key, got, want)
        # The part the interrupted invocation paid for is shown separately and was not paid again. (A kill -9 can
        # land while one answer is on its way: the server billed it, the process never stored it.)
        lost = paid_before - got["resumed_calls"]
        assert 5 <= got["resumed_calls"] < got["teacher_calls"] and got["resumed_tokens"] > 0 and 0 <= lost <= 1
        assert _teacher_extractions(srv) == want["teacher_calls"] + lost
        # Wall seconds include the interrupted invocation's (written at exit; every 2 s, so even after a kill -9).
        assert got["seconds"] >= got["resumed_seconds"] >= 0 and want["resumed_seconds"] == 0
        if how == "Ctrl-C":
            assert got["resumed_seconds"] > 0
        # A further rerun reports the same build cost.
        CliRunner().invoke(app, ["pld", str(cfg), "--run-dir", str(tmp_path / "cut")])
        assert json.loads((tmp_path / "cut" / "result.json").read_text())["build"] == got


@pytest.mark.parametrize("garbage", [("application/json", b'{"id": "x", "choices": [{"index": 0, "mess'),
                                     ("text/html", b"<html><body>502 Bad Gateway</body></html>")],
                         ids=["cut-off JSON", "HTML"])
def test_a_garbled_completion_reply_is_retried_then_one_clear_error(garbage, capsys):
    from stillroom.backends.base import GenerationParams
    from stillroom.backends.openai_compat import OpenAIBackend
    from stillroom.errors import BadReply

    times = [1]

    def corrupt(path, body, payload):
        if times[0] > 0:
            times[0] -= 1
            return garbage
        return None

    with FakeOpenAIServer(corrupt=corrupt) as srv:
        b = OpenAIBackend("fake", base_url=srv.base_url, max_retries=1, timeout_s=5)
        assert b.generate([{"role": "user", "content": "hi"}], GenerationParams()).text == "echo: hi"
        assert srv.posts == 2 and "a malformed reply, retry 1 of 1" in capsys.readouterr().err
        times[0] = 5
        with pytest.raises(BadReply, match="the reply to a completion request is not"):
            b.generate([{"role": "user", "content": "hi again"}], GenerationParams())


def test_the_cache_never_keeps_a_nan_score_whatever_the_backend(tmp_path):
    from stillroom.backends.base import ScoreRequest
    from stillroom.backends.cache import CachedBackend, ResponseCache
    from stillroom.backends.scripted import ScriptedBackend
    from stillroom.errors import BackendError

    class NaNScorer(ScriptedBackend):
        supports_score = True

        def score(self, requests):
            return [[math.nan for _ in r.continuations] for r in requests]

    cached = CachedBackend(NaNScorer(lambda p, params: "x"), ResponseCache(tmp_path / "cache.sqlite"))
    with pytest.raises(BackendError, match="none NaN. Nothing of it was cached"):
        cached.score([ScoreRequest("ctx", (" a", " b"))])
    assert score_rows(tmp_path) == 0


def test_model_outputs_and_other_run_folders_are_not_written_into_a_foreign_folder(tmp_path):
    # `prune apply/heal/merge --out` replace the folder whole when they save: a folder of someone else's would be
    # deleted. They and the commands that write a plain run folder refuse before any work.
    from stillroom.errors import RunFolderRefused
    from stillroom.runs import MODEL_DONE, check_model_destination, claim_run_folder

    other = foreign_folder(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(other, target_is_directory=True)
    before = snapshot(tmp_path)
    for check in (check_model_destination, claim_run_folder):
        for folder in (other, link):
            with pytest.raises(RunFolderRefused, match="symbolic link" if folder == link else "holds config.yaml"):
                check(folder)
    assert snapshot(tmp_path) == before
    saved = tmp_path / "saved-model"
    saved.mkdir()
    (saved / MODEL_DONE).write_text("ok\n")
    (saved / "model.safetensors").write_text("weights")
    assert check_model_destination(saved) == saved and check_model_destination(tmp_path / "new") == tmp_path / "new"
    for name in ("a", "b"):  # two model folders (never loaded: the destination is refused first)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["merge", "slerp", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(other)])
    assert result.exit_code == 2 and "is not a model folder Stillroom saved" in " ".join(result.output.split())
    assert snapshot(tmp_path) == before


def test_a_servers_scoring_is_charged_to_the_cap_and_counted_on_a_rerun(tmp_path):
    # Log-likelihood scoring (and the capability probe) on a server is billed like completions: it counts in
    # usage.json, against the spend cap, and in a rerun's totals.
    task = write_task(tmp_path / "task.jsonl", n=12)
    with FakeOpenAIServer(scoring=True) as srv:
        cfg = tmp_path / "eval.yaml"
        cfg.write_text(f"task: {{spec: {task}, val_fraction: 0.0, test_fraction: 0.0}}\neval_split: train\nmethod: loglik\n"
                       f"model: {{spec: 'openai:fake', base_url: '{srv.base_url}', max_concurrency: 1}}\n")
        whole = CliRunner().invoke(app, ["eval", str(cfg), "--run-dir", str(tmp_path / "whole")])
        assert whole.exit_code == 0, whole.output
        usage = json.loads((tmp_path / "whole" / "usage.json").read_text())
        assert usage["run_tokens"] == srv.billed_tokens > 0
        total = srv.billed_tokens
        srv.answered.clear()
        capped = CliRunner().invoke(app, ["eval", str(cfg), "--run-dir", str(tmp_path / "capped"),
                                          "--max-spend-tokens", str(total // 2)])
        assert capped.exit_code == 2 and "spend cap reached" in capped.output, capped.output
        assert 0 < srv.billed_tokens <= total // 2
        billed = srv.billed_tokens
        again = CliRunner().invoke(app, ["eval", str(cfg), "--run-dir", str(tmp_path / "capped"),
                                         "--max-spend-tokens", str(total // 2)])
        # The rerun stops at the same place and pays nothing: not even the capability probe (kept in the cache).
        assert again.exit_code == 2 and srv.billed_tokens == billed
        usage = json.loads((tmp_path / "capped" / "usage.json").read_text())
        assert usage["run_tokens"] == billed and usage["calls"] == 0


def test_a_bad_reply_quoting_a_key_does_not_show_it(monkeypatch):
    from stillroom.backends.openai_compat import OpenAIBackend
    from stillroom.backends.openai_logprobs import ServerScorer
    from stillroom.errors import BadReply

    key = "sk-live-ABCdef0123456789xyz"
    monkeypatch.setenv("MY_KEY", key)
    with FakeOpenAIServer(scoring=True, corrupt=lambda path, body, payload: ("text/plain", f"bad key {key}".encode())) as srv:
        b = OpenAIBackend("fake", base_url=srv.base_url, api_key_env="MY_KEY", max_retries=0, timeout_s=5)
        with pytest.raises(BadReply) as ei:
            ServerScorer(b).server_tokenize("hello")
    assert key not in str(ei.value) and "ABCdef" not in str(ei.value) and "is not JSON" in str(ei.value)
