"""Generation throughput: the bundled Gemma-3 270M behind llama.cpp's server vs the local transformers backend.

Same prompts, same greedy settings, one run each:

* server, 1 stream     - `OpenAIBackend` to llama.cpp's server (through `xllamacpp`, Q4_K_M GGUF), one request at
                         a time;
* server, N slots      - the same with `max_concurrency` = the server's parallel slots;
* local                - `HFBackend` on the embedded model folder (the same GGUF dequantised to float32), batched.

tokens/s = generated tokens (as each backend counts them) / wall-clock seconds for the whole set.

    .venv/bin/python bench/server_throughput.py --prompts 8 --max-tokens 24 --slots 4

Writes bench/results/server_throughput.json and prints a table. Needs the `embedded` extra. This is a
benchmark, not a test; on a shared machine the load average at the start is recorded next to the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

from _common import ROOT, log  # noqa: E402  (also sets the offline environment)

from stillroom.backends.llamacpp import start_llamacpp_server  # noqa: E402

TOPICS = ["the sea", "a library", "winter mornings", "bread", "a train journey", "bees", "an old clock", "rain",
          "mountains", "a market", "the moon", "a garden", "snow", "a bridge", "coffee", "a lighthouse"]


def timed(backend, prompts, params) -> dict:
    t0 = time.perf_counter()
    gens = backend.generate_many(prompts, params)
    seconds = time.perf_counter() - t0
    tokens = sum(g.usage.output_tokens for g in gens)
    return {"seconds": round(seconds, 2), "output_tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--slots", type=int, default=4, help="llama.cpp parallel slots (and the client's concurrency).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "server_throughput.json"))
    args = ap.parse_args()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(var, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"

    import torch

    from stillroom.backends.base import GenerationParams
    from stillroom.backends.embedded import GGUF_NAME, ensure_embedded_gemma
    from stillroom.backends.hf import HFBackend
    from stillroom.backends.openai_compat import OpenAIBackend

    torch.set_num_threads(args.threads)
    folder = ensure_embedded_gemma()
    gguf = str(folder.parent / GGUF_NAME)
    prompts = [f"Here is a short paragraph about {TOPICS[i % len(TOPICS)]}:\n" for i in range(args.prompts)]
    params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0)
    load = os.getloadavg()[0]
    rows = {}

    log(f"starting llama.cpp's server ({args.slots} slots, {args.threads} threads)")
    server, base_url = start_llamacpp_server(gguf, slots=args.slots, n_ctx=1024 * args.slots, threads=args.threads)
    try:
        warm = OpenAIBackend("gemma-3-270m", base_url=base_url, max_retries=0, timeout_s=600)
        warm.generate(prompts[0], GenerationParams(max_tokens=2))  # first-request set-up is not throughput
        for name, conc in (("server, 1 stream", 1), (f"server, {args.slots} slots", args.slots)):
            log(name)
            b = OpenAIBackend("gemma-3-270m", base_url=base_url, max_concurrency=conc, max_retries=0, timeout_s=600)
            rows[name] = {**timed(b, prompts, params), "backend": "llama.cpp server (xllamacpp), Q4_K_M GGUF",
                          "concurrency": conc}
            b.close()
        warm.close()
    finally:
        del server
        gc.collect()

    log("local transformers backend")
    local = HFBackend(str(folder), device="cpu", dtype="float32", batch_size=args.prompts)
    local.generate_many(prompts[:1], GenerationParams(max_tokens=2))
    rows["local (HFBackend)"] = {**timed(local, prompts, params),
                                 "backend": f"transformers float32, batch {args.prompts}", "concurrency": 1}

    result = {"command": " ".join(["bench/server_throughput.py", *sys.argv[1:]]), "prompts": args.prompts, "max_tokens": args.max_tokens, "slots": args.slots, "threads": args.threads,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1min_at_start": load},
              "note": "one run each, same prompts, greedy; generated tokens as each backend counts them",
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\n{'backend':<22} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for name, r in rows.items():
        print(f"{name:<22} {r['output_tokens']:>7} {r['seconds']:>8.1f} {r['tokens_per_s']:>9.1f}")
    print(f"(load average at start: {load:.1f} on {os.cpu_count()} CPUs)  -> {args.out}")


if __name__ == "__main__":
    main()
