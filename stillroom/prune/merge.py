"""SLERP merging of two same-shape models, with mergekit's semantics.

Per tensor (mergekit `merge_methods/slerp.py`): flatten; normalise both copies (a norm below `eps` leaves the
tensor as is); `dot` = the normalised inner product, clamped to [-1, 1]; if `|dot| > 0.9995` the two are (anti-)
parallel and the result is the linear interpolation `(1-t)·a + t·b`; otherwise with `theta = arccos(dot)` the
result is `sin((1-t)·theta)/sin(theta) · a + sin(t·theta)/sin(theta) · b`, applied to the *unnormalised* tensors.
`t = 0` gives the base model A, `t = 1` gives B. Computed in float32 (float64 when the inputs are), returned in
the input dtype. Non-floating tensors (integer buffers) are taken from the base.

Per-layer schedules (mergekit "gradients"): a list of anchors `[v0, ..., vk]` is spread over the layers; layer
`i` of `L` sits at `x = i/(L-1)` (x = 1 when L = 1), and t is the linear interpolation of the anchors at
`x·k`. Tensors outside the decoder layers (embeddings, final norm, head) take the schedule at x = 0, as
mergekit's planner does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stillroom.errors import ConfigError

DOT_THRESHOLD = 0.9995
"""Above this |cosine| the tensors count as parallel and SLERP falls back to linear interpolation."""
EPS = 1e-8
"""Norms below this are not normalised (mergekit's eps)."""
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class MergeShapeError(ConfigError):
    """The two models cannot be merged tensor by tensor (different tensors or shapes)."""


def slerp(t: float, v0: Any, v1: Any, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS):
    """Spherical interpolation between two tensors of the same shape (mergekit semantics, see module docstring)."""
    import torch

    if v0.shape != v1.shape:
        raise MergeShapeError(f"cannot SLERP tensors of shapes {tuple(v0.shape)} and {tuple(v1.shape)}")
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = float(torch.dot(ua, ub).clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        out = (math.sin((1 - t) * theta) / s) * a + (math.sin(t * theta) / s) * b
    return out.reshape(v0.shape).to(v0.dtype)


def t_at(schedule: float | Sequence[float], x: float) -> float:
    """t at relative depth x in [0, 1] for a constant or an anchor list (mergekit gradient interpolation)."""
    if isinstance(schedule, int | float):
        return float(schedule)
    values = [float(v) for v in schedule]
    if not values:
        raise ConfigError("empty t schedule")
    scaled = x * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def layer_t(schedule: float | Sequence[float], name: str, num_layers: int) -> float:
    """t for one tensor: by its layer's relative depth, or the schedule's start for non-layer tensors."""
    m = _LAYER.search("." + name)
    if m is None:
        return t_at(schedule, 0.0)
    i = int(m.group(1))
    x = i / (num_layers - 1) if num_layers > 1 else 1.0
    return t_at(schedule, x)


def check_mergeable(sd_a: dict, sd_b: dict) -> None:
    """Raise `MergeShapeError` naming the first tensor that is missing or has a different shape."""
    missing = sorted(set(sd_a) ^ set(sd_b))
    if missing:
        k = missing[0]
        where = "A" if k in sd_a else "B"
        raise MergeShapeError(
            f"tensor {k!r} exists only in model {where} ({len(missing)} tensors differ): SLERP needs two models "
            "with the same tensors (same architecture and depth)"
        )
    for k in sd_a:
        if tuple(sd_a[k].shape) != tuple(sd_b[k].shape):
            raise MergeShapeError(
                f"tensor {k!r} has shape {tuple(sd_a[k].shape)} in model A but {tuple(sd_b[k].shape)} in model B: "
                "SLERP needs two models of the same shape (e.g. two pruned models of the same depth)"
            )


def slerp_state_dicts(sd_a: dict, sd_b: dict, t: float | Sequence[float], num_layers: int) -> dict:
    """Merge two state dicts tensor by tensor; A is the base (t=0 gives A)."""
    check_mergeable(sd_a, sd_b)
    out = {}
    for k, va in sd_a.items():
        if not va.is_floating_point():
            out[k] = va.clone()
            continue
        out[k] = slerp(layer_t(t, k, num_layers), va, sd_b[k])
    return out


def parse_schedule(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--t-schedule {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not vals:
        raise ConfigError("--t-schedule is empty")
    return vals


def slerp_model_folders(path_a: str | Path, path_b: str | Path, out_dir: str | Path,
                        t: float | Sequence[float] = 0.5) -> Path:
    """SLERP two saved models (A is the base: t=0 gives A) and save the result with A's config and tokenizer."""
    from stillroom.prune.angular import _text_config
    from stillroom.prune.surgery import load_causal_lm, save_model

    model_a, tok = load_causal_lm(path_a)
    model_b, _ = load_causal_lm(path_b)
    la, lb = _text_config(model_a).num_hidden_layers, _text_config(model_b).num_hidden_layers
    if la != lb:
        raise MergeShapeError(f"model A has {la} layers and model B {lb}: SLERP needs two models of the same depth")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    merged = slerp_state_dicts(sd_a, sd_b, t, int(la))
    model_a.load_state_dict(merged)
    record = {"merge": "slerp", "base": str(path_a), "other": str(path_b),
              "t": t if isinstance(t, int | float) else list(t), "dot_threshold": DOT_THRESHOLD}
    return save_model(model_a, tok, out_dir, record)
