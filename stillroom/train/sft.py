"""The one supervised fine-tuning helper in Stillroom (healing pruned models, SeqKD / `kd data`, ...).

Data are prompt/completion pairs (`{"prompt": ..., "completion": ...}`); the loss falls on completion tokens only.
It is TRL's `SFTTrainer` with `completion_only_loss=True` (TRL tokenises prompt and prompt+completion, and sets
the labels of prompt tokens to -100), PEFT LoRA by default (q_proj, v_proj, r=8, lr 1e-4, cosine, as in the
self-data distillation reference code) or full fine-tuning, and one change in how the loss is computed.

Why `compute_loss` is overridden. The output head dominates small modern LMs (Gemma-3 270M: a 262k x 640 head,
168M of its 268M parameters), so the loss must not build `[batch, seq, vocab]` logits. TRL 1.16's SFTTrainer
already avoids *materialising* them: it patches the model with a fused, tiled log-prob head
(`trl.trainer.utils.add_fused_lm_head`). But that kernel projects only the positions that have a label on
Triton devices (CUDA/XPU); everywhere else (CPU, MPS) it projects *every* position through the head, tile by
tile, so prompt tokens still pay the full head cost (forward and backward). transformers' `logits_to_keep`
only keeps a suffix (or one index set shared by all rows), which does not match right-padded prompt/completion
rows, and liger kernels are CUDA-only and not installed. So `CompletionSFTTrainer.compute_loss` runs the
backbone, gathers the hidden states of the positions whose next token is a completion token, and projects only
those through the head (in tiles under activation checkpointing when there are many), applying the family's
final-logit transforms (Gemma's soft-capping, logit scaling). The cost of the head becomes proportional to the
answer length instead of the sequence length.

Under `accelerate launch` (DDP) the loss still goes through the wrapped model's `forward`: the head is a patch on
the inner model's forward that is switched on by a keyword (`completion_labels=`), exactly how TRL's own fused head
is reached, so gradient synchronisation is untouched. The normalisation follows Trainer/TRL: the summed token
loss is divided by `num_items_in_batch` (the completion tokens of the whole accumulated batch, across devices)
when the Trainer passes it, else by this micro-batch's completion tokens.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stillroom.config import LoraSettings
from stillroom.errors import ConfigError
from stillroom.models import bf16_supported

try:  # The train extra: `pip install 'stillroom[train]'`.
    from trl import SFTConfig, SFTTrainer
except ImportError:  # pragma: no cover - depends on the install
    SFTTrainer = object  # type: ignore[assignment,misc]
    SFTConfig = None  # type: ignore[assignment]


@dataclass
class SFTSettings:
    """How to fine-tune. Defaults follow the self-data distillation reference code (LoRA q_proj/v_proj, r=8,
    lr 1e-4, cosine)."""

    # The LoRA defaults come from the one home of LoRA settings, `stillroom.config.LoraSettings`.
    lora: bool = LoraSettings().enabled
    """LoRA adapters (True) or full fine-tuning (False)."""
    lora_r: int = LoraSettings().r
    """LoRA rank."""
    lora_alpha: int = LoraSettings().alpha
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = LoraSettings().dropout
    """Dropout on the LoRA input."""
    target_modules: tuple[str, ...] | str = tuple(LoraSettings().target_modules)
    """Modules that get LoRA adapters (or 'all-linear')."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name."""
    warmup_ratio: float = 0.0
    """Share of the steps spent warming up."""
    epochs: float = 1.0
    """Passes over the data (ignored when `max_steps` > 0)."""
    max_steps: int = -1
    """Optimizer steps; > 0 overrides `epochs`."""
    batch_size: int = 8
    """Examples per device per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_length: int | None = 1024
    """Tokens per example (prompt + completion), truncated on the right; None keeps everything."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed for data order, dropout and adapter initialisation."""
    logging_steps: int = 1
    """Log the loss every this many steps."""
    bf16: bool | None = None
    """bfloat16 mixed precision; None = on for CUDA devices that support it, off elsewhere (CPU)."""
    head_chunk: int = 1024
    """Completion positions projected through the head at once (each tile is recomputed in backward)."""
    merge_lora: bool = True
    """When saving, fold the adapters into the weights so the result is a plain model folder."""
    extra_args: dict[str, Any] = field(default_factory=dict)
    """Any other `SFTConfig` fields (e.g. `gradient_checkpointing`, `save_steps`)."""

    @classmethod
    def with_lora(cls, lora: LoraSettings, **kw) -> SFTSettings:
        """Settings whose LoRA part is a config's `LoraSettings` block."""
        targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
        return cls(lora=lora.enabled, lora_r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                   target_modules=targets, **kw)


