"""Uncertainty of quality figures: bootstrap intervals for accuracy and macro-F1, paired tests of one
condition against another on the same examples (paired bootstrap and exact McNemar), and the share of a
teacher-student gap that a route recovers (paired bootstrap over three prediction sets).

On 40 test examples a 10-point gap can be noise; every comparison Stillroom reports carries one of these."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _encode(gold: Sequence, pred: Sequence, labels: Sequence) -> tuple[np.ndarray, np.ndarray, int]:
    index = {lab: i for i, lab in enumerate(labels)}
    g = np.array([index.get(x, -1) for x in gold], dtype=np.int64)
    p = np.array([index.get(x, -1) if x is not None else -1 for x in pred], dtype=np.int64)
    return g, p, len(labels)


def _macro_f1_rows(g: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    """Macro-F1 of each row of (B, n) gold/pred index arrays (-1 = invalid, counted wrong; zero_division = 0),
    the same definition as `classification_metrics` (scikit-learn's `f1_score(average='macro', labels=...)`)."""
    f1s = []
    for c in range(k):
        tp = ((g == c) & (p == c)).sum(axis=1)
        fp = ((g != c) & (p == c)).sum(axis=1)
        fn = ((g == c) & (p != c)).sum(axis=1)
        denom = 2 * tp + fp + fn
        f1s.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.mean(np.stack(f1s, axis=1), axis=1) if k else np.zeros(g.shape[0])


def macro_f1(gold: Sequence, pred: Sequence, labels: Sequence) -> float:
    """Macro-F1 over `labels` (invalid answers count as wrong)."""
    g, p, k = _encode(gold, pred, labels)
    return float(_macro_f1_rows(g[None], p[None], k)[0])


def _resample(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(gold: Sequence, pred: Sequence, labels: Sequence | None, *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Percentile bootstrap intervals (examples resampled with replacement) for accuracy and, when `labels` is
    given, macro-F1. Returns {'accuracy': [lo, hi], 'macro_f1': [lo, hi] | None}."""
    n = len(gold)
    if n == 0:
        return {"accuracy": None, "macro_f1": None}
    idx = _resample(n, n_boot, seed)
    correct = np.array([g == p for g, p in zip(gold, pred, strict=True)], dtype=float)
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    acc = correct[idx].mean(axis=1)
    out = {"accuracy": [float(np.percentile(acc, lo_q)), float(np.percentile(acc, hi_q))], "macro_f1": None}
    if labels:
        g, p, k = _encode(gold, pred, labels)
        f1 = _macro_f1_rows(g[idx], p[idx], k)
        out["macro_f1"] = [float(np.percentile(f1, lo_q)), float(np.percentile(f1, hi_q))]
    return out


def paired_bootstrap(gold: Sequence, pred_a: Sequence, pred_b: Sequence, labels: Sequence | None, *,
                     metric: str = "macro_f1", n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap of `metric(a) − metric(b)` on the same examples: the observed difference, its 95%
    interval and a two-sided p-value (twice the share of resamples on the other side of zero)."""
    n = len(gold)
    if n == 0:
        return {"diff": None, "ci": None, "p_value": None}
    idx = _resample(n, n_boot, seed)
    if metric == "macro_f1" and labels:
        g, a, k = _encode(gold, pred_a, labels)
        _, b, _ = _encode(gold, pred_b, labels)
        diff_obs = float(_macro_f1_rows(g[None], a[None], k)[0] - _macro_f1_rows(g[None], b[None], k)[0])
        diffs = _macro_f1_rows(g[idx], a[idx], k) - _macro_f1_rows(g[idx], b[idx], k)
    else:
        ca = np.array([x == y for x, y in zip(gold, pred_a, strict=True)], dtype=float)
        cb = np.array([x == y for x, y in zip(gold, pred_b, strict=True)], dtype=float)
        diff_obs = float(ca.mean() - cb.mean())
        diffs = ca[idx].mean(axis=1) - cb[idx].mean(axis=1)
    if np.all(diffs == 0):
        p = 1.0
    else:
        p = float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))
    return {"diff": diff_obs, "ci": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
            "p_value": p}


def _metric_rows(gold: Sequence, pred: Sequence, labels: Sequence | None, metric: str, idx: np.ndarray) -> np.ndarray:
    """`metric` of `pred` on each resample (row of example indices) in `idx`: macro-F1 over `labels`, or
    accuracy."""
    if metric == "macro_f1" and labels:
        g, p, k = _encode(gold, pred, labels)
        return _macro_f1_rows(g[idx], p[idx], k)
    correct = np.array([x == y for x, y in zip(gold, pred, strict=True)], dtype=float)
    return correct[idx].mean(axis=1)


def bootstrap_recovery(gold: Sequence, pred_route: Sequence, pred_student: Sequence, pred_teacher: Sequence,
                       labels: Sequence | None, *, metric: str = "macro_f1", n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> dict:
    """Recovery = (route − student) / (teacher − student) on `metric`, with a paired percentile bootstrap interval.

    The three prediction lists are over the same examples (`gold`); each resample draws the same examples for
    all three, so the interval carries their correlation. 0 means no better than the student, 1 as good as the
    teacher; below 0 or above 1 happen and are reported as they are.

    The ratio only means something when the teacher is clearly above the student: when the observed gap
    (teacher − student) is ≤ 0, or its own interval reaches 0, recovery is *undefined* (`recovery` None and a
    `reason`), not a huge or sign-flipped number. When defined, the few resamples whose gap is ≤ 0 (fewer than
    (1 − level)/2 of them, by the rule above) are left out of the interval and their share is reported as
    `dropped_resamples`.

    Returns {'recovery', 'ci', 'gap', 'gap_ci', 'defined', 'reason', 'dropped_resamples', 'n', 'metric'}.
    """
    n = len(gold)
    metric = metric if (metric == "macro_f1" and labels) else "accuracy"
    out = {"recovery": None, "ci": None, "gap": None, "gap_ci": None, "defined": False, "reason": None,
           "dropped_resamples": 0.0, "n": n, "metric": metric}
    if n == 0:
        return {**out, "reason": "no examples shared by the route, the student and the teacher"}
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    obs = np.zeros((1, n), dtype=np.int64) + np.arange(n)  # the observed sample as a single "resample"
    idx = np.concatenate([obs, _resample(n, n_boot, seed)])
    r, s, t = (_metric_rows(gold, p, labels, metric, idx) for p in (pred_route, pred_student, pred_teacher))
    gap, num = t - s, r - s
    out["gap"] = float(gap[0])
    out["gap_ci"] = [float(np.percentile(gap[1:], lo_q)), float(np.percentile(gap[1:], hi_q))]
    if gap[0] <= 0:
        return {**out, "reason": f"the teacher ({t[0]:.3f}) is not above the student ({s[0]:.3f})"}
    if out["gap_ci"][0] <= 0:
        return {**out, "reason": (f"the teacher's lead over the student ({gap[0]:+.3f}, interval "
                                  f"[{out['gap_ci'][0]:+.3f}, {out['gap_ci'][1]:+.3f}]) is not clear of 0")}
    ok = gap[1:] > 0
    ratios = num[1:][ok] / gap[1:][ok]
    return {**out, "recovery": float(num[0] / gap[0]), "defined": True,
            "ci": [float(np.percentile(ratios, lo_q)), float(np.percentile(ratios, hi_q))],
            "dropped_resamples": float(1 - ok.mean())}


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact McNemar test on paired correctness: b01 = a right and b wrong, b10 = the reverse; two-sided
    binomial p-value on the discordant pairs."""
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if n01 + n10 == 0 else float(binomtest(n01, n01 + n10, 0.5).pvalue)
    return {"a_only": n01, "b_only": n10, "p_value": p}
