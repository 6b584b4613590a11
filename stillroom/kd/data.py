"""Black-box KD (`stillroom kd data`): distil through the teacher's text, so any backend works, API teachers
included.

Modes:

* ``answers`` (SeqKD, Kim & Rush 2016): the teacher answers each training input; its answers become the
  student's SFT targets.
* ``cot`` (chain-of-thought distillation): the teacher reasons, then answers ('Answer: ...'); rationale + answer
  become the targets, and the student is evaluated reasoning the same way.
* ``demos`` (in-context distillation): the teacher labels a pool of inputs; k of its labelled examples become
  the student's few-shot demonstrations. No training.

Every teacher call goes through the run folder's durable cache (`open_cached_backend`), so a rerun (or a run
cut short by Ctrl-C or a spend cap) repays nothing. When an example has a gold label, the teacher's output is
kept only if its final answer matches it (`filter_correct`); with `samples` > 1 (and a temperature > 0) the
teacher is re-sampled for the examples it got wrong (rejection sampling). Fine-tuning is the one SFT helper,
`stillroom.train.sft.train_sft` (completion-only loss, LoRA by default).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from stillroom.config import (
    BackendConfig,
    BaselineBlock,
    SelectionBlock,
    SpendConfig,
    TrainingBlock,
    spend_field,
)
from stillroom.errors import ConfigError

Mode = Literal["answers", "cot", "demos"]


class KDDataConfig(SelectionBlock, TrainingBlock, BaselineBlock):
    """`stillroom kd data`: teacher outputs → filtered SFT set (or demonstrations) → student."""

    teacher: BackendConfig = Field(default_factory=BackendConfig, description="Any backend: local, OpenAI-compatible, scripted.")
    student: BackendConfig = Field(..., description="Student: 'gemma3-270m', 'hf:PATH' or a local model folder.")
    mode: Mode = Field("answers", description="'answers' (SeqKD), 'cot' (rationales + answers) or 'demos' (few-shot).")
    filter_correct: bool = Field(True, description="Keep a teacher output only if its answer matches the gold label (when there is one).")
    samples: int = Field(1, ge=1, description="Teacher attempts per example at most (re-sampled while wrong; needs temperature > 0).")
    temperature: float = Field(0.0, ge=0, description="Teacher sampling temperature (0 = greedy).")
    teacher_max_tokens: int | None = Field(None, ge=1, description="Teacher generation budget (default 32, or 256 for cot).")
    teacher_shots: int = Field(0, ge=0, description="Gold-labelled training examples shown to the teacher as shots.")
    shots: int = Field(
        0, ge=0,
        description="Gold-labelled training examples in the student's prompt, in training and evaluation (the same k "
        "the teacher sees when teacher_shots equals it). Ignored in 'demos' mode, where the teacher's labelled "
        "examples are the shots.",
    )
    demos: int = Field(5, ge=1, description="'demos' mode: teacher-labelled demonstrations in the student's prompt.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name.")
    max_length: int = Field(1024, ge=8, description="SFT tokens per example.")
    spend: SpendConfig = spend_field()

    @model_validator(mode="after")
    def _check(self):
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples > 1 needs temperature > 0 (greedy decoding repeats the same answer)")
        return self


def teacher_answer(task, ex, text: str) -> str | None:
    """The final answer in a teacher output: an option for option tasks, extracted text for free text."""
    from stillroom.evaluate.runner import parse_choice

    if task.kind == "free_text":
        return task.extract_answer(text) or None
    return parse_choice(text, task.options(ex))


def is_correct(task, ex, answer: str | None) -> bool | None:
    """Whether the teacher's answer matches the gold label; None when the example has no label."""
    if ex.label is None:
        return None
    if answer is None:
        return False
    if task.kind == "free_text":
        norm = lambda s: re.sub(r"[\W_]+", " ", s.lower()).strip()  # noqa: E731
        return norm(answer) == norm(str(ex.label))
    return answer == ex.label


