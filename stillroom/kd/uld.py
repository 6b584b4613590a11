"""Universal Logit Distillation (ULD, Boizard et al. 2024, arXiv 2402.12030) on aligned cross-tokenizer spans, with
GOLD's hybrid term, for a teacher cached as top-k + a tail bucket.

Per aligned span (`stillroom.kd.xtok`), each side has one merged distribution: the base row's probabilities at that
side's temperature, times the probabilities of the span's other actual tokens (the merge strategy picks the base
row and the other tokens). ULD compares the two *sorted* probability vectors with an L1 distance, which needs no
shared vocabulary: Σ_j |s_(j) − t_(j)|, the shorter vector padded with zeros.

The teacher is known only through its top-k (sorted, k ≤ V_t) and the mass of the rest. With the student's sorted
top-k, the loss here is

    Σ_{j<k} |s_(j) − t_(j)|  +  |S_rest − T_rest|,         S_rest = Σ_{j≥k} s_(j),  T_rest = the teacher's tail

the sorted L1 coarse-grained onto k + 1 buckets (a lower bound of it, by the triangle inequality), and *equal* to
TRL's `ULDLoss` when k covers the whole teacher vocabulary (then T_rest = 0 and the tail term is exactly TRL's
padded comparison of the student's remaining sorted probabilities with zeros); `tests/test_xtok.py` checks that
equality on the same tensors. `torch.topk` replaces TRL's full sort of both vocabularies (262k for Gemma-3) at
every position; the teacher side is already sorted in the cache.

Hybrid term (GOLD's ``uld_use_hybrid_loss``): teacher tokens whose bytes are also a student token
(`xtok.shared_vocabulary`) are compared one to one with generalised JSD(β) on the merged probabilities, exactly as
TRL's `_compute_jsd_loss_for_matched_tokens` does (probabilities clamped at 1e-8 before the log); the rest go
through the sorted L1 above, restricted to unmatched tokens on both sides (the student's matched tokens outside the
teacher's top-k join its tail bucket). The two are weighted by fixed weights, or adaptively by the share of the
teacher vocabulary that is matched (TRL's default).

Why not call TRL's `ULDLoss` directly: it takes both models' full logits over padded sequences and sorts both
vocabularies per position; the cache holds the teacher's top-k plus a tail, never its full logits, and the teacher
is not resident while the student trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stillroom.kd.losses import LOG_FLOOR

PROB_EPS = 1e-8
"""TRL's clamp before taking logs of merged probabilities (matched-token JSD), kept for parity."""


@dataclass
class SpanBatch:
    """Aligned spans of a batch, flattened: the student's indices into its answer rows, the teacher's merged top-k.

    Student rows are the answer positions of the batch in example order (``logits[labels != -100]``)."""

    s_base: torch.Tensor
    """[G] student row of each span's base distribution."""
    s_scalar_rows: torch.Tensor
    """[M] student rows whose actual token's probability multiplies into a span."""
    s_scalar_span: torch.Tensor
    """[M] the span each of those rows belongs to."""
    s_tokens: torch.Tensor
    """[G] student tokens per span (the span's weight in the loss)."""
    t_idx: torch.Tensor
    """[G, k] teacher token ids of the base row's top-k (sorted by probability, descending)."""
    t_logp: torch.Tensor
    """[G, k] their log-probabilities, the span's merge factor already added."""
    t_rest: torch.Tensor
    """[G] log of the teacher's tail mass, merge factor added."""

    def to(self, device) -> SpanBatch:
        return SpanBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


