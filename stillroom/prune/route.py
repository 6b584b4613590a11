"""Prune + heal as one route of the skeleton (`stillroom compare` runs it; `stillroom prune-heal` exposes it):

1. angular-distance analysis of the student on calibration text (the task's training prompts) and removal of
   the contiguous block of `drop` layers with the smallest distance (`stillroom.prune.angular`, `surgery`);
2. healing data: the gold answers ('sft'), or self-data distillation ('self-data': the *unpruned* model
   rewrites each answer and conditional selection keeps the rewrites that still give the label,
   `stillroom.prune.selfdistill`), or none;
3. a LoRA healing fine-tune of the pruned model (`stillroom.train.sft`);
4. the healed, pruned model is deployed and evaluated by the shared evaluator, and recorded.

Resumable: the rewrites go through the run folder's durable cache, and a healed model whose settings match is
reloaded instead of retrained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from stillroom.config import RENAMED_FIELDS, BackendConfig, SelectionBlock, TrainingBlock


class PruneHealConfig(SelectionBlock, TrainingBlock):
    """Prune a block of layers from the student, heal it, and evaluate it."""

    renamed = {**RENAMED_FIELDS, "steps": "max_steps"}

    student: BackendConfig = Field(default_factory=BackendConfig,
                                   description="The model to prune: 'gemma3-270m', 'hf:PATH' or a folder.")
    drop: int = Field(
        2, ge=0, description="Contiguous layers to remove (the block with the smallest angular distance); 0 keeps "
        "every layer, which makes this route plain SFT of the student (the 'SFT on gold labels' reference).")
    block: str | None = Field(None, description="Remove this block instead ('start:end', 0-based, end exclusive).")
    calibration_samples: int = Field(32, ge=1, description="Training prompts used as calibration text.")
    healing: Literal["none", "sft", "self-data"] = Field(
        "sft", description="'sft' on gold answers, 'self-data' on the unpruned model's selected rewrites, or 'none'.")
    rewrite_max_tokens: int = Field(48, ge=4, description="Self-data: tokens per rewrite.")
    shots: int = Field(0, ge=0, description="k solved training examples in every prompt (healing and evaluation).")
    max_steps: int = Field(16, ge=1, description="Healing optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Healing batch size.")
    learning_rate: float = Field(1e-4, gt=0, description="Healing learning rate (cosine schedule).")

    @model_validator(mode="after")
    def _check(self):
        if self.block:
            from stillroom.errors import ConfigError
            from stillroom.prune.surgery import parse_block

            try:
                parse_block(self.block)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if self.drop == 0 and not self.block and self.healing == "self-data":
            raise ValueError("self-data healing rewrites with the unpruned model: with drop 0 use healing 'sft'")
        return self


def run_prune_heal(cfg: PruneHealConfig, run_dir: str | Path) -> dict:
    """The prune + heal route. Writes angular.json, pruned/ (before healing), healing_data.jsonl,
    selfdistill.jsonl (self-data), student/ (healed), train.json, predictions.jsonl, metrics.json, result.json,
    report.html."""
    from stillroom.models import resolve_model_path
    from stillroom.route import run_route

    return run_route(cfg, run_dir, build_prune_heal, route=f"prune-heal-{cfg.healing}", need_labels=True,
                     prepare=lambda cfg, sel: resolve_model_path(cfg.student.spec),
                     title=lambda ctx: f"Stillroom prune + heal: {ctx.task.name}").metrics


def build_prune_heal(ctx):
    """Prune + heal's build: the healed (pruned) model, rebuilt unless the run folder holds it with the same
    settings; deployed as a model folder."""
    from stillroom.backends.hf import HFBackend
    from stillroom.models import load_model_and_tokenizer
    from stillroom.route import Built, Deployment

    cfg: PruneHealConfig = ctx.cfg
    shots = ctx.shots(cfg.shots)
    student_dir = ctx.run.file("student")
    info = ctx.run.read_json("train.json") or {}
    if ctx.finished(info, "student"):
        ctx.notes.append("resumed: the healed model was already built in this run folder")
        model, tok = load_model_and_tokenizer(student_dir)
    else:
        model, tok, info = prune_and_heal(ctx, shots)
    acceptance = (info.get("healing") or {}).get("acceptance")
    if acceptance is not None:
        ctx.notes.append(f"self-data: {acceptance['kept']} of {acceptance['examples']} rewrites accepted "
                         f"({acceptance['acceptance']:.0%}); the rest keep the original answer")
    name = f"pruned {info['block']} + {cfg.healing} healing" if info.get("removed_layers") else f"{cfg.healing} fine-tune"
    deployed = Deployment(name=name, backend=HFBackend.from_objects(model, tok, name="pruned-healed"),
                          model=str(student_dir), shots=shots, model_dir=student_dir)
    extra = {"split": cfg.eval_split, "student": str(ctx.prepared), "block": info["block"],
             "angular_distance": info.get("angular_distance"), "parameters": info.get("parameters"),
             "healing": info.get("healing")}
    artifacts = {k: str(ctx.run.file(k)) for k in ("student", "pruned", "angular.json", "healing_data.jsonl",
                                                    "selfdistill.jsonl") if ctx.run.file(k).exists()}
    return Built(deployments=[deployed], steps=int(info.get("steps", 0)), extra=extra, artifacts=artifacts)


def choose_block(ctx, model, tok, shots) -> tuple[int, int, float | None]:
    """The block to remove: the configured one, none (drop 0), or the `drop` layers with the smallest angular
    distance on the task's training prompts (written to angular.json)."""
    from stillroom.prune.angular import analyze_layers
    from stillroom.prune.surgery import parse_block
    from stillroom.tasks.prompts import render_prompt
    from stillroom.tasks.task import sample

    cfg: PruneHealConfig = ctx.cfg
    if cfg.block:
        return (*parse_block(cfg.block), None)
    if cfg.drop == 0:
        return 0, 0, None
    sel = ctx.sel
    calib = [render_prompt(ctx.task, ex, shots) for ex in sample(sel.splits.train, cfg.calibration_samples, seed=sel.seed)]
    analysis = analyze_layers(model, tok, calib, model_name=str(ctx.prepared), calibration=f"{ctx.task.name} train prompts")
    ctx.run.write_json("angular.json", analysis.to_json())
    return analysis.best_block(cfg.drop)


