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

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stillroom.config import LoraSettings, TaskConfig

EVAL_FIELDS = ("eval_split", "eval_limit")


class PruneHealConfig(BaseModel):
    """Prune a block of layers from the student, heal it, and evaluate it."""

    model_config = ConfigDict(extra="forbid")

    task: TaskConfig
    student: str = Field("gemma3-270m", description="The model to prune: 'gemma3-270m', 'hf:PATH' or a folder.")
    drop: int = Field(
        2, ge=0, description="Contiguous layers to remove (the block with the smallest angular distance); 0 keeps "
        "every layer, which makes this route plain SFT of the student (the 'SFT on gold labels' reference).")
    block: str | None = Field(None, description="Remove this block instead ('start:end', 0-based, end exclusive).")
    calibration_samples: int = Field(32, ge=1, description="Training prompts used as calibration text.")
    healing: Literal["none", "sft", "self-data"] = Field(
        "sft", description="'sft' on gold answers, 'self-data' on the unpruned model's selected rewrites, or 'none'.")
    rewrite_max_tokens: int = Field(48, ge=4, description="Self-data: tokens per rewrite.")
    shots: int = Field(0, ge=0, description="k solved training examples in every prompt (healing and evaluation).")
    train_limit: int | None = Field(None, ge=1, description="Heal on a deterministic sample of N training examples.")
    eval_split: Literal["val", "test"] = Field("test", description="Split the healed model is evaluated on.")
    eval_limit: int | None = Field(None, ge=1, description="Evaluate on a deterministic sample of N examples.")
    steps: int = Field(16, ge=1, description="Healing optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Healing batch size.")
    learning_rate: float = Field(1e-4, gt=0, description="Healing learning rate (cosine schedule).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA healing (merged into the saved model); `false` = full fine-tuning.")
    seed: int = Field(0, description="Healing seed.")

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
    from stillroom.backends import open_cached_backend
    from stillroom.backends.embedded import is_converted, save_model_folder
    from stillroom.backends.hf import HFBackend
    from stillroom.config import BackendConfig
    from stillroom.models import load_model_and_tokenizer, release_memory, resolve_model_path
    from stillroom.prune.angular import analyze_layers
    from stillroom.prune.selfdistill import acceptance_summary, self_distill, sft_records
    from stillroom.prune.surgery import drop_layers, parse_block
    from stillroom.route import BuildCost, Deployment, Timer, evaluate_deployment, open_run, record, select
    from stillroom.runs import digest_of
    from stillroom.tasks.prompts import continuation, render_prompt
    from stillroom.tasks.task import sample
    from stillroom.train.sft import SFTSettings, train_sft

    timer = Timer()
    sel = select(cfg.task, split=cfg.eval_split, limit=cfg.eval_limit, train_limit=cfg.train_limit, need_labels=True)
    path = resolve_model_path(cfg.student)
    run, config_dict = open_run(cfg, run_dir)
    task = sel.task
    shots = sel.shots(cfg.shots)
    shot_ids = {s.id for s in shots}
    train = [e for e in sel.train if e.label is not None and e.id not in shot_ids]
    digest = digest_of(cfg, exclude=EVAL_FIELDS)
    student_dir = run.file("student")
    info = run.read_json("train.json") or {}
    notes: list[str] = []
    teacher_usage: dict = {}
    resumed = is_converted(student_dir) and info.get("config_digest") == digest
    if resumed:
        notes.append("resumed: the healed model was already built in this run folder")
        model, tok = load_model_and_tokenizer(student_dir)
    else:
        model, tok = load_model_and_tokenizer(path)
        before = sum(p.numel() for p in model.parameters())
        if cfg.block:
            start, end = parse_block(cfg.block)
            distance = None
        elif cfg.drop == 0:
            start = end = 0
            distance = None
        else:
            calib = [render_prompt(task, ex, shots) for ex in sample(sel.splits.train, cfg.calibration_samples, seed=sel.seed)]
            analysis = analyze_layers(model, tok, calib, model_name=str(path), calibration=f"{task.name} train prompts")
            run.write_json("angular.json", analysis.to_json())
            start, end, distance = analysis.best_block(cfg.drop)
        records = [{"id": ex.id, "prompt": render_prompt(task, ex, shots), "completion": continuation(str(ex.label))}
                   for ex in train]
        healing_info: dict = {"kind": cfg.healing}
        if cfg.healing == "self-data":
            # The unpruned model rewrites the answers (through the run's cache, so a rerun repays nothing).
            unpruned = open_cached_backend(BackendConfig(spec=cfg.student), run.cache_path,
                                           backend=HFBackend.from_objects(model, tok, name=f"unpruned:{path.name}"))
            rows = self_distill(task, train, unpruned, shots=shots, max_new_tokens=cfg.rewrite_max_tokens)
            run.write_jsonl("selfdistill.jsonl", rows)
            records = sft_records(rows, "selected")
            healing_info["acceptance"] = acceptance_summary(rows)
            teacher_usage = unpruned.meter.summary()
        removed = drop_layers(model, start, end) if end > start else []
        if removed:
            save_model_folder(model, tok, run.file("pruned"))
        run.write_jsonl("healing_data.jsonl", records)
        steps = 0
        if cfg.healing != "none":
            settings = SFTSettings.with_lora(cfg.lora, max_steps=cfg.steps, learning_rate=cfg.learning_rate,
                                             batch_size=cfg.batch_size, seed=cfg.seed)
            res = train_sft(model, tok, records, settings, output_dir=run.file("trainer"))
            model, steps = res.model, res.steps
            healing_info.update({"steps": res.steps, "losses": res.losses, "seconds": round(res.seconds, 2)})
        save_model_folder(model, tok, student_dir)
        info = {"config_digest": digest, "block": f"{start}:{end}", "angular_distance": distance,
                "removed_layers": removed, "parameters": {"before": before,
                                                           "after": sum(p.numel() for p in model.parameters())},
                "healing": healing_info, "steps": steps}
        run.write_json("train.json", info)
        release_memory()
    acceptance = (info.get("healing") or {}).get("acceptance")
    if acceptance is not None:
        notes.append(f"self-data: {acceptance['kept']} of {acceptance['examples']} rewrites accepted "
                     f"({acceptance['acceptance']:.0%}); the rest keep the original answer")
    name = f"pruned {info['block']} + {cfg.healing} healing" if info.get("removed_layers") else f"{cfg.healing} fine-tune"
    deployed = Deployment(name=name,
                          backend=HFBackend.from_objects(model, tok, name="pruned-healed"), model=str(student_dir),
                          shots=shots, model_dir=student_dir)
    results = {deployed.name: evaluate_deployment(sel, deployed)}
    cost = BuildCost.from_meter(teacher_usage, seconds=timer.seconds, training_steps=int(info.get("steps", 0)))
    cost.teacher_calls = int(teacher_usage.get("calls", 0))
    extra = {"split": cfg.eval_split, "student": str(path), "block": info["block"],
             "angular_distance": info.get("angular_distance"), "parameters": info.get("parameters"),
             "healing": info.get("healing")}
    artifacts = {k: str(run.file(k)) for k in ("student", "pruned", "angular.json", "healing_data.jsonl",
                                                "selfdistill.jsonl") if run.file(k).exists()}
    return record(run, sel, route=f"prune-heal-{cfg.healing}", deployed=deployed, results=results, cost=cost,
                  config_dict=config_dict, title=f"Stillroom prune + heal: {task.name}", metrics_extra=extra,
                  notes=notes, artifacts=artifacts, resumed=resumed)


def evaluate_model_folder(folder: str | Path, sel, *, route: str, config: dict, cost=None) -> dict:
    """Steps 3-5 of the skeleton for a model a compression command produced (a merge, a healed model): deploy the
    folder, evaluate it on `sel`'s test examples (`stillroom.route.select`, taken before the model is built so a
    bad task fails first), and record result.json, predictions, metrics and the report in the folder."""
    from stillroom.backends.hf import HFBackend
    from stillroom.route import BuildCost, Deployment, evaluate_deployment, record
    from stillroom.runs import RunFolder

    folder = Path(folder)
    dep = Deployment(name=route, backend=HFBackend(str(folder)), model=str(folder),
                     model_dir=folder)
    results = {route: evaluate_deployment(sel, dep)}
    return record(RunFolder(folder), sel, route=route, deployed=dep, results=results, cost=cost or BuildCost(),
                  config_dict=config, title=f"Stillroom {route}: {sel.task.name}")
