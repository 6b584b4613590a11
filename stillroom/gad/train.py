"""GAD's two training stages and the route behind `stillroom gad`.

Warm-up (`warm_up`): first `disc_warmup_steps` discriminator-only steps (teacher answers vs samples of the
untouched student), then SeqKD — the one SFT helper, `stillroom.train.sft`, on the teacher's answers — with one
discriminator step after every SFT step (a `TrainerCallback` that samples the student as it is at that step).

Adversarial stage (`adversarial`): TRL's `GRPOTrainer`. Each step it samples G completions per prompt
(temperature 0.8 in the paper), calls the reward function, normalises the rewards within each group (GRPO
advantages) and takes a clipped policy-gradient step with a KL penalty (β = 0.001) to the reference model, which
is the warmed-up student (TRL disables the LoRA adapters for it, or reloads the warmed-up folder for full
fine-tuning). The reward function is `GADReward`: the discriminator's score of each completion, after which the
discriminator takes its own Bradley-Terry step on the same samples against the teacher's answers.

Why a callable and not TRL's reward-model slot: `reward_funcs` also accepts an
`AutoModelForSequenceClassification`, but TRL scores it under `torch.inference_mode` and never trains it: exactly
the frozen discriminator that the student learns to hack. Why the discriminator update lives in the reward
callable rather than in a `TrainerCallback`: TRL hands the reward function exactly what that update needs, the
fresh samples (`completions`), their prompts, and every extra dataset column repeated per completion (here
`teacher`, the teacher's answer; see `GRPOTrainer._calculate_rewards`), once per generation batch. A callback's
`on_step_end` sees neither the samples nor the dataset columns, so it would have to sample the student a second
time. The reward is read before the update, so the student is rewarded by the discriminator it actually played
against.

Limits: the discriminator is updated by whichever process calls the reward function; under multi-process
training (`accelerate launch`) each rank would update its own copy on its own samples, so GAD here is a
single-process route (TRL has no hook to synchronise a second trainable model). The discriminator is fully
fine-tuned (a full copy of the student in memory, with its own AdamW state).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from stillroom.errors import ConfigError
from stillroom.gad.config import GADConfig
from stillroom.gad.discriminator import Discriminator, sample_completions
from stillroom.models import bf16_supported

# ------------------------------------------------------------------------------------------------ reward


class GADReward:
    """TRL reward function: the discriminator's score of each completion (then, optionally, one BT update).

    TRL calls it as `fn(prompts=..., completions=..., completion_ids=..., teacher=[...], trainer_state=...,
    log_metric=..., ...)`, with one entry per completion (each prompt and its dataset columns repeated G times).
    """

    __name__ = "discriminator"  # TRL names the reward after it in its logs ("rewards/discriminator/mean")

    def __init__(self, discriminator: Discriminator, *, update: bool = True, teacher_column: str = "teacher"):
        self.disc = discriminator
        self.update = update
        self.teacher_column = teacher_column
        self.history: list[dict] = []

    def __call__(self, prompts, completions, log_metric=None, trainer_state=None, **kwargs) -> list[float]:
        if prompts and not isinstance(prompts[0], str):
            raise ConfigError("GAD scores plain-text prompts; conversational datasets are not supported")
        scores = self.disc.score(prompts, completions)
        record: dict[str, Any] = {"step": getattr(trainer_state, "global_step", None),
                                  "reward_mean": float(scores.mean()),
                                  "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                                  "completion_chars": sum(map(len, completions)) / max(1, len(completions))}
        teacher = kwargs.get(self.teacher_column)
        if self.update:
            if teacher is None:
                raise ConfigError(f"the training dataset needs a {self.teacher_column!r} column (the teacher's answer)")
            stats = self.disc.step(prompts, teacher, completions)
            record.update({f"disc_{k}": v for k, v in stats.items()})
            if log_metric is not None:
                for k, v in stats.items():
                    log_metric(f"gad/disc_{k}", v)
        if log_metric is not None:
            log_metric("gad/completion_chars", record["completion_chars"])
        self.history.append(record)
        return scores.tolist()


# ------------------------------------------------------------------------------------------------ warm-up


class _DiscriminatorAlongside(TrainerCallback):
    """One discriminator step after every SFT step, on samples of the student as it is at that step."""

    def __init__(self, step_fn, history: list[dict]):
        self.step_fn, self.history = step_fn, history

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.history.append({"stage": "seqkd", "step": int(state.global_step), **self.step_fn(model)})


@dataclass
class StageResult:
    """What a stage produced: the (plain, merged) student and a JSON-ready summary."""

    model: Any
    info: dict = field(default_factory=dict)


def warm_up(student: Any, tokenizer: Any, records: list[dict], disc: Discriminator, cfg: GADConfig,
            output_dir: str | Path) -> StageResult:
    """Discriminator-only steps, then SeqKD on the teacher's answers with the discriminator trained alongside."""
    from stillroom.train.sft import SFTSettings, _unpatch, build_trainer

    prompts = [r["prompt"] for r in records]
    answers = [r["completion"] for r in records]
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)

    def disc_step(model) -> dict:
        idx = rng.sample(range(len(records)), k=min(cfg.batch_size, len(records)))
        ps = [prompts[i] for i in idx]
        samples = sample_completions(model, tokenizer, ps, temperature=cfg.temperature,
                                     max_new_tokens=cfg.max_completion_length)
        return disc.step(ps, [answers[i] for i in idx], samples)

    history: list[dict] = []
    t0 = time.perf_counter()
    for s in range(cfg.disc_warmup_steps):
        history.append({"stage": "disc-only", "step": s + 1, **disc_step(student)})
    info: dict[str, Any] = {"disc_only_steps": cfg.disc_warmup_steps, "discriminator": history}
    do_sft = cfg.warmup_steps > 0 or (cfg.warmup_steps < 0 and cfg.warmup_epochs > 0)
    if do_sft:
        settings = SFTSettings.with_lora(cfg.lora, learning_rate=cfg.warmup_learning_rate,
                               epochs=cfg.warmup_epochs or 1.0, max_steps=cfg.warmup_steps, batch_size=cfg.batch_size,
                               max_length=cfg.max_length, seed=cfg.seed)
        callbacks = [_DiscriminatorAlongside(disc_step, history)] if cfg.warmup_disc else None
        # `build_trainer` + the same tail as `train_sft` (which takes no callbacks): the SFT helper is unchanged.
        trainer = build_trainer(student, tokenizer, records, settings, output_dir, callbacks=callbacks)
        trainer.train()
        student = trainer.model
        if settings.lora and hasattr(student, "merge_and_unload"):
            student = student.merge_and_unload()
        _unpatch(student)
        logs = list(trainer.state.log_history)
        info["seqkd"] = {"steps": int(trainer.state.global_step), "losses": [h["loss"] for h in logs if "loss" in h],
                         "settings": dataclasses.asdict(settings)}
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return StageResult(model=student, info=info)


