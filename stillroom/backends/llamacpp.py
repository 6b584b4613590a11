"""llama.cpp's own OpenAI-compatible server, in-process through `xllamacpp` (in the default install): a GGUF file
served on 127.0.0.1.

Two uses:

* `start_llamacpp_server` starts one for the `openai:` backend (the slow tests, `bench/server_throughput.py`);
* `LlamaCppEngine` is the backend of a GGUF-backed model (the embedded `gemma3-270m` and `qwen2.5-coder-0.5b`, or a
  `gguf:FILE`) whose config says `engine: llamacpp` (or `auto`, the default, on a machine without CUDA): its
  *generation* runs on a llama.cpp server it starts on first use and stops at `close()` (or when the process
  ends), while log-likelihood *scoring* stays on transformers (`HFBackend`, loaded on first use: llama.cpp's
  server returns log-probabilities of generated tokens only). Routes that need logits load the transformers
  folder themselves. On 2 CPU cores llama.cpp generates several times faster than transformers' float32 CPU
  path (bench/results/teacher_engine.json).

Prompts are rendered here exactly as `HFBackend` renders them (the tokenizer's chat template where the model has
one, `chat_to_text` otherwise) and sent as raw completions, so both engines see the same prompt text; what they
generate can still differ in the last digits (llama.cpp computes with the Q4_K_M weights as stored, transformers
with them dequantised to float32), so the engine is part of the backend's identity and the two never share
cached answers.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
import time
import weakref
from pathlib import Path

from stillroom.backends.base import BackendBase, Generation, GenerationParams, Prompt, ScoreRequest
from stillroom.errors import BackendError, ConfigError

DEFAULT_SLOT_CTX = 2048
"""Tokens of context per server slot (prompt + generation) unless the config's `max_input_tokens` says more."""
ENGINES = ("auto", "transformers", "llamacpp")


def machine_threads() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def idle_cores(window_s: float = 0.5) -> float | None:
    """Cores idle over the next `window_s` seconds (from /proc/stat), or None where that cannot be read. Taken
    while this process waits, so only other processes count as busy (a 1-minute load average would still count
    this process's own work of a moment ago)."""

    def sample():
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return machine_threads() * (i1 - i0) / (t1 - t0)


def default_threads() -> int:
    """Threads for llama.cpp: the cores idle now, at least 1, at most this process's cores.

    ggml's worker threads meet at a barrier after every operation, so a thread that loses its core to another
    process stalls the rest: on 2 cores at load average 9, 2 threads generated 1.6 tokens/s and 1 thread 6.4
    (Qwen2.5-Coder-0.5B, 4 slots). On a quiet machine every core is used."""
    cpus = machine_threads()
    idle = idle_cores()
    if idle is None:
        try:
            idle = cpus - os.getloadavg()[0] + 1
        except (AttributeError, OSError):  # pragma: no cover - no load figures on this platform
            return cpus
    return max(1, min(cpus, int(idle + 0.5)))


def default_slots(threads: int | None = None) -> int:
    """Parallel server slots for this machine: two per core, between 2 and 8. On CPU, llama.cpp batches the
    slots' tokens into one forward, so a few slots per core raise throughput (about 30 tokens/s for one
    stream and 85 for four on 2 cores, docs/environment.md) at a per-slot cost in context memory."""
    return min(8, max(2, 2 * (threads or machine_threads())))


def start_llamacpp_server(gguf: str | Path, *, slots: int = 2, n_ctx: int = 2048, threads: int = 2,
                          ready_timeout_s: float = 120.0, poll: int | None = None, quiet: bool = False):
    """(server, base_url): llama.cpp's server for `gguf` on a free 127.0.0.1 port, answering once this returns.
    Each of the `slots` parallel slots gets `n_ctx / slots` tokens of context. Keep `server` referenced while it
    is used; dropping it stops the server. `quiet` silences llama.cpp's own log, which it writes straight to
    the process's stderr (through a progress display); its failures still reach the client as HTTP errors."""
    import openai
    import xllamacpp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = xllamacpp.CommonParams()
    p.model.path = str(gguf)
    p.port = port
    p.n_ctx = n_ctx
    p.n_parallel = slots
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    if poll is not None:
        p.cpuparams.poll = p.cpuparams_batch.poll = poll
    if quiet:
        p.verbosity = -1
    server = xllamacpp.Server(p)
    base_url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=ready_timeout_s,
                           http_client=openai.DefaultHttpxClient(trust_env=False))
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                client.models.list()
                break
            except openai.APIError:
                if time.monotonic() > deadline:
                    raise BackendError(f"llama.cpp server for {gguf} did not answer within {ready_timeout_s:g} s") from None
                time.sleep(0.5)
    finally:
        client.close()
    return server, base_url


