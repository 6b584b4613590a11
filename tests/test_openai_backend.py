"""OpenAIBackend against a local fake OpenAI-compatible server: retries, errors, key hygiene, concurrency."""

from __future__ import annotations

import logging
import socket
import traceback

import pytest

from stillroom.backends.base import GenerationParams
from stillroom.backends.cache import CachedBackend, ResponseCache
from stillroom.backends.openai_compat import OpenAIBackend, is_local_url, redact
from stillroom.errors import BackendError

try:  # tests/ may or may not be a package
    from tests.helpers_fake_server import FakeOpenAIServer
except ImportError:  # pragma: no cover
    from helpers_fake_server import FakeOpenAIServer

SECRET = "sk-test-SECRET-123"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    """The secret in the key variable; no proxies or base-URL overrides from the developer's shell."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    for var in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "OPENAI_BASE_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def make(srv: FakeOpenAIServer, **kw) -> OpenAIBackend:
    kw.setdefault("max_retries", 3)
    kw.setdefault("timeout_s", 5.0)
    return OpenAIBackend("test-model", base_url=srv.base_url, **kw)


def assert_no_secret(exc: BaseException, *texts: str) -> None:
    """The key appears nowhere: message, repr, formatted traceback (with chains), or other captured text."""
    formatted = "".join(traceback.format_exception(exc))
    chain, e = [], exc
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for blob in (str(exc), repr(exc), formatted, *map(repr, chain), *texts):
        assert SECRET not in blob
        assert "SECRET-123" not in blob


def test_chat_success_parses_text_usage_and_sends_params():
    with FakeOpenAIServer() as srv:
        b = make(srv)
        params = GenerationParams(max_tokens=32, temperature=0.5, top_p=0.9, stop=("\n\n",), seed=7)
        gen = b.generate(CHAT, params)
    assert gen.text == "echo: hi"
    assert gen.finish_reason == "stop"
    assert (gen.usage.input_tokens, gen.usage.output_tokens) == (11, 7)
    assert gen.usage.latency_s > 0 and gen.usage.cached is False
    (req,) = srv.requests
    assert req["path"] == "/v1/chat/completions"
    body = req["body"]
    assert body["model"] == "test-model" and body["messages"] == CHAT
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["stop"], body["seed"]) == (
        32,
        0.5,
        0.9,
        ["\n\n"],
        7,
    )
    assert req["headers"]["authorization"] == f"Bearer {SECRET}"


def test_more_than_four_stops_are_split_between_server_and_client():
    """OpenAI refuses more than 4 stop sequences: the first 4 go to the server, the rest cut the text here."""
    stops = ("\nA:", "\nB:", "\nC:", "\nD:", " upon")
    with FakeOpenAIServer() as srv:
        gen = make(srv).generate("Once upon a time", GenerationParams(max_tokens=8, stop=stops))
    (req,) = srv.requests
    assert req["body"]["stop"] == list(stops[:4])
    assert gen.text == "echo: Once" and gen.finish_reason == "stop"


def test_raw_prompt_uses_legacy_completions_and_omits_unset_options():
    with FakeOpenAIServer() as srv:
        gen = make(srv, extra_body={"top_k": 5}).generate("Once upon", GenerationParams(max_tokens=4))
    assert gen.text == "echo: Once upon" and gen.finish_reason == "length"
    (req,) = srv.requests
    assert req["path"] == "/v1/completions"
    assert req["body"]["prompt"] == "Once upon" and req["body"]["top_k"] == 5
    assert "stop" not in req["body"] and "seed" not in req["body"]


def test_identity_and_repr_hold_no_key():
    with FakeOpenAIServer() as srv:
        b = make(srv)
    assert b.identity == f"openai:{srv.base_url}:test-model"
    assert SECRET not in repr(b) and SECRET not in b.identity
    assert b.supports_score is False and b.supports_chat is True and b.max_concurrency == 8


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_errors_are_retried_by_the_client(status):
    with FakeOpenAIServer(script=[status]) as srv:
        gen = make(srv).generate(CHAT, GenerationParams())
    assert gen.text == "echo: hi"
    assert len(srv.requests) == 2


def test_retries_exhausted_raise_backend_error():
    with FakeOpenAIServer(script=[429] * 10) as srv:
        with pytest.raises(BackendError, match=r"HTTP 429.*rate limited after 2 retries") as ei:
            make(srv, max_retries=2).generate(CHAT, GenerationParams())
    assert len(srv.requests) == 3
    assert_no_secret(ei.value)


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_not_retried_names_variable_and_hides_key(status, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(script=[status]) as srv:
        with pytest.raises(BackendError) as ei:
            make(srv).generate(CHAT, GenerationParams())
        # Printing the traceback (as an unhandled error would) must not leak it either.
        traceback.print_exception(ei.value)
    assert len(srv.requests) == 1
    msg = str(ei.value)
    assert "authentication failed" in msg and "$OPENAI_API_KEY" in msg
    assert ei.value.__cause__ is None and ei.value.__context__ is None
    out = capsys.readouterr()
    assert_no_secret(ei.value, out.out, out.err, caplog.text)


def test_auth_failure_names_a_custom_variable(monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    with FakeOpenAIServer(script=[401]) as srv:
        with pytest.raises(BackendError, match=r"\$TEACHER_KEY") as ei:
            make(srv, api_key_env="TEACHER_KEY").generate("x", GenerationParams())
    assert_no_secret(ei.value)


def test_bad_request_not_retried_and_reports_server_message():
    with FakeOpenAIServer(script=[400]) as srv:
        with pytest.raises(BackendError, match=r"HTTP 400.*Invalid value for 'temperature'") as ei:
            make(srv).generate(CHAT, GenerationParams())
    assert len(srv.requests) == 1
    assert_no_secret(ei.value)


def test_unknown_model_not_retried():
    with FakeOpenAIServer(script=[404]) as srv:
        with pytest.raises(BackendError, match=r"HTTP 404.*test-model.*does not exist"):
            make(srv).generate(CHAT, GenerationParams())
    assert len(srv.requests) == 1


def test_missing_key_for_remote_server_names_the_variable(monkeypatch):
    monkeypatch.delenv("MY_TEACHER_KEY", raising=False)
    with pytest.raises(BackendError, match=r"\$MY_TEACHER_KEY is not set"):
        OpenAIBackend("gpt-x", base_url="https://api.example.com/v1", api_key_env="MY_TEACHER_KEY")


def test_missing_key_for_local_server_uses_placeholder(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with FakeOpenAIServer() as srv:
        make(srv).generate(CHAT, GenerationParams())
    assert srv.requests[0]["headers"]["authorization"] == "Bearer not-needed"


def test_connection_refused_is_a_backend_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = OpenAIBackend("m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    with pytest.raises(BackendError, match="cannot reach") as ei:
        b.generate(CHAT, GenerationParams())
    assert_no_secret(ei.value)


def test_timeout_is_a_backend_error():
    with FakeOpenAIServer(delay_s=0.5) as srv:
        with pytest.raises(BackendError, match="timed out"):
            make(srv, timeout_s=0.1, max_retries=0).generate(CHAT, GenerationParams())


def test_generate_many_keeps_order_and_bounds_concurrency():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(12)]
    with FakeOpenAIServer(delay_s=0.05) as srv:
        gens = make(srv, max_concurrency=3).generate_many(prompts, GenerationParams())
    assert [g.text for g in gens] == [f"echo: q{i}" for i in range(12)]
    assert len(srv.requests) == 12
    assert 2 <= srv.max_in_flight <= 3


def test_cached_openai_backend_commits_and_resumes_without_requests(tmp_path):
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    with FakeOpenAIServer(delay_s=0.01) as srv:
        first = CachedBackend(make(srv, max_concurrency=4), ResponseCache(tmp_path / "c.sqlite"))
        assert [g.text for g in first.generate_many(prompts, GenerationParams())] == [
            f"echo: q{i}" for i in range(6)
        ]
        again = CachedBackend(make(srv, max_concurrency=4), ResponseCache(tmp_path / "c.sqlite"))
        gens = again.generate_many(prompts, GenerationParams())
    assert len(srv.requests) == 6 and first.calls == 6 and again.calls == 0
    assert all(g.usage.cached for g in gens) and gens[3].text == "echo: q3"


def test_helpers():
    assert is_local_url("http://localhost:8000/v1") and is_local_url("http://127.0.0.1:1/v1")
    assert is_local_url("http://[::1]:8080/v1") and not is_local_url("https://api.openai.com/v1")
    assert not is_local_url(None)
    assert redact(f"bad key {SECRET}!", SECRET) == "bad key ***!"
    assert "sk-abc" not in redact("Incorrect API key provided: sk-abc***xyz1", None)