# ------------------------------------------------------------------------------------------------ loss head


def _head_transform(config: Any):
    """The final-logit transform of the family: logit scaling, then Gemma-style soft-capping (identity if none)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = 1.0 / cfg.logits_scaling  # Granite divides by it
    scale = 1.0 if scale is None else float(scale)

    def transform(logits):
        import torch

        if scale != 1.0:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def completion_head_loss(hidden, labels, head, transform, chunk: int = 1024):
    """Summed cross-entropy over completion positions, projecting only those hidden states through `head`.

    `hidden` `[B, T, H]` is the backbone output, `labels` `[B, T]` the unshifted labels (-100 = no loss). Returns
    `(loss_sum, n_tokens, n_correct)`; `n_correct` counts argmax hits (no gradient).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    h = hidden[:, :-1]
    tgt = labels[:, 1:].to(h.device)
    mask = tgt != -100
    hs, ts = h[mask], tgt[mask]
    n = int(ts.numel())
    if n == 0:
        # Keep the graph connected so backward works on a batch without completion tokens.
        return hidden.sum() * 0.0, 0, 0

    def piece(x, y):
        logits = transform(head(x)).float()
        return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(-1) == y).sum()

    if n <= chunk:
        loss, correct = piece(hs, ts)
        return loss, n, int(correct)
    loss = hs.new_zeros((), dtype=torch.float32)
    correct = 0
    for s in range(0, n, chunk):
        part, c = checkpoint(piece, hs[s : s + chunk], ts[s : s + chunk], use_reentrant=False)
        loss = loss + part
        correct += int(c)
    return loss, n, correct


def add_completion_head(model: Any, chunk: int = 1024) -> None:
    """Patch `model.forward` so that `model(..., completion_labels=labels)` returns the completion-only loss.

    Without that keyword the forward is the original one (generation and evaluation are unchanged). Patch the
    inner causal LM (under PEFT: `peft_model.get_base_model()`); calls through PEFT/DDP wrappers reach it.
    """
    previous = model.forward
    transform = _head_transform(model.config)

    def forward(self, *args, completion_labels=None, **kwargs):
        if completion_labels is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("labels", None)
        kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        out = self.base_model(*args, **kwargs)  # the backbone: no head, no logits
        loss_sum, n, correct = completion_head_loss(out.last_hidden_state, completion_labels,
                                                    self.get_output_embeddings(), transform, chunk)
        return {"loss_sum": loss_sum, "n_tokens": n, "n_correct": correct}

    model.forward = types.MethodType(forward, model)


class CompletionSFTTrainer(SFTTrainer):  # type: ignore[misc,valid-type]
    """TRL's SFTTrainer whose loss projects only completion positions through the head (module docstring)."""

    def __init__(self, *args, head_chunk: int = 1024, **kwargs):
        super().__init__(*args, **kwargs)
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_completion_head(inner, chunk=head_chunk)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs.pop("completion_mask", None)
        out = model(**inputs, completion_labels=labels)
        n_local = out["n_tokens"]
        denom = num_items_in_batch if num_items_in_batch is not None else max(1, n_local)
        loss = out["loss_sum"] / denom
        # As Trainer/TRL do: `num_items_in_batch` counts every rank's tokens and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if n_local:
            self._metrics[mode]["mean_token_accuracy"].append(out["n_correct"] / n_local)
        return (loss, out) if return_outputs else loss


# ------------------------------------------------------------------------------------------------ data


