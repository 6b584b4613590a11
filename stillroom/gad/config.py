"""`GADConfig`: every setting of `stillroom gad`, validated (unknown fields are an error)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stillroom.config import (
    EVALUATION_ONLY,
    BackendConfig,
    BaselineBlock,
    LoraSettings,
    SelectionBlock,
    SpendConfig,
    spend_field,
)

ADVERSARIAL = {"identity": "adversarial"}
"""`json_schema_extra` of a field that shapes only the adversarial stage: a finished warm-up is reused when it
changes (`identity_of(cfg, leave_out=("evaluation", "adversarial"))`)."""


class GADConfig(SelectionBlock, BaselineBlock):
    """`stillroom gad`: Generative Adversarial Distillation from a black-box teacher (text only)."""

    teacher: BackendConfig = Field(
        default_factory=BackendConfig,
        description="Any backend (local, OpenAI-compatible, scripted): GAD only needs the teacher's text.",
    )
    student: BackendConfig = Field(..., description="Student (generator): 'gemma3-270m', 'hf:PATH' or a local model folder.")

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
    num_generations: int = Field(8, ge=2, description="G: student samples per prompt in each adversarial step (paper: 8).", json_schema_extra=ADVERSARIAL)
    temperature: float = Field(0.8, gt=0, description="Student sampling temperature, both stages (paper: 0.8).")
    prompts_per_step: int = Field(2, ge=1, description="Prompts per adversarial step (the batch is prompts_per_step × G samples).", json_schema_extra=ADVERSARIAL)
    adversarial_steps: int = Field(50, ge=1, description="Adversarial (GRPO) optimiser steps.", json_schema_extra=ADVERSARIAL)
    learning_rate: float = Field(1e-5, gt=0, description="Student learning rate in the adversarial stage.", json_schema_extra=ADVERSARIAL)
    beta: float = Field(0.001, ge=0, description="KL penalty to the reference (the warmed-up student); paper: 0.001.", json_schema_extra=ADVERSARIAL)
    epsilon: float = Field(0.2, gt=0, description="PPO-style clipping range of the policy ratio.", json_schema_extra=ADVERSARIAL)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "grpo", description="TRL's token-loss aggregation ('grpo': per-sequence mean, as in GRPO and the paper).",
        json_schema_extra=ADVERSARIAL,
    )
    max_completion_length: int = Field(32, ge=1, description="Tokens per student sample at most (both stages).")
    update_discriminator: bool = Field(
        True,
        description="Train the discriminator during the adversarial stage. Off = a frozen reward model, which the "
        "student learns to hack (e.g. long answers): kept only as an ablation.",
        json_schema_extra=ADVERSARIAL,
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
    gradient_checkpointing: bool = Field(False, description="Activation checkpointing in the adversarial stage.", json_schema_extra=ADVERSARIAL)

    max_length: int = Field(512, ge=8, description="Tokens per SFT example and per discriminator input.")
    logging_steps: int = Field(1, ge=1, description="Log reward and discriminator statistics every N adversarial steps.",
                               json_schema_extra=EVALUATION_ONLY)
    seed: int = Field(0, description="Training and sampling seed.")
    spend: SpendConfig = spend_field()
