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

import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from stillroom.backends.base import ScoreRequest
from stillroom.errors import BackendError, BadReply, ConfigError

PROBE_TEXT = "Stillroom probe: The quick brown fox, 12345 — naïve café; 東京.\n\tEnd"
"""Text tokenized by both sides to check that a served model and a local one share a tokenizer."""

_MAX_ALLOWED = re.compile(r"max(?:imum)? allowed[^0-9]{0,20}(\d+)", re.IGNORECASE)

LOGPROB_SLACK = 1e-4
"""How far above 0 a log-probability may be and still count as one (float rounding on the server)."""


# ------------------------------------------------------------------------------------------------ reply checks
# Every reply is checked here, inside the backend's retry loop and before anything of it is cached or scored:
# a server that answers its capability probe well can still send NaN, nulls, strings, the wrong number of
# tokens, cut-off JSON or an HTML error page with status 200. Each check names the server, the request and the
# field, and says what was expected.


def _show(value) -> str:
    """A reply value as the user would see it in the JSON (null, "abc", NaN), cut to 40 characters."""
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = json.dumps(value) if isinstance(value, str | bool | list | dict) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class ReplyCheck:
    """Raises one `BadReply` for a request: `who` (the server), `what` (the request), the field at fault."""

    def __init__(self, who: str, what: str, redact: Callable[[str], str] | None = None):
        self.who, self.what = who, what
        self._redact = redact or (lambda text: text)

    def bad(self, field: str, problem: str, expected: str, *, transient: bool = False) -> BadReply:
        """The error for `field` (a path into the reply, e.g. `choices[0].logprobs.token_logprobs[3]`); the
        message quotes the reply, so it passes through the backend's key redaction."""
        where = f"{field} " if field else ""
        return BadReply(self._redact(f"{self.who}: bad reply to {self.what}: {where}{problem}; expected {expected}. "
                                     "Nothing of this reply was cached or scored"), transient=transient)

    def parse(self, text) -> dict:
        """The reply body as a JSON object; a cut-off or non-JSON body is a transient `BadReply`."""
        if not isinstance(text, str):
            text = str(text)
        if not text.strip():
            raise self.bad("the body", "is empty", "a JSON object", transient=True)
        try:
            out = json.loads(text)
        except json.JSONDecodeError as exc:
            start = text.lstrip()[:30]
            looks = "an HTML page" if start.startswith("<") else f"text starting {start!r}"
            problem = (f"is cut off ({exc.msg} at character {exc.pos} of {len(text)})"
                       if start.startswith(("{", "[")) else f"is not JSON but {looks}")
            raise self.bad("the body", problem, "a JSON object", transient=True) from None
        if not isinstance(out, dict):
            raise self.bad("the body", f"is a JSON {type(out).__name__}", "a JSON object")
        return out

    def logprob(self, value, field: str) -> float:
        """A finite number at most 0 (with `LOGPROB_SLACK`)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(field, f"is {_show(value)}", "a number (a log-probability)")
        v = float(value)
        if not math.isfinite(v):
            raise self.bad(field, f"is {_show(v)}", "a finite log-probability")
        if v > LOGPROB_SLACK:
            raise self.bad(field, f"is {v:g}, above 0", "a log-probability (at most 0)")
        return v

    def token_list(self, value, field: str, *, min_len: int = 0, why: str = "one per token sent") -> list:
        """A JSON list of at least `min_len` entries."""
        if not isinstance(value, list):
            raise self.bad(field, f"is {_show(value)}", f"a list of {min_len} or more entries")
        if len(value) < min_len:
            raise self.bad(field, f"has {len(value)} entries", f"{min_len} or more ({why})")
        return value

    def token_ids(self, value, field: str, *, nonempty: bool) -> list[int]:
        """A list of token ids (non-negative integers)."""
        ids = self.token_list(value, field, min_len=1 if nonempty else 0, why="the text is not empty")
        for j, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise self.bad(f"{field}[{j}]", f"is {_show(t)}", "a token id (an integer, 0 or more)")
        return list(ids)


def _request_name(kind: str, context: str, n: int) -> str:
    ctx = context if len(context) <= 40 else context[:37] + "..."
    return f"the {kind} request for {ctx!r} ({n} continuation{'s' if n != 1 else ''})"


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

    def _post(self, url: str, body: dict, *, what: str, check: Callable[[dict, ReplyCheck], Any] | None = None,
              retries: int | None = None):
        """POST JSON and return `check(reply)` (the parsed reply when no check is given). The body is parsed and
        checked inside the backend's own retry loop (its client makes no retries of its own), so a cut-off or
        non-JSON reply is retried like an HTTP 503, with the same notices and retry budget, and a bad reply
        raises one `BadReply` before anything of it is used. Failures are `BackendError`s (key redacted, nothing
        chained). The capability probe passes retries=0."""
        rc = ReplyCheck(self.backend.identity, f"{what} (POST {url})", getattr(self.backend, "redact_text", None))

        def send(timeout: float):
            # cast_to=str: the raw body, parsed here, so garbage becomes a BadReply instead of the client's
            # JSONDecodeError (or an HTML page handed back as a string).
            text = self.backend._client.post(url, body=body, cast_to=str, options={"timeout": timeout})
            reply = rc.parse(text)
            self._bill(reply)  # the server billed it, whatever its content
            return check(reply, rc) if check is not None else reply

        return self.backend.request(send, max_retries=retries)

    def _bill(self, reply: dict) -> None:
        listener = getattr(self.backend, "usage_listener", None)
        usage = reply.get("usage")
        if listener is None or not isinstance(usage, dict):
            return
        try:
            tin, tout = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (TypeError, ValueError):
            return
        if tin or tout:
            listener(max(0, tin), max(0, tout))

    def completions(self, body: dict, *, what: str = "a /completions request",
                    check: Callable[[dict, ReplyCheck], Any] | None = None, retries: int | None = None):
        """One raw `/completions` request for this backend's model; `check(reply, ReplyCheck)` validates and
        extracts what the caller needs (see `_post`)."""
        return self._post("/completions", {"model": self.backend.model, **body}, what=what, check=check,
                          retries=retries)

    def server_tokenize(self, text: str, *, retries: int | None = None) -> list[int]:
        """Token ids of `text` from vLLM's `/tokenize` (special tokens added as the model's tokenizer does)."""
        shown = text if len(text) <= 40 else text[:37] + "..."
        return self._post(server_root(self.backend.base_url) + "/tokenize",
                          {"model": self.backend.model, "prompt": text}, what=f"tokenizing {shown!r}",
                          check=lambda reply, rc: rc.token_ids(reply.get("tokens"), "tokens", nonempty=bool(text)),
                          retries=retries)

    def server_tokenize_pieces(self, text: str, *, add_special_tokens: bool = True,
                               retries: int | None = None) -> tuple[list[int], list[str]]:
        """(token ids, vocabulary pieces) of `text` from vLLM's `/tokenize` (`return_token_strs`); the pieces are
        the raw vocabulary strings ('Ġthe', '▁the', '<0xE6>'), from which cross-tokenizer KD gets token bytes."""
        shown = text if len(text) <= 40 else text[:37] + "..."
        body: dict = {"model": self.backend.model, "prompt": text, "return_token_strs": True}
        if not add_special_tokens:
            body["add_special_tokens"] = False

        def check(reply: dict, rc: ReplyCheck):
            ids = rc.token_ids(reply.get("tokens"), "tokens", nonempty=bool(text))
            strs = reply.get("token_strs")
            if not isinstance(strs, list) or len(strs) != len(ids) or not all(isinstance(x, str) for x in strs):
                raise rc.bad("token_strs", f"is {_show(strs)}",
                             f"{len(ids)} vocabulary pieces, one per token (vLLM's return_token_strs)")
            return ids, list(strs)

        return self._post(server_root(self.backend.base_url) + "/tokenize", body,
                          what=f"tokenizing {shown!r} with pieces", check=check, retries=retries)

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
        try:  # a garbled probe reply means the server cannot score; it must not crash the run
            choice = (reply.get("choices") or [{}])[0]
            n_prompt = len(ids) if cap.token_ids and ids else int((reply.get("usage") or {}).get("prompt_tokens") or 2)
            token_lps = ((choice.get("logprobs") or {}).get("token_logprobs")) or []
            cap.echo = isinstance(token_lps, list) and len(token_lps) >= n_prompt >= 1
            cap.prompt_logprobs = isinstance(choice.get("prompt_logprobs"), list)
        except (AttributeError, TypeError, ValueError, IndexError):
            cap.echo = cap.prompt_logprobs = False
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

        def check(reply: dict, rc: ReplyCheck) -> list[float]:
            choices = _choices_in_order(reply, len(prompts), rc)
            return [float(sum(prompt_token_logprobs(ch, ids, rc, f"choices[{j}]")[len(pairs[i][0]):len(ids)]))
                    for j, (i, ids, ch) in enumerate(zip(todo, prompts, choices, strict=True))]

        sums = self.completions({"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0},
                                what=_request_name("scoring", req.context, len(req.continuations)), check=check)
        for i, total in zip(todo, sums, strict=True):
            out[i] = total
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

        def check(reply: dict, rc: ReplyCheck) -> list[float]:
            sums = []
            for j, (i, choice) in enumerate(zip(todo, _choices_in_order(reply, len(todo), rc), strict=True)):
                lp = choice.get("logprobs")
                if not isinstance(lp, dict):
                    raise rc.bad(f"choices[{j}].logprobs", f"is {_show(lp)}", "the echoed prompt's tokens and "
                                 "log-probabilities (echo + logprobs)")
                tokens = rc.token_list(lp.get("tokens"), f"choices[{j}].logprobs.tokens", min_len=2)
                token_lps = rc.token_list(lp.get("token_logprobs"), f"choices[{j}].logprobs.token_logprobs",
                                          min_len=len(tokens))
                for n, t in enumerate(tokens):
                    if not isinstance(t, str):
                        raise rc.bad(f"choices[{j}].logprobs.tokens[{n}]", f"is {_show(t)}", "a token's text")
                # max_tokens 1: the last echoed token is the generated one; the first has nothing predicting it.
                prompt_tokens = tokens[:-1]
                lps = [0.0 if n == 0 and token_lps[0] is None else
                       rc.logprob(token_lps[n], f"choices[{j}].logprobs.token_logprobs[{n}]")
                       for n in range(len(prompt_tokens))]
                covered, total, k = 0, 0.0, len(prompt_tokens)
                while k > 0 and covered < len(conts[i]):
                    k -= 1
                    covered += len(prompt_tokens[k])
                    total += lps[k]
                sums.append(total)
            return sums

        sums = self.completions({"prompt": [base + conts[i] for i in todo], "echo": True, "logprobs": 1,
                                 "max_tokens": 1, "temperature": 0.0},
                                what=_request_name("scoring", req.context, len(req.continuations)), check=check)
        for i, total in zip(todo, sums, strict=True):
            out[i] = total
        return out


def _choices_in_order(reply: dict, n: int, rc: ReplyCheck | str) -> list[dict]:
    """The reply's `choices`, one per prompt sent, in the order sent (by `index`)."""
    if isinstance(rc, str):
        rc = ReplyCheck(rc, "a /completions request")
    choices = reply.get("choices")
    if not isinstance(choices, list):
        raise rc.bad("choices", f"is {_show(choices)}", f"a list of {n} choices, one per prompt sent")
    for j, c in enumerate(choices):
        if not isinstance(c, dict):
            raise rc.bad(f"choices[{j}]", f"is {_show(c)}", "a JSON object")
    indexes = [c.get("index", j) for j, c in enumerate(choices)]
    if len(choices) != n or sorted(map(str, indexes)) != sorted(map(str, range(n))):
        raise rc.bad("choices", f"has {len(choices)} entries (indexes {_show(indexes)})",
                     f"{n}, indexed 0 to {n - 1}: sent {n} prompts")
    return sorted(choices, key=lambda c: int(c.get("index", choices.index(c))))


