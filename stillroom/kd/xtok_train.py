"""Cross-tokenizer logit KD: data, teacher cache and training when teacher and student tokenize differently.

1. `encode_cross`: every training example is tokenized by both sides (prompt + gold answer, exactly as the
   same-vocabulary path does); each side's answer tokens get byte offsets (`xtok.byte_offsets`, checked against
   the answer's UTF-8 bytes) and the answers are aligned into spans (`xtok.plan_spans`).
2. The teacher fills a cache in its *own* vocabulary (`build_logit_cache(..., xtok=True)`): top-k + tail per
   answer position, the log-probability of each actual answer token (the merge factor) and the byte offsets; the
   teacher is then freed, and a killed build resumes at the first missing shard.
3. `XTokTrainer` (a plain `transformers.Trainer`; `stillroom.kd.trainer.train_xtok` and `distill_cross` run it): one student forward over the answer positions, then per span
   the ULD distance (`stillroom.kd.uld`, optionally GOLD's hybrid term) between the merged student and teacher
   distributions, plus cross-entropy on the gold answer tokens:

       loss = (1 − ce_weight) · Σ_spans n_s(span) · ULD(span) / N  +  ce_weight · Σ_tokens CE / N

   with n_s the span's student tokens and N the answer tokens of the whole accumulated batch (so gradient
   accumulation gives the loss of one big batch). No T² factor: ULD compares probabilities, not log-ratios.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import Trainer

from stillroom.errors import ConfigError
from stillroom.kd.logit_cache import Encoded, LogitCache, answer_forward, encode_examples, left_pad
from stillroom.kd.losses import answer_cross_entropy
from stillroom.kd.uld import SharedVocab, SpanBatch, uld_span_losses
from stillroom.kd.xtok import (
    MERGE_STRATEGIES,
    SpanPlan,
    TokenBytes,
    byte_offsets,
    plan_spans,
    shared_vocabulary,
)


class XTokConfig(BaseModel):
    """Logit KD across tokenizers (ULD on byte-aligned spans, GOLD's merge strategies and hybrid term)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "same", "cross"] = Field(
        "auto",
        description="'auto': the cross-tokenizer path when teacher and student tokenize differently; 'same': force "
        "the same-vocabulary path (refused when the vocabularies differ); 'cross': force the cross-tokenizer path.",
    )
    merge: Literal["bayesian", "observed"] = Field(
        "bayesian",
        description="Several tokens on one side of a span: 'bayesian' = the last token's distribution times the "
        "earlier tokens' probabilities (chain rule); 'observed' = the first token's distribution times the later "
        "tokens' probabilities (GOLD's strategies).",
    )
    student_temperature: float = Field(
        1.0, gt=0, description="Student softmax temperature in ULD (the teacher's is `temperature`, baked in the cache).")
    hybrid: bool = Field(
        False, description="GOLD's hybrid term: tokens whose bytes exist in both vocabularies are compared one to one "
        "(generalised JSD with `beta`), the rest by sorted L1.")
    hybrid_matched_weight: float | None = Field(
        None, ge=0, description="Weight of the matched-token term (None with the other None: the matched share).")
    hybrid_unmatched_weight: float | None = Field(None, ge=0, description="Weight of the sorted-L1 term.")

    @model_validator(mode="after")
    def _weights(self):
        if (self.hybrid_matched_weight is None) != (self.hybrid_unmatched_weight is None):
            raise ValueError("hybrid_matched_weight and hybrid_unmatched_weight: give both or neither")
        return self


# ---------------------------------------------------------------------------------------------- data


@dataclass
class CrossExample:
    """One training example on both sides, with its aligned answer spans."""

    student: Encoded
    teacher: Encoded
    plan: SpanPlan


def answer_text(prompt: str, answer: str) -> str:
    """The answer's text as `encode_pair` splits it (the prompt's trailing whitespace moves onto the answer)."""
    n = len(prompt) - len(prompt.rstrip())
    return prompt[len(prompt) - n :] + answer if n else answer


def encode_cross(
    student_tok: Any,
    teacher_tok: Any,
    pairs: Sequence[tuple[str, str, str]],
    *,
    max_length: int = 512,
    append_eos: bool = True,
    student_bytes: TokenBytes | None = None,
    teacher_bytes: Any = None,
) -> list[CrossExample]:
    """Tokenize (id, prompt, answer) triples with both tokenizers and align their answers by bytes.

    `teacher_tok` may be a served teacher's tokenizer (`served_teacher.ServedTokenizer`), which brings its own
    token bytes. Raises `ConfigError` naming the example when a side's tokens do not spell its answer.
    """
    sb = student_bytes or TokenBytes(student_tok)
    tb = teacher_bytes or getattr(teacher_tok, "token_bytes", None) or TokenBytes(teacher_tok)
    s_enc = encode_examples(student_tok, pairs, max_length=max_length, append_eos=append_eos)
    t_enc = encode_examples(teacher_tok, pairs, max_length=max_length, append_eos=append_eos)
    out = []
    for (ex_id, prompt, answer), s, t in zip(pairs, s_enc, t_enc, strict=True):
        text = answer_text(prompt, answer)
        s_off = byte_offsets([sb[i] for i in s.answer_ids], text, where=f"example {ex_id!r} (student tokenizer)")
        t_off = byte_offsets([tb[i] for i in t.answer_ids], text, where=f"example {ex_id!r} (teacher tokenizer)")
        s.meta["byte_offsets"], t.meta["byte_offsets"] = s_off, t_off
        out.append(CrossExample(student=s, teacher=t, plan=plan_spans(s_off, t_off)))
    return out


