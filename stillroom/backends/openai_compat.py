"""Any OpenAI-compatible server as a backend: OpenAI itself, vLLM, Ollama, llama.cpp's server, ...

The API key is read from an environment variable that the config *names* (never from a config file), and it
never appears in an error message, a repr or a traceback: errors are rebuilt as `BackendError` with the key
redacted and raised outside the `except` block, so no exception carrying the request (and its headers) is
chained onto them.
"""

from __future__ import annotations

import ipaddress
import os
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
    normalise_prompt,
    prompt_text,
)
from stillroom.errors import BackendError

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


MAX_TOKENS_PARAMS = ("auto", "max_tokens", "max_completion_tokens")


def rejects_max_tokens(exc: openai.APIError) -> bool:
    """A 400 saying the model takes `max_completion_tokens` instead of `max_tokens` (newer OpenAI models)."""
    msg = _server_message(exc)
    return getattr(exc, "status_code", None) == 400 and "max_tokens" in msg and "max_completion_tokens" in msg


class OpenAIBackend(BackendBase):
    """Chat messages go to `/chat/completions`; a raw string prompt goes to legacy `/completions`.

    Retries are left to the official client: it retries 408/409/429/5xx, connection errors and timeouts
    with exponential backoff (honouring `Retry-After`/`retry-after-ms`), up to `max_retries`, and never
    retries 400/401/403/404. A second retry loop here would multiply the waits, so there is none.
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
        extra_body: dict | None = None,
        tokenizer: Any = None,
        max_tokens_param: str = "auto",
    ):
        self.model = model
        # Resolve the URL ourselves (the client would read OPENAI_BASE_URL) so `identity` names where calls go.
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.identity = f"openai:{self.base_url}:{model}"
        self.api_key_env = api_key_env
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.extra_body = dict(extra_body) if extra_body else None
        if max_tokens_param not in MAX_TOKENS_PARAMS:
            raise BackendError(f"max_tokens_param must be one of {', '.join(MAX_TOKENS_PARAMS)}, got {max_tokens_param!r}")
        # 'auto' sends max_tokens until the model answers 400 asking for max_completion_tokens, then switches.
        self.max_tokens_param = "max_tokens" if max_tokens_param == "auto" else max_tokens_param
        self._auto_max_tokens = max_tokens_param == "auto"
        self._param_lock = threading.Lock()
        self._tokenizer_spec = tokenizer
        self._scorer = None
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
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=key, timeout=self.timeout_s, max_retries=self.max_retries
        )

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.identity!r}, max_concurrency={self.max_concurrency})"

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
        """One completion; raises `BackendError` for failures the client's retries could not fix."""
        kwargs = self._sampling_kwargs(params)
        start = time.perf_counter()
        err: BackendError | None = None
        try:
            if isinstance(prompt, str):
                resp = self._client.completions.create(model=self.model, prompt=prompt, **kwargs)
                choice = resp.choices[0] if resp.choices else None
                text = (choice.text if choice else "") or ""
            else:
                messages = normalise_prompt(prompt)
                resp = self._client.chat.completions.create(model=self.model, messages=messages, **kwargs)
                choice = resp.choices[0] if resp.choices else None
                text = (choice.message.content if choice and choice.message else "") or ""
        except openai.APIError as exc:
            if self._switch_max_tokens_param(exc, kwargs):
                return self.generate(prompt, params)
            err = self._translate(exc)
        if err is not None:
            # Raised here, outside the except block, so the openai exception (which holds the request and
            # its Authorization header) is neither chained nor shown in tracebacks.
            raise err from None
        latency = time.perf_counter() - start
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

    def _translate(self, exc: openai.APIError) -> BackendError:
        """A `BackendError` with a clear, key-free message for an openai exception."""
        who = self.identity
        msg = redact(_server_message(exc), self._secret)
        retries = f"after {self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}"
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
        elif isinstance(exc, openai.APITimeoutError):
            text = f"{who}: request timed out after {self.timeout_s:g}s ({retries}); raise timeout_s or retry later"
        elif isinstance(exc, openai.APIConnectionError):
            text = f"{who}: cannot reach {self.base_url} ({retries}): {msg}"
        else:
            text = f"{who}: {type(exc).__name__}: {msg}"
        return BackendError(redact(text, self._secret))
