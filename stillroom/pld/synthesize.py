"""Phase 2b, synthesis: the teacher writes one consolidated rule per cluster. Provenance (cluster, example
ids, labels) is attached here; if the teacher's reply is unreadable twice, the cluster's medoid instruction
becomes the rule (marked as such) so no cluster is silently lost.

Each prompt is budgeted to fit the teacher's context window: members farthest from the centroid are left out
until it fits (a cluster whose nearest member alone does not fit keeps its medoid, with no call), so a small
server slot never fails a call mid-run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from stillroom.backends.base import Backend, GenerationParams, fits_context
from stillroom.pld.cluster import Clustering, medoid
from stillroom.pld.extract import Instruction
from stillroom.pld.prompts import read_instruction, synthesis_messages
from stillroom.pld.rulebook import Rule, Rulebook
from stillroom.pld.teacher import Answer, ask_with_retry
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
    demo: bool = True,
    completes_cue: bool = False,
) -> Rulebook:
    """One rule per cluster, in cluster order; `instructions` and `embeddings` align with the clustering.
    `demo`: open each prompt with the worked example; `completes_cue`: a base-model teacher, whose reply cut at
    the token limit is read from its complete first line (`read_instruction`)."""
    groups = [clustering.members(c) for c in clustering.clusters]
    shown = []
    for idx in groups:
        centre = embeddings[idx].mean(axis=0)
        order = sorted(idx, key=lambda i: -float(embeddings[i] @ centre))
        shown.append(fit_members(task, instructions, order[:MAX_MEMBERS_SHOWN], teacher, params, demo))

    def build(s):
        return lambda strict: synthesis_messages(task, [instructions[i].text for i in s],
                                                 [instructions[i].label for i in s], strict, demo)

    asked = [k for k, s in enumerate(shown) if s]
    labels = [str(x) for x in task.labels] if task.labels else []
    # A rule that copies the worked example or leads to an answer the task does not have is retried, then the
    # cluster's medoid stands in.
    replies = ask_with_retry(teacher, [build(shown[k]) for k in asked],
                             parse=lambda t, cut: read_instruction(t, cut, keys=("rule", "instruction"), labels=labels,
                                                                   completes_cue=completes_cue),
                             params=params, description="synthesize")
    answers = [Answer(None) for _ in groups]
    for k, ans in zip(asked, replies, strict=True):
        answers[k] = ans
    rules = []
    fallbacks = 0
    rejected = Counter(a.reason for a in answers if not a.ok and a.raw)
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
    return Rulebook(task=task.name, rules=rules, version=1,
                    meta={"synthesis_fallbacks": fallbacks, "synthesis_rejected": dict(rejected),
                          "synthesis_members_trimmed": sum(
                        min(len(g), MAX_MEMBERS_SHOWN) - len(s) for g, s in zip(groups, shown, strict=True))})


def fit_members(task: Task, instructions: Sequence[Instruction], members: list[int], teacher: Backend,
                params: GenerationParams, demo: bool = True) -> list[int]:
    """The longest prefix of `members` (nearest the centroid first) whose synthesis prompt, strict variant
    included, fits the teacher's context window with room for its reply; [] when not even one fits."""
    def fits(n: int) -> bool:
        s = members[:n]
        msgs = synthesis_messages(task, [instructions[i].text for i in s], [instructions[i].label for i in s], True, demo)
        return fits_context(teacher, msgs, params.max_tokens)[0]

    n = len(members)
    while n > 0 and not fits(n):
        n -= 1
    return members[:n]