class CrossDataset(torch.utils.data.Dataset):
    """Cross examples with the teacher's cached rows."""

    def __init__(self, examples: Sequence[CrossExample], cache: LogitCache):
        if len(cache) != len(examples):
            raise ConfigError(f"teacher cache holds {len(cache)} examples, the training set {len(examples)}")
        if not cache.xtok:
            raise ConfigError(f"{cache.folder}: not a cross-tokenizer cache (no byte offsets); build it with xtok=True")
        self.examples, self.cache = list(examples), cache

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.examples[i], "cached": self.cache.get(i)}


@dataclass
class CrossCollator:
    """Left-pads the student batch and flattens the aligned spans into a `SpanBatch` (fields prefixed ``x_``)."""

    pad_id: int
    merge: str = "bayesian"

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if self.merge not in MERGE_STRATEGIES:
            raise ConfigError(f"merge must be one of {MERGE_STRATEGIES}, got {self.merge!r}")
        batch = left_pad([it["x"].student for it in items], self.pad_id)
        s_base, sc_rows, sc_span, s_tokens, t_idx, t_logp, t_rest = [], [], [], [], [], [], []
        row0 = 0
        for it in items:
            x, cached = it["x"], it["cached"]
            tg_all = cached["targets"]
            tok_lp = cached["tok_logp"].float()
            for sg, tg in zip(x.plan.student, x.plan.teacher, strict=True):
                g = len(s_base)
                if self.merge == "bayesian":
                    s_b, s_other, t_b, t_other = sg[-1], sg[:-1], tg[-1], tg[:-1]
                else:
                    s_b, s_other, t_b, t_other = sg[0], sg[1:], tg[0], tg[1:]
                s_base.append(row0 + s_b)
                sc_rows.extend(row0 + j for j in s_other)
                sc_span.extend([g] * len(s_other))
                s_tokens.append(len(sg))
                scale = float(tok_lp[t_other].sum()) if t_other else 0.0
                t_idx.append(tg_all.idx[t_b].long())
                t_logp.append(tg_all.logp[t_b].float() + scale)
                t_rest.append(float(tg_all.rest[t_b]) + scale)
            row0 += len(x.student.answer_ids)
        k = tg_all.idx.size(-1)
        batch.update({
            "x_s_base": torch.tensor(s_base, dtype=torch.long),
            "x_s_scalar_rows": torch.tensor(sc_rows, dtype=torch.long),
            "x_s_scalar_span": torch.tensor(sc_span, dtype=torch.long),
            "x_s_tokens": torch.tensor(s_tokens, dtype=torch.float32),
            "x_t_idx": torch.stack(t_idx) if t_idx else torch.zeros(0, k, dtype=torch.long),
            "x_t_logp": torch.stack(t_logp) if t_logp else torch.zeros(0, k),
            "x_t_rest": torch.tensor(t_rest, dtype=torch.float32),
        })
        return batch


def span_batch(inputs: dict[str, torch.Tensor]) -> SpanBatch:
    """The `SpanBatch` a `CrossCollator` batch carries."""
    return SpanBatch(s_base=inputs["x_s_base"], s_scalar_rows=inputs["x_s_scalar_rows"],
                     s_scalar_span=inputs["x_s_scalar_span"], s_tokens=inputs["x_s_tokens"], t_idx=inputs["x_t_idx"],
                     t_logp=inputs["x_t_logp"], t_rest=inputs["x_t_rest"])


# ---------------------------------------------------------------------------------------------- trainer


