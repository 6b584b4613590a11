"""`stillroom gad`: Generative Adversarial Distillation from a black-box teacher.

`register(app)` adds the command to the main Typer app. It takes an optional YAML config (the fields of
`GADConfig`); command-line options override it. Rerunning the same command resumes in the same run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stillroom.options import (
    NO_OPTIONS,
    BaseUrlOpt,
    ConfigArg,
    EvalLimitOpt,
    KeyEnvOpt,
    LoraOpt,
    RunDirOpt,
    Shared,
    TaskOpt,
    TrainLimitOpt,
    shared_options,
)
from stillroom.ui import console, print_results, run_guarded

Opt = typer.Option


def _print(metrics: dict, run_dir: Path) -> None:
    print_results(metrics["conditions"])
    d = metrics["data"]
    acc = "-" if d["teacher_accuracy"] is None else f"{d['teacher_accuracy']:.3f}"
    console.print(f"teacher: {d['examples']} answers ({d['teacher_calls_cached']} from the cache), accuracy {acc}, "
                  f"kept {d['kept']}")
    log = (metrics.get("adversarial") or {}).get("log") or []
    if log:
        first, last = log[0], log[-1]
        fmt = lambda x, k: "-" if k not in x else f"{x[k]:.3f}"  # noqa: E731
        console.print(f"adversarial: {metrics['adversarial']['steps']} steps; reward {fmt(first, 'reward_mean')} → "
                      f"{fmt(last, 'reward_mean')}, discriminator accuracy {fmt(first, 'disc_accuracy')} → "
                      f"{fmt(last, 'disc_accuracy')}")
    for n in metrics.get("notes", []):
        console.print(f"[yellow]note:[/] {n}")
    console.print(f"report: [bold]{run_dir / 'report.html'}[/]")


@shared_options(spend=True)
def gad_cmd(
    config: ConfigArg = None,
    task: TaskOpt = None,
    teacher: Annotated[str | None, Opt(help="Teacher spec, any backend: 'openai:MODEL', 'hf:PATH', 'gemma3-270m' (only its text is used).")] = None,
    teacher_base_url: BaseUrlOpt = None,
    teacher_api_key_env: KeyEnvOpt = None,
    student: Annotated[str | None, Opt(help="Student (generator): 'gemma3-270m', 'hf:PATH' or a local model folder.")] = None,
    num_generations: Annotated[int | None, Opt("--num-generations", "-G", help="Student samples per prompt per adversarial step (paper: 8).")] = None,
    temperature: Annotated[float | None, Opt(help="Student sampling temperature (paper: 0.8).")] = None,
    prompts_per_step: Annotated[int | None, Opt(help="Prompts per adversarial step.")] = None,
    adversarial_steps: Annotated[int | None, Opt(help="Adversarial (GRPO) steps.")] = None,
    disc_warmup_steps: Annotated[int | None, Opt(help="Discriminator-only steps before the SeqKD warm-up.")] = None,
    warmup_epochs: Annotated[float | None, Opt(help="SeqKD warm-up passes over the teacher answers (0: none).")] = None,
    warmup_steps: Annotated[int | None, Opt(help="SeqKD warm-up steps (overrides --warmup-epochs).")] = None,
    lr: Annotated[float | None, Opt("--lr", help="Student learning rate in the adversarial stage.")] = None,
    warmup_lr: Annotated[float | None, Opt(help="Student learning rate in the SeqKD warm-up.")] = None,
    disc_lr: Annotated[float | None, Opt(help="Discriminator learning rate.")] = None,
    beta: Annotated[float | None, Opt(help="KL penalty to the warmed-up student (paper: 0.001).")] = None,
    max_completion_length: Annotated[int | None, Opt(help="Tokens per student sample at most.")] = None,
    update_discriminator: Annotated[bool | None, Opt("--update-discriminator/--frozen-discriminator", help="Keep training the discriminator in the adversarial stage (frozen: an ablation that gets reward-hacked).")] = None,
    lora: LoraOpt = None,
    batch_size: Annotated[int | None, Opt(help="SeqKD warm-up batch size (and prompts per warm-up discriminator step).")] = None,
    train_limit: TrainLimitOpt = None,
    eval_limit: EvalLimitOpt = None,
    seed: Annotated[int | None, Opt(help="Training and sampling seed.")] = None,
    run_dir: RunDirOpt = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """Generative Adversarial Distillation (GAD, arXiv 2511.10643): black-box on-policy distillation.

    The student is the generator; a copy of it with a scalar head is the discriminator, trained with the
    Bradley-Terry loss to score the teacher's answer above the student's. Warm-up: discriminator-only steps,
    then SeqKD on the teacher's answers with the discriminator trained alongside. Adversarial stage (TRL
    GRPOTrainer): G samples per prompt, rewarded by the discriminator, group-normalised advantages, clipped
    policy gradient with a KL penalty β; the discriminator keeps learning on the same samples.

    Only the teacher's text is used (any backend, API teachers included), through the run's durable cache:
    a rerun repays nothing and skips finished stages. Writes teacher_outputs.jsonl, warmup/, student/,
    discriminator/, train.json, predictions.jsonl, metrics.json (eval before/after, reward and
    discriminator accuracy per logging step) and report.html. Adversarial training is unstable: watch the
    discriminator accuracy and the answer lengths in metrics.json.
    """

    def body():
        from stillroom.locking import wait_for_holders

        wait_for_holders(opts.wait)  # this command's --wait holds for every run folder it opens
        from stillroom.gad.config import GADConfig
        from stillroom.gad.train import run_gad
        from stillroom.options import load_config
        from stillroom.runs import run_dir_for

        over = {
            "task": opts.task(task), "student": {"spec": student},
            "teacher": {"spec": teacher, "base_url": teacher_base_url, "api_key_env": teacher_api_key_env},
            "num_generations": num_generations, "temperature": temperature, "prompts_per_step": prompts_per_step,
            "adversarial_steps": adversarial_steps, "disc_warmup_steps": disc_warmup_steps,
            "warmup_epochs": warmup_epochs, "warmup_steps": warmup_steps, "learning_rate": lr,
            "warmup_learning_rate": warmup_lr, "disc_learning_rate": disc_lr, "beta": beta,
            "max_completion_length": max_completion_length, "update_discriminator": update_discriminator,
            "lora": None if lora is None else {"enabled": lora}, "batch_size": batch_size, "train_limit": train_limit, "eval_limit": eval_limit,
            "seed": seed, "spend": opts.spend(),
        }
        cfg = load_config(config, GADConfig, over, "--task and --student", bool(task and student))
        out = run_dir or run_dir_for("gad", cfg)
        _print(run_gad(cfg, out), out)

    run_guarded(body)


def register(app: typer.Typer) -> None:
    """Add `stillroom gad` to the main app."""
    app.command("gad")(gad_cmd)
