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

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stillroom.config import BackendConfig, LoraSettings, SpendConfig, TaskConfig
from stillroom.errors import ConfigError

Mode = Literal["answers", "cot", "demos"]


class KDDataConfig(BaseModel):
    """`stillroom kd data`: teacher outputs → filtered SFT set (or demonstrations) → student."""

    model_config = ConfigDict(extra="forbid")

    task: TaskConfig
    teacher: BackendConfig = Field(default_factory=BackendConfig, description="Any backend: local, OpenAI-compatible, scripted.")
    student: str = Field(..., description="Student: 'gemma3-270m', 'hf:PATH' or a local model folder.")
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
    train_limit: int | None = Field(None, ge=1, description="Use a deterministic sample of N training examples.")
    eval_split: Literal["val", "test"] = Field("test", description="Split the student is evaluated on.")
    eval_limit: int | None = Field(None, ge=1, description="Evaluate on a deterministic sample of N examples.")
    eval_before: bool = Field(True, description="Also evaluate the student before distillation.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA (merged into the saved student); `false` = full fine-tuning.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name.")
    epochs: float = Field(1.0, gt=0, description="SFT passes over the kept examples.")
    max_steps: int = Field(-1, description="SFT optimizer steps (-1: use epochs).")
    learning_rate: float = Field(1e-4, gt=0, description="SFT learning rate.")
    batch_size: int = Field(8, ge=1, description="SFT batch size.")
    max_length: int = Field(1024, ge=8, description="SFT tokens per example.")
    seed: int = Field(0, description="SFT seed.")
    spend: SpendConfig = Field(default_factory=SpendConfig, description="Cap on the teacher's spend for this run.")

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
    import dataclasses

    from stillroom.backends import open_cached_backend
    from stillroom.backends.embedded import is_converted, save_model_folder
    from stillroom.backends.hf import HFBackend
    from stillroom.kd.trainer import training_digest
    from stillroom.models import load_causal_lm, load_tokenizer, resolve_model_path
    from stillroom.route import BuildCost, Deployment, Timer, evaluate_deployment, open_run, record, select

    timer = Timer()
    sel = select(cfg.task, split=cfg.eval_split, limit=cfg.eval_limit, train_limit=cfg.train_limit)
    student_path = resolve_model_path(cfg.student)
    run, config_dict = open_run(cfg, run_dir)
    task = sel.task
    teacher_shots = sel.shots(cfg.teacher_shots)
    student_shots = sel.shots(cfg.shots) if cfg.mode != "demos" else []
    shot_ids = {s.id for s in teacher_shots} | {s.id for s in student_shots}
    train = [e for e in sel.train if e.id not in shot_ids]
    max_tokens = cfg.teacher_max_tokens or (256 if cfg.mode == "cot" else 32)

    teacher = open_cached_backend(cfg.teacher, run.cache_path, cfg.spend, backend=teacher_backend)
    rows, data_stats = collect_and_record(run, task, train, teacher, mode=cfg.mode, shots=teacher_shots,
                                          samples=cfg.samples, temperature=cfg.temperature, max_tokens=max_tokens,
                                          filter_correct=cfg.filter_correct)
    if not data_stats["kept"]:
        raise ConfigError(f"the teacher produced no usable output for {len(rows)} examples (accuracy "
                          f"{data_stats['teacher_accuracy']}); nothing to distil. Try cot, more samples or another teacher")

    tok = load_tokenizer(student_path)
    student = load_causal_lm(student_path)
    conditions: dict[str, Any] = {}
    method = "cot" if cfg.mode == "cot" else "auto"
    budget = 256 if cfg.mode == "cot" else 16
    if cfg.eval_before or cfg.mode == "demos":
        base = HFBackend.from_objects(student, tok, name="student-base")
        conditions["student (no KD)"] = evaluate_deployment(sel, Deployment(
            name="student (no KD)", backend=base, model=cfg.student, shots=student_shots, method=method,
            max_new_tokens=budget, model_dir=student_path))
    notes: list[str] = []
    resumed = False
    train_info: dict[str, Any] = {"data": data_stats}
    if cfg.mode == "demos":
        kept = [r for r in rows if r["kept"]][: cfg.demos]
        by_id = {ex.id: ex for ex in train}
        demos = [dataclasses.replace(by_id[r["id"]], label=r["answer"]) for r in kept]
        run.write_jsonl("demos.jsonl", [{"id": d.id, "input": d.input, "label": d.label} for d in demos])
        deployed = Deployment(name=f"student + {len(demos)} teacher demos",
                              backend=HFBackend.from_objects(student, tok, name="student-demos"), model=cfg.student,
                              shots=demos, method=method, max_new_tokens=budget, model_dir=student_path)
        conditions[deployed.name] = evaluate_deployment(sel, deployed)
        notes.append("demos mode: no training; the teacher's labelled examples are the student's few-shot prompt")
    else:
        from stillroom.train.sft import SFTSettings, train_sft

        render = HFBackend.from_objects(student, tok, name="render").render
        records = sft_records(task, train, rows, mode=cfg.mode, render=lambda m: render(m)[0], shots=student_shots)
        run.write_jsonl("sft_data.jsonl", records)
        student_dir = run.file("student")
        digest = training_digest(cfg)
        if is_converted(student_dir) and (run.read_json("train.json") or {}).get("config_digest") == digest:
            notes.append("resumed: the student was already fine-tuned in this run folder")
            resumed = teacher.meter.calls == 0
            trained = load_causal_lm(student_dir)
            train_info = run.read_json("train.json")
        else:
            settings = SFTSettings.with_lora(cfg.lora, lr_scheduler_type=cfg.lr_scheduler,
                                   epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
                                   batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed)
            res = train_sft(student, tok, records, settings, output_dir=run.file("trainer"))
            trained = res.model
            from stillroom.kd.trainer import process_state

            if not process_state().is_main_process:
                return {}  # other ranks of a multi-process launch: every rank holds the same weights; one saves
            save_model_folder(trained, tok, student_dir)
            train_info = {"data": data_stats, "config_digest": digest,
                          "sft": {"examples": len(records), "steps": res.steps, "seconds": round(res.seconds, 2),
                                  "losses": res.losses, "trainable_parameters": res.trainable_parameters,
                                  "settings": dataclasses.asdict(settings)}}
            run.write_json("train.json", train_info)
        deployed = Deployment(name=f"student ({cfg.mode} KD)", backend=HFBackend.from_objects(trained, tok, name="student-kd"),
                              model=str(student_dir), shots=student_shots, method=method, max_new_tokens=budget,
                              model_dir=student_dir)
        conditions[deployed.name] = evaluate_deployment(sel, deployed)
    steps = int((train_info.get("sft") or {}).get("steps", 0))
    cost = BuildCost.from_meter(teacher.meter.summary(), seconds=timer.seconds, training_steps=steps)
    artifacts = {k: str(run.file(k)) for k in ("teacher_outputs.jsonl", "sft_data.jsonl", "demos.jsonl", "student")
                 if run.file(k).exists()}
    extra = {"split": cfg.eval_split, "mode": cfg.mode, "teacher": teacher.identity, "student": str(student_path),
             "data": data_stats, "train": {k: v for k, v in train_info.items() if k != "data"}}
    return record(run, sel, route=f"kd-data-{cfg.mode}", deployed=deployed, results=conditions, cost=cost,
                  config_dict=config_dict, title=f"Stillroom KD (data, {cfg.mode}): {task.name}", metrics_extra=extra,
                  notes=notes, artifacts=artifacts, usage=teacher.meter.summary(), resumed=resumed)
