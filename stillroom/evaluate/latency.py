"""Latency per answer, measured the same way for every route and every condition.

The evaluation itself is a poor clock: it batches requests, shares one prompt prefix across a batch and across
calls (the local backend's prefix store, `stillroom.backends.hf`), replays answers from the durable cache, and
its first call pays for warming the model up. A condition evaluated right after another with the same system
prompt (PLD's test pass after its validation passes) then looks several times faster than one evaluated first in
a fresh process (zero-shot), though serving them costs the same. So, for a local model, latency is a separate,
small measurement: the first `sample` evaluated examples answered one at a time (batch 1) with the condition's
own prompt and method, after one untimed warm-up answer, with the prefix store emptied and switched off (nothing
reused from the evaluation or from another route). Each timing is kept in the run's cache, so a resumed run
reports the same figures without a model call.

A served model (an OpenAI-compatible server) is timed by its requests during the evaluation: one request per
answer, the round-trip time of its first call (replays keep it).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence

import numpy as np

from stillroom.backends.base import GenerationParams, ScoreRequest
from stillroom.tasks.prompts import continuation, render_chat, render_prompt
from stillroom.tasks.task import Example, Task

SCORE_SAMPLE = 8
"""Examples timed per condition when answers are scored (one forward pass each)."""
GENERATE_SAMPLE = 4
"""Examples timed per condition when answers are generated (a generation costs many forward passes)."""

LOCAL_METHOD = ("local model: each of the first {n} test examples answered alone (batch 1) with its route's own "
                "prompt and answer method, after one untimed warm-up answer, with the shared-prefix store emptied "
                "and off (nothing reused from the evaluation or another route); wall seconds per answer on this "
                "machine")
SERVED_METHOD = ("served model: the round-trip time of each test answer's request when it was first made (one "
                 "request per answer)")
EVAL_METHOD = "the evaluation's own timing (answers in batches of 8; a batch's time shared by its answers)"


def _local(backend, method: str = "generate"):
    """The local transformers backend behind `backend` (a cached wrapper or the backend itself), else None.

    A llama.cpp engine (`backends.llamacpp.LlamaCppEngine`) scores on the transformers backend of the same model
    (its `hf`), so for 'loglik' that is what is timed, the same way as any other local model."""
    inner = getattr(backend, "backend", backend)
    if method == "loglik" and getattr(type(inner), "hf", None) is not None and not hasattr(inner, "hf_model"):
        inner = inner.hf
    return inner if getattr(inner, "hf_model", None) is not None and hasattr(inner, "clear_prefix_cache") else None


def latency_method(backend) -> str:
    """How `evaluate` times answers on this backend (said in every report)."""
    if _local(backend) is not None:
        return LOCAL_METHOD.format(n=SCORE_SAMPLE)
    inner = getattr(backend, "backend", backend)
    return SERVED_METHOD if getattr(inner, "base_url", None) else EVAL_METHOD


def measure_latency(task: Task, examples: Sequence[Example], backend, *, shots: Sequence[Example] = (),
                    system_prompt: str | None = None, method: str = "loglik", max_tokens: int = 16) -> dict | None:
    """p50/p95 seconds per answer of a local model, measured as the module docstring says; None for a backend
    that is not a local transformers model (its evaluation's own timing stands).

    `method` is the resolved one ('loglik', 'generate' or 'cot'); `max_tokens` the generation budget."""
    inner = _local(backend, method)
    if inner is None or not examples:
        return None
    n = SCORE_SAMPLE if method == "loglik" else GENERATE_SAMPLE
    sample = list(examples[:n])
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)

    def request(ex: Example):
        if method == "loglik":
            return ScoreRequest(render_prompt(task, ex, shots, system_prompt),
                                tuple(continuation(o) for o in task.options(ex)))
        return render_chat(task, ex, shots, system_prompt, reason=method == "cot")

    def call(req, tokens: int | None = None) -> None:
        if method == "loglik":
            inner.score([req])
        else:
            inner.generate(req, GenerationParams(max_tokens=tokens or max_tokens, temperature=0.0))

    cache = getattr(backend, "cache", None)
    keys = [_key(inner.identity, method, params, request(ex)) for ex in sample]
    stored = [cache.get_score(k) if cache is not None else None for k in keys]
    timings = [s[1] for s in stored if s is not None]
    if len(timings) < len(sample):
        was_on = inner.prefix_cache
        inner.clear_prefix_cache()
        inner.prefix_cache = False
        try:
            call(request(sample[0]), tokens=2)  # warm-up, untimed: kernels, allocator, lazy initialisation
            timings = []
            for ex, key, hit in zip(sample, keys, stored, strict=True):
                if hit is not None:
                    timings.append(hit[1])
                    continue
                t0 = time.perf_counter()
                call(request(ex))
                took = time.perf_counter() - t0
                timings.append(took)
                if cache is not None:
                    cache.put_score(key, identity=f"latency:{inner.identity}", loglik=[], latency_s=took)
        finally:
            inner.prefix_cache = was_on
    arr = np.asarray(timings, dtype=float)
    return {"p50_s": float(np.percentile(arr, 50)), "p95_s": float(np.percentile(arr, 95)), "n": len(timings),
            "method": LOCAL_METHOD.format(n=len(timings))}


def _key(identity: str, method: str, params: GenerationParams, request) -> str:
    """Cache key of one timing: the model, the answer method and budget, and the exact request."""
    if isinstance(request, ScoreRequest):
        body = {"context": request.context, "options": list(request.continuations)}
    else:
        body = {"prompt": request, "max_tokens": params.max_tokens}
    blob = json.dumps({"latency": 1, "identity": identity, "method": method, **body}, sort_keys=True, default=str)
    return "latency:" + hashlib.sha256(blob.encode()).hexdigest()