def prompt_token_logprobs(choice: dict, ids: Sequence[int], rc: ReplyCheck | str = "server",
                          field: str = "choices[0]") -> list[float]:
    """Log-probability of each prompt token (0 for the first, which nothing predicts) from an echo reply
    (`logprobs.token_logprobs`) or vLLM's `prompt_logprobs`, every one checked (a finite number at most 0, one
    per token sent, the token asked for)."""
    if isinstance(rc, str):
        rc = ReplyCheck(rc, "a /completions request")
    lp = choice.get("logprobs")
    token_lps = lp.get("token_logprobs") if isinstance(lp, dict) else None
    plp = choice.get("prompt_logprobs")
    if isinstance(token_lps, list) and (len(token_lps) >= len(ids) or not isinstance(plp, list)):
        rc.token_list(token_lps, f"{field}.logprobs.token_logprobs", min_len=len(ids))
        return [0.0 if pos == 0 and token_lps[0] is None else
                rc.logprob(token_lps[pos], f"{field}.logprobs.token_logprobs[{pos}]") for pos in range(len(ids))]
    if isinstance(plp, list):
        rc.token_list(plp, f"{field}.prompt_logprobs", min_len=len(ids))
        out = []
        for pos, tok in enumerate(ids):
            entry = plp[pos]
            if entry is None and pos == 0:
                out.append(0.0)
                continue
            got = _entry_logprobs(entry, f"{field}.prompt_logprobs[{pos}]", rc).get(int(tok))
            if got is None:
                raise rc.bad(f"{field}.prompt_logprobs[{pos}]", f"lacks the prompt token {tok}",
                             "the log-probability of the token sent there")
            out.append(got[0])
        return out
    raise rc.bad(f"{field}.logprobs.token_logprobs", f"is {_show(token_lps)} and there are no prompt_logprobs",
                 f"the log-probabilities of the {len(ids)} prompt tokens (echo + logprobs)")


