"""The teacher's generation engine: llama.cpp (through `xllamacpp`) vs transformers, for the embedded teacher
Qwen2.5-Coder-0.5B-Instruct.

Same prompts, one run each, greedy:

* teacher tokens/s - PLD's extraction prompts for `--prompts` training examples of the task, `--max-tokens` each,
                     through the engine's backend with no cache (llama.cpp: the server's slots in flight;
                     transformers: one batch);
* PLD route        - `run_pld` end to end in a fresh run folder (extraction, synthesis, one resolution round,
                     the comparison on the test sample), the embedded Gemma-3 270M as student (its scoring is on
                     transformers under both engines), wall time including loading the models.

    .venv/bin/python bench/teacher_engine.py --prompts 8 --max-tokens 64 --extract 8 --val 8 --test 8

Writes bench/results/teacher_engine.json and prints a table. Both models convert once into the Stillroom cache
before the clock starts. On a shared machine the load average is recorded before each engine's runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, log  # noqa: E402  (also sets the offline environment)

from stillroom.backends.base import GenerationParams  # noqa: E402
from stillroom.config import BackendConfig, PLDConfig, TaskConfig  # noqa: E402

TEACHER = "qwen2.5-coder-0.5b"


def tokens_per_s(engine: str, prompts, params) -> dict:
    from stillroom.backends import load_backend

    t0 = time.perf_counter()
    b = load_backend(BackendConfig(spec=TEACHER, engine=engine))
    if engine == "llamacpp":
        b._server_client()  # start the server: its start-up (~3 s) is reported apart from generation
    else:
        b.generate_many(prompts[:1], GenerationParams(max_tokens=1))  # load and warm; no generation measured
    ready = time.perf_counter() - t0
    t1 = time.perf_counter()
    gens = b.generate_many(prompts, params)
    seconds = time.perf_counter() - t1
    tokens = sum(g.usage.output_tokens for g in gens)
    extra = {"threads": b.threads, "slots": b.slots} if engine == "llamacpp" else {"batch_size": b.batch_size}
    if hasattr(b, "close"):
        b.close()
    del b
    gc.collect()
    return {"ready_s": round(ready, 1), "seconds": round(seconds, 1), "output_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2), **extra,
            "texts_sample": [g.text[:120] for g in gens[:2]]}


def pld_route(engine: str, args, out_root: Path) -> dict:
    from stillroom.pld.pipeline import run_pld

    cfg = PLDConfig(task=TaskConfig(spec=args.task), teacher=BackendConfig(spec=TEACHER, engine=engine),
                    student=BackendConfig(spec="gemma3-270m", engine="transformers"), train_limit=args.extract,
                    val_limit=args.val, eval_limit=args.test, max_rounds=1, teacher_max_tokens=args.max_tokens,
                    compare_baselines=False, cot=False, shots=0, failures_per_round=8, successes_per_round=4)
    run_dir = out_root / f"pld-{engine}"
    t0 = time.perf_counter()
    m = run_pld(cfg, run_dir)
    seconds = time.perf_counter() - t0
    gc.collect()
    build = m.get("build") or {}
    return {"seconds": round(seconds, 1), "build_seconds": round(build.get("seconds", 0.0), 1),
            "teacher_calls": build.get("teacher_calls"), "teacher_output_tokens": build.get("teacher_output_tokens"),
            "rules": (m.get("rulebook") or {}).get("rules")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bigbench:intent_recognition")
    ap.add_argument("--prompts", type=int, default=8, help="Extraction prompts for the tokens/s measurement.")
    ap.add_argument("--max-tokens", type=int, default=64, help="Teacher generation budget (both measurements).")
    ap.add_argument("--extract", type=int, default=8, help="PLD: training examples the teacher extracts from.")
    ap.add_argument("--val", type=int, default=8, help="PLD: validation examples of the resolution round.")
    ap.add_argument("--test", type=int, default=8, help="PLD: test examples of the final comparison.")
    ap.add_argument("--engines", default="llamacpp,transformers")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "teacher_engine.json"))
    args = ap.parse_args()

    from stillroom.backends.embedded import ensure_embedded
    from stillroom.pld.prompts import extraction_messages
    from stillroom.tasks import load_task

    log("preparing the embedded models (one time)")
    ensure_embedded(TEACHER)
    ensure_embedded("gemma3-270m")
    task = load_task(args.task)
    train = task.splits(seed=0).train[: args.prompts]
    prompts = [extraction_messages(task, ex, strict=True) for ex in train]
    params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0)
    out_root = Path(tempfile.mkdtemp(prefix="stillroom-teacher-engine-"))
    rows = {}
    try:
        for engine in args.engines.split(","):
            load = os.getloadavg()[0]
            log(f"{engine}: teacher tokens/s on {len(prompts)} extraction prompts (load average {load:.1f})")
            tps = tokens_per_s(engine, prompts, params)
            log(f"{engine}: PLD route")
            pld = pld_route(engine, args, out_root)
            rows[engine] = {"load_avg_1min_at_start": round(load, 2), "generation": tps, "pld_route": pld}
    finally:
        shutil.rmtree(out_root, ignore_errors=True)

    result = {"command": " ".join(["bench/teacher_engine.py", *sys.argv[1:]]), "teacher": TEACHER, "task": args.task,
              "sizes": {"prompts": args.prompts, "max_tokens": args.max_tokens, "pld_extract": args.extract,
                        "pld_val": args.val, "pld_test": args.test, "pld_rounds": 1, "pld_student": "gemma3-270m"},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "note": "one run each, same prompts, greedy; generated tokens as each backend counts them; the PLD "
                      "route's wall time includes loading the models (converted beforehand) and the student's scoring",
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\n{'engine':<13} {'load':>5} {'tokens':>7} {'gen s':>7} {'tokens/s':>9} {'PLD route s':>12}")
    for name, r in rows.items():
        g = r["generation"]
        print(f"{name:<13} {r['load_avg_1min_at_start']:>5.1f} {g['output_tokens']:>7} {g['seconds']:>7.1f} "
              f"{g['tokens_per_s']:>9.2f} {r['pld_route']['seconds']:>12.1f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
