"""Phase 3, conflict resolution: the student runs with the rules on validation data; its failures and a
sample of its successes (which the method's authors found essential against regressions) go to the teacher,
which rewrites the rules. A revision is accepted only if validation macro-F1 improves (regression gate);
the loop stops after `patience` rejected rounds or `max_rounds`. Every version is kept.

The resolver's prompt is budgeted to fit the teacher's context window with room for its reply: successes,
then failures, are shown fewer until it fits; a rulebook that leaves room for no failure ends the loop
without a call."""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from stillroom.backends.base import Backend, GenerationParams, fits_context
from stillroom.evaluate.runner import EvalResult
from stillroom.pld.prompts import parse_rule_list, resolution_messages
from stillroom.pld.rulebook import Rule, Rulebook
from stillroom.pld.teacher import ask_with_retry
from stillroom.tasks.task import Task

INHERIT_SIMILARITY = 0.6
"""A revised rule at least this similar (difflib ratio) to an old one inherits its id and provenance."""


@dataclass
class Round:
    """One round of the loop, for the report."""

    round: int
    candidate_version: int
    val_macro_f1_before: float
    val_macro_f1_after: float | None
    accepted: bool
    failures_sent: int
    successes_sent: int
    note: str = ""


@dataclass
class Resolution:
    best: Rulebook
    versions: list[Rulebook] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    best_val: EvalResult | None = None


def revise(old: Rulebook, new_texts: list[str], failure_ids: list[str], version: int) -> Rulebook:
    """Build the revised rulebook, carrying provenance over to rules that survive (nearly) unchanged."""
    rules, used = [], set()
    for k, text in enumerate(new_texts):
        best, best_r = None, 0.0
        for j, r in enumerate(old.rules):
            if j in used:
                continue
            ratio = difflib.SequenceMatcher(None, r.text.lower(), text.lower()).ratio()
            if ratio > best_r:
                best, best_r = j, ratio
        if best is not None and best_r >= INHERIT_SIMILARITY:
            used.add(best)
            o = old.rules[best]
            same = o.text.strip() == text.strip()
            rules.append(Rule(id=o.id, text=text, version=o.version if same else o.version + 1, cluster=o.cluster,
                              example_ids=list(o.example_ids), labels=list(o.labels), origin=o.origin if same else "resolution"))
        else:
            rules.append(Rule(id=f"v{version}r{k + 1}", text=text, version=1, cluster=None,
                              example_ids=list(failure_ids), labels=[], origin="resolution"))
    return Rulebook(task=old.task, rules=rules, version=version, meta={"parent_version": old.version})


def resolve_conflicts(
    task: Task,
    rulebook: Rulebook,
    teacher: Backend,
    evaluate_val: Callable[[Rulebook], EvalResult],
    params: GenerationParams,
    *,
    max_rounds: int = 3,
    patience: int = 1,
    max_failures: int = 16,
    max_successes: int = 8,
    seed: int = 0,
    on_version: Callable[[Rulebook, EvalResult | None], None] | None = None,
) -> Resolution:
    """Run the loop from `rulebook` and return the best version by validation macro-F1."""
    rng = random.Random(seed)
    current_val = evaluate_val(rulebook)
    res = Resolution(best=rulebook, versions=[rulebook], best_val=current_val)
    if on_version:
        on_version(rulebook, current_val)
    best_f1 = float(current_val.metrics["macro_f1"] or 0.0)
    stale = 0
    version = rulebook.version
    labels = [str(x) for x in task.labels] if task.labels else []
    for rnd in range(1, max_rounds + 1):
        preds = res.best_val.predictions
        failures = [p for p in preds if not p["correct"]]
        successes = [p for p in preds if p["correct"]]
        if not failures:
            res.rounds.append(Round(rnd, version, best_f1, None, False, 0, 0, "no failures left on validation"))
            break
        failures = rng.sample(failures, min(max_failures, len(failures)))
        successes = rng.sample(successes, min(max_successes, len(successes)))
        texts = [r.text for r in res.best.rules]
        failures, successes = fit_cases(task, texts, failures, successes, teacher, params)
        if not failures:
            res.rounds.append(Round(rnd, version, best_f1, None, False, 0, 0,
                                    "the rulebook leaves no room for a failure in the teacher's context window"))
            break
        ans = ask_with_retry(
            teacher, [lambda strict, t=texts, f=failures, s=successes: resolution_messages(task, t, f, s, strict)],
            parse=lambda text, cut, f=failures, s=successes: parse_rule_list(
                text, forbid=[p["input"] for p in f + s], truncated=cut, labels=labels),
            params=params, description=f"resolve round {rnd}",
        )[0]
        version += 1
        if not ans.ok:
            res.rounds.append(Round(rnd, version, best_f1, None, False, len(failures), len(successes),
                                    f"teacher reply not usable after one retry ({ans.reason}); rulebook kept"))
            stale += 1
            if stale >= patience:
                break
            continue
        cand = revise(res.best, list(ans.value), [p["id"] for p in failures], version)
        val = evaluate_val(cand)
        res.versions.append(cand)
        f1 = float(val.metrics["macro_f1"] or 0.0)
        accepted = f1 > best_f1
        cand.meta.update({"val_macro_f1": f1, "accepted": accepted})
        if on_version:
            on_version(cand, val)
        res.rounds.append(Round(rnd, version, best_f1, f1, accepted, len(failures), len(successes),
                                "accepted" if accepted else "rejected by the regression gate"))
        if accepted:
            res.best, res.best_val, best_f1, stale = cand, val, f1, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return res


def fit_cases(task: Task, rules: list[str], failures: list[dict], successes: list[dict], teacher: Backend,
              params: GenerationParams) -> tuple[list[dict], list[dict]]:
    """The most failures and successes (successes dropped first, down to half the failures' count, then
    both) whose resolver prompt, strict variant included, fits the teacher's window with room for the reply."""
    def fits(f: list[dict], s: list[dict]) -> bool:
        return fits_context(teacher, resolution_messages(task, rules, f, s, True), params.max_tokens)[0]

    f, s = list(failures), list(successes)
    while f and not fits(f, s):
        if s and len(s) * 2 > len(f) - 1:
            s.pop()
        elif len(f) > 1 or not s:
            f.pop()
        else:
            s.pop()
    return f, s
