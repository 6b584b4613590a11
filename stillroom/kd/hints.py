"""Hint KD (FitNets-style): match the student's intermediate hidden states to the teacher's through a learned
projection φ (student width → teacher width), with a metric H (MSE or cosine), on a layer mapping.

Layers are numbered as transformers' `output_hidden_states` numbers them: 0 is the embedding output and i the
output of decoder block i. The default mapping is uniform: student block i ↔ teacher block round(i·Lt / Ls), so
a 9-block student of an 18-block teacher matches blocks 2, 4, ..., 18. The teacher's hidden states come from the
same on-disk cache as its logits (or from the resident teacher in online mode).

φ is one linear map per mapped layer. When the widths are equal (e.g. a layer-dropped student) it starts as the
identity, so the hint is meaningful from the first step instead of chasing a random projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.errors import ConfigError

HINT_METRICS = ("mse", "cosine")


def uniform_layer_map(n_student: int, n_teacher: int, n_hints: int | None = None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs spread evenly over the student's blocks.

    With `n_hints` = None every student block is mapped; otherwise `n_hints` blocks evenly spaced, always ending
    with the last block (last ↔ last).
    """
    if n_student < 1 or n_teacher < 1:
        raise ConfigError("hint layer mapping needs at least one block in student and teacher")
    n = n_student if n_hints is None else max(1, min(int(n_hints), n_student))
    students = sorted({round(n_student * (j + 1) / n) for j in range(n)})
    return [(s, max(1, round(s * n_teacher / n_student))) for s in students]


def parse_layer_map(spec: str, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """'uniform', 'uniform:N' or explicit pairs 'S:T,S:T' (hidden-state indices, 0 = embeddings)."""
    spec = (spec or "uniform").strip()
    if spec.startswith("uniform"):
        _, _, n = spec.partition(":")
        return uniform_layer_map(n_student, n_teacher, int(n) if n else None)
    pairs = []
    for part in spec.split(","):
        try:
            s, t = (int(x) for x in part.split(":"))
        except ValueError:
            raise ConfigError(f"hint layer map {spec!r}: expected 'uniform', 'uniform:N' or 'S:T,S:T'") from None
        if not (0 <= s <= n_student and 0 <= t <= n_teacher):
            raise ConfigError(f"hint layer pair {s}:{t} out of range (student 0..{n_student}, teacher 0..{n_teacher})")
        pairs.append((s, t))
    return pairs


class HintProjector(nn.Module):
    """φ: one linear map per mapped layer, student width → teacher width."""

    def __init__(self, student_dim: int, teacher_dim: int, n_layers: int):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(n_layers))
        if student_dim == teacher_dim:
            for m in self.maps:
                nn.init.eye_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, j: int, h: torch.Tensor) -> torch.Tensor:
        return self.maps[j](h.to(self.maps[j].weight.dtype))


def hint_loss(projected: torch.Tensor, teacher: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Per-row distance [N] between projected student states and teacher states [N, d]."""
    p, t = projected.float(), teacher.float()
    if metric == "mse":
        return (p - t).pow(2).mean(-1)
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(p, t, dim=-1, eps=1e-6)
    raise ConfigError(f"unknown hint metric {metric!r}: expected one of {', '.join(HINT_METRICS)}")
