"""Phase 2b, synthesis: the teacher writes one consolidated rule per cluster. Provenance (cluster, example
ids, labels) is attached here; if the teacher's reply is unreadable twice, the cluster's medoid instruction
becomes the rule (marked as such) so no cluster is silently lost."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from stillroom.backends.base import Backend, GenerationParams
from stillroom.pld.cluster import Clustering, medoid
from stillroom.pld.extract import Instruction
from stillroom.pld.prompts import parse_single, synthesis_messages
from stillroom.pld.rulebook import Rule, Rulebook
from stillroom.pld.teacher import ask_with_retry
from stillroom.tasks.task import Task

MAX_MEMBERS_SHOWN = 20
"""Instructions shown to the teacher per cluster (those nearest the centroid), to bound prompt length."""


def synthesize_rules(
    task: Task,
    instructions: Sequence[Instruction],
    embeddings: np.ndarray,
    clustering: Clustering,
    teacher: Backend,
    params: GenerationParams,
) -> Rulebook:
    """One rule per cluster, in cluster order; `instructions` and `embeddings` align with the clustering."""
    groups = [clustering.members(c) for c in clustering.clusters]
    shown = []
    for idx in groups:
        centre = embeddings[idx].mean(axis=0)
        order = sorted(idx, key=lambda i: -float(embeddings[i] @ centre))
        shown.append(order[:MAX_MEMBERS_SHOWN])
    builders = [
        lambda strict, s=s: synthesis_messages(task, [instructions[i].text for i in s], [instructions[i].label for i in s], strict)
        for s in shown
    ]
    answers = ask_with_retry(teacher, builders, parse=lambda t: parse_single(t, ("rule", "instruction")),
                             params=params, description="synthesize")
    rules = []
    fallbacks = 0
    for c, idx, ans in zip(clustering.clusters, groups, answers, strict=True):
        text = ans.value
        origin = "synthesis"
        if not isinstance(text, str):
            text = instructions[medoid(embeddings, idx)].text
            origin = "medoid"
            fallbacks += 1
        labels = [lab for lab, _ in Counter(instructions[i].label for i in idx).most_common()]
        rules.append(Rule(id=f"c{c}", text=text, version=1, cluster=c, example_ids=[instructions[i].example_id for i in idx],
                          labels=labels, origin=origin))
    return Rulebook(task=task.name, rules=rules, version=1, meta={"synthesis_fallbacks": fallbacks})
