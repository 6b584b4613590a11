"""Log-probabilities through an OpenAI-compatible server: scoring continuations, and teacher-forced top-k.

Two request shapes exist in the wild, both on `/v1/completions`, and both are what lm-evaluation-harness's
`local-completions` model sends:

* **echo + logprobs** (vLLM, llama-cpp-python's server, Together): `prompt` is the context + continuation,
  `echo: true`, `logprobs: 1`, `max_tokens: 1`; `choices[i].logprobs.token_logprobs` then starts with the prompt's
  own tokens (the first is null: nothing predicts it), followed by the one generated token.
* **prompt_logprobs** (vLLM): `prompt_logprobs: k` returns, per prompt token, a `{token_id: {logprob, rank,
  decoded_token}}` map of the k most likely tokens plus the actual one. This is what fills a teacher-logit cache.

Token boundaries. vLLM accepts a list of token ids as `prompt`, so the context/continuation split is exactly the
one the local backend uses (`HFBackend.encode_pair`, lm-eval's `_encode_pair`): the ids come from the tokenizer
when it is known locally, else from the server's `/tokenize`. A server that takes only text gets the text, and the
continuation's tokens are counted back from the end of the echoed tokens.

What a server can do is probed once (`ServerScorer.capability`) and kept: llama.cpp's own server ignores `echo`
(it returns log-probabilities of generated tokens only), and OpenAI's chat models have no prompt log-probabilities;
for those, scoring refuses with a message naming the alternative (generation).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from stillroom.backends.base import ScoreRequest
from stillroom.errors import BackendError, ConfigError

PROBE_TEXT = "Stillroom probe: The quick brown fox, 12345 — naïve café; 東京.\n\tEnd"
"""Text tokenized by both sides to check that a served model and a local one share a tokenizer."""

_MAX_ALLOWED = re.compile(r"max(?:imum)? allowed[^0-9]{0,20}(\d+)", re.IGNORECASE)


@dataclass
class ServerCapability:
    """What a server's `/completions` can return, found by one probe."""

    echo: bool = False
    """`echo` + `logprobs` returns the prompt's own token log-probabilities."""
    prompt_logprobs: bool = False
    """vLLM's `prompt_logprobs` field is returned (top-k per prompt token, by token id)."""
    token_ids: bool = False
    """A list of token ids is accepted as `prompt` (exact token boundaries)."""
    tokenize: bool = False
    """The server has vLLM's `/tokenize` endpoint."""
    reason: str = ""
    """Why the server cannot score, when it cannot."""

    @property
    def can_score(self) -> bool:
        return self.echo or self.prompt_logprobs


def server_root(base_url: str) -> str:
    """The server's root URL (vLLM serves `/tokenize` there, not under `/v1`)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def is_openai_api(base_url: str) -> bool:
    """Whether `base_url` is OpenAI's own API (no prompt log-probabilities; probing it would cost money)."""
    return (urlparse(base_url).hostname or "").lower().endswith("api.openai.com")


def max_logprobs_from(message: str) -> int | None:
    """The limit named by a server's 'more log-probabilities than allowed' error, if it names one."""
    m = _MAX_ALLOWED.search(message or "")
    return int(m.group(1)) if m else None


