"""Log-likelihood evaluation speed: Stillroom's HFBackend.score vs naive scoring vs lm-evaluation-harness.

All three score the SAME prompts and choices with the SAME model folder (the embedded Gemma-3 270M, float32, CPU):

* stillroom  - `HFBackend.score` (shared-prefix KV cache, batched continuations, logits only where scored);
* naive      - one full forward per (prompt, choice), full-sequence logits and log-softmax, no cache;
* lm-eval    - lm-evaluation-harness from PyPI, `simple_evaluate` on a task defined by a local YAML over the same
               examples (JSONL with precomputed `prompt` / `choices` / `gold`, `target_delimiter: " "`), with
               `log_samples=True` for per-example predictions. Its pure `HFLM.loglikelihood` time over the
               same requests is measured too; the speed-up is stated against the faster of the two.

Prompts: BIG-bench `sports_understanding`, k-shot prompts from `stillroom.tasks.prompts.render_prompt` with the
first k training examples (seeded split) as shots, continuations from `continuation`.

    .venv/bin/python bench/eval_speed.py --examples 40

Writes bench/results/eval_speed.json and prints a table. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from _common import ROOT  # noqa: E402  (also sets the offline environment)

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def load_examples(task_spec: str, n: int, shots: int, seed: int):
    """(task, examples, shot examples, prompts, options) via Stillroom's task loader and prompt builder."""
    from stillroom.tasks import load_task
    from stillroom.tasks.prompts import render_prompt

    task = load_task(task_spec)
    splits = task.splits(seed=seed)
    shot_examples = splits.train[:shots]
    examples = splits.test[:n]
    if len(examples) < n:
        examples = (splits.test + splits.val)[:n]
    prompts = [render_prompt(task, ex, shot_examples) for ex in examples]
    options = [list(task.options(ex)) for ex in examples]
    golds = [options[i].index(str(ex.label)) for i, ex in enumerate(examples)]
    return task, examples, prompts, options, golds


def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


def run_naive(backend, requests):
    """One full forward per (prompt, choice); full-sequence logits and log-softmax, like HFLM without batching."""
    import torch

    model = backend.hf_model
    scores = []
    with torch.inference_mode():
        for r in requests:
            row = []
            for c in r.continuations:
                ctx, cont = backend.encode_pair(r.context, c)
                inp = (ctx + cont)[-(backend.max_length + 1):][:-1]
                logits = model(torch.tensor([inp], device=backend.device)).logits[0]
                lp = torch.log_softmax(logits.float(), dim=-1)[len(inp) - len(cont):]
                row.append(float(lp.gather(1, torch.tensor(cont, device=lp.device)[:, None]).sum()))
            scores.append(row)
    return scores


