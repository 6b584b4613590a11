"""White-box KD training: a plain `transformers.Trainer` subclass (so `accelerate launch` works unchanged on
several GPUs), LoRA or full student, reading the teacher's top-k log-probabilities from the on-disk cache.

`KDTrainer.compute_loss`, per batch:

1. one student forward over the left-padded batch with `logits_to_keep = A + 1` (A = longest answer): the
   vocabulary head (262k rows for Gemma-3) runs only at the positions that predict answer tokens;
2. the divergence (`stillroom.kd.losses`) between the student and the teacher's cached top-k + rest buckets, at
   temperature T (times T² with `t2_scaling`), mixed with the ordinary cross-entropy on the gold answer tokens:
   loss = (1 − ce_weight)·KD + ce_weight·CE, averaged over answer tokens (over the whole accumulated batch, so
   gradient accumulation and several GPUs give the same loss as one big batch);
3. with hints, + hint_weight · the hint loss (`stillroom.kd.hints`) on the mapped layers.

`teacher_mode='online'` keeps the teacher resident and computes the same targets per batch instead of reading
the cache (top-k, or the dense distribution when `top_k` is 0). On-policy distillation (the student samples,
the teacher scores its samples) cannot be precomputed; `train_on_policy` runs it through TRL's
`DistillationTrainer` (trl ≥ 1.0, the maintained successor of the experimental `GKDTrainer`), with the teacher
resident, as TRL requires.

`distill_logits` is the route behind `stillroom kd logits` / `stillroom kd hints`: task → prompts → teacher
cache (the teacher is loaded only while the cache is built, then freed) → training → the merged student saved in
the run folder → evaluation of the student before and after on the same examples.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import Trainer, TrainingArguments

from stillroom.config import (
    EVALUATION_ONLY,
    BackendConfig,
    BaselineBlock,
    SelectionBlock,
    SpendConfig,
    TrainingBlock,
    spend_field,
)
from stillroom.errors import ConfigError
from stillroom.kd.hints import HintProjector, hint_loss, parse_layer_map
from stillroom.kd.logit_cache import (
    Encoded,
    LogitCache,
    VocabPlan,
    answer_forward,
    build_logit_cache,
    check_ids_in_range,
    encode_examples,
    left_pad,
)
from stillroom.kd.losses import (
    LOG_FLOOR,
    TeacherTargets,
    answer_cross_entropy,
    dense_divergence,
    sparse_divergence,
    topk_targets,
)
from stillroom.kd.uld import SharedVocab
from stillroom.kd.xtok import TokenBytes
from stillroom.kd.xtok_train import (
    CrossCollator,
    CrossDataset,
    CrossExample,
    XTokConfig,
    XTokTrainer,
    check_cross_settings,
    choose_path,
    choose_served_path,
    encode_cross,
    shared_vocab_for,
)
from stillroom.models import (
    bf16_supported,
    load_causal_lm,
    load_tokenizer,
    merged,
    model_fingerprint,
    release_memory,
    resolve_model_path,
)

Divergence = Literal["fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl"]


class HintConfig(BaseModel):
    """Hint KD: hidden-state matching through a learned projection, added to the logit loss."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Add the hint loss (`stillroom kd hints` turns it on).")
    layer_map: str = Field(
        "uniform",
        description="'uniform' (every student block i ↔ teacher block round(i·Lt/Ls)), 'uniform:N' (N evenly "
        "spaced student blocks), or explicit hidden-state indices 'S:T,S:T' (0 = embeddings).",
    )
    metric: Literal["mse", "cosine"] = Field(
        "cosine",
        description="Distance between projected student and teacher states. Cosine is the default because it is "
        "scale-free: Gemma's residual stream has norms in the hundreds, where raw MSE would swamp the logit loss.",
    )
    weight: float = Field(1.0, ge=0, description="Weight of the hint loss added to the logit loss.")
    positions: Literal["answer", "all"] = Field(
        "answer",
        description="Match states at the answer positions only (small cache) or at every token of the sequence "
        "(more signal; the cache holds [tokens × layers × width] float16 per example).",
    )


