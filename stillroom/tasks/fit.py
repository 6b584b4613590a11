"""Inputs that fit: every prompt is checked against the model's context window before any call is paid.

A server given a prompt longer than its window answers HTTP 400, or worse, truncates silently; a run that
meets one mid-way has already paid for everything before it. So a route renders every prompt an example will
produce, bounds its tokens (`stillroom.backends.base.input_token_bound`: the model's tokenizer where known,
else UTF-8 bytes) plus the generation budget, and applies the task's `overlong` policy to those that do not
fit: 'error' (default; names the file and line), 'truncate' (the input is cut until every prompt fits) or
'skip' (the example is left out). Counts go into the run's report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from stillroom.backends.base import Prompt, context_window, fits_context
from stillroom.errors import TaskDataError
from stillroom.tasks.task import Example, Task

POLICIES = ("error", "truncate", "skip")
TRUNCATION_MARK = " [...]"


def where(task: Task, ex: Example) -> dict:
    """The file and line (or row) an example came from, as `TaskDataError` keywords."""
    loc = task.locations.get(ex.id)
    if loc is None:
        return {"path": task.source or task.name, "field": "input"}
    unit, n = loc
    if unit == "line":
        return {"path": task.source or task.name, "line": n, "field": "input"}
    return {"path": f"{task.source or task.name}, {unit} {n}", "field": "input"}


def fit_examples(
    task: Task,
    examples: Sequence[Example],
    backend,
    prompts_of: Callable[[Example], list[tuple[Prompt, int]]],
    policy: str = "error",
    what: str = "",
) -> tuple[list[Example], dict]:
    """The examples whose every prompt fits `backend`'s context window, after the `policy`.

    `prompts_of(example)` lists (prompt, max output tokens) for each call the example leads to. Returns the
    kept examples (truncated ones replaced) and counts: {'overlong', 'truncated', 'skipped'}. Makes no call.
    """
    if policy not in POLICIES:
        raise ValueError(f"overlong policy {policy!r}: expected one of {', '.join(POLICIES)}")
    counts = {"overlong": 0, "truncated": 0, "skipped": 0}
    if context_window(backend) is None:
        return list(examples), counts
    kept: list[Example] = []
    for ex in examples:
        worst = _worst(backend, prompts_of(ex))
        if worst is None:
            kept.append(ex)
            continue
        counts["overlong"] += 1
        bound, max_tokens, window = worst
        if policy == "skip":
            counts["skipped"] += 1
            continue
        if policy == "truncate":
            cut = _truncate(backend, ex, prompts_of)
            if cut is not None:
                counts["truncated"] += 1
                kept.append(cut)
                continue
        raise TaskDataError(
            f"example {ex.id!r} does not fit the model's context window{' for ' + what if what else ''}: its prompt "
            f"takes up to {bound:,} tokens plus {max_tokens:,} for the answer, over the window of {window:,} "
            f"({backend.identity}{_default_note(backend)}). Nothing was sent. Shorten it, or set the task's "
            "overlong policy to 'truncate' "
            "or 'skip'" + (" (even an empty input does not fit: shorten the instruction, shots or system prompt)"
                           if policy == "truncate" else ""),
            **where(task, ex),
        )
    return kept, counts


def _default_note(backend) -> str:
    """Says so when the window is Stillroom's default, not one the server stated."""
    inner = getattr(backend, "backend", backend)  # a cached backend wraps the real one
    if getattr(inner, "context_source", None) == "default":
        return (": the server states no context window, so the default of "
                f"{inner.context_tokens:,} tokens applies; set the model's max_input_tokens if it takes more")
    return ""


def _worst(backend, prompts: list[tuple[Prompt, int]]) -> tuple[int, int, int] | None:
    """(bound, max_tokens, window) of the first prompt that does not fit, or None when all fit."""
    for prompt, max_tokens in prompts:
        ok, bound, window = fits_context(backend, prompt, max_tokens)
        if not ok:
            return bound, max_tokens, int(window or 0)
    return None


def _truncate(backend, ex: Example, prompts_of) -> Example | None:
    """The longest prefix of the input (by characters) with which every prompt fits, or None if none does."""
    def fits(n: int) -> bool:
        return _worst(backend, prompts_of(_cut(ex, n))) is None

    if not fits(0):
        return None
    lo, hi = 0, len(ex.input)  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return _cut(ex, lo)


def _cut(ex: Example, n: int) -> Example:
    return dataclasses.replace(ex, input=ex.input[:n] + TRUNCATION_MARK)