def load_records(path: str | Path) -> list[dict]:
    """Prompt/completion pairs from a JSONL file (`prompt` + `completion`; `input`/`output` also accepted)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{p}: training data file does not exist")
    rows = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: line {lineno}: malformed JSON ({e.msg})") from None
        prompt = obj.get("prompt", obj.get("input"))
        completion = obj.get("completion", obj.get("output"))
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ConfigError(f"{p}: line {lineno}: expected string fields 'prompt' and a non-empty 'completion'")
        rows.append({"prompt": prompt, "completion": completion})
    if not rows:
        raise ConfigError(f"{p}: no training examples")
    return rows


# ------------------------------------------------------------------------------------------------ training


def sft_config(settings: SFTSettings, output_dir: str | Path, has_eval: bool = False):
    """The `SFTConfig` for these settings (prompt/completion data, completion-only loss, no hub, no reports)."""
    if SFTConfig is None:  # pragma: no cover
        raise ConfigError("fine-tuning needs trl and peft: pip install 'stillroom[train]'")
    bf16 = bf16_supported() if settings.bf16 is None else settings.bf16
    kwargs = dict(
        output_dir=str(output_dir),
        completion_only_loss=True,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        bf16=bf16,
        fp16=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="epoch" if has_eval else "no",
        dataset_num_proc=None,
        disable_tqdm=True,
    )
    kwargs.update(settings.extra_args)
    return SFTConfig(**kwargs)


def lora_config(settings: SFTSettings):
    """The PEFT `LoraConfig` for these settings."""
    from stillroom.models import lora_config as build

    return build(settings.lora_r, settings.lora_alpha, settings.lora_dropout, settings.target_modules)


def build_trainer(model: Any, tokenizer: Any, train: list[dict], settings: SFTSettings, output_dir: str | Path,
                  eval_records: list[dict] | None = None, callbacks: list | None = None) -> CompletionSFTTrainer:
    """A ready `CompletionSFTTrainer` (a plain Trainer: works unchanged under `accelerate launch`)."""
    from datasets import Dataset

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = sft_config(settings, output_dir, has_eval=bool(eval_records))
    return CompletionSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train]),
        eval_dataset=Dataset.from_list(eval_records) if eval_records else None,
        processing_class=tokenizer,
        peft_config=lora_config(settings) if settings.lora else None,
        callbacks=callbacks,
        head_chunk=settings.head_chunk,
    )


@dataclass
class SFTResult:
    """What a fine-tuning run produced."""

    model: Any
    """The trained model (LoRA folded in when `merge_lora`)."""
    losses: list[float]
    """Training loss at each logged step."""
    steps: int
    """Optimizer steps taken."""
    seconds: float
    """Wall time of `trainer.train()`."""
    trainable_parameters: int
    log_history: list[dict] = field(default_factory=list)


def train_sft(model: Any, tokenizer: Any, train: list[dict], settings: SFTSettings | None = None,
              output_dir: str | Path = "sft-out", eval_records: list[dict] | None = None) -> SFTResult:
    """Fine-tune `model` on prompt/completion pairs (loss on completions only); returns the trained model."""
    import time

    settings = settings or SFTSettings()
    trainer = build_trainer(model, tokenizer, train, settings, output_dir, eval_records)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    history = list(trainer.state.log_history)
    losses = [h["loss"] for h in history if "loss" in h]
    trained = trainer.model
    if settings.lora and settings.merge_lora and hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    _unpatch(trained)
    return SFTResult(model=trained, losses=losses, steps=int(trainer.state.global_step), seconds=seconds,
                     trainable_parameters=trainable, log_history=history)


def _unpatch(model: Any) -> None:
    """Drop instance-level forward patches (ours and TRL's), so the model is a plain transformers model again."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "forward" in vars(inner):
        del inner.forward


def heal(model_path: str | Path, data: str | Path | list[dict], out_dir: str | Path,
         settings: SFTSettings | None = None) -> dict:
    """`stillroom heal`: fine-tune a saved model on prompt/completion data and save the result as a plain folder.

    Writes the model (LoRA folded in) to `out_dir` and `out_dir/stillroom.json` with the settings, steps, time and
    loss curve.
    """
    from stillroom.models import load_model_and_tokenizer, save_model

    settings = settings or SFTSettings()
    records = load_records(data) if not isinstance(data, list) else data
    model, tok = load_model_and_tokenizer(model_path, dtype="float32", device="cpu")
    out = Path(out_dir)
    scratch = out.parent / f".{out.name}-trainer"
    try:
        res = train_sft(model, tok, records, settings, output_dir=scratch)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)  # nothing is checkpointed there (save_strategy="no")
    record = {
        "healed_from": str(model_path),
        "data": str(data) if not isinstance(data, list) else f"{len(records)} records",
        "examples": len(records),
        "settings": asdict(settings),
        "steps": res.steps,
        "seconds": res.seconds,
        "trainable_parameters": res.trainable_parameters,
        "losses": res.losses,
        "first_loss": res.losses[0] if res.losses else math.nan,
        "last_loss": res.losses[-1] if res.losses else math.nan,
    }
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:  # under `accelerate launch` every rank holds the same weights: save once
        save_model(res.model, tok, out, record)
    state.wait_for_everyone()
    return record
