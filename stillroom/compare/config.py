"""`CompareConfig`: the task, the teacher, the student, the routes and one budget knob per route."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from stillroom.config import BackendConfig, SelectionBlock, SpendConfig, spend_field

ALL_ROUTES = ("zero-shot", "k-shot", "cot", "teacher", "pld", "seqkd", "cot-data", "kd-logits", "gad",
              "prune-heal-sft", "prune-heal-self-data", "sft-gold")
"""Every route `stillroom compare` knows, in report order. 'teacher' and 'sft-gold' are reference lines."""


class CompareConfig(SelectionBlock):
    """`stillroom compare`: every route that applies to one teacher → student pair, on the same examples. The
    selection block (task, train_limit, val_limit, eval_split, eval_limit), the teacher, the student, `shots` and
    `spend` are handed to every route whose config has them (`stillroom.compare.routes`)."""

    teacher: BackendConfig = Field(default_factory=BackendConfig, description="The teacher (any backend).")
    student: BackendConfig = Field(
        default_factory=BackendConfig,
        description="The student. Training routes need local weights ('gemma3-270m', 'hf:PATH'); an API student "
        "gets the prompting routes only.",
    )
    routes: list[str] | None = Field(None, description=f"Routes to run (default: every one that applies): {', '.join(ALL_ROUTES)}.")
    eval_limit: int | None = Field(40, ge=1, description="Examples every route is evaluated on (the same ones).")
    train_limit: int | None = Field(32, ge=1, description="Training pool every route builds from (the same one).")
    val_limit: int | None = Field(16, ge=1, description="Validation examples (PLD's conflict loop).")
    shots: int = Field(5, ge=0, description="k for the k-shot baseline and the teacher reference.")
    baseline: str = Field("zero-shot", description="Every route is tested against this one (paired, same examples).")
    budgets: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-route overrides of the route's own config fields, e.g. {'kd-logits': {'max_steps': 16}, "
        "'pld': {'train_limit': 48}}. Each route's defaults are sized for the embedded model on 2 CPU cores.",
    )
    spend: SpendConfig = spend_field("Cap on each route's teacher spend.")

    @field_validator("routes")
    @classmethod
    def _known(cls, v):
        if v is not None:
            unknown = [r for r in v if r not in ALL_ROUTES]
            if unknown:
                raise ValueError(f"unknown route(s) {', '.join(unknown)}; known: {', '.join(ALL_ROUTES)}")
        return v

    @field_validator("budgets")
    @classmethod
    def _known_budgets(cls, v):
        unknown = [r for r in v if r not in ALL_ROUTES]
        if unknown:
            raise ValueError(f"budgets for unknown route(s) {', '.join(unknown)}; known: {', '.join(ALL_ROUTES)}")
        return v