class KDConfig(TrainingBlock):
    """Loss and optimisation settings of white-box KD (used by `kd logits`, `kd hints`, the tests and benches).
    The training knobs (lora, epochs, max_steps, learning_rate, batch_size, seed) are the shared training block."""

    divergence: Divergence = Field(
        "fkl",
        description="fkl = KL(teacher‖student) (mode-covering), rkl = KL(student‖teacher) (mode-seeking, MiniLLM), "
        "jsd = generalised JSD(beta) as in GKD/TRL, tvd = total variation, skew_fkl / skew_rkl = skew KL(alpha).",
    )
    beta: float = Field(0.5, ge=0, le=1, description="JSD's β (TRL convention): 0 = forward KL, 1 = reverse KL.")
    alpha: float = Field(0.1, ge=0, lt=1, description="Skew KL's α (DistiLLM): mixture weight of the first argument.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature for teacher and student in the KD term.")
    t2_scaling: bool = Field(True, description="Multiply the KD term by T² (Hinton), keeping its gradient scale.")
    ce_weight: float = Field(
        0.5, ge=0, le=1, description="loss = (1 − ce_weight)·KD + ce_weight·CE on the gold answer tokens."
    )
    top_k: int = Field(
        64, ge=0,
        description="Teacher log-probabilities kept per position (plus one bucket for the rest of the mass). "
        "0 = the full distribution (online mode only).",
    )
    teacher_mode: Literal["cached", "online"] = Field(
        "cached", description="'cached': precompute the teacher once to disk, train without it; 'online': keep it resident."
    )
    learning_rate: float = Field(2e-4, gt=0, description="AdamW learning rate (2e-4 suits LoRA; use ~2e-5 for full).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(512, ge=8, description="Prompt + answer tokens at most (the prompt is cut from the left).")
    append_eos: bool = Field(True, description="End each answer with EOS, so the student learns to stop.")
    shard_size: int = Field(256, ge=1, description="Examples per cache shard (the unit of resumption).")
    teacher_batch_size: int = Field(8, ge=1, description="Batch size of the teacher while it fills the cache.")
    logging_steps: int = Field(10, ge=1, description="Log losses every N steps.")
    dtype: str = Field("auto", description="'auto' (float32 on CPU, bfloat16 on CUDA), 'float32', 'bfloat16'.")
    hints: HintConfig = Field(default_factory=HintConfig, description="Hint KD (hidden-state matching).")


class KDLogitsConfig(KDConfig, SelectionBlock, BaselineBlock):
    """`stillroom kd logits` / `kd hints`: one task, one teacher, one student."""

    teacher: BackendConfig = Field(
        default_factory=BackendConfig,
        description="Teacher: 'gemma3-270m', 'hf:PATH', a local model folder, or 'openai:MODEL' served by vLLM at "
        "base_url (its top-k fill the cache through prompt_logprobs; see stillroom.kd.served_teacher).",
    )
    student: BackendConfig = Field(..., description="Student: 'hf:PATH' or a local model folder (same vocabulary family).")
    shots: int = Field(0, ge=0, description="k solved training examples in every prompt (training and evaluation).")
    eval_teacher: bool = Field(False, description="Also evaluate the teacher on the same examples.",
                               json_schema_extra=EVALUATION_ONLY)
    on_policy: bool = Field(
        False, description="On-policy KD through TRL's DistillationTrainer (student samples, resident teacher scores)."
    )
    max_completion_length: int = Field(32, ge=1, description="On-policy: tokens the student samples per prompt.")
    spend: SpendConfig = spend_field("Cap on a served teacher's spend for this run (its prompt_logprobs requests).")
    xtok: XTokConfig = Field(
        default_factory=XTokConfig,
        description="Teacher and student with different tokenizers: ULD on byte-aligned spans (`mode` 'auto' "
        "detects it; 'same' / 'cross' force a path).",
    )

    @model_validator(mode="after")
    def _check(self):
        # Cross-field checks at load, so a bad config fails before any model is loaded.
        if self.top_k == 0 and self.teacher_mode == "cached" and not self.on_policy:
            raise ValueError("top_k 0 (the full distribution) is only available with teacher_mode 'online'")
        if self.on_policy and self.divergence not in ("fkl", "rkl", "jsd"):
            raise ValueError(f"on-policy KD runs through TRL's DistillationTrainer, which offers fkl, rkl and jsd; "
                             f"not {self.divergence!r}")
        if self.on_policy and self.hints.enabled:
            raise ValueError("hint KD needs cached or online teacher states; it does not combine with on_policy")
        return self


# ---------------------------------------------------------------------------------------------- models


def apply_lora(model: Any, cfg: KDConfig):
    """Wrap the student in LoRA adapters (PEFT)."""
    from peft import get_peft_model

    return get_peft_model(model, cfg.lora.peft())


def n_blocks(model: Any) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def hidden_size(model_or_config: Any) -> int:
    cfg = getattr(model_or_config, "config", model_or_config)
    return int(cfg.get_text_config().hidden_size)


# ---------------------------------------------------------------------------------------------- data


class KDDataset(torch.utils.data.Dataset):
    """Encoded examples, each with its cached teacher targets when there is a cache."""

    def __init__(self, encoded: Sequence[Encoded], cache: LogitCache | None = None):
        if cache is not None and len(cache) != len(encoded):
            raise ConfigError(f"teacher cache holds {len(cache)} examples, the training set {len(encoded)}")
        self.encoded, self.cache = list(encoded), cache

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict:
        return {"enc": self.encoded[i], "cached": self.cache.get(i) if self.cache is not None else None}


def _right_align(rows: Sequence[torch.Tensor], width: int, fill: float, tail: tuple[int, ...], dtype) -> torch.Tensor:
    out = torch.full((len(rows), width, *tail), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r) :] = r
    return out


