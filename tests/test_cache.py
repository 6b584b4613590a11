"""The durable cache, CachedBackend and the spend cap: hits, concurrency, kill -9 resume, caps."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stillroom.backends.base import BackendBase, Generation, GenerationParams, Usage, request_key
from stillroom.backends.cache import CachedBackend, ResponseCache
from stillroom.backends.scripted import ScriptedBackend
from stillroom.backends.usage import Prices, SpendCap, UsageMeter, percentile
from stillroom.errors import SpendCapReached

try:  # tests/ may or may not be a package
    from tests import helpers_cache_jobs as jobs
except ImportError:  # pragma: no cover
    import helpers_cache_jobs as jobs

ROOT = Path(__file__).resolve().parents[1]
P = GenerationParams(max_tokens=5)


def fixed(text: str):
    return lambda prompt, params: text


def raw_prompts(n: int) -> list[str]:
    # 24 characters -> 6 estimated tokens each, so caps below are exact arithmetic.
    return [f"question {i:02d}: what is it?" for i in range(n)]


def counted(backend):
    """The scripted backend's token counts taken as its tokenizer's: a raw prompt's input bound is then
    6 + PROMPT_OVERHEAD_TOKENS (32) = 38, and a call's worst case 38 + max_tokens (5) = 43."""
    backend.exact_tokens = True
    return backend


# --- hits, keys, batching -------------------------------------------------------------------------------------
def test_hits_make_no_backend_calls(tmp_path):
    backend = ScriptedBackend(jobs.answer)
    meter = UsageMeter()
    wrapper = CachedBackend(backend, ResponseCache(tmp_path / "c.sqlite"), meter)
    prompts = jobs.job_prompts(5)
    first = wrapper.generate_many(prompts, P)
    assert backend.calls == 5 and wrapper.calls == 5 and not any(g.usage.cached for g in first)
    second = wrapper.generate_many(prompts, P)
    one = wrapper.generate(prompts[2], P)
    assert backend.calls == 5 and wrapper.calls == 5
    assert all(g.usage.cached for g in second) and one.usage.cached
    assert [g.text for g in second] == [g.text for g in first] and one.text == first[2].text
    assert second[0].usage.input_tokens == first[0].usage.input_tokens
    s = meter.summary()
    assert (s["calls"], s["cache_hits"]) == (5, 6)


def test_different_params_or_backend_give_different_keys(tmp_path):
    prompt = [{"role": "user", "content": "hi"}]
    variants = [
        P,
        GenerationParams(max_tokens=6),
        GenerationParams(max_tokens=5, temperature=0.7),
        GenerationParams(max_tokens=5, top_p=0.9),
        GenerationParams(max_tokens=5, stop=("\n",)),
        GenerationParams(max_tokens=5, seed=1),
        GenerationParams(max_tokens=5, n_sample=1),
    ]
    keys = {request_key("scripted:a", prompt, v) for v in variants}
    keys.add(request_key("scripted:b", prompt, P))
    keys.add(request_key("scripted:a", "hi", P))
    assert len(keys) == len(variants) + 2
    backend = ScriptedBackend(jobs.answer)
    wrapper = CachedBackend(backend, ResponseCache(tmp_path / "c.sqlite"))
    for v in variants:
        wrapper.generate(prompt, v)
    assert backend.calls == len(variants)


def test_duplicate_prompts_in_a_batch_are_sent_once(tmp_path):
    backend = ScriptedBackend(jobs.answer)
    wrapper = CachedBackend(backend, ResponseCache(tmp_path / "c.sqlite"))
    gens = wrapper.generate_many(["a", "b", "a", "a"], P)
    assert [g.text for g in gens] == ["A:a", "A:b", "A:a", "A:a"] and backend.calls == 2


