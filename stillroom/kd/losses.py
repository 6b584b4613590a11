"""Logit-distillation losses on next-token distributions: forward KL, reverse KL, generalised JSD(β), TVD and
skew KL, with temperature, on dense teacher logits or on a top-k-sparse teacher.

Conventions (p = teacher, q = student, both at temperature T):

* ``fkl``: KL(p ‖ q), mode-covering (classic Hinton KD).
* ``rkl``: KL(q ‖ p), mode-seeking (MiniLLM).
* ``jsd``: generalised JSD exactly as TRL's ``GKDTrainer.generalized_jsd_loss`` / ``DistillationTrainer``:
  m = β·p + (1−β)·q, JSD(β) = β·KL(p ‖ m) + (1−β)·KL(q ‖ m), with the endpoints special-cased as TRL does:
  β = 0 is forward KL and β = 1 is reverse KL (the formula itself vanishes at both ends).
* ``tvd``: ½ Σ |p − q|.
* ``skew_fkl``: KL(p ‖ α·p + (1−α)·q) and ``skew_rkl``: KL(q ‖ α·q + (1−α)·p) (DistiLLM, Ko et al. 2024);
  α = 0 gives plain forward / reverse KL.

A top-k-sparse teacher (the on-disk cache) keeps, per position, the k most likely token ids, their
log-probabilities, and the log of the remaining mass, log(1 − Σ top-k p). Both distributions are then compared
on the same k + 1 buckets (the k tokens and "everything else"); the student's "rest" bucket is the exact
log-sum-exp of its other logits. This is the divergence between the two distributions coarse-grained onto those
buckets: a lower bound of the dense divergence, equal to it when the top-k hold all the mass (k = V). TRL's
``generalized_jsd_loss`` only takes dense logits, so it is not reused; ``tests/test_kd.py`` checks this module
against it on dense inputs (and on bucketed ones).

Temperature divides both models' logits; the loss is *not* multiplied by T² here (TRL does not either). The
trainer applies Hinton's T² factor when asked to (``KDConfig.t2_scaling``), so gradient scale stays comparable
across temperatures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl")
"""Names accepted by `divergence` and `KDConfig.divergence`."""

LOG_FLOOR = -1.0e4
"""Log-probabilities are clamped here: exp(-1e4) is exactly 0 in float32, and 0·(finite) stays 0, so buckets
that hold no mass (e.g. the "rest" bucket when k = V) never produce inf − inf = NaN."""


@dataclass
class TeacherTargets:
    """A top-k-sparse teacher distribution for N positions (rows)."""

    idx: torch.Tensor
    """[N, k] token ids (int64 on use; stored as int32)."""
    logp: torch.Tensor
    """[N, k] teacher log-probabilities of those tokens (at the cache's temperature)."""
    rest: torch.Tensor
    """[N] log of the mass outside the top-k, log(1 − Σ exp(logp)); LOG_FLOOR or below when there is none."""

    def buckets(self) -> torch.Tensor:
        """[N, k+1] log-probabilities over the k tokens and the rest bucket."""
        return torch.cat([self.logp.float(), self.rest.float().unsqueeze(-1)], dim=-1).clamp(min=LOG_FLOOR)


def topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TeacherTargets:
    """The teacher's top-k log-probabilities and rest mass from its logits [N, V] at `temperature`."""
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    k = min(int(k), logp.size(-1))
    top_logp, top_idx = logp.topk(k, dim=-1)
    # The rest mass as a log-sum-exp over the other tokens, not log(1 - sum): exact even when the top-k hold
    # almost all the mass (1 - 0.99999... loses every digit in float32).
    others = logp.scatter(-1, top_idx, float("-inf"))
    rest = torch.logsumexp(others, dim=-1) if k < logp.size(-1) else torch.full_like(top_logp[:, 0], LOG_FLOOR)
    return TeacherTargets(idx=top_idx, logp=top_logp, rest=rest.clamp(min=LOG_FLOOR))


def student_bucket_logprobs(student_logits: torch.Tensor, idx: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The student's log-probabilities [N, k+1] on the teacher's buckets (its top-k ids, then the rest)."""
    z = student_logits.float() / temperature
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)
    top = z.gather(-1, idx.long()) - log_z
    # A finite fill (not -inf) keeps the backward of logsumexp NaN-free when the top-k cover the whole vocabulary.
    others = z.scatter(-1, idx.long(), torch.finfo(z.dtype).min)
    rest = torch.logsumexp(others, dim=-1, keepdim=True) - log_z
    return torch.cat([top, rest], dim=-1).clamp(min=LOG_FLOOR)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) over the last dimension from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, w_a: float) -> torch.Tensor:
    """log(w_a·a + (1 − w_a)·b) from log-probabilities (0 < w_a < 1)."""
    return torch.logaddexp(log_a + math.log(w_a), log_b + math.log1p(-w_a))


def divergence(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    kind: str = "fkl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Per-row divergence [N] between two aligned log-probability tensors [N, C].

    C is the vocabulary (dense) or the k + 1 buckets of a sparse teacher. `beta` is JSD's β (TRL convention),
    `alpha` the skew of the skew KLs. See the module docstring for each definition.
    """
    s = student_logp.float().clamp(min=LOG_FLOOR)
    t = teacher_logp.float().clamp(min=LOG_FLOOR)
    if kind == "fkl":
        return _kl(t, s)
    if kind == "rkl":
        return _kl(s, t)
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return _kl(t, s)
        if beta == 1.0:
            return _kl(s, t)
        m = _mix(t, s, beta)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    if kind == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    if kind in ("skew_fkl", "skew_rkl"):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
        if kind == "skew_fkl":
            return _kl(t, s) if alpha == 0.0 else _kl(t, _mix(t, s, alpha))
        return _kl(s, t) if alpha == 0.0 else _kl(s, _mix(s, t, alpha))
    raise ValueError(f"unknown divergence {kind!r}: expected one of {', '.join(DIVERGENCES)}")


def sparse_divergence(
    student_logits: torch.Tensor,
    targets: TeacherTargets,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Per-position divergence [N] between student logits [N, V] and a top-k-sparse teacher (same temperature
    the teacher's targets were made at)."""
    s = student_bucket_logprobs(student_logits, targets.idx, temperature)
    return divergence(s, targets.buckets(), kind, beta=beta, alpha=alpha)


def dense_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Per-position divergence [N] between student and teacher logits [N, V] over the full vocabulary."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return divergence(s, t, kind, beta=beta, alpha=alpha)


def answer_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy [N] of the gold next tokens `labels` [N] (the ordinary SFT loss, at T = 1)."""
    return F.cross_entropy(student_logits.float(), labels.long(), reduction="none")