def resolve_engine(engine: str, spec: str, device: str = "auto") -> str:
    """'transformers' or 'llamacpp' for a model `spec`. 'auto' picks llama.cpp for a GGUF-backed model (an
    embedded spec or 'gguf:FILE') on a machine without CUDA when `xllamacpp` is installed (the faster engine on
    CPU, bench/results/teacher_engine.json), transformers otherwise. An explicit 'llamacpp' on a model without a
    GGUF is a config error."""
    from stillroom.backends.embedded import EMBEDDED

    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    gguf_backed = spec in EMBEDDED or (spec.startswith("gguf:") and len(spec) > 5)
    if engine == "transformers":
        return "transformers"
    if engine == "llamacpp":
        if not gguf_backed:
            raise ConfigError(f"engine 'llamacpp' needs a GGUF model (an embedded spec or 'gguf:FILE'); {spec!r} "
                              "is not one. Use engine 'transformers' or 'auto'")
        return "llamacpp"
    if not gguf_backed or device not in ("auto", "cpu"):
        return "transformers"
    try:
        import torch

        if torch.cuda.is_available():
            return "transformers"
    except ImportError:  # pragma: no cover
        pass
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return "transformers"
    return "llamacpp"


_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for engine in list(_live):
        with contextlib.suppress(Exception):
            engine.close()