@dataclass
class KDCollator:
    """Left-pads a batch (`left_pad`) and lays the cached teacher rows out on the same grid: targets [B, A, k]
    right-aligned like the labels; hidden states [B, A, d] (answer positions) or [B, L, d] (all positions)."""

    pad_id: int
    hint_layers: Sequence[int] = ()
    """Teacher layers whose cached states are batched, in layer-map order."""
    hint_positions: str = "answer"

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = left_pad([it["enc"] for it in items], self.pad_id)
        if items[0]["cached"] is None:
            return batch
        a_max = batch["labels"].size(1)
        targets = [it["cached"]["targets"] for it in items]
        k = targets[0].idx.size(-1)
        batch["t_idx"] = _right_align([t.idx for t in targets], a_max, 0, (k,), torch.long)
        batch["t_logp"] = _right_align([t.logp for t in targets], a_max, LOG_FLOOR, (k,), torch.float32)
        batch["t_rest"] = _right_align([t.rest for t in targets], a_max, LOG_FLOOR, (), torch.float32)
        width = a_max if self.hint_positions == "answer" else batch["input_ids"].size(1)
        for j, layer in enumerate(self.hint_layers):
            rows = [it["cached"]["hidden"][layer] for it in items]
            batch[f"t_hidden_{j}"] = _right_align(rows, width, 0.0, (rows[0].size(-1),), torch.float16)
        return batch


# ---------------------------------------------------------------------------------------------- trainer


class KDTrainer(Trainer):
    """`Trainer` with the KD loss. Give `teacher` for online mode; otherwise batches carry the cached targets."""

    # The loss is normalised over the whole accumulated batch (num_items_in_batch), as TRL's trainers do.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, kd: KDConfig, teacher: Any = None, vocab_size: int | None = None,
                 layer_map: Sequence[tuple[int, int]] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.kd = kd
        self.vocab_size = vocab_size
        self.layer_map = list(layer_map)
        # Count answer tokens from our `labels` (already aligned with the kept logits, so no shift).
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = False
        self.teacher = None
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self._kd_logs: dict[str, list[float]] = defaultdict(list)
        self.tokens_seen = 0
        self.answer_tokens_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kd = self.kd
        labels = inputs["labels"]
        mask = labels != -100
        hints = bool(self.layer_map) and kd.hints.enabled
        s_layers = [s for s, _ in self.layer_map] if hints else []
        logits, s_hidden = answer_forward(model, inputs, hidden_layers=s_layers)
        vocab = self.vocab_size or logits.size(-1)
        s_rows = logits[mask][:, :vocab]
        t_hidden: dict[int, torch.Tensor] = {}
        if self.teacher is not None:
            t_layers = [t for _, t in self.layer_map] if hints else []
            with torch.no_grad():
                t_logits, t_h = answer_forward(self.teacher, inputs, hidden_layers=t_layers)
            t_rows = t_logits[mask][:, :vocab]
            if kd.top_k and kd.top_k < vocab:
                div = sparse_divergence(s_rows, topk_targets(t_rows, kd.top_k, kd.temperature), kd.divergence,
                                        temperature=kd.temperature, beta=kd.beta, alpha=kd.alpha)
            else:
                div = dense_divergence(s_rows, t_rows, kd.divergence, temperature=kd.temperature, beta=kd.beta,
                                       alpha=kd.alpha)
            t_hidden = {j: t_h[t] for j, (_, t) in enumerate(self.layer_map)} if hints else {}
        else:
            targets = TeacherTargets(idx=inputs["t_idx"][mask], logp=inputs["t_logp"][mask], rest=inputs["t_rest"][mask])
            div = sparse_divergence(s_rows, targets, kd.divergence, temperature=kd.temperature, beta=kd.beta,
                                    alpha=kd.alpha)
        if kd.t2_scaling:
            div = div * (kd.temperature**2)
        ce = answer_cross_entropy(s_rows, labels[mask])
        per_token = (1.0 - kd.ce_weight) * div + kd.ce_weight * ce
        if num_items_in_batch is not None:
            denom = num_items_in_batch.to(per_token.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            loss = per_token.sum() / denom
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
            ga = self.current_gradient_accumulation_steps
        else:
            loss = per_token.sum() / mask.sum().clamp(min=1)
            ga = 1
        if hints:
            h = self._hint_term(model, inputs, s_hidden, t_hidden, mask)
            loss = loss + kd.hints.weight * h / ga
            self._kd_logs["hint"].append(float(h.detach()))
        n = max(1, int(mask.sum()))
        self._kd_logs["kd"].append(float(div.detach().sum()) / n)
        self._kd_logs["ce"].append(float(ce.detach().sum()) / n)
        if model.training:
            self.tokens_seen += int(inputs["attention_mask"].sum())
            self.answer_tokens_seen += int(mask.sum())
        return (loss, {"logits": logits}) if return_outputs else loss

    def _hint_term(self, model, inputs, s_hidden, t_hidden, mask) -> torch.Tensor:
        kd = self.kd
        projector = self.accelerator.unwrap_model(model).kd_projector
        length = inputs["input_ids"].size(1)
        a_max = mask.size(1)
        total = 0.0
        for j, (s_layer, _) in enumerate(self.layer_map):
            h = s_hidden[s_layer]
            if kd.hints.positions == "answer":
                sel_mask = mask
                s_sel = h[:, length - a_max - 1 : length - 1][sel_mask]
                t_full = t_hidden[j][:, length - a_max - 1 : length - 1] if t_hidden else inputs[f"t_hidden_{j}"]
            else:
                sel_mask = inputs["attention_mask"].bool()
                s_sel = h[sel_mask]
                t_full = t_hidden[j] if t_hidden else inputs[f"t_hidden_{j}"]
            t_sel = t_full[sel_mask]
            total = total + hint_loss(projector(j, s_sel), t_sel, kd.hints.metric).mean()
        return total / max(1, len(self.layer_map))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for name, vals in self._kd_logs.items():
            if vals:
                logs[f"kd/{name}" if name != "kd" else "kd/divergence"] = sum(vals) / len(vals)
        self._kd_logs.clear()
        super().log(logs, start_time)


@dataclass
class TrainResult:
    """What a training run did."""

    model: Any
    """The trained student (a PEFT model when LoRA was used)."""
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    """Non-padding input tokens processed (prompt + answer, every epoch)."""
    answer_tokens: int = 0
    tokens_per_s: float = 0.0
    log_history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 3), "tokens": self.tokens,
                "answer_tokens": self.answer_tokens, "tokens_per_s": round(self.tokens_per_s, 2),
                "log_history": self.log_history, "notes": self.notes}