# ------------------------------------------------------------------------------------------------ adversarial


def grpo_config(cfg: GADConfig, output_dir: str | Path):
    """TRL's `GRPOConfig` for GAD: G samples per prompt, group-normalised advantages, clipped loss, KL β."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        num_generations=cfg.num_generations,
        temperature=cfg.temperature,
        top_p=1.0, top_k=0,
        max_completion_length=cfg.max_completion_length,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        loss_type=cfg.loss_type,
        scale_rewards="group",  # GRPO: (r − mean_group) / std_group
        learning_rate=cfg.learning_rate,
        # TRL counts the batch in completions: prompts_per_step prompts × G samples each.
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        gradient_accumulation_steps=1,
        max_steps=cfg.adversarial_steps,
        logging_steps=cfg.logging_steps,
        # GRPOConfig's own defaults (bf16 on, checkpointing on) assume a GPU; follow the device instead.
        bf16=bf16_supported(), fp16=False,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        seed=cfg.seed, data_seed=cfg.seed,
        remove_unused_columns=False,  # keep the `teacher` column: TRL passes it to the reward function
        save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
    )


def adversarial(student: Any, tokenizer: Any, records: list[dict], disc: Discriminator, cfg: GADConfig,
                output_dir: str | Path) -> StageResult:
    """The adversarial stage through TRL's GRPOTrainer; returns the plain (LoRA-merged) student."""
    from datasets import Dataset
    from trl import GRPOTrainer

    peft_config = None
    if cfg.lora.enabled:
        peft_config = cfg.lora.peft()
    reward = GADReward(disc, update=cfg.update_discriminator)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "teacher": r["completion"]} for r in records])
    trainer = GRPOTrainer(model=student, reward_funcs=[reward], args=grpo_config(cfg, output_dir),
                          train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    keys = {"reward": "reward_mean", "reward_std": "reward_std", "gad/disc_accuracy": "disc_accuracy",
            "gad/disc_loss": "disc_loss", "gad/disc_r_teacher": "r_teacher", "gad/disc_r_student": "r_student",
            "kl": "kl", "loss": "loss", "completions/mean_length": "completion_tokens",
            "gad/completion_chars": "completion_chars", "frac_reward_zero_std": "frac_reward_zero_std"}
    log = [{"step": h["step"], **{new: h[old] for old, new in keys.items() if old in h}}
           for h in trainer.state.log_history if "reward" in h]
    info = {"steps": int(trainer.state.global_step), "seconds": round(seconds, 2), "log": log,
            "discriminator_updates": sum(1 for h in reward.history if "disc_loss" in h),
            "trainer": "trl.GRPOTrainer", "lora": cfg.lora.enabled, "beta": cfg.beta, "num_generations": cfg.num_generations,
            "temperature": cfg.temperature}
    return StageResult(model=model, info=info)


# ------------------------------------------------------------------------------------------------ the route


def refuse_multi_process() -> None:
    """GAD is single-process: raise `ConfigError` when started by `accelerate launch` (or torchrun) with more than
    one process (WORLD_SIZE > 1)."""
    import os

    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world > 1:
        raise ConfigError(
            f"GAD runs in one process, but this is one of {world} (accelerate launch / torchrun): the discriminator "
            "is updated inside the reward function by whichever process calls it, so every rank would train its own "
            "discriminator on its own samples and the student would chase several different critics. Run `stillroom "
            "gad` directly (python -m stillroom.cli gad ...), on one GPU."
        )


def run_gad(cfg: GADConfig, run_dir: str | Path, *, teacher_backend=None) -> dict:
    """The `stillroom gad` route: teacher answers (cached) → warm-up → adversarial stage → evaluation.

    Writes config.yaml (redacted), cache.sqlite (every teacher call), teacher_outputs.jsonl, gad_data.jsonl,
    warmup/ and discriminator_warmup/ (after the warm-up), student/ and discriminator/ (after the adversarial
    stage), train.json, predictions.jsonl, metrics.json, usage.json and report.html. Rerunning resumes: the
    teacher's answers come from the cache, and a finished stage (same settings) is loaded instead of retrained.
    """
    from stillroom.models import resolve_model_path
    from stillroom.route import run_route

    refuse_multi_process()
    return run_route(cfg, run_dir, lambda ctx: build_gad(ctx, teacher_backend), route="gad",
                     prepare=lambda cfg, sel: resolve_model_path(cfg.student.spec),
                     title=lambda ctx: f"Stillroom GAD: {ctx.task.name}").metrics


def build_gad(ctx, teacher_backend=None):
    """GAD's build: the teacher's answers through the run's cache, the warm-up, the adversarial stage; deploys
    the student (and the untouched student as the 'before' row)."""
    from stillroom.backends.hf import HFBackend
    from stillroom.kd.data import collect_and_record, sft_records
    from stillroom.models import load_causal_lm, load_tokenizer, release_memory
    from stillroom.route import Built, Deployment

    cfg: GADConfig = ctx.cfg
    student_path = ctx.prepared
    teacher_shots, student_shots = ctx.shots(cfg.teacher_shots), ctx.shots(cfg.shots)
    train = ctx.train_pool(teacher_shots, student_shots)
    # The teacher is black-box: only its text is used, and every call goes through the run's durable cache.
    teacher = ctx.open_teacher(cfg.teacher, teacher_backend)
    rows, data_stats = collect_and_record(ctx.run, ctx.task, train, teacher, mode="answers", shots=teacher_shots,
                                          samples=1, temperature=cfg.teacher_temperature,
                                          max_tokens=cfg.teacher_max_tokens, filter_correct=cfg.filter_correct)
    if not data_stats["kept"]:
        raise ConfigError(f"the teacher produced no usable answer for {len(rows)} examples; nothing to distil")
    tok = load_tokenizer(student_path)
    student = load_causal_lm(student_path)
    render = HFBackend.from_objects(student, tok, name="render").render
    records = sft_records(ctx.task, train, rows, mode="answers", render=lambda m: render(m)[0], shots=student_shots)
    ctx.run.write_jsonl("gad_data.jsonl", records)
    info = warm_up_stage(ctx, student, tok, records)
    del student
    release_memory()
    trained, info = adversarial_stage(ctx, tok, records, info)
    student_dir = ctx.run.file("student")
    base = Deployment(name="student (no distillation)", backend=None, model=cfg.student.spec, shots=student_shots,
                      model_dir=student_path,
                      load=lambda: HFBackend.from_objects(load_causal_lm(student_path), tok, name="student-base"))
    deployed = Deployment(name="student (GAD)", backend=HFBackend.from_objects(trained, tok, name="student-gad"),
                          model=str(student_dir), shots=student_shots, model_dir=student_dir)
    adv = info.get("adversarial") or {}
    ctx.notes.extend(discriminator_notes(cfg, adv))
    extra = {
        "split": cfg.eval_split, "train_examples": len(records),
        "method": "GAD (warm-up: SeqKD + discriminator; adversarial: TRL GRPOTrainer, discriminator reward)",
        "teacher": teacher.identity, "student": str(student_path), "data": data_stats,
        "warmup": {k: v for k, v in (info.get("warmup") or {}).items() if k != "digest"},
        "adversarial": {k: v for k, v in adv.items() if k != "digest"},
    }
    steps = int(((info.get("warmup") or {}).get("seqkd") or {}).get("steps", 0)) + int(adv.get("steps", 0) or 0)
    artifacts = {k: str(ctx.run.file(k)) for k in ("student", "discriminator", "teacher_outputs.jsonl", "gad_data.jsonl")}
    return Built(deployments=([base] if cfg.eval_before else []) + [deployed], steps=steps, extra=extra,
                 artifacts=artifacts, usage=teacher.meter.summary)


def _disc_kw(cfg: GADConfig) -> dict:
    return {"learning_rate": cfg.disc_learning_rate, "max_length": cfg.max_length, "micro_batch": cfg.disc_micro_batch}


def warm_up_stage(ctx, student, tok, records) -> dict:
    """Stage 1, or its saved result when the run folder holds it with the same warm-up settings. Returns
    train.json's content."""
    from stillroom.backends.embedded import save_model_folder

    cfg: GADConfig = ctx.cfg
    info = ctx.run.read_json("train.json") or {}
    scopes = ("evaluation", "adversarial")
    if ctx.finished(info.get("warmup"), "warmup", "discriminator_warmup", leave_out=scopes, key="digest"):
        ctx.notes.append("resumed: the warm-up was already finished in this run folder")
        return info
    disc = Discriminator.from_student(student, tok, **_disc_kw(cfg))
    res = warm_up(student, tok, records, disc, cfg, ctx.run.file("trainer-warmup"))
    save_model_folder(res.model, tok, ctx.run.file("warmup"))
    disc.save(ctx.run.file("discriminator_warmup"))
    info = {"warmup": {**res.info, "digest": ctx.digest(scopes)}}
    ctx.run.write_json("train.json", info)
    return info


def adversarial_stage(ctx, tok, records, info: dict):
    """Stage 2 from the warmed-up student, or its saved result (same settings). Returns (student, train.json)."""
    from stillroom.backends.embedded import save_model_folder
    from stillroom.models import load_causal_lm, release_memory

    cfg: GADConfig = ctx.cfg
    student_dir = ctx.run.file("student")
    if ctx.finished(info.get("adversarial"), "student", key="digest"):
        ctx.notes.append("resumed: the adversarial stage was already finished in this run folder")
        return load_causal_lm(student_dir), info
    # Loaded from the warm-up folder, so that TRL's reference model (full fine-tuning, β > 0) is this folder.
    student = load_causal_lm(ctx.run.file("warmup"))
    p = next(student.parameters())
    disc = Discriminator.load(ctx.run.file("discriminator_warmup"), tok, device=p.device, dtype=p.dtype, **_disc_kw(cfg))
    res = adversarial(student, tok, records, disc, cfg, ctx.run.file("trainer-grpo"))
    save_model_folder(res.model, tok, student_dir)
    disc.save(ctx.run.file("discriminator"))
    info = {**info, "adversarial": {**res.info, "digest": ctx.digest()}}
    ctx.run.write_json("train.json", info)
    trained = res.model
    del disc, res, student
    release_memory()
    return trained, info


def discriminator_notes(cfg: GADConfig, adv: dict) -> list[str]:
    """What the adversarial stage's log says about the reward signal."""
    notes = []
    if adv.get("log") and cfg.update_discriminator:
        acc = [x["disc_accuracy"] for x in adv["log"] if "disc_accuracy" in x]
        if acc and min(acc) >= 0.99:
            notes.append("the discriminator separated teacher and student perfectly at every logged step: the "
                         "student's reward carried little signal (try a lower disc_learning_rate)")
    if not cfg.update_discriminator:
        notes.append("frozen discriminator (update_discriminator: false): expect reward hacking, e.g. longer answers")
    return notes