def _entry_logprobs(entry, field: str, rc: ReplyCheck) -> dict[int, tuple[float, int | None]]:
    """One `prompt_logprobs` position, checked: {token id: (log-probability, rank or None)}."""
    if not isinstance(entry, dict) or not entry:
        raise rc.bad(field, f"is {_show(entry)}", "a {token_id: {logprob, rank}} map")
    out = {}
    for key, val in entry.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise rc.bad(f"{field} key {_show(key)}", "is not a token id", "integer token ids as keys") from None
        lp = rc.logprob(val.get("logprob") if isinstance(val, dict) else val, f"{field}[{key!r}].logprob")
        rank = val.get("rank") if isinstance(val, dict) else None
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise rc.bad(f"{field}[{key!r}].rank", f"is {_show(rank)}", "an integer rank")
        out[tok] = (lp, rank)
    return out


def topk_from_prompt_logprobs(entry: dict, k: int, rc: ReplyCheck | None = None,
                              field: str = "prompt_logprobs") -> list[tuple[int, float]]:
    """The k most likely (token id, log-probability) pairs of one `prompt_logprobs` position, most likely first.

    vLLM returns the top k plus the actual prompt token (with its true rank) when that is not among them; entries
    are kept by rank (1..k) where ranks are given, else by log-probability. Every entry is checked first.
    """
    items = [(t, lp, rank) for t, (lp, rank) in
             _entry_logprobs(entry, field, rc or ReplyCheck("server", "a prompt_logprobs request")).items()]
    if all(r is not None for _, _, r in items):
        items = [x for x in items if x[2] <= k]
    items.sort(key=lambda x: (-x[1], x[0]))
    return [(t, lp) for t, lp, _ in items[:k]]


