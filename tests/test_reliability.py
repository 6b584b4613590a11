"""Reliability against an OpenAI-compatible server that counts every request (tests/helpers_fake_server.py):
a spend cap that holds for non-Latin text under concurrency, one process per run folder, interrupts that
lose nothing, inputs checked against the context window before any call, no folder left by a failed first
run, key-shaped variable names refused, visible retries, label sets from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stillroom.backends import load_backend
from stillroom.backends.base import GenerationParams, fits_context, input_token_bound, utf8_token_bound
from stillroom.backends.openai_compat import OpenAIBackend, tiktoken_encoding
from stillroom.backends.scripted import ScriptedBackend
from stillroom.cli import app
from stillroom.config import BackendConfig, EvalConfig, SpendConfig, TaskConfig, validate_config
from stillroom.errors import BackendError, ConfigError, SpendCapReached, TaskDataError
from stillroom.locking import RunFolderBusy, run_folder_lock
from stillroom.prompting.job import run_eval

try:  # tests/ may or may not be a package
    from tests.helpers_fake_server import FakeOpenAIServer, interruptible
except ImportError:  # pragma: no cover
    from helpers_fake_server import FakeOpenAIServer, interruptible

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-live-ABCdef0123456789xyz"
HANG_GUARD_S = 120  # only stops a broken test from hanging the suite; no test asserts on time


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def write_task(path: Path, inputs: list[str], labels=("yes", "no")) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(inputs):
            f.write(json.dumps({"id": f"ex{i}", "input": text, "label": labels[i % len(labels)]}, ensure_ascii=False) + "\n")
    return path


def latin_task(tmp_path: Path, n: int = 24) -> Path:
    return write_task(tmp_path / "task.jsonl", [f"Is statement number {i} plausible?" for i in range(n)])


def eval_cfg(task: Path, srv: FakeOpenAIServer, **model) -> EvalConfig:
    # method 'generate': these tests count every request the server saw, and 'auto' would first probe the
    # server's scoring (a request of its own, tested in test_served_logprobs.py).
    return EvalConfig(task=TaskConfig(spec=str(task), val_fraction=0.0, test_fraction=0.0), eval_split="train",
                      method="generate", model=BackendConfig(spec="openai:fake", base_url=srv.base_url, **model))


def cli_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "OPENAI_API_KEY"}
    env.update(PYTHONPATH=str(ROOT), NO_PROXY="127.0.0.1,localhost", STILLROOM_RUNS=str(tmp_path / "runs"),
               COLUMNS="200")
    return env


def start_eval(tmp_path: Path, task: Path, srv: FakeOpenAIServer, run_dir: Path, *extra: str, name: str = "p"):
    """`stillroom eval` in its own process; stdout+stderr go to a file the test can poll."""
    log = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "stillroom.cli", "eval", "--task", str(task), "--model", "openai:fake",
           "--base-url", srv.base_url, "--method", "generate", "--run-dir", str(run_dir), *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(tmp_path), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=interruptible)
    return proc, log


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def cache_rows(run_dir: Path) -> int:
    import sqlite3

    with sqlite3.connect(run_dir / "cache.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


# --- 1. the spend cap holds ----------------------------------------------------------------------------------------
CHINESE = "这个句子说的是一个普通人在平常的一天里做了一件非常合理的事情吗请判断"


def chars_plus_template(content) -> int:
    """The server's count: one token per character (CJK), plus a chat template of 4 tokens a message."""
    msgs = content if isinstance(content, list) else [content]
    return sum(len(m) + 4 for m in msgs) + 3


