"""`stillroom eval` and the prompting baselines (zero-shot, k-shot, chain-of-thought, a fixed system prompt) as
routes of the skeleton (`stillroom.route`): nothing to build; deploy the model with a prompt; evaluate; record.
The CLI, `stillroom compare` and the PLD route's comparison all call this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stillroom.backends import load_backend, open_cached_backend
from stillroom.config import EvalConfig
from stillroom.errors import ConfigError
from stillroom.evaluate.runner import EvalResult
from stillroom.locking import run_folder_lock
from stillroom.route import BuildCost, Deployment, Selection, evaluate_deployment, open_run, record, select
from stillroom.tasks.fit import fit_examples
from stillroom.tasks.prompts import continuation, render_chat, render_prompt
from stillroom.tasks.task import Example, Task


@dataclass
class Condition:
    """One way of prompting the model, evaluated on the same examples as the others."""

    name: str
    shots: int = 0
    system_prompt: str | None = None
    method: str = "auto"


def default_condition(cfg: EvalConfig) -> Condition:
    """The condition `stillroom eval` runs when none is given: the config's shots, system prompt and method."""
    if cfg.system_prompt_file and not Path(cfg.system_prompt_file).exists():
        raise ConfigError(f"{cfg.system_prompt_file}: system prompt file does not exist")
    system_prompt = Path(cfg.system_prompt_file).read_text(encoding="utf-8") if cfg.system_prompt_file else None
    name = {"cot": "chain-of-thought"}.get(cfg.method, f"{cfg.shots}-shot" if cfg.shots else "zero-shot")
    return Condition(name=name + (" + system prompt" if system_prompt else ""), shots=cfg.shots,
                     system_prompt=system_prompt, method=cfg.method)


def run_eval(cfg: EvalConfig, run_dir: Path, conditions: list[Condition] | None = None, backend=None,
             task: Task | None = None, route: str = "eval", wait: bool = False) -> dict[str, EvalResult]:
    """Evaluate each condition on the same examples and write the run folder (the first condition is the one
    recorded in result.json). Rerunning resumes from the durable cache.

    Task, model spec, system prompt and every prompt's fit in the context window are checked before the run
    folder is created; the folder is held (`stillroom.locking`) while it is written; `wait` queues behind a
    process that holds it instead of failing."""
    sel = select(cfg.task, split=cfg.split, limit=cfg.limit, task=task)
    conditions = conditions or [default_condition(cfg)]
    backend = backend or load_backend(cfg.model)
    sel.test, overlong = fit_eval_examples(sel, backend, conditions, cfg)
    with run_folder_lock(run_dir, wait=wait):
        return _run_eval(cfg, run_dir, conditions, backend, sel, route, overlong)


def fit_eval_examples(sel: Selection, backend, conditions: list[Condition], cfg: EvalConfig):
    """The evaluated examples after the task's overlong policy, every condition's prompt checked (no call)."""
    task = sel.task

    def prompts_of(ex: Example):
        out = []
        for cond in conditions:
            shots = sel.shots(cond.shots)
            method = cond.method
            if method == "auto":
                method = "loglik" if backend.supports_score and task.kind != "free_text" else "generate"
            if method == "loglik":
                ctx = render_prompt(task, ex, shots, cond.system_prompt)
                out += [(ctx + continuation(o), 0) for o in task.options(ex)]
            else:
                reason = method == "cot"
                out.append((render_chat(task, ex, shots, cond.system_prompt, reason=reason),
                            cfg.cot_max_tokens if reason else cfg.max_new_tokens))
        return out

    return fit_examples(task, sel.test, backend, prompts_of, policy=cfg.task.overlong)


def _run_eval(cfg: EvalConfig, run_dir: Path, conditions: list[Condition], backend, sel: Selection, route: str,
              overlong: dict) -> dict[str, EvalResult]:
    run, config_dict = open_run(cfg, run_dir)
    cached = open_cached_backend(cfg.model, run.cache_path, cfg.spend, backend=backend)
    results: dict[str, EvalResult] = {}
    deployments: dict[str, Deployment] = {}
    try:
        for cond in conditions:
            budget = cfg.cot_max_tokens if cond.method == "cot" else cfg.max_new_tokens
            dep = Deployment(name=cond.name, backend=cached, model=cfg.model.spec, system_prompt=cond.system_prompt,
                             shots=sel.shots(cond.shots), method=cond.method, max_new_tokens=budget,
                             model_dir=_local_weights(cfg.model.spec))
            deployments[cond.name] = dep
            results[cond.name] = evaluate_deployment(sel, dep)
    finally:
        # Usage is written even when a spend cap or Ctrl-C stops the run, so the user sees what was spent.
        run.write_json("usage.json", cached.meter.summary())
    notes = list(dict.fromkeys(n for r in results.values() for n in r.extra.get("notes", [])))
    if overlong["overlong"]:
        notes.append(f"{overlong['overlong']} example(s) did not fit the model's context window: "
                     f"{overlong['truncated']} truncated, {overlong['skipped']} skipped.")
    if sel.task.kind == "multiple_choice":
        notes.append("Options differ per example: per-class figures are over option positions (A, B, ...).")
    record(run, sel, route=route, deployed=deployments[conditions[0].name], results=results, cost=BuildCost(),
           config_dict=config_dict, title=f"Stillroom eval: {sel.task.name} on {cached.model}",
           metrics_extra={"split": cfg.split, "model": cached.identity,
                          "overlong": {"policy": cfg.task.overlong, **overlong}}, notes=notes, usage=cached.meter.summary())
    return results


def _local_weights(spec: str) -> Path | None:
    """The weights folder or file behind a local spec (for the size on disk), without loading anything."""
    kind, _, rest = spec.partition(":")
    from stillroom.backends.embedded import EMBEDDED, embedded_model_dir

    if spec in EMBEDDED:
        return embedded_model_dir(name=spec)
    if kind in ("hf", "gguf") and rest:
        return Path(rest).expanduser()
    return None