def test_cached_row_stores_request_usage_and_cost(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    meter = UsageMeter(prices={"scripted": Prices(input_per_mtok=1e6, output_per_mtok=2e6)})
    CachedBackend(ScriptedBackend(fixed("ok fine")), cache, meter).generate("question 00: what is it?", P)
    row = (
        sqlite3.connect(cache.path)
        .execute(
            "SELECT identity, model, request, text, input_tokens, output_tokens, cost_usd FROM responses"
        )
        .fetchone()
    )
    identity, model, request, text, tin, tout, cost = row
    assert (identity, model, text, tin, tout, cost) == (
        "scripted:scripted",
        "scripted",
        "ok fine",
        6,
        2,
        10.0,
    )
    assert json.loads(request) == {
        "backend": identity,
        "params": P.as_dict(),
        "prompt": "question 00: what is it?",
    }
    assert cache.total_usage() == {"calls": 1, "input_tokens": 6, "output_tokens": 2, "cost_usd": 10.0}
    assert cache.total_usage("other")["calls"] == 0


def test_wrapper_delegates_the_interface(tmp_path):
    backend = ScriptedBackend(jobs.answer, name="x")
    wrapper = CachedBackend(backend, ResponseCache(tmp_path / "c.sqlite"))
    assert (wrapper.identity, wrapper.model, wrapper.supports_score, wrapper.supports_chat) == (
        "scripted:x",
        "x",
        False,
        True,
    )
    assert wrapper.count_tokens("abcdefgh") == 2
    with pytest.raises(NotImplementedError):
        wrapper.score([])


class ChunkedBackend(BackendBase):
    """Batched backend (no max_concurrency) that records chunk sizes and fails on a chosen chunk."""

    identity, model = "chunked:m", "m"

    def __init__(self, batch_size: int, fail_on_chunk: int | None = None):
        self.batch_size, self.fail_on_chunk, self.chunks = batch_size, fail_on_chunk, []

    def generate_many(self, prompts, params):
        if len(self.chunks) == self.fail_on_chunk:
            self.fail_on_chunk = None
            raise RuntimeError("device lost")
        self.chunks.append(len(prompts))
        return [Generation(text=f"A:{p}", usage=Usage(1, 1, 0.01)) for p in prompts]


def test_batched_backend_commits_after_each_chunk(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    backend = ChunkedBackend(batch_size=3, fail_on_chunk=2)
    with pytest.raises(RuntimeError, match="device lost"):
        CachedBackend(backend, cache).generate_many([f"p{i}" for i in range(10)], P)
    assert len(cache) == 6  # the two chunks that finished are durable
    wrapper = CachedBackend(backend, cache)
    gens = wrapper.generate_many([f"p{i}" for i in range(10)], P)
    assert [g.text for g in gens] == [f"A:p{i}" for i in range(10)]
    assert wrapper.calls == 4 and backend.chunks == [3, 3, 3, 1]


def test_threaded_backend_caches_completions_even_when_one_call_fails(tmp_path):
    failed = []

    def flaky(prompt, params):
        if prompt == "bad" and not failed:
            failed.append(1)
            raise RuntimeError("boom")
        time.sleep(0.01)
        return "A:" + prompt

    backend = ScriptedBackend(flaky)
    backend.max_concurrency = 4
    cache = ResponseCache(tmp_path / "c.sqlite")
    prompts = [f"p{i}" for i in range(3)] + ["bad"]
    with pytest.raises(RuntimeError, match="boom"):
        CachedBackend(backend, cache).generate_many(prompts, P)
    assert len(cache) == 3  # the calls in flight finished and were committed
    wrapper = CachedBackend(backend, cache)
    assert [g.text for g in wrapper.generate_many(prompts, P)] == [f"A:{p}" for p in prompts]
    assert wrapper.calls == 1


def test_threaded_generate_many_keeps_order_and_uses_threads(tmp_path):
    seen = set()

    def slow(prompt, params):
        seen.add(threading.get_ident())
        time.sleep(0.02)
        return "A:" + prompt

    backend = ScriptedBackend(slow)
    backend.max_concurrency = 4
    prompts = [f"p{i}" for i in range(16)]
    gens = CachedBackend(backend, ResponseCache(tmp_path / "c.sqlite")).generate_many(prompts, P)
    assert [g.text for g in gens] == [f"A:{p}" for p in prompts]
    assert len(seen) > 1


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_many_threaded_batches_do_not_leak_connections(tmp_path):
    backend = ScriptedBackend(jobs.answer)
    backend.max_concurrency = 4
    wrapper = CachedBackend(backend, ResponseCache(tmp_path / "c.sqlite"))
    wrapper.generate_many(["warm-up", "again"], P)
    before = len(os.listdir("/proc/self/fd"))
    for b in range(30):
        wrapper.generate_many([f"b{b}-{i}" for i in range(4)], P)
    assert len(os.listdir("/proc/self/fd")) <= before + 2


# --- concurrency and crashes ----------------------------------------------------------------------------------
def test_cache_is_wal_and_concurrent_threads_lose_nothing(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    assert cache.journal_mode() == "wal"

    def write(t: int) -> None:
        for i in range(50):
            gen = Generation(text=f"{t}-{i}", usage=Usage(1, 1, 0.0))
            cache.put(f"k{t}-{i}", identity="x", model="m", request="{}", generation=gen)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(cache) == 400
    assert cache.get("k7-49").text == "7-49" and cache.get("missing") is None


def test_concurrent_processes_lose_nothing(tmp_path):
    db = str(tmp_path / "c.sqlite")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=jobs.writer_process, args=(db, f"proc{k}", 60, 20, start)) for k in range(2)]
    for p in procs:
        p.start()
    jobs.writer_process(db, "main", 60, 20, start)  # and this process, at the same time
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    cache = ResponseCache(db)
    assert len(cache) == 3 * 60 + 20
    for prefix in ("proc0", "proc1", "main", "shared"):
        for prompt in jobs.job_prompts(20 if prefix == "shared" else 60, prefix):
            key = request_key("scripted:scripted", prompt, jobs.PARAMS)
            assert cache.get(key).text == jobs.answer(prompt, jobs.PARAMS)


def count_rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.OperationalError:  # file or table not created yet
        return 0


def test_kill_9_then_resume_repeats_no_completed_call(tmp_path):
    db = tmp_path / "run" / "cache.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, jobs.__file__, "slow", str(db), "0.1"], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while count_rows(db) < 5:
            assert proc.poll() is None, "job ended before it could be killed"
            assert time.monotonic() < deadline, "job made no progress"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(ResponseCache(db))
    assert 5 <= done < 20

    resumed = jobs.run_job(str(db))
    assert resumed.calls == 20 - done and resumed.backend.calls == 20 - done
    assert resumed.meter.summary()["cache_hits"] == done
    third = jobs.run_job(str(db))
    assert third.calls == 0 and third.backend.calls == 0


# --- usage and spend cap --------------------------------------------------------------------------------------
def test_token_cap_stops_before_exceeding_and_rerun_resumes(tmp_path):
    db = tmp_path / "c.sqlite"
    prompts = raw_prompts(20)
    cache = ResponseCache(db)
    # Each call: worst case 38 + 5 = 43 tokens, actual 6 + 2 = 8. With a cap of 80, five calls fit (40 spent;
    # a sixth could reach 83).
    meter = UsageMeter(cap=SpendCap(max_tokens=80), prior=cache.total_usage())
    wrapper = CachedBackend(counted(ScriptedBackend(fixed("ok fine"))), cache, meter)
    with pytest.raises(SpendCapReached) as ei:
        wrapper.generate_many(prompts, P)
    msg = str(ei.value)
    assert "40 tokens spent of a cap of 80" in msg and "rerunning with a higher cap resumes" in msg
    assert "cached" in msg
    assert wrapper.calls == 5 and len(cache) == 5
    assert meter.spent_tokens == 40 <= 80
    total = cache.total_usage()
    assert total["input_tokens"] + total["output_tokens"] <= 80

    # Hits are never charged: the capped meter still serves what is cached.
    assert wrapper.generate(prompts[0], P).usage.cached

    # Same cap on a fresh invocation: earlier spend counts, so no new call is made.
    again = CachedBackend(
        counted(ScriptedBackend(fixed("ok fine"))),
        cache,
        UsageMeter(cap=SpendCap(max_tokens=80), prior=cache.total_usage()),
    )
    with pytest.raises(SpendCapReached):
        again.generate_many(prompts, P)
    assert again.calls == 0

    # Higher cap: resumes, repeating nothing.
    meter3 = UsageMeter(cap=SpendCap(max_tokens=1000), prior=cache.total_usage())
    resumed = CachedBackend(counted(ScriptedBackend(fixed("ok fine"))), cache, meter3)
    assert [g.text for g in resumed.generate_many(prompts, P)] == ["ok fine"] * 20
    assert resumed.calls == 15 and meter3.summary()["cache_hits"] == 5
    assert meter3.summary()["run_tokens"] == 160


def test_cost_cap_uses_prices(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    # $1 an input token, $2 an output token.
    prices = {"scripted": Prices(input_per_mtok=1e6, output_per_mtok=2e6)}
    # Worst case $38 + $10 = $48 a call, actual $6 + $4 = $10: a $65 cap fits two calls (a third could reach $68).
    meter = UsageMeter(prices=prices, cap=SpendCap(max_cost_usd=65.0))
    wrapper = CachedBackend(counted(ScriptedBackend(fixed("ok fine"))), cache, meter)
    with pytest.raises(SpendCapReached, match=r"\$20\.0000 spent of a cap of \$65\.0000"):
        wrapper.generate_many(raw_prompts(10), P)
    assert wrapper.calls == 2 and meter.spent_cost_usd == 20.0 and cache.total_usage()["cost_usd"] == 20.0


def test_concurrent_calls_cannot_overshoot_the_cap(tmp_path):
    backend = counted(ScriptedBackend(fixed("ok fine"), delay_s=0.01))
    backend.max_concurrency = 8
    cache = ResponseCache(tmp_path / "c.sqlite")
    meter = UsageMeter(cap=SpendCap(max_tokens=300))
    with pytest.raises(SpendCapReached) as ei:
        CachedBackend(backend, cache, meter).generate_many(raw_prompts(40), P)
    total = cache.total_usage()
    assert meter.spent_tokens == total["input_tokens"] + total["output_tokens"] <= 300
    # Calls that did not fit beside the in-flight worst cases waited for them to settle: the run stopped only
    # when one more worst case (43) no longer fitted, and says so with the settled spend.
    assert meter.spent_tokens + 43 > 300 and total["calls"] == meter.spent_tokens // 8
    assert f"{meter.spent_tokens:,} tokens spent of a cap of 300" in str(ei.value)
    assert meter._reserved_tokens == 0 and meter._in_flight == 0  # every reservation was settled or cancelled


def test_meter_summary_percentiles_and_atomic_save(tmp_path):
    meter = UsageMeter(
        prices={"m": Prices(2.0, 4.0)},
        prior={"calls": 3, "input_tokens": 10, "output_tokens": 5, "cost_usd": 1.5},
    )
    for latency in (0.1, 0.2, 0.3, 0.4, 1.0):
        r = meter.reserve(100, 50, "m")
        meter.settle(r, Usage(input_tokens=1_000_000, output_tokens=500_000, latency_s=latency))
    meter.record_hit(2)
    s = meter.summary()
    assert (s["calls"], s["cache_hits"], s["input_tokens"], s["output_tokens"]) == (
        5,
        2,
        5_000_000,
        2_500_000,
    )
    assert s["cost_usd"] == pytest.approx(5 * (2.0 + 2.0))
    assert s["latency_p50_s"] == pytest.approx(0.3) and s["latency_p95_s"] == pytest.approx(0.88)
    assert (s["run_calls"], s["run_tokens"], s["run_cost_usd"]) == (8, 7_500_015, pytest.approx(21.5))
    out = tmp_path / "sub" / "usage.json"
    meter.save(out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(s))
    assert [p.name for p in out.parent.iterdir()] == ["usage.json"]  # no temp file left behind
    assert percentile([], 50) == 0.0 and percentile([2.0], 95) == 2.0


class ScoringBackend(BackendBase):
    """A local-style backend that scores continuations by length and counts every request it scores."""

    supports_score = True
    supports_chat = False

    def __init__(self):
        self.identity, self.model, self.scored = "scoring:len", "len", 0

    def generate(self, prompt, params):
        raise AssertionError("not used")

    def score(self, requests):
        time.sleep(0.01 * len(requests))
        self.scored += len(requests)
        return [[-float(len(c)) - 0.5 * len(r.context) for c in r.continuations] for r in requests]


def test_scores_are_cached_across_runs_and_metered(tmp_path):
    from stillroom.backends.base import ScoreRequest

    reqs = [ScoreRequest(f"ctx {i}:", (" yes", " no")) for i in range(5)]
    first = CachedBackend(ScoringBackend(), ResponseCache(tmp_path / "c.sqlite"))
    want = first.score(reqs[:3])
    assert first.backend.scored == 3 and first.score_calls == 3
    assert first.meter.summary()["score_requests"] == 3
    assert first.meter.summary()["score_input_tokens"] > 0

    # A new process on the same run folder: the three known requests come from the file, only two are scored.
    again = CachedBackend(ScoringBackend(), ResponseCache(tmp_path / "c.sqlite"))
    got = again.score(reqs)
    assert again.backend.scored == 2 and again.score_calls == 2
    assert got[:3] == want and got == ScoringBackend().score(reqs)
    assert again.meter.summary()["cache_hits"] == 3
    # Hits keep the latency measured when they were scored, so a resumed report shows real latencies.
    assert all(x >= 0.005 for x in again.last_score_latencies)
    # Scores never count as paid calls.
    assert again.meter.summary()["calls"] == 0
    assert again.score(reqs) == got and again.backend.scored == 2
