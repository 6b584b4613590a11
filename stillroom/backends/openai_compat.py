"""Any OpenAI-compatible server as a backend: OpenAI itself, vLLM, Ollama, llama.cpp's server, ...

The API key is read from an environment variable that the config *names* (never from a config file), and it
never appears in an error message, a repr or a traceback: errors are rebuilt as `BackendError` with the key
redacted and raised outside the `except` block, so no exception carrying the request (and its headers) is
chained onto them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import openai

from stillroom.backends.base import (
    BackendBase,
    Generation,
    GenerationParams,
    Prompt,
    ScoreRequest,
    Usage,
    estimate_tokens,
    normalise_prompt,
    notify,
    prompt_text,
)
from stillroom.errors import BackendError, BadReply

DEFAULT_BASE_URL = "https://api.openai.com/v1"
PLACEHOLDER_KEY = "not-needed"
"""Sent to local servers when the key variable is unset (most ignore the Authorization header)."""

# Anything shaped like a bearer secret (OpenAI/Anthropic/OpenRouter style keys, possibly partly masked by the
# server), in case a server echoes a key other than ours.
_KEYLIKE = re.compile(r"\b(?:sk|rk|pk|key)-[A-Za-z0-9_\-*.]{6,}")


def is_local_url(url: str | None) -> bool:
    """Whether `url` points at this machine (localhost, 127.0.0.0/8, ::1, 0.0.0.0)."""
    if not url:
        return False
    host = (urlparse(url).hostname or "").lower()
    if host in ("localhost", "0.0.0.0") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact(text: str, secret: str | None) -> str:
    """`text` with `secret` and anything key-shaped replaced by `***`."""
    if secret and secret != PLACEHOLDER_KEY and len(secret) >= 4:
        text = text.replace(secret, "***")
    return _KEYLIKE.sub("***", text)


def _server_message(exc: openai.APIError) -> str:
    """The human part of an error response ({"error": {"message": ...}}), else the client's message."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str) and inner:
            return inner
        if body.get("message"):
            return str(body["message"])
    return str(exc.message)


MAX_SERVER_STOPS = 4
"""Stop sequences sent to the server (OpenAI's limit; vLLM, Ollama and llama.cpp accept at least as many)."""


def _cut_at_stops(text: str, stops) -> tuple[str, bool]:
    """`text` up to the first of `stops` (the stop itself removed), and whether one was found."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


OPENAI_CONTEXT = (
    ("gpt-4.1", 1_047_576),
    ("gpt-5", 400_000),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4", 200_000),
    ("gpt-4o", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-3.5-turbo", 16_385),
)
"""Context windows of OpenAI's models by name prefix (first match), for api.openai.com, which does not say."""

DEFAULT_CONTEXT_TOKENS = 4096
"""The context window assumed for a server that states none (no `max_input_tokens` in the config, no llama.cpp
`/props`, no vLLM `max_model_len`, not one of OpenAI's listed models). Conservative on purpose: llama.cpp's
default, and below every current hosted model's window, so an oversized example is caught before it is paid for
(the task's `overlong` policy decides what happens to it, as with a stated window). A server with a larger
window: set `max_input_tokens`."""

_RETRY_STATUS = {408, 409, 429}
"""HTTP statuses worth retrying besides 5xx (what the official client retries too)."""
MAX_BACKOFF_S = 30.0
"""Longest wait between two attempts, whatever the server's Retry-After says."""


def _backoff(attempt: int) -> float:
    """Seconds before retry `attempt + 1`: exponential from 0.5 s, capped, with ±25% jitter."""
    return min(MAX_BACKOFF_S, 0.5 * 2 ** min(attempt, 6)) * (0.75 + 0.5 * random.random())


def tiktoken_encoding(model: str):
    """tiktoken's encoding for an OpenAI model, or None when unknown or its BPE file is not on this machine.

    The tiktoken package ships no BPE files: it downloads them on first use. Only an encoding already in
    tiktoken's cache (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR or the temp folder) is used, so an offline
    machine never waits on the network; without one, token counts fall back to the UTF-8 byte bound.
    """
    try:
        import hashlib
        import tempfile

        import tiktoken
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        return None
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache"
    )
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    if not os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())):
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception:  # a corrupt cache file: fall back rather than fail the run
        return None