class XTokTrainer(Trainer):
    """`Trainer` with the cross-tokenizer KD loss (ULD on aligned spans + CE), reading a cross-tokenizer cache."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, kd: Any, xtok: XTokConfig, shared: SharedVocab | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd, self.xtok = kd, xtok
        self.shared = shared.to(self.args.device) if shared is not None else None
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = False
        self._kd_logs: dict[str, list[float]] = defaultdict(list)
        self.tokens_seen = 0
        self.answer_tokens_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        mask = labels != -100
        logits, _ = answer_forward(model, inputs)
        rows, toks = logits[mask], labels[mask]
        spans = span_batch(inputs)
        uld = uld_span_losses(rows, toks, spans, temperature=self.xtok.student_temperature, shared=self.shared,
                              matched_weight=self.xtok.hybrid_matched_weight,
                              unmatched_weight=self.xtok.hybrid_unmatched_weight, beta=self.kd.beta)
        ce = answer_cross_entropy(rows, toks)
        w = self.kd.ce_weight
        total = (1.0 - w) * (uld * spans.s_tokens).sum() + w * ce.sum()
        if num_items_in_batch is not None:
            denom = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            loss = total / denom
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = total / mask.sum().clamp(min=1)
        n_spans = max(1, spans.s_base.numel())
        self._kd_logs["uld"].append(float(uld.detach().sum()) / n_spans)
        self._kd_logs["ce"].append(float(ce.detach().sum()) / max(1, int(mask.sum())))
        self._kd_logs["spans_per_token"].append(n_spans / max(1, int(mask.sum())))
        if model.training:
            self.tokens_seen += int(inputs["attention_mask"].sum())
            self.answer_tokens_seen += int(mask.sum())
        return (loss, {"logits": logits}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for name, vals in self._kd_logs.items():
            if vals:
                logs[f"kd/{name}"] = sum(vals) / len(vals)
        self._kd_logs.clear()
        super().log(logs, start_time)


def shared_vocab_for(student_tok: Any, teacher_tok: Any, *, student_vocab: int, teacher_vocab: int,
                     student_bytes: TokenBytes | None = None, teacher_bytes: Any = None) -> SharedVocab:
    """The hybrid term's vocabulary match between two tokenizers (by token bytes)."""
    sb = student_bytes or TokenBytes(student_tok)
    tb = teacher_bytes or getattr(teacher_tok, "token_bytes", None) or TokenBytes(teacher_tok)
    return SharedVocab.build(shared_vocabulary(sb, tb), teacher_vocab, student_vocab)


# ---------------------------------------------------------------------------------------------- the route's choice


def choose_path(mode: str, student_tok: Any, teacher_tok: Any, student_logits: int, teacher_logits: int):
    """(cross, same-vocabulary plan or None, note) for `kd logits`: 'auto' takes the cross-tokenizer path exactly
    when `check_vocab` refuses the pair; 'same' refuses a pair that tokenizes differently, naming both vocabulary
    sizes; 'cross' always aligns by bytes."""
    from stillroom.kd.logit_cache import check_vocab

    sizes = (f"student vocabulary {len(student_tok)} tokens ({student_logits} logits), teacher vocabulary "
             f"{len(teacher_tok)} tokens ({teacher_logits} logits)")
    if mode == "cross":
        return True, None, f"cross-tokenizer path (xtok.mode 'cross'; {sizes})"
    try:
        return False, check_vocab(student_tok, teacher_tok, student_logits, teacher_logits), ""
    except ConfigError as exc:
        if mode == "same":
            raise ConfigError(
                f"xtok.mode 'same' forces the same-vocabulary path, but teacher and student tokenize differently: "
                f"{sizes}. Use xtok.mode 'auto' or 'cross' (ULD on byte-aligned spans). Details: {exc}"
            ) from None
        return True, None, (f"teacher and student tokenize differently ({sizes}): cross-tokenizer ULD on "
                            "byte-aligned spans")


def choose_served_path(mode: str, served: Any, student_tok: Any, student_logits: int) -> tuple[bool, str]:
    """(cross, note) for a teacher behind vLLM: 'auto' aligns by bytes when the server tokenizes a probe text
    differently from the student; 'same' refuses that, naming the student's vocabulary size (a server does not say
    its own); 'cross' always aligns."""
    if mode == "cross":
        return True, "cross-tokenizer path (xtok.mode 'cross')"
    try:
        served.check_tokenizer(student_tok)
        return False, ""
    except ConfigError as exc:
        if mode == "same":
            raise ConfigError(f"xtok.mode 'same' forces the same-vocabulary path, but the served teacher tokenizes "
                              f"differently from the student (student vocabulary {len(student_tok)} tokens, "
                              f"{student_logits} logits; the server does not list its vocabulary): {exc}") from None
        return True, "the served teacher tokenizes differently: cross-tokenizer ULD on byte-aligned spans"


def check_cross_settings(cfg: Any, *, served: bool) -> None:
    """Refuse the settings the cross-tokenizer path does not offer, each with the reason."""
    for bad, why in (
        (cfg.hints.enabled, "hint KD matches hidden states position by position, so it stays same-architecture and "
                            "same-tokenizer only; distil across tokenizers with `kd logits` (ULD)"),
        (getattr(cfg, "on_policy", False), "on-policy KD scores the student's samples with the teacher's tokens; "
                                           "TRL's GOLDTrainer does that with a resident teacher"),
        (cfg.teacher_mode == "online", "the cross-tokenizer path reads the teacher from its cache; use "
                                       "teacher_mode 'cached'"),
        (cfg.top_k == 0, "top_k 0 (the full distribution) is not cached; give top_k > 0"),
        (served and cfg.xtok.hybrid, "the hybrid term needs the teacher's whole vocabulary, which a server does "
                                     "not list; turn xtok.hybrid off"),
    ):
        if bad:
            raise ConfigError(f"teacher and student tokenize differently: {why}")
