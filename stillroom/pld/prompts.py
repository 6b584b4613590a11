"""The teacher's three prompts (extraction, synthesis, conflict resolution) and tolerant parsing of its replies.

Small local teachers often break structured output, so every reply is read leniently: a JSON object, a
labelled line ('Instruction: ...'), or a plain sentence; anything else is 'unreadable', retried once with a
stricter reminder, then recorded as a failure (never a crash).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from stillroom.backends.base import Message
from stillroom.tasks.task import Example, Task

# Instruction-tuned teachers reason before they answer, whatever the prompt asks (Qwen2.5-Coder-0.5B-Instruct
# writes a paragraph first), and a JSON object is easy for a small model to break. So the reply is free text
# that ENDS with a marked line ('Instruction: ...', 'Rule: ...', a numbered list after 'Rules:'), the parser
# takes the last marked line, and the token budget leaves room for the reasoning (`TEACHER_MAX_TOKENS`).
# JSON replies are still read.
EXTRACT_SYSTEM = (
    "You are an expert annotator distilling your judgement into rules. You see a task, one input and its "
    "correct answer. Think briefly (two sentences at most) about what KIND of input leads to that answer. Then "
    "write ONE general, reusable instruction that would lead a careful reader to the correct answer on similar "
    "inputs: it describes that kind of input in general terms (no names, entities or details of this input), it "
    "does not restate the task, and it names the correct answer exactly as it is written in the list of possible "
    "answers. End your reply with one line of the form 'Instruction: When <the kind of input>, answer <the "
    "correct answer>.'"
)
SYNTH_SYSTEM = (
    "You consolidate overlapping instructions into one rule. You see several instructions written for similar "
    "cases and the answers they led to. Write ONE general rule, one or two sentences, that captures what they "
    "share and names the answer it leads to, exactly as written in the brackets. End your reply with one line of "
    "the form 'Rule: When <the kind of input>, answer <the answer>.'"
)
RESOLVE_SYSTEM = (
    "You are a conflict resolver for a rulebook that a smaller model follows. You see the current numbered "
    "rules, cases the model got WRONG with the correct answer, and cases it got RIGHT. Find the root cause of "
    "the errors (a missing rule, a rule that is too broad, two rules in conflict) and rewrite the rule list so "
    "the wrong cases become right without breaking the right ones. Keep rules general: no names or details of "
    "individual cases; each rule names the answer it leads to, exactly as the task writes it. Briefly state the "
    "root cause, then end your reply with the line 'Rules:' followed by the full numbered list of rules."
)
STRICT_REMINDER = ("Your previous reply could not be used: it was unreadable or cut off, copied the example, quoted the "
                   "input instead of describing it in general terms, or named an answer the task does not have. "
                   "Reply with the final line only, in the form asked for, nothing else.")
# Each user message ends with a cue line. Chat models reason, then write the marked line the system prompt asks
# for; base models (no chat template, e.g. the embedded Gemma-3 270M) complete the cue, and the plain-text
# fallback of the parser reads their first line.
EXTRACT_CUE = "Instruction:"
# One worked case from an unrelated task opens the extraction and synthesis prompts. A base model, which
# otherwise tends to repeat the input, sees what a general instruction looks like and completes the cue in kind.
# A small instruction model copies it word for word instead (13 of 24 extractions by Qwen2.5-Coder-0.5B in one
# run): such replies are recognised (`copies_worked_example`) and dropped.
EXTRACT_DEMO_INPUT = "The battery died after two days and support never replied."
EXTRACT_DEMO_INSTRUCTION = "When a review says the product failed soon after purchase, answer negative."
SYNTH_DEMO_INSTRUCTION = "If the customer reports a defect that support did not fix, the review is negative."
SYNTH_DEMO_RULE = "Reviews that report defects or early failures are negative."
DEMO_LABELS = ("positive", "negative")
EXTRACT_DEMO = (
    "Example for a different task:\nTask: Decide whether a product review is positive or negative.\n"
    f"Possible answers: {', '.join(DEMO_LABELS)}\nInput: {EXTRACT_DEMO_INPUT}\n"
    f"Correct answer: negative\nInstruction: {EXTRACT_DEMO_INSTRUCTION}\n\nNow the real case:\n"
)
SYNTH_DEMO = (
    "Example for a different task:\nTask: Decide whether a product review is positive or negative.\n"
    "Instructions (answer they led to in brackets):\n"
    f"- (negative) {EXTRACT_DEMO_INSTRUCTION}\n"
    f"- (negative) {SYNTH_DEMO_INSTRUCTION}\n"
    f"Rule: {SYNTH_DEMO_RULE}\n\nNow the real case:\n"
)
WORKED_EXAMPLES = (EXTRACT_DEMO_INSTRUCTION, SYNTH_DEMO_INSTRUCTION, SYNTH_DEMO_RULE, EXTRACT_DEMO_INPUT)
"""Every sentence of the prompts' worked example: a reply that repeats one of them is a copy, not a rule."""
SYNTH_CUE = "Rule:"
RESOLVE_CUE = "Rules:"
TEACHER_MAX_TOKENS = 256
"""Default budget per teacher reply: two sentences of reasoning and the marked line, with room to spare (an
instruction model given 64 tokens was cut mid-reasoning on 11 of 24 extractions)."""


