"""Cross-tokenizer logit KD quality on the real pair: Qwen2.5-Coder-0.5B-Instruct teaches the embedded Gemma-3 270M,
against SeqKD (the same teacher's answers) and SFT on gold labels, at equal steps and data, on 200 test examples.

One `stillroom compare` run (resumable: a rerun reuses every finished route): routes zero-shot, seqkd, kd-logits
(cross-tokenizer ULD, chosen automatically) and sft-gold; the same 48 training examples and 16 optimizer steps of
batch 4 for every trained route; baseline kd-logits, so every other row carries its paired test against it
(paired bootstrap on macro-F1, McNemar on correctness) and 95% bootstrap intervals.

    .venv/bin/python bench/xtok_kd_quality.py --teacher hf:/tmp/i16/qwen-hf      # ~1 h on 2 shared CPU cores
    .venv/bin/python bench/xtok_kd_quality.py --teacher qwen2.5-coder-0.5b --run-dir /tmp/xtok-quality

Writes bench/results/xtok_kd_quality.json and prints a table. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT  # noqa: E402  (sets the offline environment, puts the repo on sys.path)


def study_config(teacher: str, test_limit: int = 200, train_limit: int = 48, steps: int = 16) -> dict:
    """The compare config of the study."""
    return {
        "task": {"spec": "bigbench:intent_recognition", "seed": 0},
        "teacher": {"spec": teacher}, "student": {"spec": "gemma3-270m"},
        "routes": ["zero-shot", "seqkd", "kd-logits", "sft-gold"],
        "eval_limit": test_limit, "train_limit": train_limit, "shots": 5, "baseline": "kd-logits",
        "budgets": {"seqkd": {"max_steps": steps, "batch_size": 4},
                    "kd-logits": {"max_steps": steps, "batch_size": 4, "top_k": 32},
                    "sft-gold": {"max_steps": steps, "batch_size": 4}},
    }


def main(argv=None) -> dict:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="qwen2.5-coder-0.5b")
    ap.add_argument("--test-limit", type=int, default=200)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--run-dir", default="/tmp/stillroom-bench-xtok-quality")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "xtok_kd_quality.json"))
    ap.add_argument("--summarize-only", action="store_true", help="only read <run-dir>/compare.json")
    args = ap.parse_args(argv)
    run = Path(args.run_dir)
    t0 = time.perf_counter()
    if not args.summarize_only:
        run.mkdir(parents=True, exist_ok=True)
        cfg_path = run.parent / f"{run.name}.yaml"
        cfg_path.write_text(yaml.safe_dump(study_config(args.teacher, args.test_limit, steps=args.steps)))
        subprocess.run([sys.executable, "-m", "stillroom.cli", "compare", str(cfg_path), "--run-dir", str(run)],
                       check=True)
    report = json.loads((run / "compare.json").read_text())
    keep = ("route", "status", "n", "macro_f1", "macro_f1_ci95", "accuracy", "accuracy_ci95", "invalid_rate",
            "build", "vs_baseline", "error", "reason")
    result = {
        "rows": [{k: r.get(k) for k in keep} for r in report["rows"]],
        "baseline": report.get("baseline"), "same_test_examples": report.get("same_test_examples"),
        "setup": {**study_config(args.teacher, args.test_limit, steps=args.steps),
                  "wall_seconds_this_invocation": round(time.perf_counter() - t0, 1),
                  "command": "python bench/xtok_kd_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])},
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'route':<12}{'macro-F1':>10}{'95% CI':>18}{'acc':>8}{'vs kd-logits':>14}{'p (boot)':>10}")
    for r in result["rows"]:
        if r["status"] != "ok":
            print(f"{r['route']:<12} {r['status']}: {r.get('error') or r.get('reason')}")
            continue
        ci = r["macro_f1_ci95"]
        vs = r.get("vs_baseline") or {}
        print(f"{r['route']:<12}{r['macro_f1']:>10.3f}{f'[{ci[0]:.3f}, {ci[1]:.3f}]':>18}{r['accuracy']:>8.3f}"
              f"{vs.get('diff', 0):>+14.3f}{vs.get('bootstrap_p', 1):>10.3f}")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