class ServerScorer:
    """Scoring and teacher-forced log-probabilities for one `OpenAIBackend` (its client, model and key).

    `tokenizer` (optional) is the served model's tokenizer loaded locally: the exact split then costs no extra
    requests. Without it, token ids come from the server's `/tokenize` where there is one.
    """

    def __init__(self, backend: Any, tokenizer: Any = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self._capability: ServerCapability | None = None
        self._lock = threading.Lock()
        self._prefix_text: str | None = None
        if tokenizer is not None:
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            self._prefix_text = tokenizer.decode(bos) if bos is not None else None

    # ---------------------------------------------------------------------------------------------- requests

    def _post(self, url: str, body: dict, *, retries: int | None = None) -> dict:
        """POST JSON, return the parsed reply; failures become `BackendError` (key redacted, nothing chained)."""
        # The backend's own retry loop (its client makes no retries of its own): scoring requests get the same
        # backoff notices and retry budget as completions. The capability probe passes retries=0.
        out = self.backend.request(lambda timeout: self.backend._client.post(url, body=body, cast_to=object,
                                                                           options={"timeout": timeout}),
                                   max_retries=retries)
        if not isinstance(out, dict):
            raise BackendError(f"{self.backend.identity}: {url} returned {type(out).__name__}, not a JSON object")
        return out

    def completions(self, body: dict, *, retries: int | None = None) -> dict:
        """One raw `/completions` request for this backend's model."""
        return self._post("/completions", {"model": self.backend.model, **body}, retries=retries)

    def server_tokenize(self, text: str, *, retries: int | None = None) -> list[int]:
        """Token ids of `text` from vLLM's `/tokenize` (special tokens added as the model's tokenizer does)."""
        return self.server_tokenize_pieces(text, retries=retries, pieces=False)[0]

    def server_tokenize_pieces(self, text: str, *, add_special_tokens: bool = True, retries: int | None = None,
                               pieces: bool = True) -> tuple[list[int], list[str] | None]:
        """(token ids, vocabulary pieces) of `text` from vLLM's `/tokenize` (`return_token_strs`); the pieces are
        the raw vocabulary strings ('Ġthe', '▁the', '<0xE6>'), from which cross-tokenizer KD gets token bytes."""
        body: dict = {"model": self.backend.model, "prompt": text}
        if not add_special_tokens:
            body["add_special_tokens"] = False
        if pieces:
            body["return_token_strs"] = True
        out = self._post(server_root(self.backend.base_url) + "/tokenize", body, retries=retries)
        tokens = out.get("tokens")
        if not isinstance(tokens, list):
            raise BackendError(f"{self.backend.identity}: /tokenize returned no 'tokens'")
        strs = out.get("token_strs")
        if pieces and (not isinstance(strs, list) or len(strs) != len(tokens)):
            raise BackendError(f"{self.backend.identity}: /tokenize returned no 'token_strs' (vLLM >= 0.6 has them)")
        return [int(t) for t in tokens], ([str(x) for x in strs] if pieces else None)

    # ---------------------------------------------------------------------------------------------- probing

    @property
    def capability(self) -> ServerCapability:
        """What the server can do; probed on first use (two small requests at most), then kept."""
        with self._lock:
            if self._capability is None:
                self._capability = self._probe()
            return self._capability

    def _probe(self) -> ServerCapability:
        cap = ServerCapability()
        if is_openai_api(self.backend.base_url):
            cap.reason = ("OpenAI's API returns no log-probabilities for a given continuation (chat models have no "
                          "prompt log-probabilities and /completions refuses echo with logprobs)")
            return cap
        ids: list[int] | None = None
        try:
            ids = self.server_tokenize(PROBE_TEXT, retries=0)
            cap.tokenize = bool(ids)
        except BackendError:
            ids = None
        if ids is None and self.tokenizer is not None:
            ids = self.encode(PROBE_TEXT)
        body = {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0}
        reply = None
        if ids:
            try:
                reply = self.completions({**body, "prompt": ids}, retries=0)
                cap.token_ids = True
            except BackendError:
                reply = None
        if reply is None:
            try:
                reply = self.completions({**body, "prompt": PROBE_TEXT}, retries=0)
            except BackendError as exc:
                cap.reason = f"its /completions refused echo with logprobs ({exc})"
                return cap
        choice = (reply.get("choices") or [{}])[0]
        n_prompt = len(ids) if cap.token_ids and ids else int((reply.get("usage") or {}).get("prompt_tokens") or 2)
        token_lps = ((choice.get("logprobs") or {}).get("token_logprobs")) or []
        cap.echo = isinstance(token_lps, list) and len(token_lps) >= n_prompt >= 1
        cap.prompt_logprobs = isinstance(choice.get("prompt_logprobs"), list)
        if not cap.can_score:
            cap.reason = ("the server ignores `echo`: its /completions returns log-probabilities of generated tokens "
                          "only (llama.cpp's own server does this)")
        return cap

    def refusal(self) -> str:
        """The message for a scoring request the server cannot serve, naming the alternatives."""
        return (f"{self.backend.identity} cannot score log-likelihoods: {self.capability.reason}. Use --method "
                "generate (or 'auto', which falls back to it), or serve the model with vLLM, whose /completions "
                "returns prompt log-probabilities (echo + logprobs, prompt_logprobs)")

    # ---------------------------------------------------------------------------------------------- tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the local backend encodes it (tokenizer defaults; no second BOS)."""
        if self.tokenizer is not None:
            kwargs = {}
            if self._prefix_text and text.startswith(self._prefix_text):
                kwargs["add_special_tokens"] = False
            return list(self.tokenizer.encode(text, **kwargs))
        return self.server_tokenize(text)

    def encode_pair(self, context: str, cont: str, memo: dict[str, list[int]] | None = None):
        """(context ids, continuation ids) split exactly as `HFBackend.encode_pair` (lm-eval's `_encode_pair`)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            cont, context = context[-n_spaces:] + cont, context[:-n_spaces]
        if context == "":
            whole = self.encode(cont)
            return whole[:1], whole[1:]
        if memo is not None and context in memo:
            ctx = memo[context]
        else:
            ctx = self.encode(context)
            if memo is not None:
                memo[context] = ctx
        whole = self.encode(context + cont)
        return ctx, whole[len(ctx):]

    # ---------------------------------------------------------------------------------------------- scoring

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Summed log-probability of each continuation given its context: one request per `ScoreRequest`
        (all its continuations as a batch of prompts), up to the backend's concurrency in flight."""
        cap = self.capability
        if not cap.can_score:
            raise BackendError(self.refusal())
        exact = cap.token_ids and (self.tokenizer is not None or cap.tokenize)
        one = self._score_ids if exact else self._score_text
        workers = min(self.backend.max_concurrency, max(1, len(requests)))
        if workers <= 1:
            return [one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, requests))

    def _score_ids(self, req: ScoreRequest) -> list[float]:
        memo: dict[str, list[int]] = {}
        pairs = [self.encode_pair(req.context, c, memo) for c in req.continuations]
        out = [0.0] * len(pairs)
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]  # an empty continuation scores 0
        if not todo:
            return out
        prompts = [pairs[i][0] + pairs[i][1] for i in todo]
        reply = self.completions({"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                                  "temperature": 0.0})
        choices = _choices_in_order(reply, len(prompts), self.backend.identity)
        for i, ids, choice in zip(todo, prompts, choices, strict=True):
            lps = prompt_token_logprobs(choice, ids, self.backend.identity)
            n_ctx = len(pairs[i][0])
            out[i] = float(sum(lps[n_ctx:len(ids)]))
        return out

    def _score_text(self, req: ScoreRequest) -> list[float]:
        # No token ids: the continuation's tokens are the echoed prompt tokens whose text covers it, counted back
        # from the end (a token merged across the boundary counts with the continuation).
        out = [0.0] * len(req.continuations)
        ctx = req.context
        n_spaces = len(ctx) - len(ctx.rstrip())
        conts = [(ctx[-n_spaces:] if n_spaces else "") + c for c in req.continuations]
        base = ctx[:-n_spaces] if n_spaces else ctx
        todo = [i for i, c in enumerate(conts) if c]
        if not todo:
            return out
        reply = self.completions({"prompt": [base + conts[i] for i in todo], "echo": True, "logprobs": 1,
                                  "max_tokens": 1, "temperature": 0.0})
        choices = _choices_in_order(reply, len(todo), self.backend.identity)
        for i, choice in zip(todo, choices, strict=True):
            lp = choice.get("logprobs") or {}
            tokens, token_lps = lp.get("tokens") or [], lp.get("token_logprobs") or []
            # max_tokens 1: the last echoed token is the generated one.
            tokens, token_lps = tokens[:-1], token_lps[: len(tokens) - 1]
            covered, total, j = 0, 0.0, len(tokens)
            while j > 0 and covered < len(conts[i]):
                j -= 1
                covered += len(tokens[j])
                total += float(token_lps[j] or 0.0)
            out[i] = total
        return out


def _choices_in_order(reply: dict, n: int, who: str) -> list[dict]:
    choices = sorted(reply.get("choices") or [], key=lambda c: int(c.get("index", 0)))
    if len(choices) != n:
        raise BackendError(f"{who}: sent {n} prompts, the server returned {len(choices)} choices")
    return choices


def prompt_token_logprobs(choice: dict, ids: Sequence[int], who: str = "server") -> list[float]:
    """Log-probability of each prompt token (0 for the first, which nothing predicts) from an echo reply
    (`logprobs.token_logprobs`) or vLLM's `prompt_logprobs`."""
    lp = choice.get("logprobs") or {}
    token_lps = lp.get("token_logprobs")
    if isinstance(token_lps, list) and len(token_lps) >= len(ids):
        return [float(x) if x is not None else 0.0 for x in token_lps[: len(ids)]]
    plp = choice.get("prompt_logprobs")
    if isinstance(plp, list) and len(plp) >= len(ids):
        out = []
        for pos, tok in enumerate(ids):
            entry = plp[pos]
            if entry is None:
                out.append(0.0)
                continue
            got = entry.get(str(tok), entry.get(tok))  # JSON keys are strings
            if got is None:
                raise BackendError(f"{who}: prompt_logprobs at position {pos} lack the prompt token {tok}")
            out.append(float(got["logprob"] if isinstance(got, dict) else got))
        return out
    raise BackendError(f"{who}: the reply carries no log-probabilities for the {len(ids)} prompt tokens")


def topk_from_prompt_logprobs(entry: dict, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, log-probability) pairs of one `prompt_logprobs` position, most likely first.

    vLLM returns the top k plus the actual prompt token (with its true rank) when that is not among them; entries
    are kept by rank (1..k) where ranks are given, else by log-probability.
    """
    items = []
    for key, val in entry.items():
        lp = float(val["logprob"] if isinstance(val, dict) else val)
        rank = val.get("rank") if isinstance(val, dict) else None
        items.append((int(key), lp, rank))
    if all(r is not None for _, _, r in items):
        items = [x for x in items if x[2] <= k]
    items.sort(key=lambda x: (-x[1], x[0]))
    return [(t, lp) for t, lp, _ in items[:k]]


def teacher_forced_topk(scorer: ServerScorer, prompts: Sequence[Sequence[int]], k: int,
                        positions: Callable[[int], range], *, actual: list | None = None,
                        ) -> list[list[list[tuple[int, float]]]]:
    """For each id sequence, the top-k of the distributions that predict `positions(i)` (vLLM's `prompt_logprobs`).

    With `actual` (a list), the log-probability of the actual token at each of those positions is appended to it,
    one list per sequence (vLLM returns the actual token with the top-k, whatever its rank).

    Raises `ConfigError` naming the server's limit when `k` exceeds its `max_logprobs` (20 by default in vLLM).
    """
    try:
        reply = scorer.completions({"prompt": [list(p) for p in prompts], "prompt_logprobs": int(k),
                                    "max_tokens": 1, "temperature": 0.0})
    except BackendError as exc:
        limit = max_logprobs_from(str(exc))
        if getattr(exc, "status_code", None) == 400 and limit is not None:
            raise ConfigError(
                f"top_k {k} is more log-probabilities than the server returns (its max_logprobs is {limit}): pass "
                f"--top-k {limit} (the rest of the mass is kept as one bucket), or restart vLLM with "
                f"--max-logprobs {k}"
            ) from None
        raise
    choices = _choices_in_order(reply, len(prompts), scorer.backend.identity)
    out = []
    for i, choice in enumerate(choices):
        plp = choice.get("prompt_logprobs")
        if not isinstance(plp, list) or len(plp) < len(prompts[i]):
            raise BackendError(f"{scorer.backend.identity}: the reply has no prompt_logprobs (not a vLLM server?)")
        out.append([topk_from_prompt_logprobs(plp[p] or {}, k) for p in positions(i)])
        if actual is not None:
            lps = []
            for p in positions(i):
                got = (plp[p] or {}).get(str(prompts[i][p]))
                if got is None:
                    raise BackendError(f"{scorer.backend.identity}: prompt_logprobs at position {p} lack the prompt "
                                       f"token {prompts[i][p]}")
                lps.append(float(got["logprob"] if isinstance(got, dict) else got))
            actual.append(lps)
    return out


def rest_logmass(logps: Sequence[float], floor: float) -> float:
    """log(1 − Σ exp(logps)), in float64, floored (the top-k may hold all the mass)."""
    s = math.fsum(math.exp(x) for x in logps)
    return max(floor, math.log1p(-s)) if s < 1.0 else floor