def topk_body(prompts: Sequence[Sequence[int]], k: int) -> dict:
    """The `/completions` body (less `model`) of a teacher-forced top-k request: every sequence as token ids, the
    k most likely tokens at each prompt position, one token generated (vLLM generates at least one)."""
    return {"prompt": [[int(t) for t in p] for p in prompts], "prompt_logprobs": int(k), "max_tokens": 1,
            "temperature": 0.0}


def teacher_forced_topk(scorer: ServerScorer, prompts: Sequence[Sequence[int]], k: int,
                        positions: Callable[[int], range], *, actual: list | None = None,
                        ) -> list[list[list[tuple[int, float]]]]:
    """For each id sequence, the top-k of the distributions that predict `positions(i)` (vLLM's `prompt_logprobs`).

    With `actual` (a list), the log-probability of the actual token at each of those positions is appended to it,
    one list per sequence (vLLM returns the actual token with the top-k, whatever its rank).

    Every position's map is checked (finite log-probabilities at most 0, the prompt token sent there present)
    before anything is returned to be cached. Raises `ConfigError` naming the server's limit when `k` exceeds its
    `max_logprobs` (20 by default in vLLM).
    """
    def check(reply: dict, rc: ReplyCheck):
        out = []
        for i, choice in enumerate(_choices_in_order(reply, len(prompts), rc)):
            plp = choice.get("prompt_logprobs")
            if not isinstance(plp, list):
                raise rc.bad(f"choices[{i}].prompt_logprobs", f"is {_show(plp)}",
                             "vLLM's per-token top-k maps (is this a vLLM server?)")
            rc.token_list(plp, f"choices[{i}].prompt_logprobs", min_len=len(prompts[i]))
            rows, tok_lps = [], []
            for p in positions(i):
                field = f"choices[{i}].prompt_logprobs[{p}]"
                top = topk_from_prompt_logprobs(plp[p], k, rc, field)
                entries = _entry_logprobs(plp[p], field, rc)
                if int(prompts[i][p]) not in entries:
                    raise rc.bad(field, f"lacks the prompt token {prompts[i][p]}",
                                 "the token sent there among the log-probabilities (vLLM always includes it)")
                rows.append(top)
                tok_lps.append(float(entries[int(prompts[i][p])][0]))
            out.append((rows, tok_lps))
        return out

    try:
        got = scorer.completions(topk_body(prompts, k),
                                 what=f"the top-{k} request for {len(prompts)} teacher-forced sequence(s)", check=check)
        if actual is not None:
            actual.extend(lps for _, lps in got)  # after the check passed: a retried reply adds nothing twice
        return [rows for rows, _ in got]
    except BadReply:
        raise
    except BackendError as exc:
        limit = max_logprobs_from(str(exc))
        if getattr(exc, "status_code", None) == 400 and limit is not None:
            raise ConfigError(
                f"top_k {k} is more log-probabilities than the server returns (its max_logprobs is {limit}): pass "
                f"--top-k {limit} (the rest of the mass is kept as one bucket), or restart vLLM with "
                f"--max-logprobs {k}"
            ) from None
        raise


def rest_logmass(logps: Sequence[float], floor: float) -> float:
    """log(1 − Σ exp(logps)), in float64, floored (the top-k may hold all the mass)."""
    s = math.fsum(math.exp(x) for x in logps)
    return max(floor, math.log1p(-s)) if s < 1.0 else floor
