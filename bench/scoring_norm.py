"""Log-likelihood scoring, raw and length-normalised, for the embedded teacher and student.

The Gemma-3 270M student answers one intent for almost every example zero-shot; a label prior of that kind can
come from the options' lengths (a longer option sums more negative log-probabilities). lm-evaluation-harness
reports both `acc` (argmax of the summed log-likelihood) and `acc_norm` (argmax of the log-likelihood divided by
the option's length in characters); this measures both, as macro-F1 and accuracy, for each model, zero-shot and
k-shot, on the same test examples. A third reading is contextual calibration (Zhao et al. 2021, "Calibrate
Before Use"): each option's log-likelihood minus its log-likelihood for a content-free input ("N/A") under the
same prompt and shots, which removes the prior the prompt itself puts on each label. It reports; it changes no
default.

    .venv/bin/python bench/scoring_norm.py --task bigbench:intent_recognition --limit 40 --shots 0,5
    .venv/bin/python bench/scoring_norm.py --from-compare runs/compare-...   # no model run: a compare's scores

Writes bench/results/scoring_norm.json and prints a table. `--from-compare` reads the log-likelihoods a finished
`stillroom compare` recorded per option (its loglik routes' predictions.jsonl) instead of scoring again.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from _common import ROOT, log  # noqa: E402  (also sets the offline environment)

MODELS = {"teacher": "qwen2.5-coder-0.5b", "student": "gemma3-270m"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bigbench:intent_recognition")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--models", default="teacher,student", help="Which of the embedded pair to score.")
    ap.add_argument("--from-compare", default=None, help="A compare folder: use its recorded scores.")
    ap.add_argument("--append", action="store_true", help="Add the rows to those already in --out.")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scoring_norm.json"))
    args = ap.parse_args()
    if args.from_compare:
        return from_compare(args)

    import tempfile

    from stillroom.backends.embedded import ensure_embedded
    from stillroom.backends.hf import HFBackend
    from stillroom.config import TaskConfig
    from stillroom.evaluate.runner import evaluate
    from stillroom.route import select
    from stillroom.ui import library_output_to

    # The same test sample and shots as `stillroom compare` with test_limit = --limit (the demo's 40 examples).
    sel = select(TaskConfig(spec=args.task, seed=args.seed), limit=args.limit)
    task, test = sel.task, sel.test
    rows = {}
    for role, spec in ((r, MODELS[r]) for r in args.models.split(",")):
        with library_output_to(Path(tempfile.gettempdir()) / "stillroom-scoring-norm.log"):
            backend = HFBackend(str(ensure_embedded(spec)), device="cpu", dtype="float32")
        for k in (int(x) for x in args.shots.split(",")):
            log(f"{role} ({spec}), {k}-shot")
            res = evaluate(task, test, backend, shots=sel.shots(k), method="loglik", description=f"{role} {k}-shot")
            # The content-free input gets the same prompt, shots and options as every test example.
            free = evaluate(task, [replace(test[0], id="content-free", input="N/A")], backend, shots=sel.shots(k),
                            method="loglik", description=f"{role} {k}-shot, content-free", timed=False)
            rows[f"{role} {k}-shot"] = {"model": spec, "shots": k,
                                        **figures(task, test, res.predictions, free.predictions[0]["loglik"])}
        del backend
        gc.collect()
    write_and_print(args, rows)


def figures(task, examples, preds: list[dict], free: list[float] | None = None) -> dict:
    """Raw and length-normalised macro-F1 and accuracy from per-option log-likelihoods (`loglik` of each record,
    in the order of `task.options(ex)`); with `free` (the options' log-likelihoods for a content-free input),
    calibrated ones too (classification tasks, where every example has the same options)."""
    from stillroom.evaluate.metrics import classification_metrics
    from stillroom.tasks.prompts import continuation

    by_id = {ex.id: ex for ex in examples}
    gold, raw, norm, calib = [], [], [], []
    for p in preds:
        opts = task.options(by_id[p["id"]])
        lens = [len(continuation(o)) for o in opts]
        gold.append(p["gold"])
        raw.append(opts[max(range(len(opts)), key=lambda i: p["loglik"][i])])
        norm.append(opts[max(range(len(opts)), key=lambda i: p["loglik"][i] / lens[i])])
        if free is not None:
            calib.append(opts[max(range(len(opts)), key=lambda i: p["loglik"][i] - free[i])])
    labels = list(task.labels)
    out = {"n": len(preds)}
    for name, pred in (("raw", raw), ("norm", norm), ("calib", calib)):
        if not pred:
            continue
        m = classification_metrics(gold, pred, labels)
        top = max(set(pred), key=pred.count)
        out[name] = {"macro_f1": round(m["macro_f1"], 3), "accuracy": round(m["accuracy"], 3),
                     "most_common_answer": top, "most_common_count": pred.count(top)}
    return out


def from_compare(args) -> None:
    """The figures from a finished compare's recorded scores (its loglik routes), written and printed."""
    import yaml

    from stillroom.config import TaskConfig
    from stillroom.route import select

    folder = Path(args.from_compare)
    # Only the task is needed (its options per example): read just that block of the saved config.
    task_cfg = TaskConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))["task"])
    sel = select(task_cfg)
    rows = {}
    for route_dir in sorted((folder / "routes").iterdir()):
        path = route_dir / "predictions.jsonl"
        if not path.exists():
            continue
        preds = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        preds = [p for p in preds if isinstance(p.get("loglik"), list)]
        conds = sorted({p.get("condition") for p in preds})
        for cond in conds:
            mine = [p for p in preds if p.get("condition") == cond]
            if mine:
                rows[f"{route_dir.name}: {cond}"] = figures(sel.task, sel.splits.test + sel.splits.train + sel.splits.val, mine)
    write_and_print(args, rows, source=str(folder))


def write_and_print(args, rows: dict, source: str | None = None) -> None:
    commands = [" ".join(["bench/scoring_norm.py", *sys.argv[1:]])]
    if args.append and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            before = json.load(f)
        rows = {**before.get("rows", {}), **rows}
        source = source or before.get("from_compare")
        commands = before.get("commands", [before.get("command")]) + commands
    result = {"commands": commands, "task": args.task, "split": "test",
              "limit": args.limit, "seed": args.seed, "from_compare": source,
              "note": "raw: argmax of summed log-likelihood (lm-eval acc); norm: argmax of log-likelihood / option "
                      "length in characters (lm-eval acc_norm); calib: argmax of log-likelihood minus the option's "
                      "log-likelihood for the content-free input 'N/A' under the same prompt (contextual calibration)", "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\n{'condition':<44} {'F1 raw':>7} {'acc raw':>8} {'F1 norm':>8} {'acc norm':>9} {'F1 calib':>9}"
          "  most common answer raw / norm / calib")
    for name, r in rows.items():
        c = r.get("calib")
        print(f"{name:<44} {r['raw']['macro_f1']:>7.3f} {r['raw']['accuracy']:>8.3f} {r['norm']['macro_f1']:>8.3f} "
              f"{r['norm']['accuracy']:>9.3f} {c['macro_f1'] if c else float('nan'):>9.3f}  "
              f"{r['raw']['most_common_answer']} x{r['raw']['most_common_count']} / "
              f"{r['norm']['most_common_answer']} x{r['norm']['most_common_count']}"
              + (f" / {c['most_common_answer']} x{c['most_common_count']}" if c else ""))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