def run_lm_eval(hflm, prompts, options, golds, workdir: Path, batch_size: int):
    """simple_evaluate over a local YAML task with the same prompts/choices; per-example predictions."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    name = "stillroom_eval_speed"
    data = workdir / "docs.jsonl"
    with data.open("w") as f:
        for i, (p, o, g) in enumerate(zip(prompts, options, golds, strict=True)):
            f.write(json.dumps({"id": i, "prompt": p, "choices": o, "gold": g}) + "\n")
    tdir = workdir / "tasks"
    tdir.mkdir(exist_ok=True)
    (tdir / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=json.dumps(str(data))))
    tm = TaskManager(include_path=str(tdir))
    res = lm_eval.simple_evaluate(
        model=hflm, tasks=[name], num_fewshot=0, batch_size=batch_size, device="cpu",
        task_manager=tm, log_samples=True, bootstrap_iters=0,
    )
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    scores = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    args = [[tuple(a) for a in s["arguments"]] for s in samples]
    acc = res["results"][name].get("acc,none")
    return scores, args, acc


def run_hflm_loglikelihood(hflm, requests):
    from lm_eval.api.instance import Instance

    flat = [(r.context, c) for r in requests for c in r.continuations]
    inst = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(flat)]
    out = hflm.loglikelihood(inst, disable_tqdm=True)
    scores, k = [], 0
    for r in requests:
        scores.append([float(out[k + i][0]) for i in range(len(r.continuations))])
        k += len(r.continuations)
    return scores


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bigbench:sports_understanding")
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="Stillroom HFBackend batch size (requests per chunk)")
    ap.add_argument("--lm-eval-batch-size", type=int, default=8, help="lm-eval HFLM batch size")
    ap.add_argument("--model", default=None, help="transformers folder (default: the embedded Gemma-3 270M)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--slices", type=int, default=4, help="interleave the methods over this many slices")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-lm-eval", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_speed.json"))
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from stillroom.backends.base import ScoreRequest
    from stillroom.backends.embedded import ensure_embedded_gemma
    from stillroom.backends.hf import HFBackend
    from stillroom.tasks.prompts import continuation

    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else ensure_embedded_gemma()
    task, examples, prompts, options, golds = load_examples(args.task, args.examples, args.shots, args.seed)
    requests = [ScoreRequest(p, tuple(continuation(o) for o in opts)) for p, opts in zip(prompts, options, strict=True)]
    n = len(requests)
    console.print(f"[bold]{args.task}[/]: {n} examples, {args.shots}-shot, model {folder}, "
                  f"{torch.get_num_threads()} torch threads, load avg {os.getloadavg()[0]:.2f}")

    load_start = os.getloadavg()[0]
    backend = HFBackend(str(folder), device="cpu", dtype="float32", batch_size=args.batch_size)
    ntok = [len(backend.tok_encode(p)) for p in prompts]
    console.print(f"prompt tokens: mean {sum(ntok) / n:.0f}, max {max(ntok)}; choices per example: "
                  f"{sum(len(o) for o in options) / n:.1f}")
    # Warm-up (weights are memory-mapped: the first forwards page them in) on prompts that are not measured.
    warm = [ScoreRequest(p.replace("Statement:", "Claim:"), r) for p, r in
            ((requests[0].context, requests[0].continuations), (requests[-1].context, requests[-1].continuations))]
    backend.score(warm)
    run_naive(backend, warm[:1])

    methods: dict[str, dict] = {}
    scores: dict[str, list[list[float]]] = {}

    def record(key: str, wall: float, cpu: float, part: list[list[float]], **info):
        m = methods.setdefault(key, {"seconds": 0.0, "cpu_seconds": 0.0, **info})
        m["seconds"] += wall
        m["cpu_seconds"] += cpu
        scores.setdefault(key, []).extend(part)

    def timed(fn, *a):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*a)
        return out, time.perf_counter() - w0, time.process_time() - c0

    hflm = None
    if not args.skip_lm_eval:
        import lm_eval
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        hflm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=args.lm_eval_batch_size)
        hflm.loglikelihood([Instance("loglikelihood", {}, (w.context, c), 0) for w in warm for c in w.continuations],
                           disable_tqdm=True)

    # Interleaved: the examples are cut into slices and every method runs each slice in turn (rotating order),
    # so load changes on a shared machine hit all methods alike. Wall and process CPU time are both recorded.
    backend._memo = None
    bounds = [round(i * n / args.slices) for i in range(args.slices + 1)]
    runners = [
        ("stillroom", lambda rs: backend.score(rs), {"batch_size": args.batch_size,
                                                    "what": "HFBackend.score, one call per slice"}),
    ]
    if not args.skip_naive:
        runners.append(("naive", lambda rs: run_naive(backend, rs), {
            "batch_size": 1, "what": "one full forward per (prompt, choice), full logits, no cache"}))
    if hflm is not None:
        runners.append(("lm_eval_loglikelihood", lambda rs: run_hflm_loglikelihood(hflm, rs), {
            "batch_size": args.lm_eval_batch_size, "what": "lm-eval HFLM.loglikelihood over the same requests"}))
    for si in range(args.slices):
        part = requests[bounds[si] : bounds[si + 1]]
        if not part:
            continue
        order = runners[si % len(runners):] + runners[: si % len(runners)]
        for key, fn, info in order:
            console.print(f"slice {si + 1}/{args.slices} ({len(part)} examples): {key} ...")
            out, wall, cpu = timed(fn, part)
            record(key, wall, cpu, out, **info)

    # The evaluator's calling pattern: 8 requests per call (the prefix KV cache is reused across calls).
    backend._memo = None

    def calls_of_8(rs):
        res = []
        for i in range(0, len(rs), 8):
            res.extend(backend.score(rs[i : i + 8]))
        return res

    out, wall, cpu = timed(calls_of_8, requests)
    record("stillroom_calls_of_8", wall, cpu, out, batch_size=args.batch_size,
           what="HFBackend.score, one call per 8 requests (the evaluator's pattern)")

    lm_eval_info = {}
    if hflm is not None:
        console.print(f"lm-evaluation-harness {lm_eval.__version__}: simple_evaluate on a local YAML task ...")
        with tempfile.TemporaryDirectory(prefix="stillroom-bench-") as tmp:
            (s_, lm_args, acc), wall, cpu = timed(
                lambda: run_lm_eval(hflm, prompts, options, golds, Path(tmp), args.lm_eval_batch_size))
        record("lm_eval", wall, cpu, s_, batch_size=args.lm_eval_batch_size,
               what="lm_eval.simple_evaluate on a local YAML task (incl. task and dataset setup)")
        same_requests = all(
            [tuple(a) for a in lm_args[i]] == [(r.context, c) for c in r.continuations]
            for i, r in enumerate(requests)
        )
        lm_eval_info = {"version": lm_eval.__version__, "acc": acc, "requests_identical_to_stillroom": same_requests}

    for m in methods.values():
        m["examples_per_s"] = n / m["seconds"]
    preds = {k: [argmax(r) for r in v] for k, v in scores.items()}
    ref = preds["stillroom"]

    def max_diff(a, b):
        return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))

    agreement = {k: sum(p == q for p, q in zip(ref, v, strict=True)) / n for k, v in preds.items()}
    diffs = {k: max_diff(scores["stillroom"], v) for k, v in scores.items() if k != "stillroom"}
    accuracy = {k: sum(p == g for p, g in zip(v, golds, strict=True)) / n for k, v in preds.items()}
    identical = all(preds[k] == ref for k in ("naive", "lm_eval") if k in preds) and all(
        k in preds for k in ("naive", "lm_eval"))
    st = methods["stillroom"]["seconds"]
    lm_ll = methods.get("lm_eval_loglikelihood", {}).get("seconds")
    result = {
        "task": args.task,
        "examples": n,
        "shots": args.shots,
        "seed": args.seed,
        "device": "cpu",
        "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_start": load_start,
        "load_avg_1m_at_end": os.getloadavg()[0],
        "machine": platform.platform(),
        "model": str(folder),
        "prompt_tokens_mean": sum(ntok) / n,
        "methods": methods,
        "examples_per_s": {k: m["examples_per_s"] for k, m in methods.items()},
        "seconds": {k: m["seconds"] for k, m in methods.items()},
        "speedup_vs_naive": (methods["naive"]["seconds"] / st) if "naive" in methods else None,
        "cpu_speedup_vs_naive": (methods["naive"]["cpu_seconds"] / methods["stillroom"]["cpu_seconds"])
        if "naive" in methods else None,
        "cpu_speedup_vs_lm_eval": (methods["lm_eval_loglikelihood"]["cpu_seconds"] / methods["stillroom"]["cpu_seconds"])
        if lm_ll else None,
        "speedup_vs_lm_eval": (lm_ll / st) if lm_ll else None,
        "speedup_vs_lm_eval_simple_evaluate": (methods["lm_eval"]["seconds"] / st) if "lm_eval" in methods else None,
        "predictions_identical": identical,
        "prediction_agreement_with_stillroom": agreement,
        "max_abs_loglik_diff_vs_stillroom": diffs,
        "accuracy": accuracy,
        "lm_eval": lm_eval_info,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"{args.task}: {n} examples, {args.shots}-shot, Gemma-3 270M float32, CPU "
                        f"({torch.get_num_threads()} threads)")
    for col in ("method", "batch", "seconds", "examples/s", "Stillroom speed-up", "agree", "acc"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for k, m in methods.items():
        table.add_row(k, str(m["batch_size"]), f"{m['seconds']:.2f}", f"{m['examples_per_s']:.2f}",
                      f"{m['seconds'] / st:.1f}x", f"{agreement[k]:.0%}", f"{accuracy[k]:.3f}")
    console.print(table)
    console.print(f"speedup_vs_naive={result['speedup_vs_naive']}, speedup_vs_lm_eval={result['speedup_vs_lm_eval']}, "
                  f"predictions_identical={identical}, max |Δ loglik| {diffs}")
    console.print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
