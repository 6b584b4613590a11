"""How `stillroom compare` makes each route's config: a table, route name → (config class, run function, sizes,
applicability), and one composition rule.

Every route's config is made of the same blocks (`stillroom.config`), so one rule builds them all: the compare
config's shared fields (the selection block, teacher, student, spend) go to every route whose config has a field
of that name; `roles` hands a shared field to a route under another name (the student is the `model` of a
prompting baseline, `shots` is the teacher's shots in SeqKD); `sizes` are the route's defaults for the embedded
Gemma-3 270M on 2 CPU cores; `budgets[route]` overrides any field last, validated by the route's own model, so a
wrong field name fails at load, before anything runs. Every route thus gets the same task config (the same seeded
splits), the same evaluated examples and the same training pool."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stillroom.compare.config import ALL_ROUTES, CompareConfig
from stillroom.config import validate_config
from stillroom.models import why_not_trainable

SHARED = ("task", "train_limit", "val_limit", "eval_split", "eval_limit", "teacher", "student", "spend")
"""Compare fields handed to every route whose config has a field of the same name."""


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


@dataclass(frozen=True)
class RouteSpec:
    """One row of the table. `config` and `run` are 'module:name' (imported only when the route is planned, so
    the compare CLI starts without torch)."""

    config: str
    run: str
    roles: Mapping[str, str] = field(default_factory=dict)
    """Route field → compare field, for a shared value the route calls differently."""
    sizes: Mapping[str, Any] = field(default_factory=dict)
    trains: bool = False
    """Trains the student (needs its weights as a transformers folder)."""
    teacher_logits: bool = False
    """Needs the teacher's logits (its weights as a local transformers folder)."""
    reference: bool = False


EVAL = "stillroom.config:EvalConfig"
CONDITION = "stillroom.prompting.job:run_condition"
SMALL_TRAINING = {"eval_before": False, "max_steps": 8, "batch_size": 4}

ROUTES: dict[str, RouteSpec] = {
    "zero-shot": RouteSpec(EVAL, CONDITION, roles={"model": "student"}),
    "k-shot": RouteSpec(EVAL, CONDITION, roles={"model": "student", "shots": "shots"}),
    "cot": RouteSpec(EVAL, CONDITION, roles={"model": "student"}, sizes={"method": "cot", "cot_max_tokens": 64}),
    "teacher": RouteSpec(EVAL, CONDITION, roles={"model": "teacher", "shots": "shots"}, reference=True),
    # PLD keeps its own teacher budget (256 tokens a reply): an instruction teacher reasons before its marked
    # answer line, and a reply cut before that line is dropped.
    "pld": RouteSpec("stillroom.config:PLDConfig", "stillroom.pld.pipeline:run_pld",
                     sizes={"max_rounds": 1, "compare_baselines": False, "cot": False, "shots": 0}),
    # The teacher answers as the 'teacher' reference line is evaluated (k gold shots), and SeqKD imitates it,
    # right or wrong (a base-model teacher is often wrong; filtering by gold labels would leave little to train
    # on and would no longer be SeqKD).
    "seqkd": RouteSpec("stillroom.kd.data:KDDataConfig", "stillroom.kd.data:distill_data", trains=True,
                       roles={"teacher_shots": "shots"},
                       sizes={**SMALL_TRAINING, "mode": "answers", "filter_correct": False, "teacher_max_tokens": 16}),
    "cot-data": RouteSpec("stillroom.kd.data:KDDataConfig", "stillroom.kd.data:distill_data", trains=True,
                          roles={"teacher_shots": "shots"},
                          sizes={**SMALL_TRAINING, "mode": "cot", "filter_correct": True, "teacher_max_tokens": 96}),
    "kd-logits": RouteSpec("stillroom.kd.trainer:KDLogitsConfig", "stillroom.kd.trainer:distill_logits", trains=True,
                           teacher_logits=True, sizes={**SMALL_TRAINING, "top_k": 32, "logging_steps": 1}),
    "gad": RouteSpec("stillroom.gad.config:GADConfig", "stillroom.gad.train:run_gad", trains=True,
                     roles={"teacher_shots": "shots"},
                     sizes={"eval_before": False, "teacher_max_tokens": 16, "max_completion_length": 8,
                            "num_generations": 4, "prompts_per_step": 2, "adversarial_steps": 4,
                            "disc_warmup_steps": 2, "warmup_steps": 4, "batch_size": 4}),
    "prune-heal-sft": RouteSpec("stillroom.prune.route:PruneHealConfig", "stillroom.prune.route:run_prune_heal",
                                trains=True, sizes={"healing": "sft", "max_steps": 8, "drop": 2}),
    "prune-heal-self-data": RouteSpec("stillroom.prune.route:PruneHealConfig", "stillroom.prune.route:run_prune_heal",
                                      trains=True, sizes={"healing": "self-data", "max_steps": 8, "drop": 2}),
    "sft-gold": RouteSpec("stillroom.prune.route:PruneHealConfig", "stillroom.prune.route:run_prune_heal",
                          trains=True, sizes={"healing": "sft", "max_steps": 8, "drop": 0}, reference=True),
}
assert tuple(ROUTES) == ALL_ROUTES


def _load(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def not_applicable(cfg: CompareConfig, spec: RouteSpec) -> str | None:
    """Why a route cannot run for this teacher → student pair (None when it can)."""
    if spec.trains:
        why = why_not_trainable(cfg.student.spec)
        if why:
            return f"the student ({cfg.student.spec}) {why}"
    if spec.teacher_logits:
        return kd_logits_refusal(cfg.teacher)
    return None


def route_config(cfg: CompareConfig, name: str) -> BaseModel:
    """Route `name`'s config by composition: shared fields, roles, sizes, then the route's budget."""
    spec = ROUTES[name]
    model = _load(spec.config)
    fields = model.model_fields
    data: dict[str, Any] = {k: getattr(cfg, k) for k in SHARED if k in fields}
    data.update({k: getattr(cfg, v) for k, v in spec.roles.items()})
    data = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in data.items()}
    data.update(spec.sizes)
    if spec.teacher_logits and cfg.teacher.spec.startswith("openai:") and "top_k" in data:
        # A vLLM teacher fills the cache through prompt_logprobs: stay within vLLM's default max_logprobs (20).
        data["top_k"] = min(int(data["top_k"]), 20)
    data.update(cfg.budgets.get(name, {}))
    return validate_config(model, data, source=f"compare budgets[{name!r}]")


def kd_logits_refusal(teacher: Any) -> str | None:
    """Why logit KD cannot use this teacher, or None: it runs whenever the teacher's weights are local (embedded,
    hf:, gguf: converted once, a folder) or it is served by vLLM (prompt_logprobs); a chat-only API and a scripted
    teacher give no logits. Different tokenizers are no reason: `kd logits` then aligns them by bytes."""
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
    spec = ROUTES[name]
    why = not_applicable(cfg, spec)
    if why:
        return RoutePlan(name, None, None, why)
    run = _load(spec.run)
    if spec.run == CONDITION:
        run = run(name)
    return RoutePlan(name, route_config(cfg, name), run, reference=spec.reference)


def plan_routes(cfg: CompareConfig) -> list[RoutePlan]:
    """Every requested route (default: all), planned; the ones that cannot apply carry their reason."""
    names = cfg.routes or list(ALL_ROUTES)
    return [plan_route(cfg, n) for n in ALL_ROUTES if n in names]