def extraction_messages(task: Task, ex: Example, strict: bool = False, demo: bool = True) -> list[Message]:
    """The extraction prompt for one example; `demo` opens it with the worked example (for base models only:
    see `wants_worked_example`)."""
    user = (EXTRACT_DEMO if demo else "") + f"Task: {task.instruction.strip() or task.name}\n"
    if task.labels:
        user += f"Possible answers: {', '.join(task.labels)}\n"
    elif ex.choices:
        user += f"Possible answers: {'; '.join(ex.choices)}\n"
    user += f"Input: {ex.input}\nCorrect answer: {ex.label}"
    if strict:
        user += "\n\n" + STRICT_REMINDER
    user += "\n" + EXTRACT_CUE
    return [{"role": "system", "content": EXTRACT_SYSTEM}, {"role": "user", "content": user}]


def synthesis_messages(task: Task, instructions: Sequence[str], labels: Sequence[str], strict: bool = False,
                       demo: bool = True) -> list[Message]:
    """The synthesis prompt for one cluster; `demo` as in `extraction_messages`."""
    lines = [f"- ({lab}) {ins}" for ins, lab in zip(instructions, labels, strict=True)]
    user = (SYNTH_DEMO if demo else "") + f"Task: {task.instruction.strip() or task.name}\nInstructions (answer they led to in brackets):\n" + "\n".join(lines)
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
# Stop strings for a base model's reply: the start of a new prompt field or of the next worked example ends the
# answer, where it starts to invent the next case, instead of running to max_tokens. The cues themselves are not
# stops: an instruction model ends its reply with that very marked line. `teacher_stops` gives a chat model (which
# ends its turn on its own, and may restate a field while it reasons) only the worked-example stops.
EXAMPLE_STOPS = ("\nNow the real case", "\nExample for a different task")
TEACHER_STOPS = ("\nTask:", "\nInput:", "\n- Input:", "\nCorrect answer:", "\nPossible answers:",
                 "\nCases answered", "\nCurrent rules:", *EXAMPLE_STOPS)


def completes_raw_text(backend) -> bool:
    """True for a model that continues raw text (a local model without a chat template, such as the embedded
    Gemma-3 270M base model); False for a chat model. Backends that do not say are chat models (an
    OpenAI-compatible server applies the model's template)."""
    return getattr(backend, "has_chat_template", True) is False


def wants_worked_example(backend) -> bool:
    """Whether the extraction and synthesis prompts open with the worked example. A base model needs it to see
    what a general instruction looks like; a chat model follows the system prompt, and a small one copies the
    example instead (Qwen2.5-Coder-0.5B-Instruct copied it in 8 of 8 extractions even when told not to)."""
    return completes_raw_text(backend)