def training_arguments(cfg: KDConfig, output_dir: str | Path, **over) -> TrainingArguments:
    """The TrainingArguments every Stillroom KD run uses (no checkpoints, no external loggers)."""
    bf16 = bf16_supported(cfg.dtype)
    kw = dict(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps, save_strategy="no", report_to=[], remove_unused_columns=False,
        seed=cfg.seed, bf16=bf16, dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
    )
    kw.update(over)
    return TrainingArguments(**kw)


def train_kd(
    student: Any,
    tokenizer: Any,
    encoded: Sequence[Encoded],
    cfg: KDConfig,
    *,
    output_dir: str | Path,
    cache: LogitCache | None = None,
    teacher: Any = None,
    vocab_size: int | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Distil into `student` on `encoded` from a finished `cache` (teacher_mode 'cached') or a resident `teacher`
    ('online'). Wraps the student in LoRA when `cfg.lora.enabled`; returns the trained model and throughput figures."""
    if cfg.teacher_mode == "cached" and cache is None:
        raise ConfigError("teacher_mode 'cached' needs a teacher-logit cache (build_logit_cache)")
    if cfg.teacher_mode == "online" and teacher is None:
        raise ConfigError("teacher_mode 'online' needs the teacher model")
    if cfg.teacher_mode == "cached" and cfg.top_k == 0:
        raise ConfigError("top_k 0 (the full distribution) is only available with teacher_mode 'online'")
    if cache is not None and abs(cache.temperature - cfg.temperature) > 1e-9:
        raise ConfigError(f"the cache was built at temperature {cache.temperature}, training asks for {cfg.temperature}")
    if cfg.teacher_mode == "online":
        cache = None
    vocab = vocab_size or (cache.vocab_size if cache is not None else None)
    layer_map: list[tuple[int, int]] = []
    if cfg.hints.enabled:
        n_t = cache.meta.get("teacher_blocks") if cache is not None else None
        n_t = n_t or (n_blocks(teacher) if teacher is not None else None)
        if cache is not None and cache.hint_layers:
            if "hint_student_layers" not in cache.meta:
                raise ConfigError(f"{cache.folder}: the cache holds teacher states but not the layer map; build it "
                                  "with extra_meta=hint_meta(layer_map, teacher_config)")
            layer_map = list(zip(cache.meta["hint_student_layers"], cache.hint_layers, strict=True))
        else:
            if n_t is None:
                raise ConfigError("hints need the teacher's hidden states: build the cache with hint layers")
            layer_map = parse_layer_map(cfg.hints.layer_map, n_blocks(student), n_t)
    if cfg.lora.enabled and not hasattr(student, "peft_config"):
        student = apply_lora(student, cfg)
    if layer_map:
        t_dim = hidden_size(teacher) if teacher is not None else int(cache.meta["teacher_hidden_size"])
        projector = HintProjector(hidden_size(student), t_dim, len(layer_map))
        projector.to(next(student.parameters()).device)
        # Registered on the model so DDP/FSDP and the optimizer see it; removed again before saving.
        student.kd_projector = projector
    student.train()
    dataset = KDDataset(encoded, cache)
    collator = KDCollator(
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        hint_layers=[t for _, t in layer_map] if cache is not None else (),
        hint_positions=cfg.hints.positions,
    )
    trainer = KDTrainer(
        model=student, args=training_arguments(cfg, output_dir), train_dataset=dataset, data_collator=collator,
        kd=cfg, teacher=teacher if cfg.teacher_mode == "online" else None, vocab_size=vocab, layer_map=layer_map,
        callbacks=list(callbacks) or None,
    )
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    model = trainer.model
    if hasattr(model, "kd_projector"):
        del model.kd_projector
    return TrainResult(
        model=model, steps=int(out.global_step), seconds=seconds, tokens=trainer.tokens_seen,
        answer_tokens=trainer.answer_tokens_seen, tokens_per_s=trainer.tokens_seen / max(seconds, 1e-9),
        log_history=[h for h in trainer.state.log_history if "loss" in h or "train_loss" in h],
    )


# ---------------------------------------------------------------------------------------------- across tokenizers


def train_xtok(
    student: Any,
    student_tok: Any,
    examples: Sequence[CrossExample],
    cfg: Any,
    xtok: XTokConfig,
    *,
    cache: LogitCache,
    output_dir: str | Path,
    shared: SharedVocab | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Distil into `student` from a finished cross-tokenizer `cache` (`cfg` is a `KDConfig`: optimisation,
    `ce_weight`, `beta`, LoRA). `shared` is needed when `xtok.hybrid`."""
    if xtok.hybrid and shared is None:
        raise ConfigError("the hybrid term needs the shared vocabulary (shared_vocab_for)")
    if abs(cache.temperature - cfg.temperature) > 1e-9:
        raise ConfigError(f"the cache was built at temperature {cache.temperature}, training asks for {cfg.temperature}")
    if cfg.lora.enabled and not hasattr(student, "peft_config"):
        student = apply_lora(student, cfg)
    student.train()
    trainer = XTokTrainer(
        model=student, args=training_arguments(cfg, output_dir), train_dataset=CrossDataset(examples, cache),
        data_collator=CrossCollator(pad_id=student_tok.pad_token_id if student_tok.pad_token_id is not None else 0,
                                    merge=xtok.merge),
        kd=cfg, xtok=xtok, shared=shared if xtok.hybrid else None, callbacks=list(callbacks) or None,
    )
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    spans = sum(len(x.plan) for x in examples)
    tokens = sum(len(x.student.answer_ids) for x in examples)
    notes = [f"cross-tokenizer ULD ({xtok.merge} merge{', hybrid' if xtok.hybrid else ''}): {spans} aligned spans "
             f"over {tokens} student answer tokens, teacher top-{cache.k} + tail in its own vocabulary"]
    return TrainResult(
        model=trainer.model, steps=int(out.global_step), seconds=seconds, tokens=trainer.tokens_seen,
        answer_tokens=trainer.answer_tokens_seen, tokens_per_s=trainer.tokens_seen / max(seconds, 1e-9),
        log_history=[h for h in trainer.state.log_history if "loss" in h or "train_loss" in h], notes=notes,
    )


def distill_cross(cfg: Any, pairs: Sequence[tuple[str, str, str]], *, student: Any, student_tok: Any,
                  teacher_tok: Any, load_teacher: Any, teacher_id: str, teacher_logits: int | None,
                  cache_root: Path, output_dir: Path, progress: bool = True) -> tuple[TrainResult, dict]:
    """The cross-tokenizer body of `kd logits`: encode both sides, fill (or reuse) the teacher cache in the
    teacher's vocabulary (the teacher is loaded only for missing shards, then freed), train. Returns the training
    result and the cache summary for train.json."""
    sb = TokenBytes(student_tok)
    xs = encode_cross(student_tok, teacher_tok, pairs, max_length=cfg.max_length, append_eos=cfg.append_eos,
                      student_bytes=sb)
    t_pad = getattr(teacher_tok, "pad_token_id", None)
    t0 = time.perf_counter()
    with process_state().main_process_first():
        cache, stats = build_logit_cache(
            load_teacher, [x.teacher for x in xs], cache_root, teacher_id=teacher_id, k=cfg.top_k,
            temperature=cfg.temperature, shard_size=cfg.shard_size, batch_size=cfg.teacher_batch_size,
            pad_id=t_pad if t_pad is not None else 0, progress=progress, xtok=True,
        )
    release_memory()
    info = {"folder": str(cache.folder), "computed_shards": stats.computed, "reused_shards": stats.skipped,
            "seconds": round(time.perf_counter() - t0, 2), "teacher_tokens": stats.teacher_tokens, "k": cache.k,
            "cross_tokenizer": True, "aligned_spans": sum(len(x.plan) for x in xs),
            "student_answer_tokens": sum(len(x.student.answer_ids) for x in xs)}
    shared = None
    if cfg.xtok.hybrid:
        shared = shared_vocab_for(student_tok, teacher_tok, student_bytes=sb,
                                  student_vocab=int(student.config.get_text_config().vocab_size),
                                  teacher_vocab=int(teacher_logits or cache.vocab_size))
    result = train_xtok(student, student_tok, xs, cfg, cfg.xtok, cache=cache, output_dir=output_dir, shared=shared)
    return result, info


def train_on_policy(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    cfg: KDConfig,
    *,
    output_dir: str | Path,
    max_completion_length: int = 32,
) -> TrainResult:
    """On-policy KD with TRL's `DistillationTrainer`: the student samples completions of `prompts`, the resident
    teacher scores them, and the student minimises the generalised JSD(β) on its own samples (GKD, Agarwal et al.
    2024). Only the JSD family is available there (fkl → β = 0, rkl → β = 1); there are no gold answers on the
    student's samples, so `ce_weight` does not apply, and no cache can be used (the samples change every step).
    """
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    beta = {"fkl": 0.0, "rkl": 1.0, "jsd": cfg.beta}.get(cfg.divergence)
    if beta is None:
        raise ConfigError(f"on-policy KD runs through TRL's DistillationTrainer, which offers fkl, rkl and jsd; "
                          f"not {cfg.divergence!r}")
    notes = ["on-policy: TRL DistillationTrainer, teacher resident, full-vocabulary JSD(beta) on student samples"]
    if cfg.ce_weight:
        notes.append("ce_weight ignored on-policy (the student's samples have no gold answers)")
    tokenizer.padding_side = "left"
    bf16 = bf16_supported(cfg.dtype)
    args = DistillationConfig(
        output_dir=str(output_dir), beta=beta, temperature=cfg.temperature, max_completion_length=max_completion_length,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps, logging_steps=cfg.logging_steps, save_strategy="no", report_to=[], seed=cfg.seed,
        bf16=bf16, gradient_checkpointing=False, disable_tqdm=True,
    )
    peft_config = None
    if cfg.lora.enabled and not hasattr(student, "peft_config"):
        peft_config = cfg.lora.peft()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), peft_config=peft_config,
    )
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    return TrainResult(model=trainer.model, steps=int(out.global_step), seconds=seconds, notes=notes,
                       log_history=[h for h in trainer.state.log_history if "loss" in h or "train_loss" in h])


