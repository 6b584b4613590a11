"""Evaluation speed: Stillroom's HFBackend with and without its shared-prefix store, the evaluator before the
store, and lm-evaluation-harness, on the same requests with the same model (the embedded Gemma-3 270M, float32, CPU).

Three measurements, each method on the SAME requests, interleaved in slices so load changes on a shared machine
hit all methods alike:

1. **k-shot scoring** (BIG-bench `sports_understanding`, k-shot prompts from `render_prompt`, first k training
   examples as shots), in the evaluator's calling pattern (one `score` call per 8 requests):
   * `stillroom`            - `HFBackend.score`, prefix store on (each shared prefix forward-passed once);
   * `stillroom_no_prefix`  - the same backend with `prefix_cache=False`: nothing shared across requests;
   * `stillroom_before`     - `HFBackend` as of `--baseline-commit` (the evaluator before the prefix store:
                              shared prefix within a call, one remembered prefix across calls);
   * `lm_eval_loglikelihood`- lm-eval's `HFLM.loglikelihood` over the same (context, continuation) pairs;
   * `naive` (`--naive`)    - one full forward per (prompt, choice); `lm_eval` (`--simple-evaluate`) -
                              `simple_evaluate` on a local YAML task over the same examples.
2. **PLD validation loop**: the same scoring under a ~1,000-token rulebook as system prompt, as PLD's conflict
   loop and ablation run it: validation with the rulebook, leave-one-rule-out ablations, the final comparison
   (`stillroom.evaluate.runner.evaluate`, method loglik), with and without the prefix store (and as before).
3. **k-shot generation** (`--generate N`): greedy `generate_many`, with and without the prefix store; texts must
   be identical.

For each: examples/s, token positions forward-passed per example against distinct tokens per example (the size
of the token trie of everything scored or prompted: the physical limit, ratio 1.0), peak resident memory above
the start of the method (RSS, sampled), agreement of predictions and max |delta log-likelihood|.

    .venv/bin/python bench/eval_speed.py --examples 24 --threads 1

Writes bench/results/eval_speed.json and prints tables. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from _common import ROOT, machine_load  # noqa: E402  (also sets the offline environment)

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


def load_baseline_backend(commit: str):
    """HFBackend class as of `commit` (stillroom/backends/hf.py from git), importable next to today's package."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:stillroom/backends/hf.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="stillroom-baseline-")) / "stillroom_hf_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("stillroom_hf_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.HFBackend


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms in a thread (tensors included).

    Freed heap is handed back to the system first (glibc `malloc_trim`), so what an earlier method freed but
    the allocator kept does not hide this method's peak.
    """

    def __enter__(self):
        import gc

        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta_mb = (self.peak - self.start) / 2**20


def trie_size(sequences) -> int:
    """Distinct token prefixes among `sequences`: the forward positions a perfect prefix-sharing evaluator needs."""
    root: dict = {}
    n = 0
    for seq in sequences:
        node = root
        for t in seq:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                n += 1
            node = nxt
    return n


def scored_rows(backend, requests):
    """The token rows every (context, continuation) pair needs forward-passed (HFLM's input, left-truncated)."""
    rows = []
    for r in requests:
        for c in r.continuations:
            ctx, cont = backend.encode_pair(r.context, c)
            rows.append((ctx + cont)[-(backend.max_length + 1):][:-1])
    return rows


def synthetic_rulebook(target_tokens: int, count_tokens) -> list[str]:
    """Rules in the style PLD synthesises for sports_understanding, until the rulebook has ~target_tokens."""
    sports = {
        "American football": ["threw a touchdown pass", "kicked a field goal", "was sacked", "caught the screen pass"],
        "basketball": ["hit a three-pointer", "dunked", "committed a travelling violation", "made a free throw"],
        "soccer": ["scored a penalty kick", "headed the ball in", "was offside", "took a corner kick"],
        "baseball": ["hit a home run", "threw a fastball", "stole second base", "was called out on strikes"],
        "ice hockey": ["scored a power-play goal", "took a slapshot", "was sent to the penalty box", "iced the puck"],
        "tennis": ["served an ace", "hit a backhand winner", "double faulted", "won the tiebreak"],
        "golf": ["sank a birdie putt", "hit the green in regulation", "shot an eagle", "drove into the rough"],
    }
    names = list(sports)
    rules: list[str] = []
    i = 0
    while sum(count_tokens(r) + 3 for r in rules) < target_tokens:
        sport, other = names[i % len(names)], names[(i + 3) % len(names)]
        acts = sports[sport]
        if i // len(names) % 2 == 0:
            rules.append(f"A statement about a well-known {sport} player is plausible when the action belongs to "
                         f"{sport} (for example: {', '.join(acts)}); an action from {other}, such as "
                         f"'{sports[other][i % 4]}', makes it implausible.")
        else:
            rules.append(f"Check the event as well as the action: '{acts[i % 4]}' fits a {sport} match, not a "
                         f"{other} one; a {sport} athlete named together with a {other} event or trophy is "
                         "implausible even if the action alone would fit.")
        i += 1
    return rules


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bigbench:sports_understanding")
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="Stillroom HFBackend batch size (requests per chunk)")
    ap.add_argument("--lm-eval-batch-size", type=int, default=8, help="lm-eval HFLM batch size")
    ap.add_argument("--model", default=None, help="transformers folder (default: the embedded Gemma-3 270M)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared CPU, 2+ threads spin-wait on each other in small ops)")
    ap.add_argument("--slices", type=int, default=3, help="interleave the methods over this many slices")
    ap.add_argument("--baseline-commit", default="b36f5df",
                    help="git commit whose HFBackend is 'stillroom_before' (the evaluator before the prefix store)")
    ap.add_argument("--naive", action="store_true", help="also time one full forward per (prompt, choice)")
    ap.add_argument("--simple-evaluate", action="store_true", help="also time lm_eval.simple_evaluate")
    ap.add_argument("--skip-lm-eval", action="store_true")
    ap.add_argument("--pld-examples", type=int, default=8, help="validation examples in the PLD loop (0: skip)")
    ap.add_argument("--rulebook-tokens", type=int, default=1000, help="size of the PLD rulebook (system prompt)")
    ap.add_argument("--ablations", type=int, default=2, help="leave-one-rule-out evaluations in the PLD loop")
    ap.add_argument("--generate", type=int, default=8, help="k-shot prompts for the generation check (0: skip)")
    ap.add_argument("--gen-tokens", type=int, default=4, help="new tokens per generation")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_speed.json"))
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from stillroom.backends.base import GenerationParams, ScoreRequest
    from stillroom.backends.embedded import ensure_embedded_gemma
    from stillroom.backends.hf import HFBackend
    from stillroom.evaluate.runner import evaluate
    from stillroom.pld.rulebook import Rule, Rulebook
    from stillroom.tasks.prompts import continuation, render_chat, render_prompt

    console = Console(width=180)
    torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else ensure_embedded_gemma()
    task, examples, prompts, options, golds = load_examples(args.task, args.examples, args.shots, args.seed)
    requests = [ScoreRequest(p, tuple(continuation(o) for o in opts)) for p, opts in zip(prompts, options, strict=True)]
    n = len(requests)
    load_start, load_snapshot = os.getloadavg()[0], machine_load()
    console.print(f"[bold]{args.task}[/]: {n} examples, {args.shots}-shot, model {folder}, "
                  f"{torch.get_num_threads()} torch threads, load avg {load_start:.2f} on {os.cpu_count()} CPUs")

    on = HFBackend(str(folder), device="cpu", dtype="float32", batch_size=args.batch_size, prefix_cache=True)
    off = HFBackend.from_objects(on.hf_model, on.tokenizer, name="no-prefix", batch_size=args.batch_size,
                                 prefix_cache=False)
    before = load_baseline_backend(args.baseline_commit).from_objects(on.hf_model, on.tokenizer, name="before",
                                                                      batch_size=args.batch_size)
    ntok = [len(on.tok_encode(p)) for p in prompts]
    console.print(f"prompt tokens: mean {sum(ntok) / n:.0f}, max {max(ntok)}; choices per example: "
                  f"{sum(len(o) for o in options) / n:.1f}")

    def quiet(fn):
        """The baseline passes the deprecated `past_key_values`; keep its warning out of the output."""
        def run(*a):
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    return fn(*a)
            finally:
                hf_logging.set_verbosity(level)
        return run

    # Warm-up (weights are memory-mapped: the first forwards page them in) on prompts that are not measured.
    warm = [ScoreRequest(p.replace("Statement:", "Claim:").replace("Input:", "Claim:"), r) for p, r in
            ((requests[0].context, requests[0].continuations), (requests[-1].context, requests[-1].continuations))]
    on.score(warm)
    off.score(warm)
    quiet(before.score)(warm)
    hflm = None
    if not args.skip_lm_eval:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        hflm = HFLM(pretrained=on.hf_model, tokenizer=on.tokenizer, batch_size=args.lm_eval_batch_size)
        run_hflm_loglikelihood(hflm, warm[:1])
    on.clear_prefix_cache()
    before._memo = None

    def in_calls_of_8(backend):
        def run(rs):
            res = []
            for i in range(0, len(rs), 8):
                res.extend(backend.score(rs[i : i + 8]))
            return res
        return run

    def positions(backend):
        return (lambda: backend.tokens_forwarded) if hasattr(backend, "tokens_forwarded") else None

    rows_all = scored_rows(on, requests)
    runners = [
        ("stillroom", in_calls_of_8(on), positions(on), "HFBackend.score, prefix store on, one call per 8 requests"),
        ("stillroom_no_prefix", in_calls_of_8(off), positions(off),
         "HFBackend.score, prefix_cache=False, one call per 8 requests"),
        ("stillroom_before", quiet(in_calls_of_8(before)), None,
         f"HFBackend at {args.baseline_commit} (before the prefix store), one call per 8 requests"),
    ]
    if hflm is not None:
        runners.append(("lm_eval_loglikelihood", lambda rs: run_hflm_loglikelihood(hflm, rs), None,
                        "lm-eval HFLM.loglikelihood over the same (context, continuation) pairs"))
    if args.naive:
        runners.append(("naive", lambda rs: run_naive(on, rs), None, "one full forward per (prompt, choice)"))

    def measure(section: dict, key: str, fn, counter, what: str, *a):
        m = section.setdefault(key, {"seconds": 0.0, "cpu_seconds": 0.0, "positions_forwarded": 0,
                                     "peak_rss_above_start_mb": 0.0, "what": what})
        c0 = counter() if counter else 0
        w0, p0 = time.perf_counter(), time.process_time()
        with PeakRSS() as mem:
            out = fn(*a)
        m["seconds"] += time.perf_counter() - w0
        m["cpu_seconds"] += time.process_time() - p0
        m["peak_rss_above_start_mb"] = max(m["peak_rss_above_start_mb"], mem.delta_mb)
        if counter:
            m["positions_forwarded"] += counter() - c0
        return out

    # 1. k-shot scoring, interleaved slices (rotating order).
    scoring: dict[str, dict] = {}
    scores: dict[str, list[list[float]]] = {}
    bounds = [round(i * n / args.slices) for i in range(args.slices + 1)]
    for si in range(args.slices):
        part = requests[bounds[si] : bounds[si + 1]]
        if not part:
            continue
        order = runners[si % len(runners):] + runners[: si % len(runners)]
        for key, fn, counter, what in order:
            console.print(f"scoring slice {si + 1}/{args.slices} ({len(part)} examples): {key} ...")
            scores.setdefault(key, []).extend(measure(scoring, key, fn, counter, what, part))
    for key in ("lm_eval_loglikelihood", "naive"):
        if key in scoring:  # no padding counted: a lower bound on what they forward
            scoring[key]["positions_forwarded"] = sum(len(r) for r in rows_all)
    if args.simple_evaluate and hflm is not None:
        console.print(f"lm-evaluation-harness {lm_eval.__version__}: simple_evaluate on a local YAML task ...")
        with tempfile.TemporaryDirectory(prefix="stillroom-bench-") as tmp:
            s_, _, _ = measure(scoring, "lm_eval_simple_evaluate", lambda: run_lm_eval(
                hflm, prompts, options, golds, Path(tmp), args.lm_eval_batch_size), None,
                "lm_eval.simple_evaluate on a local YAML task (incl. task and dataset setup)")
        scores["lm_eval_simple_evaluate"] = s_
    distinct = trie_size(rows_all)
    scoring_result = summarise_section(scoring, scores, n, distinct, golds)
    sr = scoring_result["methods"]
    for key, ref in (("vs_no_prefix", "stillroom_no_prefix"), ("vs_before", "stillroom_before"),
                     ("vs_lm_eval", "lm_eval_loglikelihood"), ("vs_naive", "naive")):
        if ref in sr:
            scoring_result[f"speedup_{key}"] = sr[ref]["seconds"] / sr["stillroom"]["seconds"]

    # 2. PLD validation loop under a ~1,000-token rulebook.
    pld_result = None
    if args.pld_examples > 0:
        splits = task.splits(seed=args.seed)
        val = (splits.val + splits.test[args.examples:])[: args.pld_examples]
        texts = synthetic_rulebook(args.rulebook_tokens, on.count_tokens)
        full = Rulebook(task=args.task, rules=[Rule(id=f"r{i + 1}", text=t) for i, t in enumerate(texts)])
        step = max(1, len(texts) // (args.ablations + 1))
        rounds = [("validate", full)]
        for j in range(args.ablations):
            drop = min(len(texts) - 1, (j + 1) * step)
            rounds.append((f"ablate r{drop + 1}", Rulebook(task=args.task, rules=[r for k, r in enumerate(full.rules)
                                                                                   if k != drop])))
        rounds.append(("final", full))
        sp_tokens = len(on.tok_encode(full.system_prompt()))
        console.print(f"PLD loop: {len(val)} validation examples, rulebook of {len(texts)} rules, {sp_tokens} tokens; "
                      f"rounds: {', '.join(r for r, _ in rounds)}")
        pld: dict[str, dict] = {}
        pld_scores: dict[str, list[list[float]]] = {}
        pld_methods = [("stillroom", on, positions(on), "evaluate(..., method='loglik'), prefix store on"),
                       ("stillroom_no_prefix", off, positions(off), "the same, prefix_cache=False"),
                       ("stillroom_before", before, None, f"the same with HFBackend at {args.baseline_commit}")]
        on.clear_prefix_cache()
        before._memo = None
        pld_rows = []
        for ri, (name, rb) in enumerate(rounds):
            sp = rb.system_prompt()
            pld_rows += scored_rows(on, [ScoreRequest(render_prompt(task, ex, (), sp),
                                                      tuple(continuation(o) for o in task.options(ex))) for ex in val])
            order = pld_methods[ri % 3:] + pld_methods[: ri % 3]
            for key, backend, counter, what in order:
                console.print(f"PLD round {ri + 1}/{len(rounds)} ({name}): {key} ...")
                def fn(b=backend, sp=sp, name=name):
                    # timed=False as PLD's validation passes call it (route.py's validate): the latency sample
                    # (issue 19) re-scores with the prefix store cleared and off, which PLD's loop never pays.
                    return evaluate(task, val, b, system_prompt=sp, method="loglik", description=name, timed=False)

                res = measure(pld, key, quiet(fn) if key == "stillroom_before" else fn, counter, what)
                pld_scores.setdefault(key, []).extend(p["loglik"] for p in res.predictions)
        n_pld = len(val) * len(rounds)
        pld_gold = [options_index(task, ex) for _ in rounds for ex in val]
        pld_result = summarise_section(pld, pld_scores, n_pld, trie_size(pld_rows), pld_gold)
        pld_result.update(rounds=[r for r, _ in rounds], validation_examples=len(val), rulebook_rules=len(texts),
                          rulebook_tokens=sp_tokens)
        pm = pld_result["methods"]
        pld_result["speedup_vs_no_prefix"] = pm["stillroom_no_prefix"]["seconds"] / pm["stillroom"]["seconds"]
        pld_result["speedup_vs_before"] = pm["stillroom_before"]["seconds"] / pm["stillroom"]["seconds"]

    # 3. k-shot greedy generation, with and without the prefix store.
    gen_result = None
    if args.generate > 0:
        shots = task.splits(seed=args.seed).train[: args.shots]
        chats = [render_chat(task, ex, shots) for ex in examples[: args.generate]]
        params = GenerationParams(max_tokens=args.gen_tokens, temperature=0.0)
        gen: dict[str, dict] = {}
        texts_by: dict[str, list] = {}
        on.clear_prefix_cache()
        for key, backend in (("stillroom_no_prefix", off), ("stillroom", on)):
            console.print(f"generation ({len(chats)} prompts, {args.gen_tokens} new tokens): {key} ...")
            texts_by[key] = measure(gen, key, lambda b=backend: b.generate_many(chats, params), positions(backend),
                                    f"generate_many, greedy, prefix store {'on' if backend.prefix_cache else 'off'}")
        prompt_ids = [on._prompt_ids(c) for c in chats]
        distinct_gen = trie_size(prompt_ids) + sum(max(0, g.usage.output_tokens - 1) for g in texts_by["stillroom"])
        for m in gen.values():
            m["examples_per_s"] = len(chats) / m["seconds"]
            m["positions_forwarded_per_example"] = m["positions_forwarded"] / len(chats)
            m["forwarded_over_distinct"] = m["positions_forwarded"] / distinct_gen
        gen_result = {
            "prompts": len(chats), "new_tokens": args.gen_tokens, "methods": gen,
            "distinct_tokens_per_example": distinct_gen / len(chats),
            "texts_identical": [g.text for g in texts_by["stillroom"]] == [g.text for g in texts_by["stillroom_no_prefix"]],
            "speedup_vs_no_prefix": gen["stillroom_no_prefix"]["seconds"] / gen["stillroom"]["seconds"],
        }

    result = {
        "task": args.task, "examples": n, "shots": args.shots, "seed": args.seed, "device": "cpu", "dtype": "float32",
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg_1m_at_start": load_start, "load_avg_1m_at_end": os.getloadavg()[0],
        "load": {"start": load_snapshot, "end": machine_load()},
        "command": "python bench/eval_speed.py " + " ".join(sys.argv[1:]),
        "note": "shared CPU (other jobs running; see load averages); methods interleaved in slices/rounds",
        "machine": platform.platform(), "model": str(folder), "prompt_tokens_mean": sum(ntok) / n,
        "baseline_commit": args.baseline_commit,
        "lm_eval_version": lm_eval.__version__ if hflm is not None else None,
        "scoring": scoring_result, "pld_validation_loop": pld_result, "generation": gen_result,
    }
    result["targets"] = {
        "scoring_3x_before": scoring_result.get("speedup_vs_before", 0) >= 3,
        "scoring_3x_no_prefix": scoring_result.get("speedup_vs_no_prefix", 0) >= 3,
        "scoring_30x_lm_eval": scoring_result.get("speedup_vs_lm_eval", 0) >= 30,
        "pld_3x_no_prefix": bool(pld_result and pld_result["speedup_vs_no_prefix"] >= 3),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    def show(title, section, ref="stillroom"):
        table = Table(title=title)
        for col in ("method", "seconds", "examples/s", "speed-up of stillroom", "positions/example",
                    "over distinct", "peak RSS MB", "agree", "max |d ll|"):
            table.add_column(col, justify="left" if col == "method" else "right")
        st = section["methods"][ref]["seconds"]

        def fmt(x, spec):
            return "-" if x is None else format(x, spec)

        for k, m in section["methods"].items():
            table.add_row(k, f"{m['seconds']:.1f}", f"{m['examples_per_s']:.2f}", f"{m['seconds'] / st:.1f}x",
                          fmt(m["positions_forwarded_per_example"], ".0f"), fmt(m["forwarded_over_distinct"], ".2f"),
                          f"{m['peak_rss_above_start_mb']:.0f}", f"{m.get('agreement', 1.0):.0%}",
                          f"{m.get('max_abs_loglik_diff', 0.0):.1e}")
        console.print(table)
        console.print(f"distinct tokens per example (the limit): {section['distinct_tokens_per_example']:.1f}")

    show(f"{args.task}: {n} examples, {args.shots}-shot scoring, Gemma-3 270M float32, CPU "
         f"({torch.get_num_threads()} thread)", scoring_result)
    if pld_result:
        show(f"PLD validation loop: {pld_result['validation_examples']} examples x {len(pld_result['rounds'])} rounds, "
             f"{pld_result['rulebook_tokens']}-token rulebook", pld_result)
    if gen_result:
        show(f"{args.shots}-shot greedy generation, {gen_result['prompts']} prompts x {args.gen_tokens} tokens "
             f"(texts identical: {gen_result['texts_identical']})", gen_result)
    console.print(f"targets: {result['targets']}")
    console.print(f"wrote {out}")
    return result


def options_index(task, ex) -> int:
    return list(task.options(ex)).index(str(ex.label))


def summarise_section(methods: dict, scores: dict, n: int, distinct: int, golds: list[int]) -> dict:
    """Per-method examples/s, positions per example, ratio to the distinct tokens, agreement with stillroom."""
    ref = scores["stillroom"]
    preds = {k: [argmax(r) for r in v] for k, v in scores.items()}
    for k, m in methods.items():
        m["examples_per_s"] = n / m["seconds"]
        m["positions_forwarded_per_example"] = m["positions_forwarded"] / n if m["positions_forwarded"] else None
        m["forwarded_over_distinct"] = m["positions_forwarded"] / distinct if m["positions_forwarded"] else None
        m["agreement"] = sum(p == q for p, q in zip(preds["stillroom"], preds[k], strict=True)) / n
        m["max_abs_loglik_diff"] = max(abs(x - y) for ra, rb in zip(ref, scores[k], strict=True)
                                       for x, y in zip(ra, rb, strict=True))
        m["accuracy"] = sum(p == g for p, g in zip(preds[k], golds, strict=True)) / n
    return {
        "methods": methods,
        "distinct_tokens_per_example": distinct / n,
        "predictions_identical": all(v == preds["stillroom"] for v in preds.values()),
    }


if __name__ == "__main__":
    main()
