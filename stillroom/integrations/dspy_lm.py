"""DSPy on Stillroom backends: a `dspy.BaseLM` whose every call goes through a Stillroom `Backend`.

Wrap a `CachedBackend` (see `open_dspy_lm`) and DSPy's calls land in Stillroom's durable SQLite cache and usage
meter like any other route's: `.calls` on the cached backend counts the real model calls DSPy made, a rerun
replays them for free, and a spend cap applies. This is how `bench/pld_vs_dspy.py` gives DSPy's optimisers
exactly the teacher and student that PLD uses, and counts their teacher calls the same way.

    from stillroom.integrations.dspy_lm import open_dspy_lm
    teacher_lm, teacher_backend = open_dspy_lm("gemma3-270m", "run/cache.sqlite")
    teacher_backend.calls        # real model calls made through it so far

DSPy is a bench-only dependency (`pip install 'stillroom[bench]'`); importing this module without it raises
ImportError. Written against DSPy 3.4's legacy `BaseLM.forward` contract (DSPy emits a DeprecationWarning for
it; the interface is supported throughout 3.4).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import dspy

from stillroom.backends.base import Backend, Generation, GenerationParams, Message

# DSPy request options that change nothing for a local Stillroom backend (or that DSPy uses for its own
# bookkeeping); accepted and dropped. Anything else unknown is recorded in `StillroomLM.ignored_kwargs`.
_NO_EFFECT = {"num_retries", "cache", "api_key", "api_base", "base_url", "timeout", "headers", "extra_headers",
              "num_generations", "parallel_tool_calls", "tool_choice", "user", "metadata", "stream"}


class _Obj(dict):
    """A dict whose keys also read as attributes: DSPy reads the OpenAI response both ways."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _content_text(content: Any) -> str:
    """Message content as plain text (DSPy sends a string, or OpenAI content parts for multimodal input)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type") in (None, "text", "input_text") and isinstance(part.get("text"), str):
                    out.append(part["text"])
                else:
                    raise ValueError(f"Stillroom backends take text only; got a {part.get('type')!r} content part")
            else:
                out.append(str(part))
        return "\n".join(out)
    return str(content)


def to_stillroom_prompt(prompt: str | None = None, messages: Iterable[dict] | None = None) -> list[Message]:
    """DSPy's `prompt=` / `messages=` as Stillroom chat messages (role + text content)."""
    if messages:
        return [{"role": str(m.get("role", "user")), "content": _content_text(m.get("content"))} for m in messages]
    if prompt is None:
        raise ValueError("StillroomLM needs prompt= or messages=")
    return [{"role": "user", "content": str(prompt)}]


def generation_params(kwargs: dict, n: int) -> list[GenerationParams]:
    """One `GenerationParams` per requested sample, from DSPy/OpenAI-style kwargs.

    `n` samples get distinct `n_sample` values (0..n-1), so each is its own cache entry rather than n copies
    of one answer. DSPy's `rollout_id` (which it uses to ask for a fresh sample of the same prompt) becomes the
    sampling seed when no seed is given, or is mixed into it, so different rollouts are different cache
    entries and reproducible where the backend honours seeds.
    """
    max_tokens = kwargs.get("max_tokens")
    if max_tokens is None:
        max_tokens = kwargs.get("max_completion_tokens")
    temperature = kwargs.get("temperature")
    top_p = kwargs.get("top_p")
    stop = kwargs.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    else:
        stop = tuple(str(s) for s in stop if s)
    seed = kwargs.get("seed")
    rollout = kwargs.get("rollout_id")
    if rollout is not None:
        seed = int(rollout) if seed is None else (int(seed) * 1_000_003 + int(rollout)) % (2**31)
    base = GenerationParams(
        max_tokens=int(max_tokens) if max_tokens is not None else GenerationParams.max_tokens,
        temperature=float(temperature) if temperature is not None else 0.0,
        top_p=float(top_p) if top_p is not None else 1.0,
        stop=stop,
        seed=int(seed) if seed is not None else None,
    )
    return [replace(base, n_sample=i) for i in range(n)]