# ---------------------------------------------------------------------------------------------- the route


def process_state():
    """accelerate's `PartialState`, created so that CPU processes of a multi-process launch form one (gloo) group.

    A bare `PartialState()` joins a group only on an accelerator: on a machine without CUDA, or with
    ACCELERATE_USE_CPU set, every rank of `accelerate launch --multi_gpu` / torchrun would count as the main process
    here and fill the teacher cache itself. (The Trainer builds its own state from `TrainingArguments`, which
    reads ACCELERATE_USE_CPU: on CPU that variable is what makes training data-parallel.)
    """
    import os

    from accelerate import PartialState

    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=forced or not torch.cuda.is_available())


@dataclass
class KDModels:
    """The teacher and student a KD config names, resolved before the run folder exists."""

    student_path: Path
    teacher_path: Path | None
    served: Any = None
    """A `ServedTeacher` (vLLM) instead of a local teacher folder."""


def resolve_kd_models(cfg: KDLogitsConfig, sel) -> KDModels:
    """The checks `kd logits` makes before it creates its run folder: a labelled training pool, the teacher
    (a local folder, or a vLLM server that can fill the cache) and the student."""
    shot_ids = {s.id for s in sel.shots(cfg.shots)}
    if not any(e.label is not None and e.id not in shot_ids for e in sel.train):
        raise ConfigError(f"task {sel.task.name!r}: no labelled training examples")
    served = None
    if cfg.teacher.spec.partition(":")[0] == "openai":  # a teacher behind vLLM: never loaded here
        from stillroom.kd.served_teacher import served_teacher_for

        served = served_teacher_for(cfg)
    return KDModels(student_path=resolve_model_path(cfg.student.spec), served=served,
                    teacher_path=None if served else resolve_model_path(cfg.teacher.spec))


