"""The one metrics module: quality (accuracy, macro-F1, per-class, confusion), latency, tokens, cost."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stillroom.backends.usage import percentile

INVALID = "<invalid>"


def classification_metrics(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix and invalid-answer rate.

    An invalid answer (None) counts as wrong: it is a miss for its gold class and belongs to no predicted
    class, so it lowers recall without inflating any class's precision. The confusion matrix has one extra
    column for invalid answers.
    """
    # scikit-learn is imported here, not at module level, so `stillroom --help` starts fast.
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    labels = list(labels)
    n = len(gold)
    pred_s = [INVALID if p is None else p for p in pred]
    if n == 0:
        return {"n": 0, "accuracy": 0.0, "macro_f1": 0.0, "invalid_rate": 0.0, "labels": labels, "per_class": {}, "confusion": []}
    acc = float(accuracy_score(gold, pred_s))
    # `labels=` restricts the average to the real classes; `zero_division=0` scores a class that is never
    # predicted as F1 0 rather than warning, which is what a user comparing routes needs.
    macro = float(f1_score(gold, pred_s, labels=labels, average="macro", zero_division=0))
    p, r, f, s = precision_recall_fscore_support(gold, pred_s, labels=labels, zero_division=0)
    per_class = {
        lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, lab in enumerate(labels)
    }
    cm = confusion_matrix(gold, pred_s, labels=labels + [INVALID])[: len(labels)]
    return {
        "n": n,
        "accuracy": acc,
        "macro_f1": macro,
        "invalid_rate": sum(x is None for x in pred) / n,
        "labels": labels,
        "per_class": per_class,
        "confusion": cm.tolist(),
        "confusion_columns": labels + [INVALID],
    }


def cost_metrics(input_tokens: Sequence[int], output_tokens: Sequence[int], latencies: Sequence[float]) -> dict:
    """Per-example token and latency figures: means and p50/p95."""
    return {
        "input_tokens_mean": float(np.mean(input_tokens)) if len(input_tokens) else 0.0,
        "output_tokens_mean": float(np.mean(output_tokens)) if len(output_tokens) else 0.0,
        "output_tokens_p50": percentile(output_tokens, 50),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
    }


ONE_CLASS_SHARE = 0.9
"""A condition whose answers are at least this share one label (invalid answers included in the count) is
flagged as (nearly) one-class, unless the gold answers are that concentrated too."""


def one_class_warning(gold: Sequence[str | None], pred: Sequence[str | None], *, name: str = "",
                      threshold: float = ONE_CLASS_SHARE) -> str | None:
    """A warning when the predictions are (nearly) all one label: its accuracy then mostly counts how often
    that label is right, not what the model understood. None when the predictions vary, when there are fewer
    than 4 answers, or when the gold labels are themselves that concentrated on that label."""
    from collections import Counter

    n = len(pred)
    valid = [p for p in pred if p is not None]
    if n < 4 or not valid:
        return None
    label, count = Counter(valid).most_common(1)[0]
    if count / n < threshold:
        return None
    gold_share = sum(g == label for g in gold) / n if gold else 0.0
    if gold_share >= threshold:
        return None
    who = f"{name}: " if name else ""
    return (f"{who}predicted {label!r} for {count} of {n} test examples ({count / n:.0%}; the gold labels have it "
            f"{gold_share:.0%}): a one-class answer, so its accuracy says little about the task "
            f"(flagged at {threshold:.0%} or more answers on one label).")
