"""Logit-KD training speed and memory: Stillroom's cached-logit KD vs TRL's GKDTrainer with the teacher resident.

Same student, same data, same batches, same optimiser, in one run (each arm in its own process, so its peak memory
is its own):

* teacher  - the teacher (embedded Gemma-3 270M) runs once over the training examples and writes its top-k
             log-probabilities (+ rest mass) to the on-disk cache (`stillroom.kd.logit_cache`); timed on its own.
* stillroom - `stillroom.kd.trainer.train_kd` from that cache: the teacher is never loaded; the student computes
             logits only at the answer positions.
* trl      - TRL 1.16's `trl.experimental.gkd.GKDTrainer` with `lmbda=0` (no student sampling: supervised KD on the
             same sequences) and `beta=0` (forward KL, the same divergence as the Stillroom arm), teacher resident,
             full-vocabulary logits at every position, as TRL computes them. (TRL's non-experimental
             `DistillationTrainer` is on-policy only: it samples completions every step, so it is not the same
             workload; `stillroom kd logits --on-policy` uses it.)

Student: the embedded Gemma-3 270M with decoder blocks --drop removed (a layer-dropped copy, made once in the
Stillroom cache with `stillroom.prune.surgery`), LoRA r=16 on all linear layers in both arms, AdamW, float32.
Data: BIG-bench prompts from `stillroom.tasks.prompts.render_prompt` with k solved shots, answers ' <label>' + EOS;
the loss falls on the answer tokens in both arms.

Tokens/s = non-padding tokens (prompt + answer) per second of training step, over the steps after the first
(warm-up) one. Peak memory = the process's peak resident set (CPU) or `torch.cuda.max_memory_allocated` (CUDA).

    .venv/bin/python bench/kd_speed.py                  # defaults below; ~10 min on 2 CPU cores
    .venv/bin/python bench/kd_speed.py --steps 4 --examples 24

Writes bench/results/kd_speed.json and prints a table. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _common import ROOT, student_folder  # noqa: E402  (also sets the offline environment and puts the repo on sys.path)


def prepare(args, work: Path) -> dict:
    """Encode the examples once (student tokenizer) and write them for the arms."""
    from stillroom.backends.embedded import ensure_embedded_gemma
    from stillroom.kd.logit_cache import encode_examples
    from stillroom.kd.trainer import load_tokenizer
    from stillroom.tasks import load_task
    from stillroom.tasks.prompts import continuation, render_prompt

    task = load_task(args.task)
    splits = task.splits(seed=0)
    shots = splits.train[: args.shots]
    train = splits.train[args.shots : args.shots + args.examples]
    tok = load_tokenizer(student_folder(args.drop))
    enc = encode_examples(tok, [(ex.id, render_prompt(task, ex, shots), continuation(str(ex.label))) for ex in train],
                          max_length=1024)
    data = {"task": args.task, "shots": args.shots, "teacher": str(ensure_embedded_gemma()),
            "student": str(student_folder(args.drop)), "pad_id": tok.pad_token_id,
            "examples": [{"id": e.id, "prompt_ids": e.prompt_ids, "answer_ids": e.answer_ids} for e in enc]}
    (work / "data.json").write_text(json.dumps(data))
    return data


def peak_mem_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def resident_models() -> list[int]:
    """Decoder-block counts of every transformers model alive in this process (the teacher has 18)."""
    import gc
    import warnings

    from transformers import PreTrainedModel

    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some gc'd objects trips deprecation shims
        for o in gc.get_objects():
            if isinstance(o, PreTrainedModel) and "lm_head" in o._modules:
                seen.append(int(o.config.num_hidden_layers))
    return sorted(seen)


class _Counting:
    """Wraps a collator; remembers the non-padding tokens of every batch."""

    def __init__(self, fn):
        self.fn, self.tokens = fn, []

    def __call__(self, items):
        b = self.fn(items)
        self.tokens.append(int(b["attention_mask"].sum()))
        return b


def _timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def _throughput(tokens: list[int], times: list[float]) -> dict:
    # Step 0 is warm-up (allocator, first-call overheads); the rest are timed.
    tok, sec = sum(tokens[1 : len(times)]), sum(times[1:])
    return {"steps_timed": len(times) - 1, "tokens_timed": tok, "seconds_timed": round(sec, 3),
            "tokens_per_s": tok / sec if sec else 0.0, "step_seconds": [round(t, 3) for t in times]}


def arm_teacher(args, data) -> dict:
    from stillroom.kd.logit_cache import Encoded, build_logit_cache
    from stillroom.kd.trainer import load_causal_lm, model_fingerprint

    enc = [Encoded(**e) for e in data["examples"]]
    t0 = time.perf_counter()
    cache, stats = build_logit_cache(
        lambda: load_causal_lm(data["teacher"]), enc, Path(args.work) / "teacher_logits",
        teacher_id=model_fingerprint(Path(data["teacher"])), k=args.top_k, vocab_size=None,
        batch_size=args.batch_size, pad_id=data["pad_id"], progress=False,
    )
    size = sum(p.stat().st_size for p in cache.folder.glob("shard-*"))
    return {"seconds": round(time.perf_counter() - t0, 2), "teacher_forward_seconds": round(stats.seconds, 2),
            "teacher_tokens": stats.teacher_tokens, "computed_shards": stats.computed, "reused_shards": stats.skipped,
            "cache_bytes": size, "cache_folder": str(cache.folder), "peak_mem_mb": round(peak_mem_mb(), 1)}


def arm_stillroom(args, data) -> dict:
    from stillroom.kd.logit_cache import Encoded, LogitCache
    from stillroom.kd.trainer import KDCollator, KDConfig, KDDataset, KDTrainer, apply_lora, load_causal_lm
    from stillroom.kd.trainer import training_arguments as targs

    enc = [Encoded(**e) for e in data["examples"]]
    cache = LogitCache(next(p for p in (Path(args.work) / "teacher_logits").iterdir() if p.is_dir()))
    cfg = KDConfig(divergence="fkl", ce_weight=0.0, top_k=args.top_k, lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                   learning_rate=1e-4, batch_size=args.batch_size, max_steps=args.steps + 1, logging_steps=1)
    student = apply_lora(load_causal_lm(data["student"]), cfg)
    collator = _Counting(KDCollator(pad_id=data["pad_id"]))
    timer = _timer()
    trainer = KDTrainer(model=student, args=targs(cfg, Path(args.work) / "out-stillroom"),
                        train_dataset=KDDataset(enc, cache), data_collator=collator, kd=cfg, vocab_size=cache.vocab_size,
                        callbacks=[timer])
    models = resident_models()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**_throughput(collator.tokens, timer.times), "losses": losses, "models_in_memory_blocks": models,
            "teacher_resident": 18 in models, "peak_mem_mb": round(peak_mem_mb(), 1)}


def arm_trl(args, data) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from stillroom.kd.trainer import load_causal_lm, load_tokenizer

    pad = data["pad_id"]

    def collate(rows):
        # Right-padded full sequences; labels = answer tokens only (prompt -100), as TRL's collators build them.
        n = max(len(r["prompt_ids"]) + len(r["answer_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            seq = r["prompt_ids"] + r["answer_ids"]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(r["prompt_ids"]) : len(seq)] = torch.tensor(r["answer_ids"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    tok = load_tokenizer(data["student"])
    student = load_causal_lm(data["student"])
    teacher = load_causal_lm(data["teacher"])
    gkd = GKDConfig(
        output_dir=str(Path(args.work) / "out-trl"), lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
        per_device_train_batch_size=args.batch_size, max_steps=args.steps + 1, learning_rate=1e-4, logging_steps=1,
        save_strategy="no", report_to=[], bf16=False, gradient_checkpointing=False, seed=0, max_length=1024,
        dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    collator = _Counting(collate)
    timer = _timer()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=gkd, data_collator=collator,
                         train_dataset=Dataset.from_list(data["examples"]), processing_class=tok, peft_config=lora,
                         callbacks=[timer])
    models = resident_models()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**_throughput(collator.tokens, timer.times), "losses": losses, "models_in_memory_blocks": models,
            "teacher_resident": 18 in models, "peak_mem_mb": round(peak_mem_mb(), 1)}


def run_arm(name: str, args) -> dict:
    """Run one arm in a fresh process (its own peak memory) and read its JSON back."""
    out = Path(args.work) / f"arm-{name}.json"
    cmd = [sys.executable, __file__, "--arm", name, "--work", str(args.work), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--top-k", str(args.top_k), "--threads", str(args.threads)]
    print(f"== arm {name}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="bigbench:sports_understanding")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--examples", type=int, default=32, help="training examples (the teacher scores them all)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per arm (after one warm-up step)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--drop", default="9:15", help="decoder blocks removed from the teacher to make the student")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per arm (0: torch's default). 1 by default: on a small CPU shared with other "
                    "jobs, intra-op threads stall at every op's barrier (measured 3.7x slower forwards with 2 threads "
                    "under load); both arms use the same setting")
    ap.add_argument("--work", default=None, help="scratch folder (default: <stillroom cache>/bench/kd_speed)")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kd_speed.json"))
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from stillroom.runs import cache_root

    args.work = Path(args.work or cache_root() / "bench" / "kd_speed")
    if args.arm:  # child process
        data = json.loads((args.work / "data.json").read_text())
        res = {"teacher": arm_teacher, "stillroom": arm_stillroom, "trl": arm_trl}[args.arm](args, data)
        (args.work / f"arm-{args.arm}.json").write_text(json.dumps(res, indent=2))
        return res

    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    load0 = os.getloadavg()[0]
    data = prepare(args, args.work)
    lens = [len(e["prompt_ids"]) + len(e["answer_ids"]) for e in data["examples"]]
    teacher = run_arm("teacher", args)
    ours = run_arm("stillroom", args)
    trl = run_arm("trl", args)
    speedup = ours["tokens_per_s"] / trl["tokens_per_s"] if trl["tokens_per_s"] else float("nan")
    epoch_tokens = sum(lens)
    # One epoch end to end: the teacher pass plus training time at the measured rate, both sides.
    e2e_ours = teacher["teacher_forward_seconds"] + epoch_tokens / ours["tokens_per_s"]
    e2e_trl = epoch_tokens / trl["tokens_per_s"]
    result = {
        "speedup_vs_trl": round(speedup, 2),
        "peak_mem_mb": ours["peak_mem_mb"],
        "trl_peak_mem_mb": trl["peak_mem_mb"],
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "tokens_per_s": round(ours["tokens_per_s"], 1),
        "trl_tokens_per_s": round(trl["tokens_per_s"], 1),
        "teacher_resident_during_training": ours["teacher_resident"],
        "trl_teacher_resident": trl["teacher_resident"],
        "teacher_cache": teacher,
        "one_epoch_seconds_incl_teacher_pass": {"stillroom": round(e2e_ours, 1), "trl": round(e2e_trl, 1),
                                                "speedup": round(e2e_trl / e2e_ours, 2)},
        "arms": {"stillroom": ours, "trl": trl},
        "setup": {
            "task": args.task, "shots": args.shots, "examples": len(lens), "tokens_per_example_mean": sum(lens) / len(lens),
            "batch_size": args.batch_size, "steps_timed": args.steps, "top_k": args.top_k,
            "teacher": "embedded Gemma-3 270M (18 blocks, float32)",
            "student": f"Gemma-3 270M with blocks {args.drop} dropped, LoRA r=16 all-linear, AdamW lr 1e-4, float32",
            "stillroom": "train_kd from the top-k cache: fkl, ce_weight 0, answer-position logits only",
            "trl": "trl.experimental.gkd.GKDTrainer, lmbda=0, beta=0 (forward KL), temperature 1, teacher resident",
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.platform(), "load_avg_1m": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
            "command": "python bench/kd_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'arm':<12}{'tokens/s':>12}{'peak MB':>12}{'teacher resident':>18}")
    for name, r in (("stillroom", ours), ("trl", trl)):
        print(f"{name:<12}{r['tokens_per_s']:>12.1f}{r['peak_mem_mb']:>12.0f}{str(r['teacher_resident']):>18}")
    print(f"speed-up {speedup:.2f}x; teacher pass {teacher['teacher_forward_seconds']:.1f}s "
          f"({teacher['cache_bytes'] / 2**20:.1f} MiB cache); one epoch incl. teacher pass: "
          f"{e2e_ours:.0f}s vs {e2e_trl:.0f}s -> {out}")
    return result


if __name__ == "__main__":
    main()
