"""Self-data distillation: the unpruned model rewrites each training answer in its own words, and conditional
selection keeps a rewrite only where it is still right.

The rewrite prompt is the one the method builds on (Yang et al.'s self-distillation template, quoted in
methods.md §2): the task and input as the instruction, the gold answer as the reference answer, then the model's
own response. By default the header is followed by worked demonstrations (`DEMONSTRATIONS`: solved rewrites
from unrelated tasks, each a short own-words response ending with the line `Answer: <label>`), which a small base
model needs to state a one-word label at all; the response ends at its first answer line (`--no-demos` / empty
`demonstrations` sends the template alone). Conditional selection keeps the rewrite when (1) the answer extracted
from it equals the label (options tasks: `parse_choice`, the evaluator's tolerant parser, which reads the text
after the last 'Answer:'; free text: `Task.extract_answer`) and (2) it contains none of the meta-phrases that
betray the rewriting set-up ("reference answer", "your response", ...); otherwise the original answer is kept.
Both versions are written, with the reason for each decision.

Generation goes through the run folder's durable cache (`open_cached_backend`), so rerunning resumes for free.
Healing data are prompt/completion pairs: the prompt is exactly what the evaluator scores (`render_prompt`, with
the same shots), the completion is " " + the answer: the original label, or for a kept rewrite of an options task
the label followed by the rewrite's own words (`healing_completion`: the label stays where log-likelihood scoring
reads it); free-text rewrites are kept as generated. The loss falls only on the completion.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stillroom.backends.base import Backend, GenerationParams
from stillroom.evaluate.runner import parse_choice
from stillroom.tasks.prompts import render_input, render_prompt
from stillroom.tasks.task import Example, Task

REWRITE_HEADER = (
    "Below are an instruction that describes a task along with a reference answer. "
    "Using the reference answer as a guide, write your own response.\n\n"
)
REWRITE_SECTION = "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}\n\n### Response:\n{seed}"
REWRITE_TEMPLATE = REWRITE_HEADER + REWRITE_SECTION
"""The self-distillation rewrite prompt (methods.md §2). `seed` starts the response ('' by default; for maths
the method seeds "Great! Let's think step by step."). With demonstrations, the header is followed by the solved
demonstrations in the same sections, then the example's section."""

ANSWER_LINE = "Answer: "
"""How a demonstrated response ends: one line `Answer: <label>`, which `parse_choice` reads (text after the last
'Answer:')."""


@dataclass(frozen=True)
class Demonstration:
    """A solved rewrite shown before the example: an instruction, its reference answer and a response."""

    instruction: str
    reference: str
    response: str
    """Own-words text, then the answer line (`ANSWER_LINE` + reference)."""


DEMONSTRATIONS: tuple[Demonstration, ...] = (
    Demonstration(
        "Classify the sentiment of the review. The possible choices are: positive, neutral, and negative.\n\n"
        "Review: The soup was cold and the waiter ignored us for an hour.",
        "negative",
        "The answer is negative. The diner complains about cold food and slow service, so the review is unhappy."
        "\nAnswer: negative",
    ),
    Demonstration(
        "Name the topic of the headline. The possible choices are: science_tech, sports, politics, and business."
        "\n\nHeadline: Astronomers spot water vapour on a distant planet",
        "science_tech",
        "The answer is science_tech. Astronomers finding water on another planet is a discovery of research."
        "\nAnswer: science_tech",
    ),
    Demonstration(
        "Which kind of animal is described? The possible choices are: mammal, reptile, bird, and fish.\n\n"
        "Description: It has feathers, lays eggs and flies south in winter.",
        "bird",
        "The answer is bird. Feathers, eggs and flying south for the winter describe this animal.\nAnswer: bird",
    ),
)
"""Worked rewrites from tasks unrelated to any evaluated one: each shows a short own-words response that states
the answer and ends with the explicit answer line. A small base model given only the method's template rarely
states a one-word label (it paraphrases the input), so conditional selection rejects almost every rewrite; with
these it answers in the demonstrated format and the selector can read the label. The answers sit at different
positions of their choice lists (last, first, third), so the demonstrations teach copying the reference rather
than a position: with every answer second, the embedded 270M model answered the second listed option. Each
response states the answer first ("The answer is <label>."), a few lines below the reference, where the model
copies it most reliably, then explains: on intent_recognition (48 training examples) this kept 26/48 rewrites
against 18/48 with the statement at the end of the sentence and 0/48 with the template alone."""