class LlamaCppEngine(BackendBase):
    """Generation on a llama.cpp server started on first use, scoring on transformers (see the module docstring).

    `gguf` is the model file; `hf_loader()` returns the `HFBackend` of the same model (called at most once, on
    the first score); `tokenizer_loader()` returns its tokenizer (for prompt rendering and token counts). The
    server runs quiet: llama.cpp would write its log straight to the process's stderr, through our progress bars.
    """

    supports_score = True
    supports_chat = True
    exact_tokens = True

    def __init__(self, gguf: str | Path, *, hf_loader, tokenizer_loader, identity: str, name: str,
                 slots: int | None = None, threads: int | None = None, slot_ctx: int | None = None,
                 timeout_s: float = 600.0):
        self.gguf = Path(gguf)
        self._hf_loader, self._tokenizer_loader = hf_loader, tokenizer_loader
        self.model = name
        self.identity = f"{identity}|llamacpp"
        self._threads = threads
        self.threads = threads or machine_threads()  # decided again when the server starts (default_threads)
        self.slots = slots or default_slots(machine_threads())
        self.slot_ctx = slot_ctx or DEFAULT_SLOT_CTX
        self.context_tokens = self.slot_ctx
        self.timeout_s = timeout_s
        self._hf = None
        self._tok = None
        self._server = None
        self._client = None
        self._lock = threading.Lock()
        self.server_start_s: float | None = None
        _live.add(self)

    def __repr__(self) -> str:
        return f"LlamaCppEngine({self.gguf.name!r}, slots={self.slots}, threads={self.threads})"

    # ------------------------------------------------------------------ lazily built parts

    @property
    def tokenizer(self):
        """The model's transformers tokenizer (loaded on first use)."""
        with self._lock:
            if self._tok is None:
                self._tok = self._tokenizer_loader()
            return self._tok

    @property
    def has_chat_template(self) -> bool:
        """Whether the model has a chat template, as `HFBackend` says it: PLD prompts a model without one (a base
        model such as the embedded Gemma-3 270M) with a worked example and its prompt fields as stop strings."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def hf(self):
        """The transformers backend of the same model, for scoring (loaded on first use)."""
        with self._lock:
            if self._hf is None:
                self._hf = self._hf_loader()
                self._tok = self._tok or self._hf.tokenizer
            return self._hf

    def _server_client(self):
        with self._lock:
            if self._client is None:
                from stillroom.backends.openai_compat import OpenAIBackend

                t0 = time.perf_counter()
                self.threads = self._threads or default_threads()
                self._server, base_url = start_llamacpp_server(self.gguf, slots=self.slots,
                                                               n_ctx=self.slot_ctx * self.slots, threads=self.threads,
                                                               quiet=True)
                self.server_start_s = time.perf_counter() - t0
                self._client = OpenAIBackend(self.model, base_url=base_url, max_concurrency=self.slots,
                                             timeout_s=self.timeout_s, max_retries=2, retry_budget_s=self.timeout_s * 2,
                                             max_input_tokens=self.slot_ctx)
            return self._client

    def close(self) -> None:
        """Stop the server (the next generation starts a new one)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None
            server, self._server = self._server, None
        # xllamacpp has no stop method: its server stops when the object is freed, so drop the last reference.
        del server

    def prepare(self, use: str) -> None:
        """Build now what `use` ('score' or 'generate') needs: the transformers model or the server."""
        if use == "score":
            _ = self.hf
        else:
            self._server_client()

    # ------------------------------------------------------------------ the Backend interface

    def render(self, prompt: Prompt) -> tuple[str, bool]:
        """The prompt text `HFBackend` would feed this model, and whether it came from the chat template."""
        from stillroom.backends.base import normalise_prompt

        p = normalise_prompt(prompt)
        if isinstance(p, str):
            return p, False
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            try:
                return str(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)), True
            except Exception:  # e.g. a template that rejects a system role: as HFBackend does
                pass
        from stillroom.backends.base import chat_to_text

        return chat_to_text(p), False

    def generate(self, prompt: Prompt, params: GenerationParams) -> Generation:
        return self.generate_many([prompt], params)[0]

    def generate_many(self, prompts: list[Prompt], params: GenerationParams) -> list[Generation]:
        """Every prompt rendered as `HFBackend` renders it and sent as a raw completion; up to `slots` in flight."""
        texts = [self.render(p)[0] for p in prompts]
        return self._server_client().generate_many(texts, params)

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """On transformers: exactly `HFBackend.score` of the same model."""
        return self.hf.score(requests)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def max_length(self) -> int:
        return self.slot_ctx


def engine_backend(spec: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                   slot_ctx: int | None = None) -> LlamaCppEngine:
    """The `LlamaCppEngine` of a GGUF-backed spec: an embedded model (its verified GGUF; scoring on its converted
    folder) or 'gguf:FILE' (scoring on transformers' dequantised load of the same file)."""
    from stillroom.backends.embedded import (
        EMBEDDED,
        ensure_embedded,
        ensure_embedded_gguf,
    )
    from stillroom.backends.hf import HFBackend

    if spec in EMBEDDED:
        gguf = ensure_embedded_gguf(spec)
        folder = ensure_embedded(spec)  # the tokenizer (and the scoring model) come from the converted folder

        def hf_loader():
            return HFBackend(str(folder), device=device, dtype=dtype, batch_size=batch_size)

        def tok_loader():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder))

        identity = f"hf:{Path(folder).resolve()}"
    else:
        gguf = Path(spec.partition(":")[2]).expanduser()
        if not gguf.exists():
            raise ConfigError(f"GGUF file {gguf} does not exist")

        def hf_loader():
            return HFBackend(str(gguf.parent), gguf_file=gguf.name, device=device, dtype=dtype, batch_size=batch_size)

        def tok_loader():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(gguf.parent.resolve()), gguf_file=gguf.name)

        identity = f"hf:{gguf.parent.resolve()}/{gguf.name}:gguf"
    return LlamaCppEngine(gguf, hf_loader=hf_loader, tokenizer_loader=tok_loader, identity=identity,
                          name=Path(gguf).stem, slot_ctx=slot_ctx)
