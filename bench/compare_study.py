"""The compare study: every route of `stillroom compare` on one task, the same test examples (at least 200), one
teacher and one student, with 95% intervals, recovery of the teacher's lead and paired tests against zero-shot.

Default pair: the embedded Qwen2.5-Coder-0.5B-Instruct teaching the embedded Gemma-3 270M base (another family,
another tokenizer: logit KD aligns them by bytes), so there is a real gap for the routes to close. `--student
qwen2.5-coder-0.5b --routes zero-shot,k-shot,cot,pld` runs PLD and the prompt baselines with the instruction model
as its own student; `--drop 14:18` gives the earlier self-distillation study (the 270M teacher, itself minus
layers 14:18 as the student). Every route runs into its own folder under the work folder and is resumable: an
interrupted study continues where it stopped (`stillroom compare`'s own resume), and a rerun with nothing changed
computes nothing.

    python bench/compare_study.py --task bigbench:intent_recognition          # all routes, 200 test examples
    python bench/compare_study.py --test 24 --routes zero-shot,k-shot         # a quick look

Writes bench/results/compare_study_<name>.json (the compare summary, command, budgets, machine load) and the
report's two plots as bench/results/compare_study_<name>_quality_latency.png and ..._build_cost.png; prints the
table. <name> is --name, else the task's short name.
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

from _common import ROOT, log, machine_load, student_folder  # noqa: E402  (also sets the offline environment and puts the repo on sys.path)

TRAINED = ("seqkd", "cot-data", "kd-logits", "prune-heal-sft", "prune-heal-self-data", "sft-gold")
"""The routes whose training budget --steps/--batch/--lr set (GAD has its own two-stage budget below)."""


def budgets(args) -> dict:
    """Every route's budget: one training budget for all training routes, so they compare at equal steps and data."""
    train = {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": args.lr}
    out = {r: dict(train) for r in TRAINED}
    out["gad"] = {"warmup_steps": args.steps, "batch_size": args.batch, "warmup_learning_rate": args.lr,
                  "adversarial_steps": args.gad_steps}
    out["pld"] = {"teacher_max_tokens": args.pld_tokens}
    return out


def cfg_labels(cfg):
    """The task's label set (macro-F1 is computed over it)."""
    from stillroom.route import select

    return list(select(cfg.task).task.labels or ())


def study_config(args, student: str):
    """The compare config this bench runs, built from its arguments (test_configs validates it and plans every
    route, so a renamed field cannot silently break the bench)."""
    from stillroom.compare.config import CompareConfig

    return CompareConfig.model_validate({
        "task": {"spec": args.task, "seed": 0}, "teacher": {"spec": args.teacher}, "student": {"spec": student},
        "routes": args.routes.split(",") if args.routes else None, "eval_limit": args.test, "train_limit": args.train,
        "val_limit": args.val, "shots": args.shots, "budgets": budgets(args),
    })


def parse_args(argv=None):
    """The bench's arguments."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bigbench:intent_recognition")
    ap.add_argument("--teacher", default="qwen2.5-coder-0.5b")
    ap.add_argument("--student", default="gemma3-270m")
    ap.add_argument("--drop", default=None,
                    help="instead of --student: the embedded Gemma-3 270M minus these layers ('14:18')")
    ap.add_argument("--test", type=int, default=200, help="test examples (the same for every route)")
    ap.add_argument("--train", type=int, default=96, help="training pool (the same for every route)")
    ap.add_argument("--val", type=int, default=24, help="validation examples (PLD's conflict loop)")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps of every training route")
    ap.add_argument("--batch", type=int, default=8, help="batch size of every training route")
    ap.add_argument("--lr", type=float, default=5e-4, help="learning rate of every training route (LoRA)")
    ap.add_argument("--gad-steps", type=int, default=8, help="GAD's adversarial steps after its SeqKD warm-up")
    ap.add_argument("--pld-tokens", type=int, default=256, help="PLD's teacher budget per extraction reply")
    ap.add_argument("--routes", default=None, help="comma-separated routes (default: all)")
    ap.add_argument("--name", default=None, help="results name (default: the task's short name)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--reuse-only", action="store_true",
                    help="write the results of the routes already finished in the work folder; list the others as "
                         "not finished (nothing is computed)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: bench/results/compare_study_<name>.json)")
    ap.add_argument("--pairs", default="kd-logits:sft-gold,seqkd:kd-logits,gad:seqkd,prune-heal-self-data:prune-heal-sft,"
                    "pld:k-shot", help="route pairs 'a:b' also tested against each other (paired bootstrap on macro-F1, "
                    "McNemar on correctness), from the routes' predictions on the same examples")
    ap.add_argument("--markdown", type=Path, nargs="+", default=None,
                    help="print the README table of these results files and exit (nothing is computed)")
    return ap.parse_args(argv)


def paired(work: Path, pairs: str, labels) -> list[dict]:
    """Each pair 'a:b' of finished routes tested against each other on the examples both answered."""
    from stillroom.evaluate.stats import mcnemar, paired_bootstrap

    def preds(route: str) -> dict:
        path = work / "routes" / route / "predictions.jsonl"
        if not path.exists():
            return {}
        return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}

    out = []
    for pair in filter(None, pairs.split(",")):
        a, b = pair.split(":")
        pa, pb = preds(a), preds(b)
        ids = sorted(set(pa) & set(pb))
        if not ids:
            continue
        gold = [pa[i]["gold"] for i in ids]
        boot = paired_bootstrap(gold, [pa[i]["pred"] for i in ids], [pb[i]["pred"] for i in ids], labels)
        mc = mcnemar([pa[i]["correct"] for i in ids], [pb[i]["correct"] for i in ids])
        out.append({"a": a, "b": b, "n": len(ids), "macro_f1_diff": boot["diff"], "diff_ci95": boot["ci"],
                    "bootstrap_p": boot["p_value"], "mcnemar_p": mc.get("p_value"),
                    "same_answers": sum(pa[i]["pred"] == pb[i]["pred"] for i in ids)})
    return out


def _ci(lo_hi) -> str:
    return "" if not lo_hi or lo_hi[0] is None else f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]"


def compact(result: dict, path: Path) -> dict:
    """One study's figures for the combined file (`--markdown ... --out`): per route, quality, recovery and the
    paired test with their intervals, and the build cost; the full results stay in `path`."""
    keep = ("status", "reason", "n", "macro_f1", "macro_f1_ci95", "accuracy", "accuracy_ci95", "recovery",
            "vs_baseline", "build", "build_seconds", "latency_p50_s", "input_tokens", "system_prompt_tokens")
    return {"file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
            **{k: result.get(k) for k in ("command", "task", "teacher", "student", "baseline", "budgets",
                                          "recommendation", "recovery", "pairs")},
            "routes": {r["route"]: {k: r.get(k) for k in keep} for r in result["rows"]}}


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def markdown_table(result: dict) -> str:
    """One results file as the README's table: quality with its interval, recovery with its interval, the paired
    test against the baseline, and the build cost, for every route (the ones that did not run with why)."""
    lines = [f"| route | macro-F1 [95% CI] | accuracy | recovery [95% CI] | Δ {result['baseline']} (paired p) "
             "| teacher calls | steps | build s | p50 s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['route']} | {r['status']}: {r.get('reason') or r.get('error') or ''} |||||||| |")
            continue
        rec = r.get("recovery") or {}
        rec_text = ("1 (by definition)" if r["route"] == "teacher" else "0 (by definition)" if r.get("is_baseline")
                    else "undefined" if rec and not rec.get("defined") else
                    f"{rec['value']:.2f}{_ci(rec.get('ci95'))}" if rec else "-")
        v = r.get("vs_baseline") or {}
        diff = "-" if r.get("is_baseline") or v.get("diff") is None else (
            f"{v['diff']:+.3f} ({_p(v['bootstrap_p'])}){' *' if v.get('significant') else ''}")
        b = r.get("build") or {}
        lines.append(f"| {r['route']}{' (ref)' if r['reference'] else ''} | {r['macro_f1']:.3f}{_ci(r['macro_f1_ci95'])} "
                     f"| {r['accuracy']:.3f} | {rec_text} | {diff} | {b.get('teacher_calls', 0)} "
                     f"| {b.get('training_steps', 0)} | {r['build_seconds']:.0f} | {r['latency_p50_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.markdown:
        studies = {}
        for path in args.markdown:
            result = json.loads(path.read_text(encoding="utf-8"))
            print(f"\n{path.name}: {result['task']}, teacher {result['teacher']}, student {result['student']}\n")
            print(markdown_table(result))
            for q in result.get("pairs", []):
                print(f"- {q['a']} vs {q['b']}: {q['macro_f1_diff']:+.3f} macro-F1 [{q['diff_ci95'][0]:+.3f}, "
                      f"{q['diff_ci95'][1]:+.3f}], {_p(q['bootstrap_p'])}; McNemar {_p(q['mcnemar_p'])}; "
                      f"same answer on {q['same_answers']} of {q['n']}")
            studies[path.stem] = compact(result, path)
        if args.out:
            from stillroom.runs import atomic_write_text

            atomic_write_text(args.out, json.dumps({"studies": studies}, indent=2) + "\n")
            print(f"\nwrote {args.out}")
        return

    import torch

    from stillroom.compare.cli import LIBRARY_LOG, print_compare
    from stillroom.compare.run import run_compare
    from stillroom.runs import atomic_write_text, cache_root
    from stillroom.ui import library_output_to

    name = args.name or args.task.split(":")[-1].split("/")[-1]
    out = args.out or ROOT / "bench" / "results" / f"compare_study_{name}.json"
    work = args.work or cache_root() / "bench" / f"compare_study_{name}"
    student = f"hf:{student_folder(args.drop)}" if args.drop else args.student
    cfg = study_config(args, student)
    log(f"compare study {name}: {args.task}, teacher {args.teacher}, student {student}, {args.test} test examples "
        f"-> {work}")
    load_start = machine_load()
    t0 = time.perf_counter()
    plans = None
    if args.reuse_only:
        from stillroom.compare.routes import RoutePlan, plan_routes
        from stillroom.route import read_result

        plans = [p if read_result(work / "routes" / p.name) is not None else
                 RoutePlan(p.name, None, None, "not finished yet: rerun bench/compare_study.py to continue", p.reference,
                           skip_status="not run")
                 for p in plan_routes(cfg)]
    # As `stillroom compare` does: the libraries' bars and warnings go to the work folder's log, ours to the terminal.
    with library_output_to(work / LIBRARY_LOG, training_bars=True):
        summary = run_compare(cfg, work, plans=plans)
    seconds = time.perf_counter() - t0
    print_compare(summary, work)
    rows = [{k: v for k, v in r.items() if k not in ("examples", "predictions")} for r in summary["rows"]]
    result = {
        "command": "python bench/compare_study.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k not in ("out", "work")),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "cuda": torch.cuda.is_available()},
        "wall_seconds_this_invocation": round(seconds, 1),
        "load": {"start": load_start, "end": machine_load()},
        "budgets": budgets(args),
        "note": "Latency and build seconds were measured on a shared 2-core CPU machine: compare them within this "
                "study only. Routes reused from an earlier invocation keep the seconds of their first build.",
        **{k: v for k, v in summary.items() if k != "rows"}, "rows": rows,
        "pairs": paired(work, args.pairs, cfg_labels(cfg)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    html = (work / "report.html").read_text(encoding="utf-8")
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]+)">', html)
    for plot, data in zip(("quality_latency", "build_cost"), imgs, strict=False):
        (out.parent / f"{out.stem}_{plot}.png").write_bytes(base64.b64decode(data))
    log(f"wrote {out} ({seconds:.0f} s); report {work / 'report.html'}")


if __name__ == "__main__":
    main()