@pytest.mark.parametrize("cap", ["tokens", "usd"])
def test_cap_holds_for_chinese_text_under_concurrency(tmp_path, cap):
    # 4 characters a token would estimate ~15 tokens per input; the server counts ~45. Eight calls in flight.
    task = write_task(tmp_path / "zh.jsonl", [f"{CHINESE}{i}" for i in range(48)], labels=("是", "否"))
    with FakeOpenAIServer(delay_s=0.02, count_tokens=chars_plus_template, completion_tokens=3) as srv:
        cfg = eval_cfg(task, srv, max_concurrency=8, price_in_per_mtok=1.0, price_out_per_mtok=2.0)
        spend = SpendConfig(max_tokens=2500) if cap == "tokens" else SpendConfig(max_cost_usd=0.0025)
        cfg = cfg.model_copy(update={"spend": spend})
        with pytest.raises(SpendCapReached) as ei:
            run_eval(cfg, tmp_path / "run")
        billed_in = sum(a["usage"]["prompt_tokens"] for a in srv.answered)
        billed_out = sum(a["usage"]["completion_tokens"] for a in srv.answered)
        usage = json.loads((tmp_path / "run" / "usage.json").read_text())
        assert 0 < srv.posts < 48 and srv.posts == len(srv.answered) == usage["calls"] == cache_rows(tmp_path / "run")
        assert usage["run_tokens"] == billed_in + billed_out
        if cap == "tokens":
            assert billed_in + billed_out <= 2500
            # The message states the spend after every in-flight call settled: what the server billed.
            assert f"{billed_in + billed_out:,} tokens spent of a cap of 2,500" in str(ei.value)
            # ...and stopped only when one more call's worst case no longer fitted beside it.
            import re

            worst = int(re.search(r"could use up to ([\d,]+) tokens", str(ei.value)).group(1).replace(",", ""))
            assert billed_in + billed_out + worst > 2500
        else:
            cost = (billed_in * 1.0 + billed_out * 2.0) / 1e6
            assert cost <= 0.0025
            assert f"${cost:.4f} spent of a cap of $0.0025" in str(ei.value)
        assert "still in flight" not in str(ei.value)


def test_input_bound_is_an_upper_bound_for_any_script():
    backend = ScriptedBackend(lambda p, params: "x")
    for text in [CHINESE, "ascii words only", "emoji 🙂🙂🙂", "ελληνικά κείμενο", "العربية"]:
        msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": text}]
        assert input_token_bound(backend, msgs) >= chars_plus_template([m["content"] for m in msgs])
        assert utf8_token_bound(text) >= len(text) + 1


def test_server_counting_above_the_bound_raises_later_reservations():
    from stillroom.backends.base import Usage
    from stillroom.backends.usage import SpendCap, UsageMeter

    meter = UsageMeter(cap=SpendCap(max_tokens=10_000))
    r = meter.reserve(100, 10, "m")
    meter.settle(r, Usage(input_tokens=300, output_tokens=5))
    assert meter.reserve(100, 10, "m").tokens == 310


def test_tiktoken_without_its_bpe_file_falls_back_without_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    assert tiktoken_encoding("gpt-4o") is None and tiktoken_encoding("not-an-openai-model") is None
    b = OpenAIBackend("gpt-4o", base_url="http://127.0.0.1:9/v1", max_retries=0)
    assert b.exact_tokens is False
    assert input_token_bound(b, [{"role": "user", "content": CHINESE}]) >= len(CHINESE.encode())


# --- 2. one process per run folder ---------------------------------------------------------------------------------
def test_two_processes_on_one_folder_make_exactly_one_call_per_prompt(tmp_path):
    task = latin_task(tmp_path, 24)
    run_dir = tmp_path / "shared-run"
    with FakeOpenAIServer(gate=True) as srv:
        first, log1 = start_eval(tmp_path, task, srv, run_dir, name="first")
        wait_until(lambda: srv.posts >= 1, "the first process's first request")
        # A second process without --wait is refused at once, naming the folder and the holder.
        second = subprocess.run(
            [sys.executable, "-m", "stillroom.cli", "eval", "--task", str(task), "--model", "openai:fake",
             "--base-url", srv.base_url, "--run-dir", str(run_dir)],
            cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD_S)
        out = second.stdout + second.stderr
        assert second.returncode == 2, out
        assert str(run_dir) in out and f"process {first.pid}" in out and "--wait" in out
        # A third one with --wait queues behind the first.
        third, log3 = start_eval(tmp_path, task, srv, run_dir, "--wait", name="third")
        wait_until(lambda: "waiting" in log3.read_text(), "the third process to report it is waiting")
        srv.open_gate()
        assert first.wait(HANG_GUARD_S) == 0, log1.read_text()
        assert third.wait(HANG_GUARD_S) == 0, log3.read_text()
        distinct = {json.dumps(r["body"]["messages"], sort_keys=True) for r in srv.requests}
        assert srv.posts == len(distinct) == cache_rows(run_dir)
        usage = json.loads((run_dir / "usage.json").read_text())
        assert usage["calls"] == 0 and usage["cache_hits"] == len(distinct)  # the third paid for nothing