def healing_records(ctx, model, tok, shots) -> tuple[list[dict], dict]:
    """The healing data: gold answers, or (self-data) the unpruned model's accepted rewrites, generated through
    the run's cache (registered as the route's teacher, so a rerun repays nothing and its cost is counted)."""
    from stillroom.backends.hf import HFBackend
    from stillroom.prune.selfdistill import acceptance_summary, self_distill, sft_records
    from stillroom.tasks.prompts import continuation, render_prompt

    cfg: PruneHealConfig = ctx.cfg
    train = ctx.train_pool(shots, labelled=True)
    healing_info: dict = {"kind": cfg.healing}
    if cfg.healing != "self-data":
        return [{"id": ex.id, "prompt": render_prompt(ctx.task, ex, shots), "completion": continuation(str(ex.label))}
                for ex in train], healing_info
    unpruned = ctx.open_teacher(cfg.student, HFBackend.from_objects(model, tok, name=f"unpruned:{ctx.prepared.name}"),
                                capped=False)
    rows = self_distill(ctx.task, train, unpruned, shots=shots, max_new_tokens=cfg.rewrite_max_tokens)
    ctx.run.write_jsonl("selfdistill.jsonl", rows)
    healing_info["acceptance"] = acceptance_summary(rows)
    return sft_records(rows, "selected"), healing_info


def prune_and_heal(ctx, shots):
    """Remove the block, heal with LoRA SFT, save student/ and train.json. Returns (model, tokenizer, info)."""
    from stillroom.backends.embedded import save_model_folder
    from stillroom.models import load_model_and_tokenizer, release_memory
    from stillroom.prune.surgery import drop_layers
    from stillroom.train.sft import SFTSettings, train_sft

    cfg: PruneHealConfig = ctx.cfg
    model, tok = load_model_and_tokenizer(ctx.prepared)
    before = sum(p.numel() for p in model.parameters())
    start, end, distance = choose_block(ctx, model, tok, shots)
    records, healing_info = healing_records(ctx, model, tok, shots)
    removed = drop_layers(model, start, end) if end > start else []
    if removed:
        save_model_folder(model, tok, ctx.run.file("pruned"))
    ctx.run.write_jsonl("healing_data.jsonl", records)
    steps = 0
    if cfg.healing != "none":
        settings = SFTSettings.with_lora(cfg.lora, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
                                         batch_size=cfg.batch_size, seed=cfg.seed)
        res = train_sft(model, tok, records, settings, output_dir=ctx.run.file("trainer"))
        model, steps = res.model, res.steps
        healing_info.update({"steps": res.steps, "losses": res.losses, "seconds": round(res.seconds, 2)})
    save_model_folder(model, tok, ctx.run.file("student"))
    info = {"config_digest": ctx.digest(), "block": f"{start}:{end}", "angular_distance": distance,
            "removed_layers": removed,
            "parameters": {"before": before, "after": sum(p.numel() for p in model.parameters())},
            "healing": healing_info, "steps": steps}
    ctx.run.write_json("train.json", info)
    release_memory()
    return model, tok, info
