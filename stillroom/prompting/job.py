"""`stillroom eval` and the prompting baselines (zero-shot, k-shot, chain-of-thought, a fixed system prompt) as
routes of the skeleton (`stillroom.route`): nothing to build; deploy the model with a prompt; evaluate; record.
The CLI and `stillroom compare` call this; PLD deploys its own baselines through the same skeleton."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stillroom.backends import load_backend, open_cached_backend
from stillroom.config import EvalConfig
from stillroom.errors import ConfigError
from stillroom.evaluate.runner import EvalResult
from stillroom.route import Built, Deployment, RouteContext, Selection, run_route
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
             task: Task | None = None, route: str = "eval", wait: bool | None = None) -> dict[str, EvalResult]:
    """Evaluate each condition on the same examples and write the run folder (the first condition is the one
    recorded in result.json). Rerunning resumes from the durable cache.

    Task, model spec, system prompt and every prompt's fit in the context window are checked before the run
    folder is created; the folder is held (`stillroom.locking`) while it is written; `wait` queues behind a
    process that holds it instead of failing."""
    conditions = conditions or [default_condition(cfg)]

    def prepare(cfg: EvalConfig, sel: Selection):
        model = backend or load_backend(cfg.model)
        sel.test, overlong = fit_eval_examples(sel, model, conditions, cfg)
        return model, overlong

    def build(ctx: RouteContext) -> Built:
        model, overlong = ctx.prepared
        cached = open_cached_backend(cfg.model, ctx.run.cache_path, cfg.spend, backend=model)
        deps = [Deployment(name=c.name, backend=cached, model=cfg.model.spec, system_prompt=c.system_prompt,
                           shots=ctx.shots(c.shots), method=c.method,
                           max_new_tokens=cfg.cot_max_tokens if c.method == "cot" else cfg.max_new_tokens,
                           model_dir=_local_weights(cfg.model.spec)) for c in conditions]
        return Built(deployments=deps, deployed=conditions[0].name, usage=cached.meter.summary,
                     extra={"split": cfg.eval_split, "model": cached.identity,
                            "overlong": {"policy": cfg.task.overlong, **overlong}},
                     after_eval=lambda results: eval_notes(ctx.sel, results, overlong))

    return run_route(cfg, run_dir, build, route=route, prepare=prepare, task=task, wait=wait,
                     title=lambda ctx: f"Stillroom eval: {ctx.task.name} on {cfg.model.spec}").results


CONDITION_NAMES = {"zero-shot": "zero-shot", "cot": "chain-of-thought"}


def run_condition(route: str):
    """The run function of a prompting route of `stillroom compare` (zero-shot, k-shot, cot, teacher): one
    condition of `stillroom eval`, named as the report shows it."""

    def run(cfg: EvalConfig, out: Path):
        name = CONDITION_NAMES.get(route) or (f"teacher ({cfg.shots}-shot)" if route == "teacher" else f"{cfg.shots}-shot")
        return run_eval(cfg, out, conditions=[Condition(name=name, shots=cfg.shots, method=cfg.method)], route=name)

    return run


def eval_notes(sel: Selection, results: dict[str, EvalResult], overlong: dict) -> list[str]:
    """The evaluator's notes, the overlong counts, and how multiple-choice figures read."""
    notes = list(dict.fromkeys(n for r in results.values() for n in r.extra.get("notes", [])))
    if overlong["overlong"]:
        notes.append(f"{overlong['overlong']} example(s) did not fit the model's context window: "
                     f"{overlong['truncated']} truncated, {overlong['skipped']} skipped.")
    if any(r.metrics.get("gold_labels") is False for r in results.values()):
        notes.append("No gold labels: the task is free text without reference answers, so no accuracy is measured "
                     "(give the task a label column with --label-field to measure quality).")
    if sel.task.kind == "multiple_choice":
        notes.append("Options differ per example: per-class figures are over option positions (A, B, ...).")
    return notes


def fit_eval_examples(sel: Selection, backend, conditions: list[Condition], cfg: EvalConfig):
    """The evaluated examples after the task's overlong policy, every condition's prompt checked (no call)."""
    task = sel.task

    def prompts_of(ex: Example):
        out = []
        for cond in conditions:
            shots = sel.shots(cond.shots)
            methods = [cond.method]
            if cond.method == "auto":
                if task.kind == "free_text":
                    methods = ["generate"]
                elif getattr(backend, "max_concurrency", None) is not None:
                    # A server: asking whether it scores is a paid probe, not to be made before the run folder
                    # (its cache, its cap) is held. The example must fit whichever way it is answered.
                    methods = ["loglik", "generate"]
                else:
                    methods = ["loglik" if backend.supports_score else "generate"]
            for method in methods:
                if method == "loglik":
                    ctx = render_prompt(task, ex, shots, cond.system_prompt)
                    out += [(ctx + continuation(o), 0) for o in task.options(ex)]
                else:
                    reason = method == "cot"
                    out.append((render_chat(task, ex, shots, cond.system_prompt, reason=reason),
                                cfg.cot_max_tokens if reason else cfg.max_new_tokens))
        return out

    return fit_examples(task, sel.test, backend, prompts_of, policy=cfg.task.overlong)


def _local_weights(spec: str) -> Path | None:
    """The weights folder or file behind a local spec (for the size on disk), without loading anything."""
    kind, _, rest = spec.partition(":")
    from stillroom.backends.embedded import EMBEDDED, embedded_model_dir

    if spec in EMBEDDED:
        return embedded_model_dir(name=spec)
    if kind in ("hf", "gguf") and rest:
        return Path(rest).expanduser()
    return None
