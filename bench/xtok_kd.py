"""Cross-tokenizer logit-KD training speed and memory: Stillroom's cached ULD against TRL's GOLDTrainer (ULD).

Teacher Qwen2.5-Coder-0.5B-Instruct (ByteLevel BPE, 151,936 logits), student the embedded Gemma-3 270M
(SentencePiece-style with byte fallback, 262,144 logits): different tokenizers. Same examples, same batches, same
LoRA, same optimiser, same steps, in one run; each arm in its own process, so its peak memory is its own:

* teacher   - Qwen runs once over the training examples (its own tokenization) and writes its top-k + tail,
              the actual answer tokens' log-probabilities and byte offsets (`build_logit_cache(xtok=True)`).
* stillroom - `stillroom.kd.xtok_train.XTokTrainer` from that cache: the teacher is never loaded; the student
              computes logits only at its answer positions; ULD (bayesian merge) on byte-aligned spans.
* trl       - `trl.experimental.gold.GOLDTrainer` with `use_uld_loss`, `lmbda=0` (no sampling: the same gold
              sequences), extended ULD with the bayesian merge, teacher resident, full logits of both models at
              every position, both vocabularies sorted at every answer position, as TRL computes them. TRL's own
              byte offsets refuse a non-ByteLevel student (Gemma), so its collator here hands it the student's
              byte offsets computed by `stillroom.kd.xtok` (the teacher's come from TRL itself).

Both arms: student sequences are the same token ids (prompt + ' <label>' + EOS, `encode_examples`), the loss on the
answer tokens, ce weight 0. Tokens/s = the student's non-padding tokens per second of training step, over the
steps after the first (warm-up). Peak memory = the process's peak resident set (CPU) or
`torch.cuda.max_memory_allocated` (CUDA).

    .venv/bin/python bench/xtok_kd.py --teacher hf:/tmp/i16/qwen-hf          # ~10 min on 2 shared CPU cores
    .venv/bin/python bench/xtok_kd.py --teacher qwen2.5-coder-0.5b --steps 8 --examples 32

Writes bench/results/xtok_kd.json and prints a table. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _common import ROOT  # noqa: E402  (sets the offline environment, puts the repo on sys.path)
from kd_speed import _Counting, _throughput, _timer, peak_mem_mb, resident_models  # noqa: E402

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def prepare(args, work: Path) -> dict:
    """Encode the examples once on both sides and write them for the arms."""
    from stillroom.backends.embedded import ensure_embedded_gemma
    from stillroom.kd.xtok_train import answer_text, encode_cross
    from stillroom.models import load_tokenizer, resolve_model_path
    from stillroom.tasks import load_task
    from stillroom.tasks.prompts import continuation, render_prompt

    task = load_task(args.task)
    splits = task.splits(seed=0)
    shots = splits.train[: args.shots]
    train = splits.train[args.shots : args.shots + args.examples]
    student, teacher = Path(ensure_embedded_gemma()), resolve_model_path(args.teacher)
    pairs = [(ex.id, render_prompt(task, ex, shots), continuation(str(ex.label))) for ex in train]
    xs = encode_cross(load_tokenizer(student), load_tokenizer(teacher), pairs, max_length=args.max_length)
    data = {"task": args.task, "teacher": str(teacher), "student": str(student),
            "s_pad": load_tokenizer(student).pad_token_id, "t_pad": load_tokenizer(teacher).pad_token_id,
            "examples": [{"id": x.student.id, "prompt": p, "answer": answer_text(p, a),
                          "s": [x.student.prompt_ids, x.student.answer_ids, x.student.meta["byte_offsets"]],
                          "t": [x.teacher.prompt_ids, x.teacher.answer_ids, x.teacher.meta["byte_offsets"]]}
                         for x, (_, p, a) in zip(xs, pairs, strict=True)]}
    (work / "data.json").write_text(json.dumps(data))
    return data


def _cross(data):
    from stillroom.kd.logit_cache import Encoded
    from stillroom.kd.xtok import plan_spans
    from stillroom.kd.xtok_train import CrossExample

    out = []
    for e in data["examples"]:
        s = Encoded(id=e["id"], prompt_ids=e["s"][0], answer_ids=e["s"][1], meta={"byte_offsets": [tuple(o) for o in e["s"][2]]})
        t = Encoded(id=e["id"], prompt_ids=e["t"][0], answer_ids=e["t"][1], meta={"byte_offsets": [tuple(o) for o in e["t"][2]]})
        out.append(CrossExample(student=s, teacher=t, plan=plan_spans(s.meta["byte_offsets"], t.meta["byte_offsets"])))
    return out


def arm_teacher(args, data) -> dict:
    from stillroom.kd.logit_cache import build_logit_cache
    from stillroom.models import load_causal_lm, model_fingerprint

    xs = _cross(data)
    t0 = time.perf_counter()
    cache, stats = build_logit_cache(
        lambda: load_causal_lm(data["teacher"]), [x.teacher for x in xs], Path(args.work) / "teacher_logits",
        teacher_id=model_fingerprint(Path(data["teacher"])), k=args.top_k, batch_size=args.batch_size,
        pad_id=data["t_pad"], progress=False, xtok=True,
    )
    size = sum(p.stat().st_size for p in cache.folder.glob("shard-*"))
    return {"seconds": round(time.perf_counter() - t0, 2), "teacher_forward_seconds": round(stats.seconds, 2),
            "teacher_tokens": stats.teacher_tokens, "computed_shards": stats.computed, "cache_bytes": size,
            "peak_mem_mb": round(peak_mem_mb(), 1)}


def arm_stillroom(args, data) -> dict:
    from stillroom.kd.logit_cache import LogitCache
    from stillroom.kd.trainer import KDConfig, apply_lora
    from stillroom.kd.trainer import training_arguments as targs
    from stillroom.kd.xtok_train import CrossCollator, CrossDataset, XTokConfig, XTokTrainer
    from stillroom.models import load_causal_lm

    xs = _cross(data)
    cache = LogitCache(next(p for p in (Path(args.work) / "teacher_logits").iterdir() if p.is_dir()))
    cfg = KDConfig(ce_weight=0.0, top_k=args.top_k, lora=LORA, learning_rate=1e-4, batch_size=args.batch_size,
                   max_steps=args.steps + 1, logging_steps=1)
    student = apply_lora(load_causal_lm(data["student"]), cfg)
    collator = _Counting(CrossCollator(pad_id=data["s_pad"], merge="bayesian"))
    timer = _timer()
    trainer = XTokTrainer(model=student, args=targs(cfg, Path(args.work) / "out-stillroom"),
                          train_dataset=CrossDataset(xs, cache), data_collator=collator, kd=cfg,
                          xtok=XTokConfig(merge="bayesian"), callbacks=[timer])
    models = resident_models()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**_throughput(collator.tokens, timer.times), "losses": losses, "models_in_memory_blocks": models,
            "teacher_resident": 24 in models, "peak_mem_mb": round(peak_mem_mb(), 1)}


def arm_trl(args, data) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    from stillroom.models import load_causal_lm, load_tokenizer

    pad = data["s_pad"]

    def collate(rows):
        # Right-padded student sequences, labels on the answer; the texts GOLD re-tokenizes for the teacher, and the
        # student's answer byte offsets (completion-relative, as GOLD's collator emits them for ByteLevel students).
        n = max(len(r["s_prompt"]) + len(r["s_answer"]) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        offs = torch.zeros((len(rows), n, 2), dtype=torch.long)
        for i, r in enumerate(rows):
            p, a, o = r["s_prompt"], r["s_answer"], r["s_offsets"]
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(p) : len(seq)] = torch.tensor(a)
            offs[i, len(p) : len(seq)] = torch.tensor(o)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "byte_offsets": offs,
                "original_prompt_text": [r["prompt"].rstrip() for r in rows],
                "original_completion_text": [r["answer"] for r in rows]}

    tok = load_tokenizer(data["student"])
    student = load_causal_lm(data["student"])
    teacher = load_causal_lm(data["teacher"])
    gold = GOLDConfig(
        output_dir=str(Path(args.work) / "out-trl"), lmbda=0.0, seq_kd=False, use_uld_loss=True,
        use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        teacher_tokenizer_name_or_path=data["teacher"], per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + 1, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], bf16=False,
        gradient_checkpointing=False, seed=0, max_length=args.max_length, dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=True,
        log_completions=False,
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    collator = _Counting(collate)
    timer = _timer()
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=gold, data_collator=collator,
                          train_dataset=Dataset.from_list([
                              {"id": e["id"], "prompt": e["prompt"], "answer": e["answer"], "s_prompt": e["s"][0],
                               "s_answer": e["s"][1], "s_offsets": e["s"][2]} for e in data["examples"]]), processing_class=tok, peft_config=lora,
                          callbacks=[timer])
    models = resident_models()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**_throughput(collator.tokens, timer.times), "losses": losses, "models_in_memory_blocks": models,
            "teacher_resident": 24 in models, "peak_mem_mb": round(peak_mem_mb(), 1)}


def run_arm(name: str, args) -> dict:
    """Run one arm in a fresh process (its own peak memory) and read its JSON back."""
    out = Path(args.work) / f"arm-{name}.json"
    cmd = [sys.executable, __file__, "--arm", name, "--work", str(args.work), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--top-k", str(args.top_k), "--threads", str(args.threads),
           "--max-length", str(args.max_length)]
    print(f"== arm {name}", flush=True)
    with open(Path(args.work) / f"arm-{name}.log", "w") as logf:  # library output goes to the log, not the terminal
        subprocess.run(cmd, check=True, stdout=logf, stderr=subprocess.STDOUT)
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="qwen2.5-coder-0.5b", help="teacher spec (a local Qwen folder: hf:PATH)")
    ap.add_argument("--task", default="bigbench:intent_recognition")
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--examples", type=int, default=20, help="training examples (the teacher scores them all)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm (after one warm-up step)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per arm (as bench/kd_speed.py)")
    ap.add_argument("--work", default="/tmp/stillroom-bench-xtok", help="scratch folder")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "xtok_kd.json"))
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.work = Path(args.work)
    if args.arm:  # child process
        data = json.loads((args.work / "data.json").read_text())
        res = {"teacher": arm_teacher, "stillroom": arm_stillroom, "trl": arm_trl}[args.arm](args, data)
        (args.work / f"arm-{args.arm}.json").write_text(json.dumps(res, indent=2))
        return res

    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    load0 = os.getloadavg()[0]
    t_all = time.perf_counter()
    data = prepare(args, args.work)
    lens = [len(e["s"][0]) + len(e["s"][1]) for e in data["examples"]]
    teacher = run_arm("teacher", args)
    ours = run_arm("stillroom", args)
    trl = run_arm("trl", args)
    speedup = ours["tokens_per_s"] / trl["tokens_per_s"] if trl["tokens_per_s"] else float("nan")
    epoch_tokens = sum(lens)
    e2e_ours = teacher["teacher_forward_seconds"] + epoch_tokens / ours["tokens_per_s"]
    e2e_trl = epoch_tokens / trl["tokens_per_s"]
    result = {
        "speedup_vs_trl_gold": round(speedup, 2),
        "peak_mem_mb": ours["peak_mem_mb"],
        "trl_peak_mem_mb": trl["peak_mem_mb"],
        "memory_ratio": round(trl["peak_mem_mb"] / ours["peak_mem_mb"], 2),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "tokens_per_s": round(ours["tokens_per_s"], 2),
        "trl_tokens_per_s": round(trl["tokens_per_s"], 2),
        "teacher_resident_during_training": ours["teacher_resident"],
        "trl_teacher_resident": trl["teacher_resident"],
        "teacher_cache": teacher,
        "one_epoch_seconds_incl_teacher_pass": {"stillroom": round(e2e_ours, 1), "trl": round(e2e_trl, 1),
                                                "speedup": round(e2e_trl / e2e_ours, 2)},
        "arms": {"stillroom": ours, "trl": trl},
        "setup": {
            "task": args.task, "shots": args.shots, "examples": len(lens),
            "student_tokens_per_example_mean": round(sum(lens) / len(lens), 1), "max_length": args.max_length,
            "batch_size": args.batch_size, "steps_timed": args.steps, "top_k": args.top_k,
            "teacher": f"{args.teacher} ({data['teacher']}), float32",
            "student": "embedded Gemma-3 270M, LoRA r=16 all-linear, AdamW lr 1e-4, float32",
            "stillroom": "XTokTrainer from the cross-tokenizer cache: ULD, bayesian merge, ce_weight 0, teacher top-k "
                         "+ tail, answer-position logits only",
            "trl": "trl.experimental.gold.GOLDTrainer, use_uld_loss, extended ULD, bayesian merge, lmbda 0, "
                   "ce weight 0, teacher resident",
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.platform(), "load_avg_1m": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
            "wall_seconds": round(time.perf_counter() - t_all, 1),
            "command": "python bench/xtok_kd.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'arm':<12}{'tokens/s':>12}{'peak MB':>12}{'teacher resident':>18}")
    for name, r in (("stillroom", ours), ("trl GOLD", trl)):
        print(f"{name:<12}{r['tokens_per_s']:>12.2f}{r['peak_mem_mb']:>12.0f}{str(r['teacher_resident']):>18}")
    print(f"speed-up {speedup:.2f}x, memory {result['memory_ratio']:.2f}x less; teacher pass "
          f"{teacher['teacher_forward_seconds']:.1f}s ({teacher['cache_bytes'] / 2**20:.1f} MiB cache, peak "
          f"{teacher['peak_mem_mb']:.0f} MB); one epoch incl. teacher pass: {e2e_ours:.0f}s vs {e2e_trl:.0f}s -> {out}")
    return result


if __name__ == "__main__":
    main()
