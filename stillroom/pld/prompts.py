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
SYNTH_CUE = "Consolidated rule:"
RESOLVE_CUE = "Revised rules (numbered list):"


def extraction_messages(task: Task, ex: Example, strict: bool = False) -> list[Message]:
    user = f"Task: {task.instruction.strip() or task.name}\n"
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
    user = f"Task: {task.instruction.strip() or task.name}\nInstructions (answer they led to in brackets):\n" + "\n".join(lines)
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


def parse_single(text: str, keys: Sequence[str], forbid: Sequence[str] = ()) -> str | None:
    """A single instruction/rule from a reply, or None when the reply is unreadable.

    Readable: JSON with one of `keys`, a line 'Key: ...', or one plain sentence of reasonable length. A reply
    that merely repeats a forbidden string (the input, the label) is unreadable.
    """
    obj = _json_object(text)
    cand = None
    if obj:
        for k in keys:
            if isinstance(obj.get(k), str) and obj[k].strip():
                cand = obj[k]
                break
    if cand is None:
        m = re.search(r"(?im)^\s*(?:" + "|".join(re.escape(k) for k in keys) + r")\s*[:\-]\s*(.+)$", text)
        if m:
            cand = m.group(1)
    if cand is None and "{" not in text:
        lines = [ln for ln in (x.strip() for x in text.splitlines()) if ln]
        if lines:
            cand = lines[0]
    if cand is None:
        return None
    cand = _clean(cand)
    if not 12 <= len(cand) <= 800 or len(cand.split()) < 3:
        return None
    if any(f and _clean(f).lower() == cand.lower() for f in forbid):
        return None
    return cand


def parse_rule_list(text: str) -> list[str] | None:
    """A list of rules from a resolver reply: JSON {'rules': [...]} or a numbered / bulleted list."""
    obj = _json_object(text)
    if obj and isinstance(obj.get("rules"), list):
        rules = [_clean(str(r)) for r in obj["rules"] if isinstance(r, str | int | float) and _clean(str(r))]
        return [r for r in rules if len(r) >= 12] or None
    items = re.findall(r"(?m)^\s*(?:\d+[.)]|[-*])\s+(.{12,})$", text)
    return [_clean(x) for x in items] or None
