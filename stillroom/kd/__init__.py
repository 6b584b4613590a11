"""Knowledge distillation for LLMs (methods.md §3).

White-box (`stillroom kd logits`, `stillroom kd hints`):
    losses.py       forward/reverse KL, generalised JSD(β) (TRL's convention), TVD, skew KL; dense or top-k sparse
    logit_cache.py  the teacher's top-k log-probabilities (+ rest mass) precomputed once into resumable shards;
                    vocabulary checks; answer-position-only forwards
    trainer.py      `KDTrainer` (a plain transformers Trainer: LoRA or full, `accelerate launch` ready), online
                    teacher mode, on-policy through TRL's DistillationTrainer, and the `distill_logits` route
    hints.py        hidden-state hints through a learned projection, layer mapping
Black-box (`stillroom kd data`):
    data.py         SeqKD, chain-of-thought and teacher-labelled demonstrations from any (cached) backend, then
                    SFT through `stillroom.train.sft`
cli.py registers the `kd` sub-commands. Modules import torch; this package file does not.
"""