class StillroomLM(dspy.BaseLM):
    """A DSPy language model over any Stillroom `Backend` (usually a `CachedBackend`).

    `forward(prompt=None, messages=None, **kwargs)` returns an OpenAI chat-completion-shaped object: `model`,
    `choices[i].message.content` / `.role`, `choices[i].finish_reason`, `usage` (a dict with `prompt_tokens`,
    `completion_tokens`, `total_tokens`: real calls only, cache hits cost nothing) and `cache_hit`.
    Understood kwargs: `max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`, `stop`, `seed`,
    `n` and `rollout_id`; other unknown options are recorded in `ignored_kwargs` and not sent anywhere.

    DSPy's own cache is switched off (`cache=False`). Stillroom's cache is the durable one: it is keyed by
    backend identity, the exact messages and every generation parameter, it survives crashes, and it is where
    calls are counted and charged. A second cache in front of it would answer repeated prompts before they
    reach the backend, so they would never be counted (or metered against the spend cap), and it would live
    in DSPy's global ~/.dspy_cache, outside the run folder, shared between unrelated runs. (DSPy 3.4 only
    consults its cache for its built-in engines anyway; `cache=False` states the intent and keeps it so.)
    """

    def __init__(self, backend: Backend, *, model: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, **kwargs: Any):
        super().__init__(model=model or f"stillroom/{backend.identity}", model_type="chat",
                         temperature=temperature, max_tokens=max_tokens, cache=False, num_retries=0, **kwargs)
        self.backend = backend
        # Shared (not copied) by the copies DSPy makes with `lm.copy(rollout_id=..., temperature=...)`, so the
        # counts below cover every request made through this LM and its copies.
        self._counter = [0]
        self.ignored_kwargs: set[str] = set()
        self.usage_log: list[dict] = []
        """Per generation: input/output tokens, latency (the original call's, for cache hits) and `cached`."""

    @property
    def requests(self) -> int:
        """forward() calls (one per DSPy LM request, whatever `n`); the backend counts the real model calls."""
        return self._counter[0]

    def forward(self, prompt: str | None = None, messages: list[dict] | None = None, **kwargs: Any) -> _Obj:
        merged = {**self.kwargs, **{k: v for k, v in kwargs.items() if v is not None}}
        known = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n", "rollout_id",
                 "model", "messages", "prompt"}
        self.ignored_kwargs.update(k for k, v in merged.items() if v is not None and k not in known | _NO_EFFECT)
        n = merged.get("n") or 1
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        chat = to_stillroom_prompt(prompt, messages)
        gens: list[Generation] = [self.backend.generate(chat, p) for p in generation_params(merged, n)]
        self._counter[0] += 1
        self.usage_log.extend({"input_tokens": g.usage.input_tokens, "output_tokens": g.usage.output_tokens,
                               "latency_s": g.usage.latency_s, "cached": g.usage.cached} for g in gens)
        real = [g for g in gens if not g.usage.cached]
        tin = sum(g.usage.input_tokens for g in real)
        tout = sum(g.usage.output_tokens for g in real)
        choices = [
            _Obj(index=i, message=_Obj(role="assistant", content=g.text, tool_calls=None),
                 finish_reason=g.finish_reason or "stop", logprobs=None)
            for i, g in enumerate(gens)
        ]
        return _Obj(
            id=f"stillroom-{self._counter[0]}",
            object="chat.completion",
            model=self.backend.identity,
            choices=choices,
            usage={"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout},
            cache_hit=not real,
        )

    async def aforward(self, prompt: str | None = None, messages: list[dict] | None = None, **kwargs: Any) -> _Obj:
        # Stillroom backends are synchronous (local models hold a lock; HTTP backends pool their own threads).
        return await asyncio.to_thread(self.forward, prompt=prompt, messages=messages, **kwargs)

    @classmethod
    def load_state(cls, state: dict[str, Any], **kwargs: Any):
        raise NotImplementedError(
            "a StillroomLM wraps a live Stillroom backend and cannot be rebuilt from saved state; open it again "
            "with open_dspy_lm(...) and set it on the loaded program"
        )

    def __repr__(self) -> str:
        return f"StillroomLM({self.backend.identity!r})"


def open_dspy_lm(spec: str, cache_path: str | Path, *, spend=None, backend: Backend | None = None,
                 max_tokens: int = 256, temperature: float = 0.0, **kwargs: Any):
    """A `StillroomLM` over `spec` (e.g. 'gemma3-270m') wrapped in the durable cache at `cache_path`.

    Returns `(lm, cached_backend)`; `cached_backend.calls` counts real model calls, `.meter.summary()` gives
    tokens, latency and cost. Pass `backend=` to reuse an already loaded model.
    """
    from stillroom.backends import open_cached_backend
    from stillroom.config import BackendConfig

    cached = open_cached_backend(BackendConfig(spec=spec), Path(cache_path), spend, backend=backend)
    return StillroomLM(cached, max_tokens=max_tokens, temperature=temperature, **kwargs), cached


def history_texts(lm: StillroomLM, start: int = 0) -> list[str]:
    """Raw completion texts recorded in `lm.history` from entry `start` on (for auditing what DSPy parsed)."""
    out = []
    for entry in lm.history[start:]:
        for o in entry.get("outputs") or []:
            out.append(o.get("text") if isinstance(o, dict) else str(o))
    return out


__all__ = ["StillroomLM", "open_dspy_lm", "to_stillroom_prompt", "generation_params", "history_texts"]