def distill_logits(cfg: KDLogitsConfig, run_dir: str | Path, *, progress: bool = True) -> dict:
    """The `kd logits` / `kd hints` route. Rerunning the same command resumes: a finished teacher cache is reused
    without loading the teacher, and a finished student is re-evaluated without retraining.

    Writes config.yaml, teacher_logits/<key>/ (the cache), student/ (the distilled student, LoRA merged),
    train.json, predictions.jsonl, metrics.json and report.html.
    """
    from stillroom.route import run_route

    return run_route(cfg, run_dir, lambda ctx: build_logits(ctx, progress), prepare=resolve_kd_models,
                     route="kd-hints" if cfg.hints.enabled else "kd-logits",
                     title=lambda ctx: f"Stillroom KD: {ctx.task.name}").metrics


def build_logits(ctx, progress: bool = True):
    """White-box KD's build: the prompts encoded with the student's tokenizer, the teacher's targets (cached
    top-k, a resident teacher, or on-policy), the trained and merged student; the teacher and the untouched
    student as optional baselines."""
    from transformers import AutoConfig

    from stillroom.backends.hf import HFBackend
    from stillroom.route import BuildCost, Built, Deployment
    from stillroom.tasks.prompts import continuation, render_prompt

    cfg: KDLogitsConfig = ctx.cfg
    m: KDModels = ctx.prepared
    if m.served:
        # A served teacher is a paid teacher: its requests go through the run's cache and usage meter (the spend
        # cap, or the compare's ledger), like every other route's teacher calls.
        m.served.metered(ctx.open_teacher(cfg.teacher, m.served.backend))
    shots = ctx.shots(cfg.shots)
    train = ctx.train_pool(shots, labelled=True)
    s_tok = load_tokenizer(m.student_path)
    s_cfg = AutoConfig.from_pretrained(str(m.student_path)).get_text_config()
    t_tok, t_cfg, plan, cross = pair_tokenizers(ctx, s_tok, s_cfg)
    prompts = [render_prompt(ctx.task, ex, shots) for ex in train]
    pairs = [(ex.id, p, continuation(str(ex.label))) for ex, p in zip(train, prompts, strict=True)]
    # Across tokenizers each side encodes its own ids (`distill_cross`); here, the student's ids are the teacher's.
    encoded = [] if cross else encode_examples(s_tok, pairs, max_length=cfg.max_length, append_eos=cfg.append_eos)
    check_ids_in_range(encoded, plan.size)
    load_teacher = teacher_loader(m, s_tok, cfg.dtype, same_tokenizer=not cross)
    deps = []
    if cfg.eval_teacher:
        deps.append(Deployment(name="teacher", backend=None, model=str(m.teacher_path), shots=shots,
                               load=lambda: HFBackend.from_objects(load_teacher(), t_tok, name="teacher")))
    if cfg.eval_before:
        deps.append(Deployment(name="student (no KD)", backend=None, model=str(m.student_path), shots=shots,
                               load=lambda: HFBackend.from_objects(load_causal_lm(m.student_path, dtype=cfg.dtype),
                                                                   s_tok, name="student-base")))
    trained, info = train_or_reuse(ctx, s_tok, encoded, prompts, plan, s_cfg, t_cfg, load_teacher, progress,
                                   cross=(pairs, t_tok) if cross else None)
    if trained is None:
        return None  # other ranks of a multi-GPU run: the main process saves and evaluates
    student_dir = ctx.run.file("student")
    deps.append(Deployment(name="student (KD)", backend=HFBackend.from_objects(trained, s_tok, name="student-kd"),
                           model=str(student_dir), shots=shots, model_dir=student_dir))
    method = kd_method(cfg, cross)
    ctx.notes.append(f"method: {method}")
    extra = {"split": cfg.eval_split, "train_examples": len(pairs), "method": method,
             "teacher": m.served.identity if m.served else str(m.teacher_path), "student": str(m.student_path),
             "train": {k: v for k, v in info.items() if k != "log_history"}}
    if m.served:  # the served teacher's calls, tokens and USD as billed, earlier invocations included
        cost = BuildCost.from_meter(ctx.teacher.meter.summary(), training_steps=int(info.get("steps", 0)))
    else:
        cost = BuildCost(teacher_input_tokens=int((info.get("cache") or {}).get("teacher_tokens", 0) or 0),
                         training_steps=int(info.get("steps", 0)))
    return Built(deployments=deps, cost=cost, extra=extra,
                 artifacts={"student": str(student_dir), "teacher_logits": str(ctx.run.file("teacher_logits"))},
                 usage=ctx.teacher.meter.summary if m.served else None)


