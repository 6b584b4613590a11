"""`stillroom eval` as a function: load the task, open the cached backend in the run folder, evaluate one or
more conditions (zero-shot, k-shot, a system prompt, chain-of-thought), write predictions, metrics, usage and
the report. The CLI, the demo and the PLD route's comparison all call this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stillroom.backends import open_cached_backend
from stillroom.config import EvalConfig
from stillroom.evaluate.runner import EvalResult, evaluate
from stillroom.report.html import eval_report
from stillroom.runs import RunFolder
from stillroom.tasks import load_task
from stillroom.tasks.task import Example, Task, sample


@dataclass
class Condition:
    """One way of prompting the model, evaluated on the same examples as the others."""

    name: str
    shots: int = 0
    system_prompt: str | None = None
    method: str = "auto"


def load_task_from_config(cfg: EvalConfig) -> Task:
    t = cfg.task
    return load_task(t.spec, instruction=t.instruction, labels=t.labels)


def pick_examples(task: Task, cfg: EvalConfig) -> tuple[list[Example], list[Example]]:
    """The evaluated examples (split, optionally a deterministic sample) and the training pool for shots."""
    splits = task.splits(seed=cfg.task.seed, val_fraction=cfg.task.val_fraction, test_fraction=cfg.task.test_fraction)
    return sample(splits.get(cfg.split), cfg.limit, seed=cfg.task.seed), splits.train


def run_eval(cfg: EvalConfig, run_dir: Path, conditions: list[Condition] | None = None, backend=None,
             task: Task | None = None) -> dict[str, EvalResult]:
    """Evaluate each condition and write the run folder. Rerunning resumes from the durable cache."""
    run = RunFolder(run_dir)
    config_dict = cfg.model_dump(mode="json")
    run.save_config(config_dict)
    task = task or load_task_from_config(cfg)
    examples, train = pick_examples(task, cfg)
    if conditions is None:
        system_prompt = Path(cfg.system_prompt_file).read_text(encoding="utf-8") if cfg.system_prompt_file else None
        name = f"{cfg.shots}-shot" if cfg.shots else "zero-shot"
        conditions = [Condition(name=name + (" + system prompt" if system_prompt else ""), shots=cfg.shots,
                                system_prompt=system_prompt, method=cfg.method)]
    cached = open_cached_backend(cfg.model, run.cache_path, cfg.spend, backend=backend)
    results: dict[str, EvalResult] = {}
    try:
        for cond in conditions:
            shots = sample(train, cond.shots, seed=cfg.task.seed) if cond.shots else []
            results[cond.name] = evaluate(
                task, examples, cached, shots=shots, system_prompt=cond.system_prompt, method=cond.method,
                max_new_tokens=cfg.max_new_tokens, description=cond.name,
            )
    finally:
        # Usage is written even when a spend cap or Ctrl-C stops the run, so the user sees what was spent.
        run.write_json("usage.json", cached.meter.summary())
    rows = [{"condition": name, **p} for name, r in results.items() for p in r.predictions]
    run.write_jsonl("predictions.jsonl", rows)
    metrics = {"task": task.name, "split": cfg.split, "examples": len(examples), "model": cached.identity,
               "conditions": {name: {"method": r.method, **r.metrics} for name, r in results.items()}}
    run.write_json("metrics.json", metrics)
    notes = list(dict.fromkeys(n for r in results.values() for n in r.extra.get("notes", [])))
    if task.kind == "multiple_choice":
        notes.append("Options differ per example: per-class figures are over option positions (A, B, ...).")
    run.write_text(
        "report.html",
        eval_report(f"Stillroom eval: {task.name} on {cached.model}", {n: r.metrics for n, r in results.items()},
                    config_dict, usage=cached.meter.summary(), notes=notes),
    )
    return results
