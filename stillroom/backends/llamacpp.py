"""llama.cpp's own OpenAI-compatible server, in-process through `xllamacpp` (the `server` extra): a GGUF file
(the bundled Gemma-3 270M, say) served on 127.0.0.1 for the `openai:` backend. The slow tests and
`bench/server_throughput.py` start it this way."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from stillroom.errors import BackendError


def start_llamacpp_server(gguf: str | Path, *, slots: int = 2, n_ctx: int = 2048, threads: int = 2,
                          ready_timeout_s: float = 120.0):
    """(server, base_url): llama.cpp's server for `gguf` on a free 127.0.0.1 port, answering once this returns.
    Each of the `slots` parallel slots gets `n_ctx / slots` tokens of context. Keep `server` referenced while it
    is used; dropping it stops the server."""
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
    server = xllamacpp.Server(p)
    base_url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=ready_timeout_s)
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