def teacher_stops(backend) -> tuple[str, ...]:
    """Stop strings for `backend`'s teacher replies: every prompt field for a model that completes raw text (no
    chat template), the worked-example ones only for a chat model. Backends that do not say are chat models
    (an OpenAI-compatible server applies the template)."""
    return TEACHER_STOPS if completes_raw_text(backend) else EXAMPLE_STOPS


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


def complete_lines(text: str) -> str:
    """The part of a reply cut at the token limit that is whole: everything before its last line break (the last
    line stopped mid-sentence)."""
    cut = text.rfind("\n")
    return text[:cut] if cut >= 0 else ""


def _marked(keys: Sequence[str]) -> re.Pattern:
    # 'Instruction: ...', 'General instruction: ...', '**Rule:** ...', '- Instruction: ...'; only a colon marks
    # (a dash would match prose such as 'rule-based').
    return re.compile(r"(?im)^[\s>*_#-]*(?:[a-z]+\s+)?(?:" + "|".join(re.escape(k) for k in keys)
                      + r")s?\s*[*_]*\s*:\s*[*_]*\s*(.+)$")


def parse_single(text: str, keys: Sequence[str], forbid: Sequence[str] = (), truncated: bool = False,
                 completes_cue: bool = False) -> str | None:
    """A single instruction/rule from a reply, or None when the reply is unreadable.

    Readable: JSON with one of `keys`; else the LAST line marked '[General] Key: ...' (an instruction model
    reasons first and ends on the marked line); else its first plain line of reasonable length that is not a
    repeated prompt field (a base model completes the cue, unmarked). A reply cut at the token limit
    (`truncated`) is read from its complete lines only (those followed by a line break), and by the plain-line
    fallback only when the teacher `completes_cue` (a base model, no chat template: its first line answers the
    cue, and it often rambles on after it until the limit); from an instruction model those lines are the
    reasoning that ran out of budget. A reply that merely repeats a forbidden string (the input, the label), even
    in part, is unreadable, so it gets the retry.
    """
    if truncated:
        text = complete_lines(text)
    obj = _json_object(text)
    cands: list[str] = []
    if obj:
        cands += [obj[k] for k in keys if isinstance(obj.get(k), str) and obj[k].strip()][:1]
    marked = list(_marked(keys).finditer(text))
    if marked and not cands:
        cands.append(marked[-1].group(1))
    if not cands and "{" not in text and (completes_cue or not truncated):
        cands += [ln for ln in (x.strip() for x in text.splitlines()) if ln and not _PROMPT_FIELD.match(ln)][:1]
    for cand in cands:
        cand = _clean(_strip_list_prefix(_clean(cand))).strip("*_` ").strip()
        if _acceptable(cand, forbid):
            return cand
    return None


COPY_RATIO = 0.6
"""A reply whose words match a worked-example sentence at this difflib ratio or more is a copy of it.

Ratio = 2·(words in common, in order) / (words in both). Measured on the extraction example: a word-for-word
copy scores 1.0, the example with its answer swapped for an intent label 0.85; instructions written for the
intent task score 0.2 ('When the user asks to add a song to a playlist, answer add_to_playlist.') and 0.44 for
one built on the example's own frame ('When a request says the user wants to hear a song soon, answer
play_music.'). 0.6 sits between the two groups (`tests/test_pld.py` keeps these figures)."""


def copy_ratio(text: str, example: str) -> float:
    """difflib's similarity of the two word sequences (lower case, punctuation ignored), 0 to 1."""
    import difflib

    return difflib.SequenceMatcher(None, _words(text), _words(example), autojunk=False).ratio()