META_PHRASES: tuple[str, ...] = (
    "reference answer",
    "reference response",
    "the reference",
    "your response",
    "your own response",
    "my own response",
    "write your own",
    "as a guide",
    "### instruction",
    "### response",
    "### reference",
)
"""Phrases that mark a rewrite as talking about the rewriting task instead of answering (case-insensitive)."""

STOP = ("\n###", "###", "\n\n\n")
"""Where a rewrite ends: base models tend to continue with the next '### ...' section."""


@dataclass
class Selection:
    """Whether one rewrite was kept, and why."""

    keep: bool
    reason: str
    """'kept', 'empty', 'meta_phrase: <phrase>', 'wrong_answer: <extracted>', 'no_answer' or
    'copied_demonstration'."""
    extracted: str | None


def _section(instruction: str, reference: str, seed: str = "") -> str:
    return REWRITE_SECTION.format(instruction=instruction, reference=reference, seed=seed)


def rewrite_prompt(task: Task, ex: Example, reference: str | None = None, seed: str = "",
                   demonstrations: Sequence[Demonstration] = ()) -> str:
    """The rewrite prompt for one example (reference defaults to its gold label).

    Without demonstrations it is the method's template exactly; with them, the template's header, each solved
    demonstration as a full section, then the example's section (ending at '### Response:\n' + seed).
    """
    instruction = (task.instruction.strip() + "\n\n" if task.instruction.strip() else "") + render_input(task, ex)
    ref = str(ex.label) if reference is None else reference
    demos = "".join(_section(d.instruction, d.reference, d.response) + "\n\n" for d in demonstrations)
    return REWRITE_HEADER + demos + _section(instruction, ref, seed)


_ANSWER_LINE_RE = re.compile(r"^[ \t]*answer[ \t]*:.*$", re.IGNORECASE | re.MULTILINE)


def end_at_answer_line(text: str) -> str:
    """The text up to and including its first line that starts with 'Answer:' (the whole text if none).

    A demonstrated response ends there; a base model sometimes goes on with another made-up example, whose own
    'Answer:' line would otherwise be the one the selector reads.
    """
    m = _ANSWER_LINE_RE.search(text)
    return text[: m.end()].rstrip() if m else text


def strip_answer_line(text: str) -> str:
    """The own-words part of a rewrite: the text before its first answer line."""
    m = _ANSWER_LINE_RE.search(text)
    return (text[: m.start()] if m else text).strip()


def find_meta_phrase(text: str, phrases: Sequence[str] = META_PHRASES) -> str | None:
    """The first meta-phrase found in `text` (case-insensitive), else None."""
    low = re.sub(r"\s+", " ", text.lower())
    for p in phrases:
        if p.lower() in low:
            return p
    return None


def extract_answer(task: Task, ex: Example, text: str) -> str | None:
    """The final answer a rewrite gives: one of the options for options tasks, the extracted text for free text."""
    if task.kind == "free_text":
        return task.extract_answer(text) or None
    return parse_choice(text, task.options(ex))


def _same_answer(task: Task, a: str | None, label: str | None) -> bool:
    if a is None or label is None:
        return False
    if task.kind == "free_text":
        norm = lambda s: re.sub(r"[\W_]+", " ", s.lower()).strip()  # noqa: E731
        return norm(a) == norm(label)
    return a == label


def select_rewrite(task: Task, ex: Example, rewrite: str, phrases: Sequence[str] = META_PHRASES, *,
                   demonstrations: Sequence[Demonstration] = ()) -> Selection:
    """Conditional selection: keep the rewrite iff its answer equals the label and it has no meta-phrase.

    The answer is read by the evaluator's parsers: for options tasks `parse_choice`, which takes the text after
    the last 'Answer:' when there is one (the demonstrated format), else the only option the text names. A
    rewrite whose own words repeat a demonstration's is rejected too ('copied_demonstration'): it says nothing
    about the example.
    """
    if not rewrite.strip():
        return Selection(False, "empty", None)
    phrase = find_meta_phrase(rewrite, phrases)
    extracted = extract_answer(task, ex, rewrite)
    if phrase is not None:
        return Selection(False, f"meta_phrase: {phrase}", extracted)
    if extracted is None:
        return Selection(False, "no_answer", None)
    if not _same_answer(task, extracted, ex.label):
        return Selection(False, f"wrong_answer: {extracted}", extracted)
    own = _norm_words(strip_answer_line(rewrite))
    if own and any(own == _norm_words(strip_answer_line(d.response)) for d in demonstrations):
        return Selection(False, "copied_demonstration", extracted)
    return Selection(True, "kept", extracted)