def test_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    with run_folder_lock(tmp_path / "r"):
        with run_folder_lock(tmp_path / "r"):
            pass
    code = ("import sys; from stillroom.locking import run_folder_lock\n"
            "with run_folder_lock(sys.argv[1]): print('ok')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.stdout.strip() == "ok", done.stderr
    with run_folder_lock(tmp_path / "r"):
        held = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], env=cli_env(tmp_path),
                              capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert "RunFolderBusy" in held.stderr and f"process {os.getpid()}" in held.stderr
    assert issubclass(RunFolderBusy, Exception)


# --- 3. interrupts lose nothing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("concurrency", [1, 8])
def test_sigint_lets_in_flight_calls_finish_and_the_rerun_pays_nothing_twice(tmp_path, concurrency):
    task = latin_task(tmp_path, 24)
    run_dir = tmp_path / "run"
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"task: {{spec: {task}, val_fraction: 0.0, test_fraction: 0.0}}\neval_split: train\n"
                   f"model: {{max_concurrency: {concurrency}}}\n", encoding="utf-8")
    with FakeOpenAIServer(gate=True) as srv:
        proc, log = start_eval(tmp_path, task, srv, run_dir, str(cfg))
        wait_until(lambda: srv.in_flight == concurrency, f"{concurrency} requests in flight")
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: "interrupted: letting" in log.read_text(), "the interrupt notice")
        assert srv.posts == concurrency  # nothing new was started after Ctrl-C
        srv.open_gate()
        assert proc.wait(HANG_GUARD_S) == 130, log.read_text()
        text = log.read_text()
        assert f"letting {concurrency} call(s) already sent finish" in text and "rerun the same command" in text
        assert len(srv.answered) == concurrency == cache_rows(run_dir)  # every paid answer was kept
        rerun, log2 = start_eval(tmp_path, task, srv, run_dir, str(cfg), name="rerun")
        assert rerun.wait(HANG_GUARD_S) == 0, log2.read_text()
    distinct = {json.dumps(r["body"]["messages"], sort_keys=True) for r in srv.requests}
    assert srv.posts == len(distinct) == 24 == cache_rows(run_dir)


def test_second_sigint_aborts_at_once(tmp_path):
    task = latin_task(tmp_path, 8)
    with FakeOpenAIServer(gate=True) as srv:
        proc, log = start_eval(tmp_path, task, srv, tmp_path / "run")
        wait_until(lambda: srv.in_flight >= 1, "a request in flight")
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: "interrupted: letting" in log.read_text(), "the interrupt notice")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(HANG_GUARD_S) == 130, log.read_text()  # the gate never opened
        assert srv.answered == []