def collect_teacher_outputs(task, examples, teacher, *, mode: Mode, shots=(), samples: int = 1,
                            temperature: float = 0.0, max_tokens: int = 32, filter_correct: bool = True) -> list[dict]:
    """Ask the (cached) teacher for every example; one row per example with its text, parsed answer, correctness
    and whether it is kept. With `samples` > 1, examples still without a kept output are re-sampled."""
    from stillroom.backends.base import GenerationParams
    from stillroom.tasks.prompts import render_chat

    reason = mode == "cot"
    rows: dict[str, dict] = {}
    pending = list(examples)
    for attempt in range(samples):
        if not pending:
            break
        # An answer is one line: base models otherwise run on into a made-up next example.
        params = GenerationParams(max_tokens=max_tokens, temperature=temperature, n_sample=attempt,
                                  seed=attempt if temperature > 0 else None, stop=() if reason else ("\n",))
        gens = teacher.generate_many([render_chat(task, ex, shots, reason=reason) for ex in pending], params)
        still = []
        for ex, g in zip(pending, gens, strict=True):
            ans = teacher_answer(task, ex, g.text)
            ok = is_correct(task, ex, ans)
            keep = ans is not None and (ok is not False or not filter_correct)
            rows[ex.id] = {"id": ex.id, "input": ex.input, "gold": ex.label, "text": g.text, "answer": ans,
                           "correct": ok, "kept": keep, "attempt": attempt, "cached": g.usage.cached}
            if not keep:
                still.append(ex)
        pending = still
        if temperature == 0:
            break  # greedy decoding would only repeat itself
    return [rows[ex.id] for ex in examples if ex.id in rows]


def sft_records(task, examples, rows: list[dict], *, mode: Mode, render, shots=()) -> list[dict]:
    """Prompt/completion pairs for `train_sft` from the kept teacher rows.

    Option tasks in 'answers' mode train on the log-likelihood prompt (`render_prompt` + ' <option>'), the very
    text the evaluator scores; free text and 'cot' train on the rendered chat prompt (`render`, as the student's
    backend renders it when generating) followed by the teacher's answer or rationale. `shots` are the student's
    solved examples, in the prompt as the evaluator will show them.
    """
    from stillroom.tasks.prompts import continuation, render_chat, render_prompt

    by_id = {ex.id: ex for ex in examples}
    out = []
    for r in rows:
        if not r["kept"]:
            continue
        ex = by_id[r["id"]]
        if mode == "answers" and task.kind != "free_text":
            out.append({"prompt": render_prompt(task, ex, shots), "completion": continuation(r["answer"])})
        elif mode == "answers":
            out.append({"prompt": render(render_chat(task, ex, shots)), "completion": " " + r["answer"].strip()})
        else:
            out.append({"prompt": render(render_chat(task, ex, shots, reason=True)),
                        "completion": " " + r["text"].strip()})
    return out


def collect_and_record(run, task, examples, teacher, **kw) -> tuple[list[dict], dict]:
    """`collect_teacher_outputs` through a cached teacher, written to the run folder (`teacher_outputs.jsonl`,
    `usage.json` even when the teacher fails midway), with the data statistics the routes report."""
    try:
        rows = collect_teacher_outputs(task, examples, teacher, **kw)
    finally:
        run.write_json("usage.json", teacher.meter.summary())
    run.write_jsonl("teacher_outputs.jsonl", rows)
    labelled = [r for r in rows if r["correct"] is not None]
    stats = {
        "examples": len(rows), "kept": sum(r["kept"] for r in rows),
        "teacher_accuracy": (sum(bool(r["correct"]) for r in labelled) / len(labelled)) if labelled else None,
        "unparsed": sum(r["answer"] is None for r in rows),
        "teacher_calls_cached": sum(r["cached"] for r in rows),
    }
    return rows, stats


def distill_data(cfg: KDDataConfig, run_dir: str | Path, *, teacher_backend=None) -> dict:
    """The `kd data` route. Writes teacher_outputs.jsonl, sft_data.jsonl (or demos.jsonl), student/,
    train.json, predictions.jsonl, metrics.json, usage.json and report.html. Rerunning resumes from the cache."""
    from stillroom.models import resolve_model_path
    from stillroom.route import run_route

    return run_route(cfg, run_dir, lambda ctx: build_data(ctx, teacher_backend), route=f"kd-data-{cfg.mode}",
                     prepare=lambda cfg, sel: resolve_model_path(cfg.student.spec),
                     title=lambda ctx: f"Stillroom KD (data, {cfg.mode}): {ctx.task.name}").metrics


