"""Self-data acceptance: the share of rewrites conditional selection keeps, with the method's template alone and
with the worked demonstrations (stillroom.prune.selfdistill), on a task's training split.

    python bench/selfdata_acceptance.py                # bigbench:intent_recognition, 48 examples, seed 0
    python bench/selfdata_acceptance.py --n 64 --variants demos

The teacher is the embedded base model (greedy). Generations go through each variant's run cache under
--work, so a rerun costs nothing. Writes bench/results/selfdata_acceptance.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import ROOT, log

VARIANTS = ("template", "demos")
"""'template': the method's rewrite prompt alone; 'demos': the same with the worked demonstrations."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="bigbench:intent_recognition")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--n", type=int, default=48, help="training examples rewritten (deterministic sample)")
    ap.add_argument("--seed", type=int, default=0, help="split and sampling seed")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--work", type=Path, default=None,
                    help="run folders (default: <stillroom cache>/bench/selfdata_acceptance)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "selfdata_acceptance.json")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    import torch

    torch.set_num_threads(args.threads)
    from stillroom.backends import load_backend
    from stillroom.prune.selfdistill import DEMONSTRATIONS, run_selfdistill
    from stillroom.runs import cache_root

    work = args.work or cache_root() / "bench" / "selfdata_acceptance"
    backend = None
    results = {}
    for v in variants:
        run_dir = work / f"{v}-n{args.n}-seed{args.seed}-t{args.max_new_tokens}"
        log(f"{v}: rewriting {args.n} training examples into {run_dir}")
        if backend is None:
            backend = load_backend(args.model)
        t0 = time.perf_counter()
        s = run_selfdistill(args.model, args.task, run_dir, limit=args.n, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, backend=backend,
                            demonstrations=DEMONSTRATIONS if v == "demos" else ())
        rows = [json.loads(x) for x in (run_dir / "selfdistill.jsonl").read_text().splitlines()]
        results[v] = {
            "n": s["examples"], "kept": s["kept"], "acceptance": s["acceptance"], "reasons": s["reasons"],
            "new_teacher_calls": s["backend_calls"], "seconds": round(time.perf_counter() - t0, 1),
            "samples": [{k: r[k] for k in ("id", "label", "rewrite", "selected", "reason")} for r in rows[:4]],
        }
    out = {"task": args.task, "model": args.model, "split": "train", "seed": args.seed, "n": args.n,
           "max_new_tokens": args.max_new_tokens, "decoding": "greedy", "variants": results,
           "command": f"python bench/selfdata_acceptance.py --task {args.task} --n {args.n} --seed {args.seed} "
                      f"--max-new-tokens {args.max_new_tokens} --variants {','.join(variants)}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"\n{args.task}, {args.model}, train split seed {args.seed}, n={args.n}, {args.max_new_tokens} new tokens")
    print(f"{'variant':<10} {'kept':>9} {'accept':>7}  reasons")
    for v, r in results.items():
        reasons = ", ".join(f"{k} {c}" for k, c in sorted(r["reasons"].items(), key=lambda kv: -kv[1]))
        print(f"{v:<10} {r['kept']:>4}/{r['n']:<4} {r['acceptance']:>7.1%}  {reasons}")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