# --- 4. inputs that fit --------------------------------------------------------------------------------------------
def test_overlong_example_is_refused_before_any_call_naming_file_and_line(tmp_path):
    inputs = [f"short input {i}" for i in range(6)]
    inputs[2] = "x" * 1_000_000
    task = write_task(tmp_path / "task.jsonl", inputs)
    with FakeOpenAIServer(n_ctx=1024) as srv:
        with pytest.raises(TaskDataError) as ei:
            run_eval(eval_cfg(task, srv), tmp_path / "run")
        assert srv.posts == 0 and srv.gets == ["/props"]  # the window was probed; nothing was paid for
    msg = str(ei.value)
    assert str(task) in msg and "line 3" in msg and "over the window of 1,024" in msg and "'truncate'" in msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_overlong_policy_skip_or_truncate_is_counted(tmp_path, policy):
    inputs = [f"short input {i}" for i in range(6)]
    inputs[2] = "y" * 5000
    task = write_task(tmp_path / "task.jsonl", inputs)
    with FakeOpenAIServer(count_tokens=lambda c: sum(len(m.encode()) for m in c)) as srv:
        cfg = eval_cfg(task, srv, max_input_tokens=1024)
        cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"overlong": policy})})
        run_eval(cfg, tmp_path / "run")
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["overlong"] == {"policy": policy, "overlong": 1, "truncated": int(policy == "truncate"),
                                       "skipped": int(policy == "skip")}
        assert srv.posts == (5 if policy == "skip" else 6)
        assert all(a["usage"]["prompt_tokens"] + 16 <= 1024 for a in srv.answered)


def test_pld_synthesis_and_resolution_prompts_are_trimmed_to_the_window():
    from stillroom.backends.base import normalise_prompt
    from stillroom.pld.cluster import Clustering
    from stillroom.pld.extract import Instruction
    from stillroom.pld.resolve import fit_cases
    from stillroom.pld.synthesize import synthesize_rules
    from stillroom.tasks.task import Example, Task

    sent = []

    def teacher_reply(prompt, params):
        sent.append(normalise_prompt(prompt))
        return '{"rule": "Answer yes when the claim is ordinary."}'

    teacher = ScriptedBackend(teacher_reply)
    teacher.context_tokens = 3000
    task = Task(name="t", instruction="Decide.", kind="classification", labels=("yes", "no"),
                examples=[Example(id="a", input="x", label="yes")])
    instr = [Instruction(example_id=f"e{i}", label="yes", text=f"Instruction {i}: " + "long words " * 20, raw=[])
             for i in range(20)]
    emb = np.ones((20, 4), dtype=np.float32)
    clustering = Clustering(eps=0.3, min_samples=3, assignments=[0] * 20)
    params = GenerationParams(max_tokens=256)
    rb = synthesize_rules(task, instr, emb, clustering, teacher, params)
    assert len(sent) == 1 and rb.rules[0].origin == "synthesis"
    assert 0 < rb.meta["synthesis_members_trimmed"] < 20
    assert fits_context(teacher, sent[0], 256)[0]
    fails = [{"input": "w " * 100, "gold": "yes", "pred": "no", "text": "no"} for _ in range(16)]
    f, s = fit_cases(task, ["a rule"], fails, fails[:8], teacher, params)
    assert 0 < len(f) < 16


# --- 5. a failed first run leaves no folder ------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["bad data", "missing file", "empty model", "unknown model", "unknown bigbench"])
def test_failed_first_run_leaves_no_folder(tmp_path, monkeypatch, case):
    task = latin_task(tmp_path, 6)
    if case == "bad data":
        task.write_text(task.read_text() + '{"id": "z", "input": "no label here"}\n')
    spec, model = str(task), "openai:fake"
    if case == "missing file":
        spec = str(tmp_path / "nope.jsonl")
    if case == "empty model":
        model = ""
    if case == "unknown model":
        model = "nonsense:thing"
    if case == "unknown bigbench":
        import stillroom.tasks.bigbench as bb

        def not_there(name, cache_dir=None):
            raise TaskDataError(f"BIG-bench task '{name}' is not in the archive")

        monkeypatch.setattr(bb, "bigbench_task_json", not_there)
        spec = "bigbench:no_such_task"
    with FakeOpenAIServer() as srv:
        result = CliRunner().invoke(app, ["eval", "--task", spec, "--model", model, "--base-url", srv.base_url,
                                          "--run-dir", str(tmp_path / "run")])
        assert result.exit_code == 2, result.output
        assert "error:" in result.output
        assert srv.posts == 0
    assert not (tmp_path / "run").exists()


