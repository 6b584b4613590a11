"""How `stillroom compare` turns its one config into each route's own config.

Every route gets the same task config (so the same seeded splits), the same test sample (`test_limit`) and the
same training pool (`train_limit`); a route's defaults here are sized for the embedded Gemma-3 270M on 2 CPU
cores, and `budgets[route]` overrides any field of that route's config (validated by the route's own model,
so a wrong field name fails at load, before anything runs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stillroom.compare.config import ALL_ROUTES, CompareConfig
from stillroom.config import EvalConfig, PLDConfig, deep_merge, validate_config
from stillroom.models import is_white_box

REFERENCE_ROUTES = ("teacher", "sft-gold")


@dataclass
class RoutePlan:
    """One route of a compare: its config, the function that runs it, or why it does not apply."""

    name: str
    config: BaseModel | None
    run: Callable[[Any, Path], Any] | None
    skip_reason: str | None = None
    reference: bool = False
    skip_status: str = "not applicable"
    """The status a skipped route is reported with (e.g. 'not run' for a route left for a later invocation)."""


def _eval_route(cfg: CompareConfig, model, *, name: str, shots: int = 0, method: str = "auto", **over):
    from stillroom.evaluate.job import Condition, run_eval

    data = deep_merge({"task": cfg.task.model_dump(), "model": model.model_dump(), "split": "test",
                       "limit": cfg.test_limit, "shots": shots, "method": method, "spend": cfg.spend.model_dump()},
                      over)
    ec = validate_config(EvalConfig, data, source=f"compare route {name!r}")

    def run(c: EvalConfig, out: Path):
        cond = Condition(name=name, shots=c.shots, method=c.method)
        return run_eval(c, out, conditions=[cond], route=name)

    return ec, run


def _base(cfg: CompareConfig) -> dict:
    return {"task": cfg.task.model_dump(), "train_limit": cfg.train_limit, "eval_split": "test", "eval_limit": cfg.test_limit}


def kd_logits_refusal(teacher: Any) -> str | None:
    """Why logit KD cannot use this teacher, or None: it runs whenever the teacher's weights are local (embedded,
    hf:, gguf:, a folder) or it is served by vLLM (prompt_logprobs); a chat-only API and a scripted teacher give no
    logits. Different tokenizers are no reason: `kd logits` then aligns them by bytes."""
    from stillroom.backends.openai_logprobs import is_openai_api

    kind = teacher.spec.partition(":")[0]
    if kind == "scripted":
        return f"the teacher ({teacher.spec}) is scripted: it has no logits"
    if kind == "openai" and (not teacher.base_url or is_openai_api(teacher.base_url)):
        return (f"the teacher ({teacher.spec}) is a chat-only API: it gives no logits (no prompt log-probabilities); "
                "logit KD needs its weights (hf:, gguf:, embedded) or a vLLM server (prompt_logprobs)")
    return None


def plan_route(cfg: CompareConfig, name: str) -> RoutePlan:
    """The plan for one route (its config validated now, so a bad budget fails before any route runs)."""
    over = cfg.budgets.get(name, {})
    student_trainable = is_white_box(cfg.student.spec)
    source = f"compare budgets[{name!r}]"
    trains = name in ("seqkd", "cot-data", "kd-logits", "gad", "prune-heal-sft", "prune-heal-self-data", "sft-gold")
    if trains and not student_trainable:
        return RoutePlan(name, None, None, f"the student ({cfg.student.spec}) is an API model: it cannot be trained")
    if name == "zero-shot":
        c, run = _eval_route(cfg, cfg.student, name=name, **over)
    elif name == "k-shot":
        c, run = _eval_route(cfg, cfg.student, name=f"{cfg.shots}-shot", shots=cfg.shots, **over)
    elif name == "cot":
        c, run = _eval_route(cfg, cfg.student, name="chain-of-thought", method="cot", **{"cot_max_tokens": 64, **over})
    elif name == "teacher":
        c, run = _eval_route(cfg, cfg.teacher, name=f"teacher ({cfg.shots}-shot)", shots=cfg.shots, **over)
    elif name == "pld":
        from stillroom.pld.pipeline import run_pld

        data = deep_merge({"task": cfg.task.model_dump(), "teacher": cfg.teacher.model_dump(),
                           "student": cfg.student.model_dump(), "extract_sample": cfg.train_limit,
                           "val_limit": cfg.val_limit, "test_limit": cfg.test_limit, "max_rounds": 1,
                           "teacher_max_tokens": 96, "compare_baselines": False, "cot": False, "shots": 0,
                           "spend": cfg.spend.model_dump()}, over)
        c, run = validate_config(PLDConfig, data, source=source), run_pld
    elif name in ("seqkd", "cot-data"):
        from stillroom.kd.data import KDDataConfig, distill_data

        mode = "answers" if name == "seqkd" else "cot"
        data = deep_merge({**_base(cfg), "teacher": cfg.teacher.model_dump(), "student": cfg.student.spec,
                           "mode": mode, "eval_before": False, "max_steps": 8, "batch_size": 4,
                           # The teacher answers as the 'teacher' reference line is evaluated (k gold shots), and
                           # SeqKD imitates it, right or wrong (a base-model teacher is often wrong; filtering by
                           # gold labels would leave little to train on and would no longer be SeqKD).
                           "teacher_shots": cfg.shots, "filter_correct": mode == "cot",
                           "teacher_max_tokens": 16 if mode == "answers" else 96, "spend": cfg.spend.model_dump()}, over)
        c, run = validate_config(KDDataConfig, data, source=source), distill_data
    elif name == "kd-logits":
        why = kd_logits_refusal(cfg.teacher)
        if why:
            return RoutePlan(name, None, None, why)
        from stillroom.kd.trainer import KDLogitsConfig, distill_logits

        # A teacher with different tokenizer from the student's goes through the cross-tokenizer path (ULD on
        # byte-aligned spans), chosen inside the route; a served one fills the cache through prompt_logprobs
        # (top_k within vLLM's default max_logprobs, 20).
        served = cfg.teacher.spec.startswith("openai:")
        teacher_kw = ({"teacher_base_url": cfg.teacher.base_url, "teacher_api_key_env": cfg.teacher.api_key_env,
                       "teacher_max_concurrency": cfg.teacher.max_concurrency} if served else {})
        data = deep_merge({**_base(cfg), "teacher": cfg.teacher.spec, "student": cfg.student.spec, "eval_before": False,
                           "max_steps": 8, "batch_size": 4, "top_k": 20 if served else 32, "logging_steps": 1,
                           **teacher_kw}, over)
        c = validate_config(KDLogitsConfig, data, source=source)
        run = lambda kc, out: distill_logits(kc, out, progress=True)  # noqa: E731
    elif name == "gad":
        from stillroom.gad.config import GADConfig
        from stillroom.gad.train import run_gad

        data = deep_merge({**_base(cfg), "teacher": cfg.teacher.model_dump(), "student": cfg.student.spec,
                           "eval_before": False, "teacher_max_tokens": 16, "max_completion_length": 8,
                           "teacher_shots": cfg.shots,
                           "num_generations": 4, "prompts_per_step": 2, "adversarial_steps": 4, "disc_warmup_steps": 2,
                           "warmup_steps": 4, "batch_size": 4, "spend": cfg.spend.model_dump()}, over)
        c, run = validate_config(GADConfig, data, source=source), run_gad
    elif name in ("prune-heal-sft", "prune-heal-self-data", "sft-gold"):
        from stillroom.prune.route import PruneHealConfig, run_prune_heal

        healing = {"prune-heal-sft": "sft", "prune-heal-self-data": "self-data", "sft-gold": "sft"}[name]
        data = deep_merge({**_base(cfg), "student": cfg.student.spec, "healing": healing, "steps": 8,
                           "drop": 0 if name == "sft-gold" else 2}, over)
        c, run = validate_config(PruneHealConfig, data, source=source), run_prune_heal
    else:  # pragma: no cover - CompareConfig validates route names
        raise ValueError(name)
    return RoutePlan(name, c, run, reference=name in REFERENCE_ROUTES)


def plan_routes(cfg: CompareConfig) -> list[RoutePlan]:
    """Every requested route (default: all), planned; the ones that cannot apply carry their reason."""
    names = cfg.routes or list(ALL_ROUTES)
    return [plan_route(cfg, n) for n in ALL_ROUTES if n in names]
