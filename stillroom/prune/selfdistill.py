"""Self-data distillation: the unpruned model rewrites each training answer in its own words, and conditional
selection keeps a rewrite only where it is still right.

The rewrite prompt is the one the method builds on (Yang et al.'s self-distillation template, quoted in
methods.md §2): the task and input as the instruction, the gold answer as the reference answer, then the model's
own response. Conditional selection keeps the rewrite when (1) the answer extracted from it equals the label
(options tasks: `parse_choice`, the evaluator's tolerant parser; free text: `Task.extract_answer`) and (2) it
contains none of the meta-phrases that betray the rewriting set-up ("reference answer", "your response", ...);
otherwise the original answer is kept. Both versions are written, with the reason for each decision.

Generation goes through the run folder's durable cache (`open_cached_backend`), so rerunning resumes for free.
Healing data are prompt/completion pairs: the prompt is exactly what the evaluator scores (`render_prompt`, with
the same shots), the completion is " " + the answer (original or selected rewrite), so the loss falls only on the
answer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stillroom.backends.base import Backend, GenerationParams
from stillroom.evaluate.runner import parse_choice
from stillroom.tasks.prompts import render_input, render_prompt
from stillroom.tasks.task import Example, Task

REWRITE_TEMPLATE = (
    "Below are an instruction that describes a task along with a reference answer. "
    "Using the reference answer as a guide, write your own response.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Reference Answer:\n{reference}\n\n"
    "### Response:\n{seed}"
)
"""The self-distillation rewrite prompt (methods.md §2). `seed` starts the response ('' by default; for maths
the method seeds "Great! Let's think step by step.")."""

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
    """'kept', 'empty', 'meta_phrase: <phrase>', 'wrong_answer: <extracted>' or 'no_answer'."""
    extracted: str | None


def rewrite_prompt(task: Task, ex: Example, reference: str | None = None, seed: str = "") -> str:
    """The rewrite prompt for one example (reference defaults to its gold label)."""
    instruction = (task.instruction.strip() + "\n\n" if task.instruction.strip() else "") + render_input(task, ex)
    ref = str(ex.label) if reference is None else reference
    return REWRITE_TEMPLATE.format(instruction=instruction, reference=ref, seed=seed)


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


def select_rewrite(task: Task, ex: Example, rewrite: str, phrases: Sequence[str] = META_PHRASES) -> Selection:
    """Conditional selection: keep the rewrite iff its answer equals the label and it has no meta-phrase."""
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
    return Selection(True, "kept", extracted)


def self_distill(task: Task, examples: Sequence[Example], teacher: Backend, *, shots: Sequence[Example] = (),
                 max_new_tokens: int = 64, seed_text: str = "", chat: bool = False,
                 phrases: Sequence[str] = META_PHRASES, chunk_size: int = 16, progress: Any = None) -> list[dict]:
    """Rewrite every example's answer with `teacher` and apply conditional selection.

    Returns one row per example: `id`, `prompt` (the evaluator's prompt, with `shots`), `original` and
    `rewrite` (completions, each starting with a space), `selected` (the completion to train on), `kept`,
    `reason`, `extracted`. With `chat=True` the rewrite prompt is sent as one user message (instruction-tuned
    teachers); by default it is a raw completion prompt (base models).
    """
    params = GenerationParams(max_tokens=max_new_tokens, temperature=0.0, stop=STOP)
    rows: list[dict] = []
    for start in range(0, len(examples), chunk_size):
        chunk = list(examples[start : start + chunk_size])
        prompts = [rewrite_prompt(task, ex, seed=seed_text) for ex in chunk]
        sent = [[{"role": "user", "content": p}] for p in prompts] if chat else prompts
        gens = teacher.generate_many(sent, params)
        for ex, g in zip(chunk, gens, strict=True):
            text = (seed_text + g.text).strip()
            sel = select_rewrite(task, ex, text, phrases)
            original = " " + str(ex.label)
            rewrite = " " + text
            rows.append({
                "id": ex.id,
                "prompt": render_prompt(task, ex, shots),
                "label": ex.label,
                "original": original,
                "rewrite": rewrite,
                "selected": rewrite if sel.keep else original,
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
                    progress: Any = None) -> dict:
    """`stillroom selfdistill`: rewrite the training split of a task with the teacher, through the run's cache.

    Writes `selfdistill.jsonl` (both versions and the decision per example), `sft_original.jsonl` and
    `sft_self_data.jsonl` (prompt/completion healing sets) and `selfdistill.json` (acceptance summary).
    """
    from stillroom.backends import open_cached_backend
    from stillroom.config import BackendConfig
    from stillroom.runs import RunFolder
    from stillroom.tasks import load_task
    from stillroom.tasks.task import sample

    run = RunFolder(run_dir)
    spec = teacher_spec if ":" in teacher_spec or teacher_spec in ("gemma3-270m", "embedded") else f"hf:{teacher_spec}"
    cfg = BackendConfig(spec=spec, batch_size=batch_size)
    config = {"command": "selfdistill", "teacher": spec, "task": {"spec": task_spec, "seed": seed}, "limit": limit,
              "shots": shots, "max_new_tokens": max_new_tokens, "chat": chat, "seed_text": seed_text,
              "template": REWRITE_TEMPLATE,
              "meta_phrases": list(META_PHRASES)}
    run.save_config(config)
    task = load_task(task_spec)
    train = task.splits(seed=seed).train
    shot_examples = sample(train, shots, seed=seed) if shots else []
    shot_ids = {s.id for s in shot_examples}
    pool = [ex for ex in train if ex.id not in shot_ids and ex.label is not None]
    examples = sample(pool, limit, seed=seed)
    teacher = open_cached_backend(cfg, run.cache_path, backend=backend)
    try:
        rows = self_distill(task, examples, teacher, shots=shot_examples, max_new_tokens=max_new_tokens, chat=chat,
                            seed_text=seed_text, progress=progress)
    finally:
        run.write_json("usage.json", teacher.meter.summary())
    run.write_jsonl("selfdistill.jsonl", rows)
    run.write_jsonl("sft_original.jsonl", sft_records(rows, "original"))
    run.write_jsonl("sft_self_data.jsonl", sft_records(rows, "selected"))
    summary = {"task": task.name, "teacher": teacher.identity, "shots": [s.id for s in shot_examples],
               "backend_calls": teacher.calls, **acceptance_summary(rows)}
    run.write_json("selfdistill.json", summary)
    return summary
