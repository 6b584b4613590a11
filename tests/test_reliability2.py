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
    from tests.helpers_fake_server import FakeOpenAIServer, fake_tokenize
except ImportError:  # pragma: no cover
    from helpers_fake_server import FakeOpenAIServer, fake_tokenize


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
    cfg.write_text(f"task: {{spec: {task}, val_fraction: 0.0, test_fraction: 0.0}}\nsplit: train\nmethod: loglik\n"
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
