"""`stillroom eval` as a function: load the task, open the cached backend in the run folder, evaluate one or
more conditions (zero-shot, k-shot, a system prompt, chain-of-thought), write predictions, metrics, usage and
the report. The CLI, the demo and the PLD route's comparison all call this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stillroom.backends import load_backend, open_cached_backend
from stillroom.config import EvalConfig
from stillroom.errors import ConfigError
from stillroom.evaluate.runner import EvalResult, evaluate
from stillroom.locking import run_folder_lock
from stillroom.report.html import eval_report
from stillroom.runs import RunFolder
from stillroom.tasks import load_task
from stillroom.tasks.fit import fit_examples
from stillroom.tasks.prompts import continuation, render_chat, render_prompt
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
             task: Task | None = None, wait: bool = False) -> dict[str, EvalResult]:
    """Evaluate each condition and write the run folder. Rerunning resumes from the durable cache.

    Task, model spec, system prompt and every prompt's fit in the context window are checked before the run
    folder is created; the folder is held (`stillroom.locking`) while it is written; `wait` queues behind a
    process that holds it instead of failing.
    """
    task = task or load_task_from_config(cfg)
    examples, train = pick_examples(task, cfg)
    if conditions is None:
        system_prompt = _read_system_prompt(cfg.system_prompt_file)
        name = f"{cfg.shots}-shot" if cfg.shots else "zero-shot"
        conditions = [Condition(name=name + (" + system prompt" if system_prompt else ""), shots=cfg.shots,
                                system_prompt=system_prompt, method=cfg.method)]
    backend = backend or load_backend(cfg.model)
    examples, overlong = fit_eval_examples(task, examples, train, backend, conditions, cfg)
    with run_folder_lock(run_dir, wait=wait):
        return _run_eval(cfg, run_dir, conditions, backend, task, examples, train, overlong)


def _read_system_prompt(path: str | None) -> str | None:
    if not path:
        return None
    if not Path(path).exists():
        raise ConfigError(f"{path}: system prompt file does not exist")
    return Path(path).read_text(encoding="utf-8")


def fit_eval_examples(task: Task, examples, train, backend, conditions: list[Condition], cfg: EvalConfig):
    """`examples` after the task's overlong policy, every condition's prompt checked (no call is made)."""
    def prompts_of(ex: Example):
        out = []
        for cond in conditions:
            shots = sample(train, cond.shots, seed=cfg.task.seed) if cond.shots else []
            method = cond.method
            if method == "auto":
                method = "loglik" if backend.supports_score and task.kind != "free_text" else "generate"
            if method == "loglik":
                ctx = render_prompt(task, ex, shots, cond.system_prompt)
                out += [(ctx + continuation(o), 0) for o in task.options(ex)]
            else:
                reason = method == "cot"
                out.append((render_chat(task, ex, shots, cond.system_prompt, reason=reason),
                            cfg.max_new_tokens * (16 if reason else 1)))
        return out

    return fit_examples(task, examples, backend, prompts_of, policy=cfg.task.overlong)


def _run_eval(cfg: EvalConfig, run_dir: Path, conditions: list[Condition], backend, task: Task, examples, train,
              overlong: dict) -> dict[str, EvalResult]:
    run = RunFolder(run_dir)
    config_dict = cfg.model_dump(mode="json")
    run.save_config(config_dict)
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
               "overlong": {"policy": cfg.task.overlong, **overlong},
               "conditions": {name: {"method": r.method, **r.metrics} for name, r in results.items()}}
    run.write_json("metrics.json", metrics)
    notes = []
    if overlong["overlong"]:
        notes.append(f"{overlong['overlong']} example(s) did not fit the model's context window: "
                     f"{overlong['truncated']} truncated, {overlong['skipped']} skipped.")
    if task.kind == "multiple_choice":
        notes.append("Options differ per example: per-class figures are over option positions (A, B, ...).")
    run.write_text(
        "report.html",
        eval_report(f"Stillroom eval: {task.name} on {cached.model}", {n: r.metrics for n, r in results.items()},
                    config_dict, usage=cached.meter.summary(), notes=notes),
    )
    return results