def _norm_words(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


COMPLETIONS = ("auto", "answer_first", "rewrite")


def healing_completion(task: Task, ex: Example, rewrite: str, style: str = "auto") -> str:
    """The completion a kept rewrite becomes in the healing data (starts with a space, like the original).

    'answer_first': " <label>\n<the rewrite's own words>". Options tasks are scored by log-likelihood of
    " <option>" right after the prompt's answer prefix (`render_prompt`, e.g. '\nIntent:'), so the label has to
    be the first thing the completion says for the healing loss to fall on the tokens the evaluator scores; the
    teacher's own words follow it (the self-generated, in-distribution part of the target). A completion that
    opens with prose would train the scored position towards prose and put the label after a second
    'Answer:' that no scorer reads. 'rewrite': the rewrite as generated, ending with its answer line; for
    free-text tasks, which are scored by generating and extracting the final answer, that is the right target.
    'auto' is 'rewrite' for free-text tasks and 'answer_first' otherwise.
    """
    if style not in COMPLETIONS:
        raise ValueError(f"completion must be one of {COMPLETIONS}, not {style!r}")
    if style == "auto":
        style = "rewrite" if task.kind == "free_text" else "answer_first"
    if style == "rewrite":
        return " " + rewrite.strip()
    own = strip_answer_line(rewrite)
    return " " + str(ex.label) + ("\n" + own if own else "")


def self_distill(task: Task, examples: Sequence[Example], teacher: Backend, *, shots: Sequence[Example] = (),
                 max_new_tokens: int = 64, seed_text: str = "", chat: bool = False,
                 phrases: Sequence[str] = META_PHRASES, chunk_size: int = 16, progress: Any = None,
                 demonstrations: Sequence[Demonstration] | None = DEMONSTRATIONS,
                 completion: str = "auto") -> list[dict]:
    """Rewrite every example's answer with `teacher` and apply conditional selection.

    Returns one row per example: `id`, `prompt` (the evaluator's prompt, with `shots`), `original` and
    `rewrite` (completions, each starting with a space; the rewrite ends at its first answer line), `raw` (the
    generation as returned), `selected` (the completion to train on: `healing_completion` of the rewrite when
    kept, else the original), `kept`, `reason`, `extracted`. With `chat=True` the rewrite prompt is sent as one
    user message (instruction-tuned teachers); by default it is a raw completion prompt (base models).

    `demonstrations` (default `DEMONSTRATIONS`; None or () for the method's template alone) are solved rewrites
    shown before the example; `completion` is the healing completion style ('auto', 'answer_first', 'rewrite').
    """
    demos = tuple(demonstrations or ())
    if completion not in COMPLETIONS:
        raise ValueError(f"completion must be one of {COMPLETIONS}, not {completion!r}")
    params = GenerationParams(max_tokens=max_new_tokens, temperature=0.0, stop=STOP)
    rows: list[dict] = []
    for start in range(0, len(examples), chunk_size):
        chunk = list(examples[start : start + chunk_size])
        prompts = [rewrite_prompt(task, ex, seed=seed_text, demonstrations=demos) for ex in chunk]
        sent = [[{"role": "user", "content": p}] for p in prompts] if chat else prompts
        gens = teacher.generate_many(sent, params)
        for ex, g in zip(chunk, gens, strict=True):
            raw = (seed_text + g.text).strip()
            text = end_at_answer_line(raw) if demos else raw
            sel = select_rewrite(task, ex, text, phrases, demonstrations=demos)
            original = " " + str(ex.label)
            rows.append({
                "id": ex.id,
                "prompt": render_prompt(task, ex, shots),
                "label": ex.label,
                "original": original,
                "rewrite": " " + text,
                "raw": raw,
                "selected": healing_completion(task, ex, text, completion) if sel.keep else original,
                "kept": sel.keep,
                "reason": sel.reason,
                "extracted": sel.extracted,
            })
        if progress is not None:
            progress(len(chunk))
    return rows


def acceptance_summary(rows: Sequence[dict]) -> dict:
    """Acceptance share and the count of each rejection reason (reasons grouped by their kind)."""
    n = len(rows)
    kept = sum(r["kept"] for r in rows)
    reasons = Counter(r["reason"].split(":")[0] for r in rows)
    return {"examples": n, "kept": kept, "acceptance": kept / n if n else 0.0, "reasons": dict(reasons)}


def sft_records(rows: Sequence[dict], which: str) -> list[dict]:
    """Prompt/completion pairs for healing: `which` is 'original' or 'selected' (self-data)."""
    if which not in ("original", "selected"):
        raise ValueError("which must be 'original' or 'selected'")
    return [{"id": r["id"], "prompt": r["prompt"], "completion": r[which]} for r in rows]


def run_selfdistill(teacher_spec: str, task_spec: str, run_dir: str | Path, *, limit: int | None = None,
                    shots: int = 0, seed: int = 0, max_new_tokens: int = 64, chat: bool = False,
                    seed_text: str = "", batch_size: int = 8, backend: Backend | None = None,
                    progress: Any = None, demonstrations: Sequence[Demonstration] | None = DEMONSTRATIONS,
                    completion: str = "auto", task_options: dict | None = None) -> dict:
    """`stillroom selfdistill`: rewrite the training split of a task with the teacher, through the run's cache.

    `demonstrations` and `completion` as in `self_distill`; `task_options` are TaskConfig fields (columns,
    instruction) for the task file.
    Writes `selfdistill.jsonl` (both versions and the decision per example), `sft_original.jsonl` and
    `sft_self_data.jsonl` (prompt/completion healing sets) and `selfdistill.json` (acceptance summary).
    """
    from stillroom.backends import open_cached_backend
    from stillroom.config import BackendConfig
    from stillroom.runs import RunFolder, claim_run_folder
    from stillroom.tasks.task import sample

    run = RunFolder(claim_run_folder(run_dir))  # refuses a folder that is not Stillroom's
    spec = teacher_spec if ":" in teacher_spec or teacher_spec in ("gemma3-270m", "embedded") else f"hf:{teacher_spec}"
    cfg = BackendConfig(spec=spec, batch_size=batch_size)
    from stillroom.config import TaskConfig, validate_config
    from stillroom.route import load_task_config

    task_cfg = validate_config(TaskConfig, {"spec": task_spec, "seed": seed, **(task_options or {})}, source="command line")
    config = {"command": "selfdistill", "teacher": spec, "task": {"spec": task_spec, "seed": seed, **(task_options or {})}, "limit": limit,
              "shots": shots, "max_new_tokens": max_new_tokens, "chat": chat, "seed_text": seed_text,
              "template": REWRITE_TEMPLATE,
              "demonstrations": [asdict(d) for d in demonstrations or ()], "completion": completion,
              "meta_phrases": list(META_PHRASES)}
    run.save_config(config)
    task = load_task_config(task_cfg)
    train = task.splits(seed=seed).train
    shot_examples = sample(train, shots, seed=seed) if shots else []
    shot_ids = {s.id for s in shot_examples}
    pool = [ex for ex in train if ex.id not in shot_ids and ex.label is not None]
    examples = sample(pool, limit, seed=seed)
    teacher = open_cached_backend(cfg, run.cache_path, backend=backend)
    try:
        rows = self_distill(task, examples, teacher, shots=shot_examples, max_new_tokens=max_new_tokens, chat=chat,
                            seed_text=seed_text, progress=progress, demonstrations=demonstrations,
                            completion=completion)
    finally:
        run.write_json("usage.json", teacher.meter.summary())
    run.write_jsonl("selfdistill.jsonl", rows)
    run.write_jsonl("sft_original.jsonl", sft_records(rows, "original"))
    run.write_jsonl("sft_self_data.jsonl", sft_records(rows, "selected"))
    summary = {"task": task.name, "teacher": teacher.identity, "shots": [s.id for s in shot_examples],
               "backend_calls": teacher.calls, **acceptance_summary(rows)}
    run.write_json("selfdistill.json", summary)
    return summary
