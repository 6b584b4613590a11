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


def _predictions(folder: Path, condition: str) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("condition") == condition]


def collect(route_dirs: dict[str, Path], baseline: str = "kd-logits") -> list[dict]:
    """Rows from finished route folders (result.json, predictions.jsonl): quality with intervals, build, and the
    paired test against `baseline` on the examples both were evaluated on (the compare report's own test)."""
    from stillroom.compare.report import paired_test

    found = {name: json.loads((d / "result.json").read_text()) for name, d in route_dirs.items()
             if (d / "result.json").exists()}
    preds = {name: _predictions(route_dirs[name], res["condition"]) for name, res in found.items()}
    rows = []
    for name in route_dirs:
        if name not in found:
            rows.append({"route": name, "status": "not finished"})
            continue
        q = found[name]["quality"]
        labels = list(q["per_class_f1"]) or None
        vs = paired_test(preds[baseline], preds[name], labels) if baseline in preds and name != baseline else None
        rows.append({"route": name, "status": "ok", **{k: q[k] for k in ("n", "macro_f1", "macro_f1_ci95",
                                                                          "accuracy", "accuracy_ci95", "invalid_rate")},
                     "build": found[name]["build"], "vs_baseline": vs, "folder": str(route_dirs[name])})
    return rows


def main(argv=None) -> dict:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="qwen2.5-coder-0.5b")
    ap.add_argument("--test-limit", type=int, default=200)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--run-dir", default="/tmp/stillroom-bench-xtok-quality")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "xtok_kd_quality.json"))
    ap.add_argument("--summarize-only", action="store_true", help="only read <run-dir>/compare.json")
    ap.add_argument("--collect", default=None,
                    help="ROUTE=FOLDER,...: summarise finished route folders directly (paired tests against "
                    "kd-logits), e.g. when routes ran in more than one compare folder")
    args = ap.parse_args(argv)
    if args.collect:
        dirs = {k: Path(v) for k, v in (x.split("=", 1) for x in args.collect.split(","))}
        result = {"rows": collect(dirs), "baseline": "kd-logits",
                  "setup": {**study_config(args.teacher, args.test_limit, steps=args.steps),
                            "command": "python bench/xtok_kd_quality.py " + " ".join(argv or sys.argv[1:])}}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        _table(result["rows"])
        return result
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
    _table(result["rows"])
    print(f"-> {out}")
    return result


def _table(rows: list[dict]) -> None:
    print(f"\n{'route':<12}{'macro-F1':>10}{'95% CI':>18}{'acc':>8}{'diff vs':>10}{'p boot':>8}{'p McN':>8}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['route']:<12} {r['status']}: {r.get('error') or r.get('reason') or ''}")
            continue
        ci = r["macro_f1_ci95"]
        vs = r.get("vs_baseline") or {}
        print(f"{r['route']:<12}{r['macro_f1']:>10.3f}{f'[{ci[0]:.3f}, {ci[1]:.3f}]':>18}{r['accuracy']:>8.3f}"
              f"{vs.get('diff', 0):>+10.3f}{vs.get('bootstrap_p', 1):>8.3f}{vs.get('mcnemar_p', 1):>8.3f}")


if __name__ == "__main__":
    main()
