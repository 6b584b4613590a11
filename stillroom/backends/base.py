"""The one model interface every Stillroom route uses.

A backend turns chat messages (or a raw prompt) into text plus usage, and, where it can, scores the
log-likelihood of continuations. Local transformers models, OpenAI-compatible servers and the scripted test
backend all implement it; the durable cache (`stillroom.backends.cache.CachedBackend`) wraps any of them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = list[Message] | str  # chat messages, or a raw completion prompt


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters. Part of the cache key, so two calls with different parameters never collide."""

    max_tokens: int = 256
    """Upper bound on generated tokens."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (ignored when greedy)."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the stop string itself is not returned."""
    seed: int | None = None
    """Sampling seed, where the backend honours one."""
    n_sample: int = 0
    """Distinguishes repeated samples of the same prompt in the cache (0, 1, 2, ...)."""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class Usage:
    """What one call cost."""

    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    cached: bool = False
    """True when the answer came from the durable cache (no backend call was made)."""


@dataclass
class Generation:
    """Text produced by a backend, with its usage."""

    text: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None


@dataclass(frozen=True)
class ScoreRequest:
    """Log-likelihood request: score each continuation given the same context."""

    context: str
    continuations: tuple[str, ...]


@runtime_checkable
class Backend(Protocol):
    """The interface. `identity` names the backend and model completely (used in cache keys and reports)."""

    identity: str
    model: str
    supports_score: bool
    supports_chat: bool

    def generate(self, prompt: Prompt, params: GenerationParams) -> Generation:
        """Generate one completion for chat messages or a raw prompt."""
        ...

    def generate_many(self, prompts: list[Prompt], params: GenerationParams) -> list[Generation]:
        """Generate for many prompts (concurrently or batched where the backend can), in input order."""
        ...

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Summed log-probability of each continuation given its context, one list per request.

        Raises `NotImplementedError` where `supports_score` is False.
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Token count of `text` under this backend's tokenizer (an estimate where it has none)."""
        ...


def normalise_prompt(prompt: Prompt) -> list[Message] | str:
    """Validate a prompt and return it in canonical form (list of role/content dicts, or a string)."""
    if isinstance(prompt, str):
        return prompt
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def request_key(identity: str, prompt: Prompt, params: GenerationParams) -> str:
    """Stable cache key: sha256 over backend identity + model, parameters and the messages."""
    payload = json.dumps(
        {"backend": identity, "params": params.as_dict(), "prompt": normalise_prompt(prompt)},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def prompt_text(prompt: Prompt) -> str:
    """All text in a prompt, for token estimates."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


def estimate_tokens(text: str) -> int:
    """Rough token count (4 characters a token) for reports on backends without a tokenizer.

    Never use it to guard money or context: Chinese text or a chat template can need far more tokens. Use
    `input_token_bound` for that.
    """
    return max(1, (len(text) + 3) // 4)


def utf8_token_bound(text: str) -> int:
    """An upper bound on the token count of `text` under any byte-level or byte-fallback tokenizer.

    Such tokenizers (GPT's BPE, Llama, Gemma, Qwen, Mistral) never make a token of less than one UTF-8 byte,
    except the one word-boundary marker SentencePiece may put in front; so bytes + 1 bounds every script.
    """
    return len(text.encode("utf-8")) + 1


MESSAGE_OVERHEAD_TOKENS = 8
"""Chat-template tokens per message at most (role markers, turn separators), for the input bound."""
PROMPT_OVERHEAD_TOKENS = 32
"""Template tokens per request at most (BOS, generation prompt, a template's default system preamble)."""


def input_token_bound(backend, prompt: Prompt) -> int:
    """Input tokens a server can count for `prompt`, at most: the backend's own tokenizer where it has one
    (`exact_tokens`), else the UTF-8 byte bound, plus the chat-template overhead. The spend cap reserves it
    and the context check compares it with the window, so neither can be overrun by an optimistic estimate.
    """
    count = backend.count_tokens if getattr(backend, "exact_tokens", False) else utf8_token_bound
    if isinstance(prompt, str):
        return count(prompt) + PROMPT_OVERHEAD_TOKENS
    return sum(count(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in prompt) + PROMPT_OVERHEAD_TOKENS


def context_window(backend) -> int | None:
    """The most tokens (prompt + generation) one request to `backend` may hold, where known."""
    for attr in ("context_tokens", "max_length"):
        n = getattr(backend, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def fits_context(backend, prompt: Prompt, max_tokens: int) -> tuple[bool, int, int | None]:
    """Whether `prompt` plus `max_tokens` of output fits the backend's context window (True when unknown).

    Returns (fits, input token bound, window).
    """
    bound = input_token_bound(backend, prompt)
    window = context_window(backend)
    return (window is None or bound + max_tokens <= window), bound, window


_notice_console = None


def notify(message: str) -> None:
    """Tell the user something the run is doing on its own (a retry, a wait), on stderr, above any progress bar."""
    global _notice_console
    from rich.console import Console
    from rich.text import Text

    # Inside `ui.library_output_to`, sys.stderr is the library log: a notice is ours, so it goes to the
    # terminal that log replaced (a "waiting" or "retry" line must be seen, not filed away).
    terminal = getattr(sys.stderr, "terminal", None) if getattr(sys.stderr, "_stillroom_log", False) else None
    if terminal is not None:
        Console(file=terminal, highlight=False).print(Text(message, style="yellow"), soft_wrap=True)
        return
    if _notice_console is None:
        _notice_console = Console(stderr=True, highlight=False)
    _notice_console.print(Text(message, style="yellow"), soft_wrap=True)


class BackendBase:
    """Defaults shared by concrete backends: a sequential `generate_many`, no scoring, estimated tokens."""

    identity: str = "base"
    model: str = ""
    supports_score: bool = False
    supports_chat: bool = True

    def generate(self, prompt: Prompt, params: GenerationParams) -> Generation:  # pragma: no cover - abstract
        raise NotImplementedError

    def generate_many(self, prompts: list[Prompt], params: GenerationParams) -> list[Generation]:
        return [self.generate(p, params) for p in prompts]

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        raise NotImplementedError(f"{self.identity} cannot score log-likelihoods; use generation instead")

    exact_tokens: bool = False
    """True when `count_tokens` uses the model's own tokenizer (then it bounds the input, with the template)."""
    context_tokens: int | None = None
    """Context window in tokens (prompt + generation), where known."""

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)


def chat_to_text(messages: Sequence[Message]) -> str:
    """Plain-text rendering of chat messages for base models that have no chat template.

    Ends with 'Answer:' for the model to complete, unless the last user message already ends with a cue of
    its own (a line ending in ':', such as 'General instruction:'), which a base model then completes.
    """
    out = []
    for m in messages:
        role = m["role"]
        if role == "system":
            out.append(m["content"].strip() + "\n")
        elif role == "user":
            out.append(m["content"].strip())
        else:
            out.append("Answer: " + m["content"].strip() + "\n")
    if messages and messages[-1]["role"] == "user" and messages[-1]["content"].rstrip().endswith(":"):
        return "\n".join(out)
    return "\n".join(out) + "\nAnswer:"