# --- 6. a key where its variable's name belongs --------------------------------------------------------------------
def test_key_shaped_variable_name_is_refused_and_appears_nowhere(tmp_path):
    task = latin_task(tmp_path, 6)
    with FakeOpenAIServer() as srv:
        result = CliRunner().invoke(app, ["eval", "--task", str(task), "--model", "openai:fake", "--base-url",
                                          srv.base_url, "--api-key-env", KEY, "--run-dir", str(tmp_path / "run")])
        assert srv.posts == 0
    assert result.exit_code == 2 and "api_key_env" in result.output and "NAME of the environment variable" in result.output
    assert KEY not in result.output and "ABCdef0123" not in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: {{spec: {task}}}\nmodel: {{spec: 'openai:fake', api_key_env: {KEY}}}\n")
    result = CliRunner().invoke(app, ["eval", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and KEY not in result.output
    with pytest.raises(ConfigError) as ei:
        validate_config(BackendConfig, {"spec": "openai:x", "api_key_env": KEY})
    assert KEY not in str(ei.value)
    with pytest.raises(ValueError) as ei2:
        OpenAIBackend("x", base_url="http://127.0.0.1:9/v1", api_key_env=KEY)
    assert KEY not in str(ei2.value)
    assert BackendConfig(api_key_env="MY_PROVIDER_KEY").api_key_env == "MY_PROVIDER_KEY"


# --- 7. retries are shown and give up within the budget ------------------------------------------------------------
def test_each_backoff_is_shown(capsys):
    with FakeOpenAIServer(script=[429, 429, 503]) as srv:
        b = OpenAIBackend("fake", base_url=srv.base_url, max_retries=5, timeout_s=5)
        assert b.generate([{"role": "user", "content": "hi"}], GenerationParams()).text == "echo: hi"
        assert srv.posts == 4
    err = capsys.readouterr().err
    assert "rate limited, retry 1 of 5 in" in err and "rate limited, retry 2 of 5 in" in err
    assert "HTTP 503, retry 3 of 5 in" in err


def test_a_server_that_never_answers_is_given_up_within_the_retry_budget(capsys):
    with FakeOpenAIServer(hang=True) as srv:
        # A budget of 2 s leaves room for at least one backoff (at most 0.625 s after the first 0.3 s attempt),
        # so a retry notice is always shown; a 1 s budget made that depend on the random backoff's draw.
        b = OpenAIBackend("fake", base_url=srv.base_url, max_retries=5, timeout_s=0.3, retry_budget_s=2.0)
        with pytest.raises(BackendError, match="retry budget of 2s is spent|timed out"):
            b.generate([{"role": "user", "content": "hi"}], GenerationParams())
        assert 2 <= srv.posts < 6  # the budget, not the retry count, ended it
    assert "no answer within" in capsys.readouterr().err
    # The defaults: every attempt's timeout is cut to what is left of a two-minute budget.
    d = load_backend(BackendConfig(spec="openai:x", base_url="http://127.0.0.1:9/v1"))
    assert d.retry_budget_s == 120 and d.max_retries == 5


# --- 8. label sets from the command line ---------------------------------------------------------------------------
def test_labels_from_the_command_line_and_quoted_yaml_hint(tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"input": f"q{i}", "label": "yes"}) + "\n" for i in range(5)))
    shown = CliRunner().invoke(app, ["tasks", "show", str(task), "--labels", "yes,no"])
    assert shown.exit_code == 0 and "labels: yes, no" in shown.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: {{spec: {task}, labels: [yes, no]}}\n")
    bad = CliRunner().invoke(app, ["eval", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert bad.exit_code == 2 and "quote them" in bad.output
    assert validate_config(EvalConfig, {"task": {"spec": "x", "labels": "yes,no"}}).task.labels == ["yes", "no"]
    task.write_text(task.read_text() + json.dumps({"input": "unlabelled"}) + "\n")
    missing = CliRunner().invoke(app, ["tasks", "show", str(task)])
    assert missing.exit_code == 2 and "line 6" in missing.output and "kind='free_text'" not in missing.output
