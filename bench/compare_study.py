"""The compare study: every route of `stillroom compare` on one task, the same test examples (at least 200), one
teacher and one student, with 95% intervals and paired tests against zero-shot.

Teacher: the embedded Gemma-3 270M. Student: the same model with layers 14:18 removed (14 of 18 layers, as in
bench/kd_quality.py), so there is a real gap for the routes to close. Every route runs into its own folder under
the work folder and is resumable: an interrupted study continues where it stopped (`stillroom compare`'s own
resume), and a rerun with nothing changed computes nothing.

    python bench/compare_study.py                      # all routes, 200 test examples
    python bench/compare_study.py --test 24 --routes zero-shot,k-shot   # a quick look

Writes bench/results/compare_study.json (the compare summary, command, machine) and the report's two plots as
bench/results/compare_study_quality_latency.png and ..._build_cost.png; prints the table.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _common import ROOT, log, student_folder  # noqa: E402  (also sets the offline environment and puts the repo on sys.path)


def study_config(args, student: Path):
    """The compare config this bench runs, built from its arguments (test_configs validates it and plans every
    route, so a renamed field cannot silently break the bench)."""
    from stillroom.compare.config import CompareConfig

    return CompareConfig.model_validate({
        "task": {"spec": args.task, "seed": 0}, "teacher": {"spec": "gemma3-270m"}, "student": {"spec": f"hf:{student}"},
        "routes": args.routes.split(",") if args.routes else None, "eval_limit": args.test, "train_limit": args.train,
        "val_limit": 24, "shots": args.shots,
        "budgets": {"seqkd": {"max_steps": 16}, "cot-data": {"max_steps": 16}, "kd-logits": {"max_steps": 16},
                    "gad": {"adversarial_steps": 8, "warmup_steps": 8}, "prune-heal-sft": {"max_steps": 16},
                    "prune-heal-self-data": {"max_steps": 16}, "sft-gold": {"max_steps": 16},
                    "pld": {"teacher_max_tokens": 64}},
    })


def parse_args(argv=None):
    """The bench's arguments."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bigbench:intent_recognition")
    ap.add_argument("--test", type=int, default=200, help="test examples (the same for every route)")
    ap.add_argument("--train", type=int, default=48, help="training pool (the same for every route)")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--drop", default="14:18", help="layers removed from the teacher to make the student")
    ap.add_argument("--routes", default=None, help="comma-separated routes (default: all)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--reuse-only", action="store_true",
                    help="write the results of the routes already finished in the work folder; list the others as "
                         "not finished (nothing is computed)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare_study.json")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()

    import torch

    from stillroom.compare.cli import print_compare
    from stillroom.compare.run import run_compare
    from stillroom.runs import atomic_write_text, cache_root

    work = args.work or cache_root() / "bench" / "compare_study"
    student = student_folder(args.drop)
    cfg = study_config(args, student)
    log(f"compare study: {args.task}, teacher gemma3-270m, student {student.name}, {args.test} test examples -> {work}")
    t0 = time.perf_counter()
    plans = None
    if args.reuse_only:
        from stillroom.compare.routes import RoutePlan, plan_routes
        from stillroom.route import read_result

        plans = [p if read_result(work / "routes" / p.name) is not None else
                 RoutePlan(p.name, None, None, "not finished yet: rerun bench/compare_study.py to continue", p.reference,
                           skip_status="not run")
                 for p in plan_routes(cfg)]
    summary = run_compare(cfg, work, plans=plans)
    seconds = time.perf_counter() - t0
    print_compare(summary, work)
    rows = [{k: v for k, v in r.items() if k not in ("examples", "predictions")} for r in summary["rows"]]
    result = {
        "command": "python bench/compare_study.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if v is not None and k not in ("out", "work")),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "cuda": torch.cuda.is_available()},
        "wall_seconds_this_invocation": round(seconds, 1),
        "note": "Latency and build seconds were measured on a shared 2-core CPU machine: compare them within this "
                "study only. Routes reused from an earlier invocation keep the seconds of their first build.",
        **{k: v for k, v in summary.items() if k != "rows"}, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    html = (work / "report.html").read_text(encoding="utf-8")
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]+)">', html)
    for name, data in zip(("quality_latency", "build_cost"), imgs, strict=False):
        (args.out.parent / f"compare_study_{name}.png").write_bytes(base64.b64decode(data))
    log(f"wrote {args.out} ({seconds:.0f} s); report {work / 'report.html'}")


if __name__ == "__main__":
    main()