def copies_worked_example(text: str, examples: Sequence[str] = WORKED_EXAMPLES) -> bool:
    """True when `text` repeats a sentence of the prompts' worked example: a difflib ratio of at least
    `COPY_RATIO`, or the whole sentence inside a longer reply."""
    words = _words(text)
    return any(copy_ratio(text, e) >= COPY_RATIO or (len(_words(e)) >= 6 and _contains(words, _words(e)))
               for e in examples)


def _label_forms(label: str) -> set[str]:
    low = label.lower().strip()
    return {low, low.replace("_", " "), low.replace("-", " ")}


def _names(text: str, form: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(form) + r"(?![\w-])", text) is not None


def named_labels(text: str, labels: Sequence[str]) -> list[str]:
    """The labels of `labels` that `text` names (whole words, case-insensitive; 'add_to_playlist' also as 'add
    to playlist')."""
    low = text.lower()
    return [lab for lab in labels if any(_names(low, f) for f in _label_forms(str(lab)))]


# Words that introduce the answer a rule leads to: 'answer X.', 'the answer is "X"', 'is labelled X', 'classify
# it as X', 'choose X'. What follows is read as a label when it is quoted or ends the clause.
_ANSWER_CUE = re.compile(
    r"\b(?:answers?(?:\s+(?:is|with|as))?|(?:is|are|be)\s+labell?ed(?:\s+as)?|labell?ed\s+as|label\s+it(?:\s+as)?|"
    r"classif(?:y|ied)(?:\s+it)?\s+as|categori[sz]ed?(?:\s+it)?\s+as|(?:label|intent|category|class)\s+is|"
    r"choose|select|pick|respond\s+with|output)\s*:?\s*", re.I)
_NOT_A_LABEL = {"it", "this", "that", "these", "those", "them", "accordingly", "correctly", "carefully", "so",
                "thus", "first", "here", "there", "one", "the", "a", "an", "yourself", "directly", "clearly"}


def foreign_labels(text: str, labels: Sequence[str]) -> list[str]:
    """Answers `text` leads to that are not in the task's label set (empty when it names only real labels).

    Read after an answer cue ('answer X.', 'is labelled "X"'): a quoted word, or a bare word that ends the
    clause; a worked-example label ('negative') after such a cue is foreign unless the task has it. Where the
    task's labels are identifiers ('play_music'), any other identifier-like word ('play_song') is foreign too.
    """
    forms = set().union(*(_label_forms(str(lab)) for lab in labels)) if labels else set()
    low = text.lower()
    found: list[str] = []
    for m in _ANSWER_CUE.finditer(low):
        rest = low[m.end():]
        if any(rest.startswith(f) and not re.match(r"[\w-]", rest[len(f):len(f) + 1] or " ") for f in forms):
            continue
        q = re.match(r"[\"'`\u201c\u2018]([^\"'`\u201d\u2019]{1,40})[\"'`\u201d\u2019]", rest)
        word = q.group(1).strip() if q else None
        if word is None:
            b = re.match(r"([a-z][\w-]*)\s*(?=[.;,!)]|$)", rest)
            word = b.group(1) if b else None
        if word and word not in forms and word not in _NOT_A_LABEL and word not in found:
            found.append(word)
    if any("_" in str(lab) for lab in labels):
        for w in re.findall(r"(?<![\w-])[a-z0-9]+(?:_[a-z0-9]+)+(?![\w-])", low):
            if w not in forms and w not in found:
                found.append(w)
    return found


@dataclass
class Rejected:
    """A teacher reply that was read but cannot be used, and why: 'unreadable', 'truncated' (cut at the token
    limit before its instruction line was complete), 'copies_example' (repeats the prompt's worked example),
    'foreign_label' (leads to an answer the task does not have), 'wrong_label' (leads to another of the task's
    answers than its own example's), 'quotes_input' (quotes its example's input instead of describing it)."""

    reason: str
    text: str | None = None


DROP_REASONS = ("unreadable", "truncated", "copies_example", "foreign_label", "wrong_label", "quotes_input")