def build_data(ctx, teacher_backend=None):
    """Black-box KD's build: the teacher's outputs (through the run's cache), then the student fine-tuned on
    them ('answers', 'cot') or given them as demonstrations ('demos')."""
    from stillroom.backends.hf import HFBackend
    from stillroom.models import load_causal_lm, load_tokenizer
    from stillroom.route import Built, Deployment

    cfg: KDDataConfig = ctx.cfg
    student_path = ctx.prepared
    teacher_shots = ctx.shots(cfg.teacher_shots)
    student_shots = ctx.shots(cfg.shots) if cfg.mode != "demos" else []
    train = ctx.train_pool(teacher_shots, student_shots)
    teacher = ctx.open_teacher(cfg.teacher, teacher_backend)
    rows, data_stats = collect_and_record(
        ctx.run, ctx.task, train, teacher, mode=cfg.mode, shots=teacher_shots, samples=cfg.samples,
        temperature=cfg.temperature, max_tokens=cfg.teacher_max_tokens or (256 if cfg.mode == "cot" else 32),
        filter_correct=cfg.filter_correct)
    if not data_stats["kept"]:
        raise ConfigError(f"the teacher produced no usable output for {len(rows)} examples (accuracy "
                          f"{data_stats['teacher_accuracy']}); nothing to distil. Try cot, more samples or another teacher")
    tok = load_tokenizer(student_path)
    answer = {"method": "cot" if cfg.mode == "cot" else "auto", "max_new_tokens": 256 if cfg.mode == "cot" else 16}
    base = Deployment(name="student (no KD)", backend=None, model=cfg.student.spec, shots=student_shots,
                      model_dir=student_path, **answer,
                      load=lambda: HFBackend.from_objects(load_causal_lm(student_path), tok, name="student-base"))
    if cfg.mode == "demos":
        kept = [r for r in rows if r["kept"]][: cfg.demos]
        by_id = {ex.id: ex for ex in train}
        demos = [dataclasses.replace(by_id[r["id"]], label=r["answer"]) for r in kept]
        ctx.run.write_jsonl("demos.jsonl", [{"id": d.id, "input": d.input, "label": d.label} for d in demos])
        model = load_causal_lm(student_path)  # one copy in memory for both conditions
        base.backend, base.load = HFBackend.from_objects(model, tok, name="student-base"), None
        deployed = dataclasses.replace(base, name=f"student + {len(demos)} teacher demos", shots=demos,
                                       backend=HFBackend.from_objects(model, tok, name="student-demos"))
        ctx.notes.append("demos mode: no training; the teacher's labelled examples are the student's few-shot prompt")
        train_info: dict[str, Any] = {"data": data_stats}
    else:
        trained, train_info = fine_tune_student(ctx, rows, train, tok, student_shots, data_stats)
        if trained is None:
            return None  # other ranks of a multi-process launch: every rank holds the same weights; one saves
        student_dir = ctx.run.file("student")
        deployed = Deployment(name=f"student ({cfg.mode} KD)", backend=HFBackend.from_objects(trained, tok, name="student-kd"),
                              model=str(student_dir), shots=student_shots, model_dir=student_dir, **answer)
    artifacts = {k: str(ctx.run.file(k)) for k in ("teacher_outputs.jsonl", "sft_data.jsonl", "demos.jsonl", "student")
                 if ctx.run.file(k).exists()}
    extra = {"split": cfg.eval_split, "mode": cfg.mode, "teacher": teacher.identity, "student": str(student_path),
             "data": data_stats, "train": {k: v for k, v in train_info.items() if k != "data"}}
    return Built(deployments=([base] if cfg.eval_before or cfg.mode == "demos" else []) + [deployed],
                 steps=int((train_info.get("sft") or {}).get("steps", 0)), extra=extra, artifacts=artifacts,
                 usage=teacher.meter.summary)


def fine_tune_student(ctx, rows, train, tok, student_shots, data_stats):
    """SFT of the student on the kept teacher outputs (reused when the run folder holds it, same settings).
    Returns (the trained model, train.json's content); (None, {}) on a secondary rank of a multi-process launch."""
    from stillroom.backends.embedded import save_model_folder
    from stillroom.backends.hf import HFBackend
    from stillroom.kd.trainer import process_state
    from stillroom.models import load_causal_lm
    from stillroom.train.sft import SFTSettings, train_sft

    cfg: KDDataConfig = ctx.cfg
    student_path = ctx.prepared
    student_dir = ctx.run.file("student")
    student = load_causal_lm(student_path)
    render = HFBackend.from_objects(student, tok, name="render").render
    records = sft_records(ctx.task, train, rows, mode=cfg.mode, render=lambda m: render(m)[0], shots=student_shots)
    ctx.run.write_jsonl("sft_data.jsonl", records)
    info = ctx.run.read_json("train.json")
    if ctx.finished(info, "student"):
        ctx.notes.append("resumed: the student was already fine-tuned in this run folder")
        return load_causal_lm(student_dir), info
    settings = SFTSettings.with_lora(cfg.lora, lr_scheduler_type=cfg.lr_scheduler, epochs=cfg.epochs,
                                     max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
                                     batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed)
    res = train_sft(student, tok, records, settings, output_dir=ctx.run.file("trainer"))
    if not process_state().is_main_process:
        return None, {}
    save_model_folder(res.model, tok, student_dir)
    info = {"data": data_stats, "config_digest": ctx.digest(),
            "sft": {"examples": len(records), "steps": res.steps, "seconds": round(res.seconds, 2),
                    "losses": res.losses, "trainable_parameters": res.trainable_parameters,
                    "settings": dataclasses.asdict(settings)}}
    ctx.run.write_json("train.json", info)
    return res.model, info