@dataclass
class SharedVocab:
    """The hybrid term's vocabulary match (`xtok.shared_vocabulary`) as tensors."""

    t2s: torch.Tensor
    """[V_t] student id of each teacher id, −1 where the teacher token has no student twin."""
    s_matched: torch.Tensor
    """[V_s] bool: student ids that are some teacher token's twin."""
    n_matched: int
    teacher_vocab: int

    @classmethod
    def build(cls, mapping: dict[int, int], teacher_vocab: int, student_vocab: int) -> SharedVocab:
        """From a teacher id → student id dict and both vocabulary (logit) sizes."""
        t2s = torch.full((teacher_vocab,), -1, dtype=torch.long)
        s_matched = torch.zeros(student_vocab, dtype=torch.bool)
        for t, s in mapping.items():
            if t < teacher_vocab and s < student_vocab:
                t2s[t] = s
                s_matched[s] = True
        return cls(t2s=t2s, s_matched=s_matched, n_matched=int((t2s >= 0).sum()), teacher_vocab=teacher_vocab)

    def to(self, device) -> SharedVocab:
        return SharedVocab(self.t2s.to(device), self.s_matched.to(device), self.n_matched, self.teacher_vocab)

    def weights(self, matched_weight: float | None, unmatched_weight: float | None) -> tuple[float, float]:
        """(matched, unmatched) weights: the given ones, or TRL's adaptive share of matched teacher tokens."""
        if matched_weight is None or unmatched_weight is None:
            w = self.n_matched / max(1, self.teacher_vocab)
            return w, 1.0 - w
        return float(matched_weight), float(unmatched_weight)


def _pad_cols(x: torch.Tensor, k: int) -> torch.Tensor:
    return x if x.size(-1) >= k else torch.nn.functional.pad(x, (0, k - x.size(-1)))


def _pointwise_gjsd(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalised JSD on probabilities, per element (summed by the caller)."""
    ls, lt = s.clamp_min(PROB_EPS).log(), t.clamp_min(PROB_EPS).log()
    if beta == 0:
        return lt.exp() * (lt - ls)
    if beta == 1:
        return ls.exp() * (ls - lt)
    lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
    return beta * lt.exp() * (lt - lm) + (1 - beta) * ls.exp() * (ls - lm)


def uld_span_losses(
    student_rows: torch.Tensor,
    student_tokens: torch.Tensor,
    spans: SpanBatch,
    *,
    temperature: float = 1.0,
    shared: SharedVocab | None = None,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """ULD (hybrid with `shared`) per aligned span [G].

    `student_rows` [N, V_s] are the student's logits at its answer positions, `student_tokens` [N] the tokens they
    predict; `temperature` is the student's (the teacher's is the cache's).
    """
    g = spans.s_base.numel()
    if g == 0:
        return student_rows.sum() * 0.0 + torch.zeros(0, device=student_rows.device)
    z = student_rows.float() / temperature
    log_z = torch.logsumexp(z, dim=-1)
    # Merge factor per span: Σ log p(actual token) over the span's non-base rows.
    scale = torch.zeros(g, device=z.device, dtype=z.dtype)
    if spans.s_scalar_rows.numel():
        rows = spans.s_scalar_rows
        tok_lp = z[rows].gather(-1, student_tokens[rows].long().unsqueeze(-1)).squeeze(-1) - log_z[rows]
        scale = scale.index_add(0, spans.s_scalar_span, tok_lp)
    base = z[spans.s_base] - (log_z[spans.s_base] - scale).unsqueeze(-1)  # [G, V_s] merged log-probs
    mass = scale.exp()
    k = spans.t_logp.size(-1)
    t_top = spans.t_logp.float().clamp(min=LOG_FLOOR).exp()
    t_rest = spans.t_rest.float().clamp(min=LOG_FLOOR).exp()
    if shared is None:
        s_top = _pad_cols(base.topk(min(k, base.size(-1)), dim=-1).values.exp(), k)
        s_rest = (mass - s_top.sum(-1)).clamp(min=0.0)
        return (s_top - t_top).abs().sum(-1) + (s_rest - t_rest).abs()
    w_m, w_u = shared.weights(matched_weight, unmatched_weight)
    twin = shared.t2s[spans.t_idx.long()]  # [G, k]
    matched = twin >= 0
    s_twin = base.gather(-1, twin.clamp(min=0)).exp()
    jsd = (_pointwise_gjsd(s_twin, t_top, beta) * matched).sum(-1)
    t_un = torch.where(matched, torch.zeros_like(t_top), t_top).sort(dim=-1, descending=True).values
    s_un_logp = base.masked_fill(shared.s_matched.unsqueeze(0), torch.finfo(base.dtype).min)
    s_un = _pad_cols(s_un_logp.topk(min(k, base.size(-1)), dim=-1).values.exp(), k)
    s_rest = (mass - (s_twin * matched).sum(-1) - s_un.sum(-1)).clamp(min=0.0)
    l1 = (s_un - t_un).abs().sum(-1) + (s_rest - t_rest).abs()
    return w_m * jsd + w_u * l1