def pair_tokenizers(ctx, s_tok, s_cfg):
    """(teacher tokenizer, teacher text config, same-vocabulary plan, cross): whether teacher and student tokenize
    differently, and so take the cross-tokenizer path (`stillroom.kd.xtok_train`; `xtok.mode` can force either)."""
    from transformers import AutoConfig

    cfg: KDLogitsConfig = ctx.cfg
    m: KDModels = ctx.prepared
    t_tok, t_cfg = s_tok, None
    plan = VocabPlan(size=int(s_cfg.vocab_size))
    if m.served:
        cross, note = choose_served_path(cfg.xtok.mode, m.served, s_tok, int(s_cfg.vocab_size))
        t_tok = m.served.tokenizer() if cross else s_tok  # ids and token bytes through the server's /tokenize
    else:
        if m.teacher_path.resolve() != m.student_path.resolve():
            t_tok = load_tokenizer(m.teacher_path)
        t_cfg = AutoConfig.from_pretrained(str(m.teacher_path)).get_text_config()
        cross, same, note = choose_path(cfg.xtok.mode, s_tok, t_tok, int(s_cfg.vocab_size), int(t_cfg.vocab_size))
        plan = same or plan
    if cross:
        check_cross_settings(cfg, served=bool(m.served))
    ctx.notes.extend(n for n in (plan.note, note) if n)
    return t_tok, t_cfg, plan, cross


def kd_method(cfg: KDLogitsConfig, cross: bool) -> str:
    """The method line of a KD report."""
    if cross:
        return (f"ULD across tokenizers ({cfg.xtok.merge} merge{', hybrid' if cfg.xtok.hybrid else ''}, cached "
                f"teacher top-{cfg.top_k} + tail)")
    return "on-policy GKD (TRL)" if cfg.on_policy else f"{cfg.divergence} ({cfg.teacher_mode} teacher, top-{cfg.top_k})"


