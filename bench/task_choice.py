"""Which BIG-bench tasks show a gap between the embedded teacher and student: the compare study's second task was
chosen with this. For each candidate task, the embedded Gemma-3 270M base (student) zero-shot and 5-shot and the
embedded Qwen2.5-Coder-0.5B-Instruct (teacher) 5-shot, by log-likelihood, on the same 40 test examples (seed 0,
the compare's own selection). A task is worth studying where the teacher's 5-shot line is clearly above both of
the student's, on macro-F1 and on accuracy (a student that answers one label has a macro-F1 floor of about 0.33
on a two-label task, and its accuracy is the majority share).

    .venv/bin/python bench/task_choice.py --tasks presuppositions_as_nli,epistemic_reasoning,implicatures

Writes bench/results/task_choice.json (rows are kept across invocations: a rerun computes only the missing ones)
and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

from _common import ROOT, log, machine_load  # noqa: E402  (also sets the offline environment)

CANDIDATES = ("presuppositions_as_nli,epistemic_reasoning,implicatures,sports_understanding,"
              "logical_fallacy_detection")
PAIR = (("student", "gemma3-270m", (0, 5)), ("teacher", "qwen2.5-coder-0.5b", (5,)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=CANDIDATES, help="comma-separated BIG-bench task names")
    ap.add_argument("--limit", type=int, default=40, help="test examples per task")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "task_choice.json")
    args = ap.parse_args()

    from stillroom.backends.embedded import ensure_embedded
    from stillroom.backends.hf import HFBackend
    from stillroom.config import TaskConfig
    from stillroom.evaluate.runner import evaluate
    from stillroom.route import select
    from stillroom.runs import atomic_write_text
    from stillroom.ui import library_output_to

    before = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = before.get("rows", {})
    sels = {}
    for name in args.tasks.split(","):
        sel = select(TaskConfig(spec=f"bigbench:{name}", seed=0), limit=args.limit)
        sels[name] = sel
        log(f"{name}: labels {', '.join(sel.task.labels or ())}; {len(sel.test)} test examples")
    for role, spec, shots in PAIR:
        with library_output_to(Path(tempfile.gettempdir()) / "stillroom-task-choice.log"):
            backend = HFBackend(str(ensure_embedded(spec)), device="cpu", dtype="float32")
        for name, sel in sels.items():
            for k in shots:
                key = f"{name} | {role} {k}-shot"
                if key in rows:
                    continue
                t0 = time.perf_counter()
                res = evaluate(sel.task, sel.test, backend, shots=sel.shots(k), method="loglik", description=key,
                               timed=False)
                rows[key] = {"task": name, "model": spec, "role": role, "shots": k, "n": len(sel.test),
                             "macro_f1": round(res.metrics["macro_f1"], 3),
                             "accuracy": round(res.metrics["accuracy"], 3),
                             "seconds": round(time.perf_counter() - t0, 1)}
                log(f"{key}: macro-F1 {rows[key]['macro_f1']:.3f}, accuracy {rows[key]['accuracy']:.3f}")
                atomic_write_text(args.out, json.dumps({"command": "bench/task_choice.py --tasks " + args.tasks,
                                                        "limit": args.limit, "load": machine_load(), "rows": rows},
                                                       indent=2) + "\n")
        del backend
        gc.collect()
    print(f"\n{'task':<28} {'student 0-shot':>15} {'student 5-shot':>15} {'teacher 5-shot':>15}   (macro-F1 / accuracy)")
    for name in sorted({r["task"] for r in rows.values()}):
        cells = []
        for role, k in (("student", 0), ("student", 5), ("teacher", 5)):
            r = rows.get(f"{name} | {role} {k}-shot")
            cells.append(f"{r['macro_f1']:.3f} / {r['accuracy']:.3f}" if r else "-")
        print(f"{name:<28} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
