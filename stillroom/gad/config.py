"""`GADConfig`: every setting of `stillroom gad`, validated (unknown fields are an error)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stillroom.config import BackendConfig, LoraSettings, SpendConfig, TaskConfig


class GADConfig(BaseModel):
    """`stillroom gad`: Generative Adversarial Distillation from a black-box teacher (text only)."""

    model_config = ConfigDict(extra="forbid")

    task: TaskConfig
    teacher: BackendConfig = Field(
        default_factory=BackendConfig,
        description="Any backend (local, OpenAI-compatible, scripted): GAD only needs the teacher's text.",
    )
    student: str = Field(..., description="Student (generator): 'gemma3-270m', 'hf:PATH' or a local model folder.")

    # teacher answers (through the run's durable cache)
    teacher_max_tokens: int = Field(32, ge=1, description="Teacher generation budget per answer.")
    teacher_temperature: float = Field(0.0, ge=0, description="Teacher sampling temperature (0 = greedy).")
    teacher_shots: int = Field(0, ge=0, description="Gold-labelled training examples shown to the teacher as shots.")
    shots: int = Field(0, ge=0, description="Gold-labelled training examples in the student's prompt (training and evaluation).")
    filter_correct: bool = Field(
        False,
        description="Keep a teacher answer only if it matches the gold label. Off by default: GAD imitates the "
        "teacher, right or wrong (unparsable answers are always dropped).",
    )

    # adversarial stage (GRPO through TRL)
    num_generations: int = Field(8, ge=2, description="G: student samples per prompt in each adversarial step (paper: 8).")
    temperature: float = Field(0.8, gt=0, description="Student sampling temperature, both stages (paper: 0.8).")
    prompts_per_step: int = Field(2, ge=1, description="Prompts per adversarial step (the batch is prompts_per_step × G samples).")
    adversarial_steps: int = Field(50, ge=1, description="Adversarial (GRPO) optimiser steps.")
    learning_rate: float = Field(1e-5, gt=0, description="Student learning rate in the adversarial stage.")
    beta: float = Field(0.001, ge=0, description="KL penalty to the reference (the warmed-up student); paper: 0.001.")
    epsilon: float = Field(0.2, gt=0, description="PPO-style clipping range of the policy ratio.")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "grpo", description="TRL's token-loss aggregation ('grpo': per-sequence mean, as in GRPO and the paper)."
    )
    max_completion_length: int = Field(32, ge=1, description="Tokens per student sample at most (both stages).")
    update_discriminator: bool = Field(
        True,
        description="Train the discriminator during the adversarial stage. Off = a frozen reward model, which the "
        "student learns to hack (e.g. long answers): kept only as an ablation.",
    )

    # warm-up
    disc_warmup_steps: int = Field(
        10, ge=0, description="Discriminator-only steps first (teacher answers vs the initial student's samples)."
    )
    warmup_epochs: float = Field(1.0, ge=0, description="SeqKD warm-up: SFT passes over the teacher answers (0 = none).")
    warmup_steps: int = Field(-1, description="SeqKD warm-up optimiser steps (-1: use warmup_epochs; 0: no SFT warm-up).")
    warmup_learning_rate: float = Field(1e-4, gt=0, description="SeqKD warm-up learning rate.")
    warmup_disc: bool = Field(True, description="Train the discriminator alongside the SeqKD warm-up (one step per SFT step).")
    batch_size: int = Field(8, ge=1, description="SeqKD warm-up batch size; also prompts per discriminator warm-up step.")

    # discriminator
    disc_learning_rate: float = Field(1e-5, gt=0, description="Discriminator learning rate (AdamW, full fine-tuning).")
    disc_micro_batch: int = Field(16, ge=1, description="Sequences per discriminator forward pass (gradients accumulated).")

    # student parameters
    lora: LoraSettings = Field(
        default_factory=lambda: LoraSettings(dropout=0.0),
        description="LoRA adapters on the student (merged into the saved student); `false` = full fine-tuning. The "
        "one departure from the shared LoRA default: dropout 0, so dropout does not perturb the policy ratio.")
    gradient_checkpointing: bool = Field(False, description="Activation checkpointing in the adversarial stage.")

    max_length: int = Field(512, ge=8, description="Tokens per SFT example and per discriminator input.")
    train_limit: int | None = Field(None, ge=1, description="Use a deterministic sample of N training examples.")
    eval_split: Literal["val", "test"] = Field("test", description="Split the student is evaluated on.")
    eval_limit: int | None = Field(None, ge=1, description="Evaluate on a deterministic sample of N examples.")
    eval_before: bool = Field(True, description="Also evaluate the student before distillation.")
    logging_steps: int = Field(1, ge=1, description="Log reward and discriminator statistics every N adversarial steps.")
    seed: int = Field(0, description="Training and sampling seed.")
    spend: SpendConfig = Field(default_factory=SpendConfig, description="Cap on the teacher's spend for this run.")


#: Fields that only shape the evaluation (a finished stage is reused when they change).
EVAL_FIELDS = ("eval_split", "eval_limit", "eval_before", "logging_steps")
#: Fields that only shape the adversarial stage (the warm-up is reused when they change).
ADVERSARIAL_FIELDS = ("num_generations", "prompts_per_step", "adversarial_steps", "learning_rate", "beta", "epsilon",
                      "loss_type", "update_discriminator", "gradient_checkpointing")