def teacher_loader(m: KDModels, s_tok, dtype: str, *, same_tokenizer: bool = True):
    """A function that loads the teacher when it is needed (a served one sharing the student's tokenizer: after
    checking it)."""

    def load():
        if m.served:
            if same_tokenizer:
                m.served.check_tokenizer(s_tok)
            return m.served
        return load_causal_lm(m.teacher_path, dtype=dtype)

    return load


def train_or_reuse(ctx, s_tok, encoded, prompts, plan, s_cfg, t_cfg, load_teacher, progress, cross=None):
    """The trained student: reloaded when the run folder holds it (same training settings), else trained and
    saved with train.json. `cross` = (pairs, teacher tokenizer) takes the cross-tokenizer path. Returns (model,
    train.json's content); (None, {}) on a secondary rank."""
    from stillroom.backends.embedded import save_model_folder

    cfg: KDLogitsConfig = ctx.cfg
    student_dir = ctx.run.file("student")
    info = ctx.run.read_json("train.json")
    if ctx.finished(info, "student"):
        ctx.notes.append("resumed: the distilled student was already trained in this run folder")
        return load_causal_lm(student_dir, dtype=cfg.dtype), info
    student = load_causal_lm(ctx.prepared.student_path, dtype=cfg.dtype)
    cache, cache_info, teacher = None, {}, None
    if cfg.on_policy:
        teacher = load_teacher()
        result = train_on_policy(student, teacher, s_tok, prompts, cfg, output_dir=ctx.run.file("trainer"),
                                 max_completion_length=cfg.max_completion_length)
    elif cross is not None:
        m: KDModels = ctx.prepared
        result, cache_info = distill_cross(
            cfg, cross[0], student=student, student_tok=s_tok, teacher_tok=cross[1], load_teacher=load_teacher,
            teacher_id=m.served.identity if m.served else model_fingerprint(m.teacher_path),
            teacher_logits=None if m.served else int(t_cfg.vocab_size), cache_root=ctx.run.file("teacher_logits"),
            output_dir=ctx.run.file("trainer"), progress=progress,
        )
    else:
        cache, cache_info, teacher = teacher_targets(ctx, encoded, plan, s_tok, s_cfg, t_cfg, load_teacher, progress)
        result = train_kd(student, s_tok, encoded, cfg, output_dir=ctx.run.file("trainer"), cache=cache,
                          teacher=teacher, vocab_size=plan.size)
    trained = merged(result.model)
    info = {**result.summary(), "cache": cache_info, "examples": len(prompts), "config_digest": ctx.digest()}
    del teacher, result
    release_memory()
    if not process_state().is_main_process:
        return None, {}
    save_model_folder(trained, s_tok, student_dir)
    ctx.run.write_json("train.json", info)
    return trained, info


def teacher_targets(ctx, encoded, plan, s_tok, s_cfg, t_cfg, load_teacher, progress):
    """The teacher's side of KD: the on-disk top-k cache (filled once, by the main process of a launch), or the
    resident teacher (online mode). Returns (cache, cache summary, teacher)."""
    cfg: KDLogitsConfig = ctx.cfg
    m: KDModels = ctx.prepared
    if cfg.teacher_mode != "cached":
        return None, {}, load_teacher()
    hint_kw: dict[str, Any] = {}
    if cfg.hints.enabled:
        layer_map = parse_layer_map(cfg.hints.layer_map, int(s_cfg.num_hidden_layers), int(t_cfg.num_hidden_layers))
        hint_kw = {"hint_layers": [t for _, t in layer_map], "hint_positions": cfg.hints.positions,
                   "extra_meta": hint_meta(layer_map, t_cfg)}
    t0 = time.perf_counter()
    # Under `accelerate launch` the main process fills the cache; the others then find every shard done and open
    # it without loading the teacher.
    with process_state().main_process_first():
        cache, stats = build_logit_cache(
            load_teacher, encoded, ctx.run.file("teacher_logits"),
            teacher_id=m.served.identity if m.served else model_fingerprint(m.teacher_path),
            k=cfg.top_k, temperature=cfg.temperature, vocab_size=plan.size, shard_size=cfg.shard_size,
            batch_size=cfg.teacher_batch_size, pad_id=s_tok.pad_token_id or 0, progress=progress, **hint_kw,
        )
    release_memory()  # the teacher loaded inside build_logit_cache is unreachable now
    info = {"folder": str(cache.folder), "computed_shards": stats.computed, "reused_shards": stats.skipped,
            "seconds": round(time.perf_counter() - t0, 2), "teacher_tokens": stats.teacher_tokens, "k": cache.k}
    return cache, info, None


def hint_meta(layer_map: Sequence[tuple[int, int]], teacher_config: Any) -> dict:
    """What the trainer needs to read hints back from a cache: the student side of the layer map, teacher shape."""
    cfg = teacher_config.get_text_config() if hasattr(teacher_config, "get_text_config") else teacher_config
    return {"hint_student_layers": [int(s) for s, _ in layer_map], "teacher_blocks": int(cfg.num_hidden_layers),
            "teacher_hidden_size": int(cfg.hidden_size)}
