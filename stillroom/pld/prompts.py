"""The teacher's three prompts (extraction, synthesis, conflict resolution) and tolerant parsing of its replies.

Small local teachers often break structured output, so every reply is read leniently: a JSON object, a
labelled line ('Instruction: ...'), or a plain sentence; anything else is 'unreadable', retried once with a
stricter reminder, then recorded as a failure (never a crash).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from stillroom.backends.base import Message
from stillroom.tasks.task import Example, Task

EXTRACT_SYSTEM = (
    "You are an expert annotator distilling your judgement into rules. You see a task, one input and its "
    "correct answer. Think about why that answer is correct, then write ONE general, reusable instruction that "
    "would lead a careful reader to the correct answer on similar inputs. The instruction must not mention "
    "names, entities or details specific to this input. Reply with JSON only: "
    '{"reasoning": "<one or two sentences>", "instruction": "<the general instruction>"}'
)
SYNTH_SYSTEM = (
    "You consolidate overlapping instructions into one rule. You see several instructions written for similar "
    "cases and the answers they led to. Write ONE general rule, one or two sentences, that captures what they "
    'share and says which answer it leads to. Reply with JSON only: {"rule": "<the rule>"}'
)
RESOLVE_SYSTEM = (
    "You are a conflict resolver for a rulebook that a smaller model follows. You see the current numbered "
    "rules, cases the model got WRONG with the correct answer, and cases it got RIGHT. Find the root cause of "
    "the errors (a missing rule, a rule that is too broad, two rules in conflict) and rewrite the rule list so "
    "the wrong cases become right without breaking the right ones. Keep rules general: no names or details of "
    'individual cases. Reply with JSON only: {"analysis": "<short>", "rules": ["<rule 1>", "<rule 2>", ...]}'
)
STRICT_REMINDER = "Your previous reply could not be read. Reply with the JSON object only, nothing else."
# Each user message ends with a cue line. Chat models answer the system prompt's JSON request anyway; base
# models (no chat template, e.g. the embedded Gemma-3 270M) complete the cue, and the plain-text fallback of
# the parser reads their first line.
EXTRACT_CUE = "General instruction:"
# One worked case from an unrelated task opens the extraction and synthesis prompts. Chat models still reply
# in JSON; a base model, which otherwise tends to repeat the input, sees what a general instruction looks
# like and completes the cue in kind.
EXTRACT_DEMO = (
    "Example for a different task:\nTask: Decide whether a product review is positive or negative.\n"
    "Possible answers: positive, negative\nInput: The battery died after two days and support never replied.\n"
    "Correct answer: negative\nGeneral instruction: When a review says the product failed soon after purchase, "
    "answer negative.\n\nNow the real case:\n"
)
SYNTH_DEMO = (
    "Example for a different task:\nTask: Decide whether a product review is positive or negative.\n"
    "Instructions (answer they led to in brackets):\n"
    "- (negative) When a review says the product failed soon after purchase, answer negative.\n"
    "- (negative) If the customer reports a defect that support did not fix, the review is negative.\n"
    "Consolidated rule: Reviews that report defects or early failures are negative.\n\nNow the real case:\n"
)
SYNTH_CUE = "Consolidated rule:"
RESOLVE_CUE = "Revised rules (numbered list):"


def extraction_messages(task: Task, ex: Example, strict: bool = False) -> list[Message]:
    user = EXTRACT_DEMO + f"Task: {task.instruction.strip() or task.name}\n"
    if task.labels:
        user += f"Possible answers: {', '.join(task.labels)}\n"
    elif ex.choices:
        user += f"Possible answers: {'; '.join(ex.choices)}\n"
    user += f"Input: {ex.input}\nCorrect answer: {ex.label}"
    if strict:
        user += "\n\n" + STRICT_REMINDER
    user += "\n" + EXTRACT_CUE
    return [{"role": "system", "content": EXTRACT_SYSTEM}, {"role": "user", "content": user}]


def synthesis_messages(task: Task, instructions: Sequence[str], labels: Sequence[str], strict: bool = False) -> list[Message]:
    lines = [f"- ({lab}) {ins}" for ins, lab in zip(instructions, labels, strict=True)]
    user = SYNTH_DEMO + f"Task: {task.instruction.strip() or task.name}\nInstructions (answer they led to in brackets):\n" + "\n".join(lines)
    if strict:
        user += "\n\n" + STRICT_REMINDER
    user += "\n" + SYNTH_CUE
    return [{"role": "system", "content": SYNTH_SYSTEM}, {"role": "user", "content": user}]


def resolution_messages(task: Task, rules: Sequence[str], failures: Sequence[dict], successes: Sequence[dict],
                        strict: bool = False) -> list[Message]:
    def case(p: dict) -> str:
        return f"- Input: {p['input']}\n  Correct answer: {p['gold']}\n  Model answered: {p['pred'] if p['pred'] is not None else '(no valid answer)'}"

    user = (
        f"Task: {task.instruction.strip() or task.name}\n\nCurrent rules:\n"
        + ("\n".join(f"{i}. {r}" for i, r in enumerate(rules, 1)) or "(none)")
        + "\n\nCases answered WRONG:\n" + ("\n".join(case(p) for p in failures) or "(none)")
        + "\n\nCases answered RIGHT (keep these right):\n" + ("\n".join(case(p) for p in successes) or "(none)")
    )
    if strict:
        user += "\n\n" + STRICT_REMINDER
    user += "\n" + RESOLVE_CUE
    return [{"role": "system", "content": RESOLVE_SYSTEM}, {"role": "user", "content": user}]


def _json_object(text: str) -> dict | None:
    """The first JSON object in `text` (models often wrap JSON in prose or code fences)."""
    start = text.find("{")
    while start != -1:
        depth = 0
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    try:
                        obj = json.loads(text[start : i + 1])
                        if isinstance(obj, dict):
                            return obj
                    except json.JSONDecodeError:
                        pass
                    break
        start = text.find("{", start + 1)
    return None


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().strip('"').strip()


# Lines that repeat a field of our own prompts: a small base model often continues the prompt's pattern
# instead of answering, and such a line is never an instruction.
_PROMPT_FIELD = re.compile(
    r"^\s*(?:[-*]\s*)?(?:task|input|correct answer|possible answers|model answered|current rules|"
    r"cases answered (?:wrong|right)|instructions \(answer)\b[^:\n]{0,40}:", re.I)
# Stop strings for every teacher reply: the start of a new prompt field, or the cue again, ends the answer.
# A JSON reply from a chat model never contains them; a base model's continuation is cut where it starts
# to invent the next example, instead of running to max_tokens.
TEACHER_STOPS = ("\nTask:", "\nInput:", "\n- Input:", "\nCorrect answer:", "\nPossible answers:",
                 "\nCases answered", "\nCurrent rules:", "\nGeneral instruction:", "\nConsolidated rule:",
                 "\nRevised rules")


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def _contains(seq: list[str], sub: list[str]) -> bool:
    n = len(sub)
    return any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


def echoes(cand: str, source: str, threshold: float = 0.8) -> bool:
    """True when `cand` merely repeats `source`: it is a stretch of the source's words, it is mostly the
    source (the whole source, a few words added), or nearly all its words come from the source's vocabulary.
    A short source (a label) inside a longer instruction is not an echo: rules name the answer they lead to."""
    cw, sw = _words(cand), _words(source)
    if not cw or not sw:
        return False
    if _contains(sw, cw):
        return True
    if len(sw) >= 4 and len(sw) >= 0.6 * len(cw) and _contains(cw, sw):
        return True
    sv = set(sw)
    return sum(w in sv for w in cw) / len(cw) >= threshold and len(set(cw) & sv) / len(set(cw) | sv) >= 0.5


# A reply that copies the prompt's list format: "- (label) text" or "1. text".
_LIST_PREFIX = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])?\s*(?:\([^()]{1,40}\)\s*)?")


def _strip_list_prefix(s: str) -> str:
    return _LIST_PREFIX.sub("", s, count=1)


def contradicts_label(text: str, label: str, labels: Sequence[str]) -> bool:
    """True when `text` names answers of the task but not `label`: an instruction extracted for an example of
    `label` that leads to another answer is wrong for its own example."""
    named = [lab for lab in labels if re.search(r"(?<![\w-])" + re.escape(lab.lower()) + r"(?![\w-])", text.lower())]
    return bool(named) and label not in named


def _acceptable(cand: str, forbid: Sequence[str]) -> bool:
    if not 12 <= len(cand) <= 800 or len(cand.split()) < 3:
        return False
    if _PROMPT_FIELD.match(cand):
        return False
    return not any(f and (echoes(cand, f) or _clean(f).lower() == cand.lower()) for f in forbid)


def parse_single(text: str, keys: Sequence[str], forbid: Sequence[str] = ()) -> str | None:
    """A single instruction/rule from a reply, or None when the reply is unreadable.

    Readable: JSON with one of `keys`, a line '[General] Key: ...', or the first plain line of reasonable length
    that is not a repeated prompt field. A reply that merely repeats a forbidden string (the input, the label),
    even in part, is unreadable, so it gets the retry.
    """
    obj = _json_object(text)
    cands: list[str] = []
    if obj:
        cands += [obj[k] for k in keys if isinstance(obj.get(k), str) and obj[k].strip()][:1]
    m = re.search(r"(?im)^\s*(?:[a-z]+\s+)?(?:" + "|".join(re.escape(k) for k in keys) + r")s?\s*[:\-]\s*(.+)$", text)
    if m and not cands:
        cands.append(m.group(1))
    if not cands and "{" not in text:
        cands += [ln for ln in (x.strip() for x in text.splitlines()) if ln and not _PROMPT_FIELD.match(ln)][:1]
    for cand in cands:
        cand = _clean(_strip_list_prefix(_clean(cand)))
        if _acceptable(cand, forbid):
            return cand
    return None


def parse_rule_list(text: str, forbid: Sequence[str] = ()) -> list[str] | None:
    """A list of rules from a resolver reply: JSON {'rules': [...]} or a numbered / bulleted list.

    Items that repeat a prompt field ('Input: ...', 'Correct answer: ...') or echo a forbidden string (the
    cases shown) are dropped, as are duplicates; no rule left means unreadable.
    """
    obj = _json_object(text)
    if obj and isinstance(obj.get("rules"), list):
        items = [str(r) for r in obj["rules"] if isinstance(r, str | int | float)]
    else:
        items = re.findall(r"(?m)^\s*(?:\d+[.)]|[-*])\s+(.{12,})$", text)
    rules: list[str] = []
    for x in items:
        r = _clean(_strip_list_prefix(_clean(x)))
        if _acceptable(r, forbid) and r.lower() not in (y.lower() for y in rules):
            rules.append(r)
    return rules or None