def quotes_input(text: str, source: str, span: int = 4) -> bool:
    """True when `text` quotes `source`: `span` consecutive words of it, or all of it when it is shorter (and at
    least 3 words). An instruction that carries its example's words is tied to that example, not general.
    Four words: 'Utterance: Play some James Cleveland.' quoted as 'When "Play some James Cleveland", answer
    play_music.' is caught, while an intent instruction shares at most two or three running words with its
    input ('a track to')."""
    sw, cw = _words(source), _words(text)
    n = min(span, len(sw))
    if n < 3:
        return False
    return any(_contains(cw, sw[i : i + n]) for i in range(len(sw) - n + 1))


def read_instruction(text: str, truncated: bool, *, keys: Sequence[str], forbid: Sequence[str] = (),
                     labels: Sequence[str] = (), label: str | None = None, quote: str | None = None,
                     completes_cue: bool = False) -> str | Rejected:
    """One instruction or rule from a teacher reply, or why it cannot be used (`Rejected`).

    `labels` is the task's label set (empty for multiple-choice tasks: no label check); `label` the answer the
    instruction was written for (extraction), whose instruction must not lead to another of the labels; `quote`
    the example's input, which the instruction must not quote (`quotes_input`). `completes_cue`: the teacher is
    a base model that completes the prompt's cue line, so a reply cut at the token limit is still read from its
    first line when that line is complete (`parse_single`); 'truncated' when the cut took the instruction line.
    """
    got = parse_single(text, keys, forbid, truncated=truncated, completes_cue=completes_cue)
    if got is None:
        # Read again without the forbidden strings: a reply that is an instruction built around the quoted input
        # is counted as such, not as unreadable.
        bare = (parse_single(text, keys, (), truncated=truncated, completes_cue=completes_cue)
                if quote is not None else None)
        if bare is not None and (quotes_input(bare, quote) or echoes(bare, quote)):
            return Rejected("quotes_input", bare)
        # A base model's complete first line that cannot be used is unreadable: the cut came after it.
        whole_line = completes_cue and complete_lines(text).strip()
        return Rejected("truncated" if truncated and not whole_line else "unreadable")
    if copies_worked_example(got):
        return Rejected("copies_example", got)
    if labels and foreign_labels(got, labels):
        return Rejected("foreign_label", got)
    if label is not None and labels and contradicts_label(got, label, labels):
        return Rejected("wrong_label", got)
    if quote is not None and quotes_input(got, quote):
        return Rejected("quotes_input", got)
    return got


def parse_rule_list(text: str, forbid: Sequence[str] = (), truncated: bool = False,
                    labels: Sequence[str] = ()) -> list[str] | None:
    """A list of rules from a resolver reply: JSON {'rules': [...]} or a numbered / bulleted list (the one after
    the last 'Rules:' line when there is one: an instruction model may number its analysis first).

    Items that repeat a prompt field ('Input: ...', 'Correct answer: ...'), echo a forbidden string (the cases
    shown), copy the worked example or lead to an answer outside `labels` are dropped, as are duplicates; a reply
    cut at the token limit loses its unfinished last line. No rule left means unreadable.
    """
    if truncated:
        text = complete_lines(text)
    obj = _json_object(text)
    if obj and isinstance(obj.get("rules"), list):
        items = [str(r) for r in obj["rules"] if isinstance(r, str | int | float)]
    else:
        heads = list(re.finditer(r"(?im)^[\s*_#]*(?:revised\s+|final\s+|new\s+)?rules?[\s*_]*:[\s*_]*$", text))
        body = text[heads[-1].end():] if heads else text
        items = re.findall(r"(?m)^\s*(?:\d+[.)]|[-*])\s+(.{12,})$", body)
    rules: list[str] = []
    for x in items:
        r = _clean(_strip_list_prefix(_clean(x))).strip("*_` ").strip()
        if (_acceptable(r, forbid) and not copies_worked_example(r) and not (labels and foreign_labels(r, labels))
                and r.lower() not in (y.lower() for y in rules)):
            rules.append(r)
    return rules or None