MAX_TOKENS_PARAMS = ("auto", "max_tokens", "max_completion_tokens")


def rejects_max_tokens(exc: openai.APIError) -> bool:
    """A 400 saying the model takes `max_completion_tokens` instead of `max_tokens` (newer OpenAI models)."""
    msg = _server_message(exc)
    return getattr(exc, "status_code", None) == 400 and "max_tokens" in msg and "max_completion_tokens" in msg


class OpenAIBackend(BackendBase):
    """Chat messages go to `/chat/completions`; a raw string prompt goes to legacy `/completions`.

    Retries are ours, not the client's (its `max_retries` is 0), so each backoff is shown as it happens
    ("rate limited, retry 2 of 5 in 8 s") and the whole call keeps to `retry_budget_s`: against a server that
    never answers, a call gives up within the budget instead of `(max_retries + 1) * timeout_s`. 408/409/429,
    5xx, connection errors and timeouts are retried with exponential backoff (honouring `Retry-After` and
    `retry-after-ms`); 400/401/403/404 never are.
    """

    supports_chat = True

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        retry_budget_s: float = 120.0,
        max_input_tokens: int | None = None,
        extra_body: dict | None = None,
        tokenizer: Any = None,
        max_tokens_param: str = "auto",
    ):
        from stillroom.config import check_key_env_name

        check_key_env_name(api_key_env)
        self.model = model
        # Resolve the URL ourselves (the client would read OPENAI_BASE_URL) so `identity` names where calls go.
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.identity = f"openai:{self.base_url}:{model}"
        self.api_key_env = api_key_env
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.retry_budget_s = float(retry_budget_s)
        self.extra_body = dict(extra_body) if extra_body else None
        self._encoding = tiktoken_encoding(model)
        self.exact_tokens = self._encoding is not None
        self._context_tokens = max_input_tokens
        self.context_source = "stated"
        """'stated' (config, server or OpenAI's list) or 'default' (`DEFAULT_CONTEXT_TOKENS`: the server said nothing)."""
        self._probed = max_input_tokens is not None
        self._probe_lock = threading.Lock()
        if max_tokens_param not in MAX_TOKENS_PARAMS:
            raise BackendError(f"max_tokens_param must be one of {', '.join(MAX_TOKENS_PARAMS)}, got {max_tokens_param!r}")
        # 'auto' sends max_tokens until the model answers 400 asking for max_completion_tokens, then switches.
        self.max_tokens_param = "max_tokens" if max_tokens_param == "auto" else max_tokens_param
        self._auto_max_tokens = max_tokens_param == "auto"
        self._param_lock = threading.Lock()
        self._tokenizer_spec = tokenizer
        self._scorer = None
        self.usage_listener = None
        """Called with (input tokens, output tokens) of every scoring, top-k or probe request the server bills
        (set by `CachedBackend`, which charges them to the run's meter and cache: completions are charged there
        already)."""
        key = os.environ.get(api_key_env) or None
        if key is None:
            if not is_local_url(self.base_url):
                raise BackendError(
                    f"{self.identity}: no API key: the environment variable ${api_key_env} is not set. Export "
                    f"the key in ${api_key_env} (keys are read from the environment, never from config files), "
                    "or set api_key_env to the variable that holds it."
                )
            key = PLACEHOLDER_KEY  # local vLLM / Ollama / llama.cpp servers usually need no key
        self._secret = key
        # A server on this machine is reached directly, whatever proxy the environment sets.
        http_client = openai.DefaultHttpxClient(trust_env=False) if is_local_url(self.base_url) else None
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout_s, max_retries=0,
                                     http_client=http_client)

    def count_tokens(self, text: str) -> int:
        """tiktoken's count where the model's encoding is available, else the 4-characters estimate."""
        if self._encoding is not None:
            return len(self._encoding.encode(text, disallowed_special=()))
        return estimate_tokens(text)

    @property
    def context_tokens(self) -> int:
        """The server's context window (prompt + generation): the config's `max_input_tokens`, else probed once
        from llama.cpp's `GET /props` (per-slot `n_ctx`) or vLLM's `GET /v1/models` (`max_model_len`), else
        OpenAI's published window for its own models (`OPENAI_CONTEXT`), else `DEFAULT_CONTEXT_TOKENS`
        (`context_source` says which)."""
        with self._probe_lock:
            if not self._probed:
                self._probed = True
                if self.base_url != DEFAULT_BASE_URL:
                    self._context_tokens = self._probe_context()
                else:
                    self._context_tokens = next((n for p, n in OPENAI_CONTEXT if self.model.startswith(p)), None)
                if self._context_tokens is None:
                    self._context_tokens = DEFAULT_CONTEXT_TOKENS
                    self.context_source = "default"
        return self._context_tokens

    def _probe_context(self) -> int | None:
        import urllib.error
        import urllib.request

        root = self.base_url.removesuffix("/v1")
        # A local server is reached directly, whatever proxy the shell sets.
        opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if is_local_url(self.base_url) else []))

        def get(url: str):
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self._secret}"})
            with opener.open(req, timeout=min(5.0, self.timeout_s)) as r:
                return json.loads(r.read())

        try:
            props = get(root + "/props")
            n = (props.get("default_generation_settings") or {}).get("n_ctx") or props.get("n_ctx")
            if isinstance(n, int) and n > 0:
                return n
        except (OSError, ValueError, AttributeError, urllib.error.URLError):
            pass
        try:
            for m in get(self.base_url + "/models").get("data", []):
                if m.get("id") == self.model and isinstance(m.get("max_model_len"), int):
                    return m["max_model_len"]
        except (OSError, ValueError, AttributeError, urllib.error.URLError):
            pass  # a server that says nothing about its window: prompts are sent unchecked, as before
        return None

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.identity!r}, max_concurrency={self.max_concurrency})"

    def redact_text(self, text: str) -> str:
        """`text` with this backend's key and anything key-shaped replaced by `***`."""
        return redact(text, self._secret)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def _sampling_kwargs(self, params: GenerationParams) -> dict:
        kw: dict = {"temperature": params.temperature, "top_p": params.top_p}
        extra = dict(self.extra_body or {})
        if self.max_tokens_param == "max_tokens":
            kw["max_tokens"] = params.max_tokens
        else:  # not a typed argument of the client's legacy completions: sent in the body
            extra["max_completion_tokens"] = params.max_tokens
        if params.stop:
            # OpenAI's API takes at most 4 stop sequences (a 400 otherwise); the rest are applied to the text
            # after it arrives (`_cut_at_stops`), so every backend honours every stop string.
            kw["stop"] = list(params.stop)[:MAX_SERVER_STOPS]
        if params.seed is not None:
            kw["seed"] = params.seed
        if extra:
            kw["extra_body"] = extra
        return kw

    def generate(self, prompt: Prompt, params: GenerationParams) -> Generation:
        """One completion, retried within `max_retries` and `retry_budget_s`; raises `BackendError` otherwise."""
        kwargs = self._sampling_kwargs(params)

        def send(timeout: float):
            if isinstance(prompt, str):
                resp = self._client.completions.create(model=self.model, prompt=prompt, timeout=timeout, **kwargs)
            else:
                resp = self._client.chat.completions.create(model=self.model, messages=normalise_prompt(prompt),
                                                            timeout=timeout, **kwargs)
            if isinstance(resp, str):  # the client hands back a non-JSON body (an HTML error page) as text
                start = resp.lstrip()[:30]
                raise BadReply(f"{self.identity}: the reply to a completion request is not JSON but "
                               f"{'an HTML page' if start.startswith('<') else repr(start)}. Nothing of it was cached",
                               transient=True)
            return resp

        def resend_with_max_completion_tokens(exc: openai.APIError) -> bool:
            if not self._switch_max_tokens_param(exc, kwargs):
                return False
            kwargs.clear()
            kwargs.update(self._sampling_kwargs(params))
            return True

        start = time.perf_counter()
        resp = self.request(send, on_error=resend_with_max_completion_tokens)
        return self._finish(prompt, params, resp, time.perf_counter() - start)

    def request(self, send, *, max_retries: int | None = None, on_error=None):
        """`send(timeout)` (one HTTP request through this backend's client) with the backend's retries: each
        backoff shown, the whole call bounded by `retry_budget_s`, errors turned into one key-free `BackendError`
        (with `.status_code`). Every request to the server goes through here: completions, and the scoring and
        tokenizer requests of `stillroom.backends.openai_logprobs`. `on_error(exc)` returning True resends at
        once (the `max_completion_tokens` switch)."""
        retries = self.max_retries if max_retries is None else max_retries
        start = time.perf_counter()
        attempt = 0
        while True:
            left = self.retry_budget_s - (time.perf_counter() - start)
            timeout = max(0.1, min(self.timeout_s, left))
            try:
                return send(timeout)
            except openai.APIError as exc:
                if on_error is not None and on_error(exc):
                    continue
                err = self._translate(exc, timeout, attempt)
                err.status_code = getattr(exc, "status_code", None)  # type: ignore[attr-defined]
                wait_s = self._retry_wait(exc, attempt)
            except BadReply as exc:  # a reply `send` checked and refused (stillroom.backends.openai_logprobs)
                err, wait_s = exc, (_backoff(attempt) if exc.transient else None)
                err.status_code = None  # type: ignore[attr-defined]
            except json.JSONDecodeError as exc:  # the client parsing a cut-off completion reply
                err = BadReply(f"{self.identity}: the reply to a completion request is not well-formed JSON "
                               f"({exc.msg} at character {exc.pos}): cut off, or not from the API. Nothing of it "
                               "was cached", transient=True)
                err.status_code, wait_s = None, _backoff(attempt)  # type: ignore[attr-defined]
            # Raised here, outside the except block, so the openai exception (which holds the request and its
            # Authorization header) is neither chained nor shown in tracebacks.
            if wait_s is None or attempt >= retries:
                raise err from None
            left = self.retry_budget_s - (time.perf_counter() - start)
            if left <= wait_s + 0.1:
                raise BackendError(f"{err} (gave up: the retry budget of {self.retry_budget_s:g}s is spent)") from None
            attempt += 1
            notify(f"{self.model}: {self._why(err)}, retry {attempt} of {retries} in {wait_s:.3g} s")
            time.sleep(wait_s)

    @staticmethod
    def _why(err: BackendError) -> str:
        reason = getattr(err, "reason", "")
        return reason or "request failed"

    def _retry_wait(self, exc: openai.APIError, attempt: int) -> float | None:
        """Seconds to wait before retrying `exc`, or None when retrying cannot help."""
        if isinstance(exc, openai.APIStatusError):
            if exc.status_code not in _RETRY_STATUS and exc.status_code < 500:
                return None
            headers = exc.response.headers
            try:
                if headers.get("retry-after-ms"):
                    return min(MAX_BACKOFF_S, float(headers["retry-after-ms"]) / 1000)
                if headers.get("retry-after"):
                    return min(MAX_BACKOFF_S, float(headers["retry-after"]))
            except ValueError:
                pass
        elif not isinstance(exc, openai.APIConnectionError):  # APITimeoutError is one
            return None
        return _backoff(attempt)

    def _finish(self, prompt: Prompt, params: GenerationParams, resp, latency: float) -> Generation:
        if isinstance(prompt, str):
            choice = resp.choices[0] if resp.choices else None
            text = (choice.text if choice else "") or ""
        else:
            choice = resp.choices[0] if resp.choices else None
            text = (choice.message.content if choice and choice.message else "") or ""
        if choice is None:
            raise BackendError(f"{self.identity}: the server returned no choices")
        if resp.usage is not None:
            usage = Usage(resp.usage.prompt_tokens or 0, resp.usage.completion_tokens or 0, latency)
        else:  # some servers omit usage; estimate so accounting and caps still work
            usage = Usage(
                self.count_tokens(prompt_text(prompt)), self.count_tokens(text) if text else 0, latency
            )
        text, cut = _cut_at_stops(text, params.stop[MAX_SERVER_STOPS:])
        return Generation(text=text, usage=usage, finish_reason="stop" if cut else choice.finish_reason)

    def generate_many(self, prompts: list[Prompt], params: GenerationParams) -> list[Generation]:
        """Up to `max_concurrency` requests in flight; results in input order."""
        if len(prompts) <= 1 or self.max_concurrency == 1:
            return [self.generate(p, params) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: self.generate(p, params), prompts))

    def _switch_max_tokens_param(self, exc: openai.APIError, sent: dict) -> bool:
        """Once per backend: on the model's 400 asking for `max_completion_tokens`, send that from now on."""
        if not (self._auto_max_tokens and "max_tokens" in sent and rejects_max_tokens(exc)):
            return False
        with self._param_lock:
            self.max_tokens_param = "max_completion_tokens"
        return True

    # Log-likelihood scoring lives in stillroom.backends.openai_logprobs; these are its hooks.

    @property
    def scorer(self):
        """The server's scoring helper (`ServerScorer`); its capability is probed on first use and kept."""
        with self._param_lock:
            if self._scorer is None:
                from stillroom.backends.openai_logprobs import ServerScorer

                tok = self._tokenizer_spec
                if isinstance(tok, str):
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(tok)
                self._scorer = ServerScorer(self, tok)
            return self._scorer

    @property
    def supports_score(self) -> bool:
        """Whether the server returns prompt log-probabilities (probed once: echo + logprobs / prompt_logprobs)."""
        return self.scorer.capability.can_score

    @property
    def score_refusal(self) -> str:
        """Why this server cannot score, and what to do instead."""
        return self.scorer.refusal()

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Summed log-probability of each continuation given its context, through the server's /completions."""
        if not self.supports_score:
            raise NotImplementedError(self.score_refusal)
        return self.scorer.score(requests)

    def _translate(self, exc: openai.APIError, timeout: float | None = None, attempt: int | None = None) -> BackendError:
        """A `BackendError` with a clear, key-free message for an openai exception; `.reason` is a short
        phrase for retry notices ("rate limited", "HTTP 503", "timed out after 60 s")."""
        who = self.identity
        msg = redact(_server_message(exc), self._secret)
        n = self.max_retries if attempt is None else attempt
        retries = f"after {n} retr{'y' if n == 1 else 'ies'}"
        reason = type(exc).__name__
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            text = (
                f"{who}: authentication failed (HTTP {exc.status_code}): check the key in ${self.api_key_env}. "
                f"Server said: {msg}"
            )
        elif isinstance(exc, openai.APIStatusError):
            hint = {
                404: " (check the model name and base_url)",
                429: f" (rate limited {retries}; completed calls are cached, rerun later to resume)",
            }.get(exc.status_code, "")
            if exc.status_code >= 500:
                hint = f" (server error {retries}; completed calls are cached, rerun to resume)"
            text = f"{who}: request failed (HTTP {exc.status_code}){hint}: {msg}"
            reason = "rate limited" if exc.status_code == 429 else f"HTTP {exc.status_code}"
        elif isinstance(exc, openai.APITimeoutError):
            t = self.timeout_s if timeout is None else timeout
            text = f"{who}: request timed out after {t:.3g}s ({retries}); raise timeout_s or retry later"
            reason = f"no answer within {t:.3g} s"
        elif isinstance(exc, openai.APIConnectionError):
            text = f"{who}: cannot reach {self.base_url} ({retries}): {msg}"
            reason = "cannot connect"
        else:
            text = f"{who}: {type(exc).__name__}: {msg}"
        err = BackendError(redact(text, self._secret))
        err.reason = reason
        return err
