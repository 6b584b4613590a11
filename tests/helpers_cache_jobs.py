"""Cache jobs run in other processes by tests/test_cache.py (multiprocessing targets and a CLI for kill -9).

    python tests/helpers_cache_jobs.py slow DB_PATH [DELAY_S]

runs the 20-prompt job sequentially (batch size 1, `DELAY_S` per call) so a test can kill it mid-way.
"""

from __future__ import annotations

import sys

from stillroom.backends.base import GenerationParams, Prompt, prompt_text
from stillroom.backends.cache import CachedBackend, ResponseCache
from stillroom.backends.scripted import ScriptedBackend
from stillroom.backends.usage import UsageMeter

PARAMS = GenerationParams(max_tokens=5)


def answer(prompt: Prompt, params: GenerationParams) -> str:
    """Deterministic answer, so every process produces the same text for the same prompt."""
    return "A:" + prompt_text(prompt)


def job_prompts(n: int = 20, prefix: str = "question") -> list[Prompt]:
    """The job's prompts: chat messages, `n` of them."""
    return [[{"role": "user", "content": f"{prefix} {i:03d}"}] for i in range(n)]


def run_job(db: str, n: int = 20, delay_s: float = 0.0, meter: UsageMeter | None = None) -> CachedBackend:
    """The resumable job: every prompt through the cache, sequentially (no max_concurrency, batch size 1)."""
    wrapper = CachedBackend(ScriptedBackend(answer, delay_s=delay_s), ResponseCache(db), meter)
    gens = wrapper.generate_many(job_prompts(n), PARAMS)
    assert [g.text for g in gens] == [answer(p, PARAMS) for p in job_prompts(n)]
    return wrapper


def writer_process(db: str, prefix: str, n: int, shared: int, start=None) -> None:
    """multiprocessing target: `n` own prompts plus `shared` prompts every writer also asks, concurrently.

    `start` (a multiprocessing Barrier) lines the writers up so they really do write at the same time.
    """
    backend = ScriptedBackend(answer)
    backend.max_concurrency = 4  # type: ignore[attr-defined]  # threaded path: several writer threads per process
    wrapper = CachedBackend(backend, ResponseCache(db))
    prompts = job_prompts(n, prefix) + job_prompts(shared, "shared")
    if start is not None:
        start.wait(timeout=60)
    gens = wrapper.generate_many(prompts, PARAMS)
    assert [g.text for g in gens] == [answer(p, PARAMS) for p in prompts]


if __name__ == "__main__":
    if sys.argv[1] == "slow":
        run_job(sys.argv[2], delay_s=float(sys.argv[3]) if len(sys.argv) > 3 else 0.1)
    else:
        raise SystemExit(f"unknown job {sys.argv[1]!r}")
