"""Log-likelihood scoring, raw and length-normalised, for the embedded teacher and student.

The Gemma-3 270M student answers one intent for almost every example zero-shot; a label prior of that kind can
come from the options' lengths (a longer option sums more negative log-probabilities). lm-evaluation-harness
reports both `acc` (argmax of the summed log-likelihood) and `acc_norm` (argmax of the log-likelihood divided by
the option's length in characters); this measures both, as macro-F1 and accuracy, for each model, zero-shot and
k-shot, on the same test examples. It reports; it changes no default.

    .venv/bin/python bench/scoring_norm.py --task bigbench:intent_recognition --limit 40 --shots 0,5

Writes bench/results/scoring_norm.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from _common import ROOT, log  # noqa: E402  (also sets the offline environment)

MODELS = {"teacher": "qwen2.5-coder-0.5b", "student": "gemma3-270m"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bigbench:intent_recognition")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scoring_norm.json"))
    args = ap.parse_args()

    from stillroom.backends.embedded import ensure_embedded
    from stillroom.backends.hf import HFBackend
    from stillroom.evaluate.metrics import classification_metrics
    from stillroom.evaluate.runner import evaluate
    from stillroom.config import TaskConfig
    from stillroom.route import select
    from stillroom.tasks.prompts import continuation
    from stillroom.ui import library_output_to

    # The same test sample and shots as `stillroom compare` with test_limit = --limit (the demo's 40 examples).
    sel = select(TaskConfig(spec=args.task, seed=args.seed), limit=args.limit)
    task, test = sel.task, sel.test
    rows = {}
    for role, spec in MODELS.items():
        with library_output_to(ROOT / "bench" / "results" / ".scoring_norm.log"):
            backend = HFBackend(str(ensure_embedded(spec)), device="cpu", dtype="float32")
        for k in (int(x) for x in args.shots.split(",")):
            log(f"{role} ({spec}), {k}-shot")
            res = evaluate(task, test, backend, shots=sel.shots(k), method="loglik", description=f"{role} {k}-shot")
            gold = [p["gold"] for p in res.predictions]
            raw = [p["pred"] for p in res.predictions]
            norm = []
            for ex, p in zip(test, res.predictions, strict=True):
                opts = task.options(ex)
                lens = [len(continuation(o)) for o in opts]
                norm.append(opts[max(range(len(opts)), key=lambda i: p["loglik"][i] / lens[i])])
            labels = list(task.labels)
            m_raw, m_norm = classification_metrics(gold, raw, labels), classification_metrics(gold, norm, labels)
            top = max(set(raw), key=raw.count)
            rows[f"{role} {k}-shot"] = {
                "model": spec, "shots": k, "n": len(test),
                "raw": {"macro_f1": round(m_raw["macro_f1"], 3), "accuracy": round(m_raw["accuracy"], 3),
                        "most_common_answer": top, "most_common_count": raw.count(top)},
                "norm": {"macro_f1": round(m_norm["macro_f1"], 3), "accuracy": round(m_norm["accuracy"], 3),
                         "most_common_answer": max(set(norm), key=norm.count),
                         "most_common_count": max(norm.count(x) for x in set(norm))},
            }
        del backend
        gc.collect()
    result = {"command": " ".join(["bench/scoring_norm.py", *sys.argv[1:]]), "task": args.task, "split": "test",
              "limit": args.limit, "seed": args.seed,
              "note": "raw: argmax of summed log-likelihood (lm-eval acc); norm: argmax of log-likelihood / option "
                      "length in characters (lm-eval acc_norm)", "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\n{'model':<18} {'F1 raw':>7} {'acc raw':>8} {'F1 norm':>8} {'acc norm':>9}  most common answer raw / norm")
    for name, r in rows.items():
        print(f"{name:<18} {r['raw']['macro_f1']:>7.3f} {r['raw']['accuracy']:>8.3f} {r['norm']['macro_f1']:>8.3f} "
              f"{r['norm']['accuracy']:>9.3f}  {r['raw']['most_common_answer']} x{r['raw']['most_common_count']} / "
              f"{r['norm']['most_common_answer']} x{r['norm']['most_common_count']}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
