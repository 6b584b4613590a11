"""KD quality study: the embedded Gemma-3 270M teacher into a depth-pruned copy of itself, on one task.

Student: Gemma-3 270M with the block of --block-size decoder blocks that has the smallest angular distance on the
task's training prompts removed (`stillroom.prune.angular` + `stillroom.prune.surgery`), the same recipe as
bench/compression.py. Conditions, all on the same training examples, the same prompts (k gold shots), the same
LoRA settings and step budget, scored by the same log-likelihood evaluator on the same test examples:

* teacher        - the unpruned model;
* no KD          - the pruned student as is;
* SFT            - `stillroom.train.sft.train_sft` on the gold answers;
* logit KD (FKL) - `stillroom kd logits` route (`distill_logits`): teacher top-64 log-probs cached once, forward KL,
                   pure KD (ce_weight 0);
* logit KD (RKL) - the same with reverse KL;
* SeqKD          - `stillroom kd data` route (`distill_data`, mode answers): the teacher (through the run's cached
                   backend) answers every training input by generation with the same shots; its answers, right or
                   wrong (no correctness filter, i.e. pure SeqKD), are the SFT targets.

Task: BIG-bench `intent_recognition` (7 intents, chance 1/7), chosen because the 270M teacher is far above chance
there 3-shot (0.48 on 60 test examples; 0.10 zero-shot) — see bench/compression.py for the probe.

CPU budget (2 shared cores): --train 96 examples, --epochs 2 (24 optimizer steps at batch 8), --eval 60 test
examples; all on one torch thread (see bench/kd_speed.py). Every finished condition is stored in the work folder
and skipped on rerun.

    .venv/bin/python bench/kd_quality.py

Writes bench/results/kd_quality.json and prints a table. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from _common import ROOT, StateFile, log, machine_load  # noqa: E402  (also sets the offline environment)

LORA = {"lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


State = StateFile


def summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "invalid_rate") if k in metrics}


def kd_configs(args, teacher_path: Path | str, student: Path | str) -> dict:
    """The route configs this bench runs (logit KD with FKL and RKL, SeqKD), built from its arguments (test_configs
    validates them, so a renamed field cannot silently break the bench)."""
    from stillroom.config import BackendConfig, TaskConfig
    from stillroom.kd.data import KDDataConfig
    from stillroom.kd.trainer import KDLogitsConfig

    common = dict(shots=args.shots, eval_limit=args.eval, epochs=args.epochs, batch_size=args.batch_size,
                  learning_rate=args.lr, seed=0)
    out = {div: KDLogitsConfig(task=TaskConfig(spec=args.task), teacher=f"hf:{teacher_path}", student=str(student),
                               train_limit=args.train, eval_before=False, divergence=div, ce_weight=0.0, top_k=64,
                               max_length=512, logging_steps=5, **LORA, **common) for div in ("fkl", "rkl")}
    out["seqkd"] = KDDataConfig(
        task=TaskConfig(spec=args.task), teacher=BackendConfig(spec=f"hf:{teacher_path}", batch_size=8),
        student=str(student), mode="answers", filter_correct=False, teacher_shots=args.shots, teacher_max_tokens=12,
        train_limit=args.train, eval_before=False, max_length=512, **common,
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": list(ALL_LINEAR)}, lr_scheduler="linear")
    return out


def parse_args(argv=None):
    """The bench's arguments."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bigbench:intent_recognition")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--train", type=int, default=96, help="training examples (before removing the shots)")
    ap.add_argument("--eval", type=int, default=60, help="test examples")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--block-size", type=int, default=4, help="decoder blocks removed from the teacher")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="work folder (default: <stillroom cache>/bench/kd_quality)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kd_quality.json"))
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from stillroom.backends.embedded import ensure_embedded_gemma, is_converted
    from stillroom.evaluate.runner import evaluate_model
    from stillroom.kd.data import distill_data
    from stillroom.kd.trainer import distill_logits, load_causal_lm, load_tokenizer
    from stillroom.prune.angular import analyze_layers
    from stillroom.prune.surgery import prune_model_folder
    from stillroom.runs import cache_root
    from stillroom.tasks import load_task
    from stillroom.tasks.prompts import continuation, render_prompt
    from stillroom.tasks.task import sample
    from stillroom.train.sft import SFTSettings, train_sft

    work = Path(args.work or cache_root() / "bench" / "kd_quality")
    work.mkdir(parents=True, exist_ok=True)
    st = State(work / "state.json")
    t_start, load_start = time.perf_counter(), machine_load()
    teacher_path = Path(ensure_embedded_gemma())
    task = load_task(args.task)
    splits = task.splits(seed=0)
    shots = sample(splits.train, args.shots, seed=0)
    shot_ids = {s.id for s in shots}
    train = [e for e in sample(splits.train, args.train, seed=0) if e.id not in shot_ids]
    test = sample(splits.test, args.eval, seed=0)
    tok = load_tokenizer(teacher_path)
    timings = st.get("seconds") or {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        st.put("seconds", timings)
        return out

    # The student: the lowest-angular-distance block removed.
    student = work / f"student-drop{args.block_size}"
    if not is_converted(student) or st.get("prune") is None:
        log("angular analysis on 32 training prompts")
        model = load_causal_lm(teacher_path)
        texts = [render_prompt(task, ex, shots) + continuation(str(ex.label)) for ex in train[:32]]
        analysis = analyze_layers(model, tok, texts, batch_size=4)
        start, end, d = analysis.best_block(args.block_size)
        del model
        prune_model_folder(teacher_path, start, end, student, analysis={"angular_distance": d})
        st.put("prune", {"drop": f"{start}:{end}", "angular_distance": d})
    log(f"student: blocks {st.get('prune')['drop']} removed")

    def evaluate_folder(name, folder):
        if st.get(name) is None:
            log(f"evaluating {name}")
            model = load_causal_lm(folder)
            r = timed(f"eval {name}", lambda: evaluate_model(task, test, model, tok, shots=shots, name=name))
            st.put(name, summary(r.metrics))
        log(f"{name}: {st.get(name)}")

    evaluate_folder("teacher", teacher_path)
    evaluate_folder("no KD", student)

    if st.get("SFT") is None:
        log("SFT on gold answers")
        records = [{"prompt": render_prompt(task, ex, shots), "completion": continuation(str(ex.label))} for ex in train]
        settings = SFTSettings(lora=True, lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_LINEAR,
                               learning_rate=args.lr, lr_scheduler_type="linear", epochs=args.epochs,
                               batch_size=args.batch_size, max_length=512, seed=0, logging_steps=5)
        res = timed("train SFT", lambda: train_sft(load_causal_lm(student), tok, records, settings,
                                                   output_dir=work / "sft-trainer"))
        r = timed("eval SFT", lambda: evaluate_model(task, test, res.model, tok, shots=shots, name="sft"))
        st.put("SFT", {**summary(r.metrics), "steps": res.steps, "train_seconds": round(res.seconds, 1),
                       "loss_first_last": [res.losses[0], res.losses[-1]] if res.losses else None})
    log(f"SFT: {st.get('SFT')}")

    for name, div in (("logit KD (FKL)", "fkl"), ("logit KD (RKL)", "rkl")):
        if st.get(name) is None:
            log(name)
            cfg = kd_configs(args, teacher_path, student)[div]
            m = timed(name, lambda cfg=cfg, div=div: distill_logits(cfg, work / f"kd-{div}", progress=False))
            tr = m["train"]
            st.put(name, {**summary(m["conditions"]["student (KD)"]), "steps": tr["steps"],
                          "train_seconds": tr["seconds"], "tokens_per_s": tr["tokens_per_s"],
                          "teacher_cache_seconds": (tr.get("cache") or {}).get("seconds")})
        log(f"{name}: {st.get(name)}")

    if st.get("SeqKD") is None:
        log("SeqKD (kd data, answers)")
        cfg = kd_configs(args, teacher_path, student)["seqkd"]
        m = timed("SeqKD", lambda: distill_data(cfg, work / "seqkd"))
        st.put("SeqKD", {**summary(m["conditions"]["student (answers KD)"]), "teacher_label_accuracy":
                         m["data"]["teacher_accuracy"], "teacher_unparsed": m["data"]["unparsed"],
                         "sft_examples": m["train"]["sft"]["examples"], "steps": m["train"]["sft"]["steps"]})
    log(f"SeqKD: {st.get('SeqKD')}")

    conds = ["teacher", "no KD", "SFT", "logit KD (FKL)", "logit KD (RKL)", "SeqKD"]
    result = {
        "task": args.task, "chance": 1 / len(task.labels or [1]), "shots": args.shots,
        "train_examples": len(train), "test_examples": len(test),
        "student": f"Gemma-3 270M minus blocks {st.get('prune')['drop']} (lowest angular distance, "
                   f"{18 - args.block_size} of 18 blocks)",
        "conditions": {c: st.get(c) for c in conds},
        "budget": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
                   "lora": "r=16, alpha=32, all linear layers", "torch_threads": args.threads,
                   "seconds": timings, "wall_seconds_this_run": round(time.perf_counter() - t_start, 1),
                   "load_this_run": {"start": load_start, "end": machine_load()},
                   "device": f"cpu ({os.cpu_count()} cores, shared)", "machine": platform.platform()},
        "notes": [
            "Logit KD and SeqKD use the Stillroom routes themselves (distill_logits, distill_data); SFT uses "
            "stillroom.train.sft.train_sft with the same LoRA settings, scheduler (linear), steps and prompts.",
            "KD arms use ce_weight 0 (pure distillation) and SeqKD keeps every teacher answer (no correctness "
            "filter), so neither sees a gold label: only SFT does.",
            f"Single seed, small test set: differences of a few points are within noise ({len(test)} examples: "
            f"±{50 / len(test) ** 0.5:.1f} points standard error at 50% accuracy).",
        ],
        "command": "python bench/kd_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'condition':<18}{'accuracy':>10}{'macro-F1':>10}")
    for c in conds:
        m = st.get(c) or {}
        print(f"{c:<18}{m.get('accuracy', float('nan')):>10.3f}{(m.get('macro_f1') or float('nan')):>10.3f}")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
