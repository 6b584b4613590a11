"""A deterministic backend for tests and dry runs: the answer is a plain function of the prompt."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from stillroom.backends.base import (
    BackendBase,
    Generation,
    GenerationParams,
    Prompt,
    Usage,
    estimate_tokens,
    prompt_text,
)

ScriptFn = Callable[[Prompt, GenerationParams], str]


class ScriptedBackend(BackendBase):
    """Answers with `fn(prompt, params)`; counts every real call so tests can assert on them.

    Token usage is estimated at 4 characters a token, which is enough for spend-cap tests.
    """

    supports_score = False
    supports_chat = True

    def __init__(self, fn: ScriptFn, name: str = "scripted", delay_s: float = 0.0):
        self.fn = fn
        self.model = name
        self.identity = f"scripted:{name}"
        self.delay_s = delay_s
        self.calls = 0
        self._lock = threading.Lock()

    def generate(self, prompt: Prompt, params: GenerationParams) -> Generation:
        start = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        text = self.fn(prompt, params)
        with self._lock:
            self.calls += 1
        usage = Usage(
            input_tokens=estimate_tokens(prompt_text(prompt)),
            output_tokens=estimate_tokens(text) if text else 0,
            latency_s=time.perf_counter() - start,
        )
        return Generation(text=text, usage=usage, finish_reason="stop")


def echo_last_line(prompt: Prompt, params: GenerationParams) -> str:
    """Script used by `scripted:echo`: repeats the last line of the prompt."""
    text = prompt_text(prompt).strip()
    return text.splitlines()[-1] if text else ""
