"""`stillroom kd logits | hints | data`: white-box logit KD, hint KD, and black-box KD through teacher text.

`register(app)` adds the `kd` sub-app to the main Typer app. Every command takes an optional YAML config (the
fields of `KDLogitsConfig` / `KDDataConfig`); command-line options override it. Rerunning the same command
resumes in the same run folder (teacher cache, teacher-logit shards, the trained student).
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
    load_config,
    shared_options,
)
from stillroom.ui import console, print_results, run_guarded

StudentOpt = Annotated[str | None, typer.Option(help="Student: 'hf:PATH' or a local model folder.")]
EpochsOpt = Annotated[float | None, typer.Option(help="Passes over the training examples.")]
MaxStepsOpt = Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Learning rate.")]
BatchOpt = Annotated[int | None, typer.Option(help="Batch size per device.")]


def _print(metrics: dict, run_dir: Path) -> None:
    if not metrics:  # a non-main rank under `accelerate launch`
        return
    print_results(metrics["conditions"])
    train = metrics.get("train") or {}
    if train.get("tokens_per_s"):
        console.print(f"training: {train['steps']} steps, {train['seconds']:.0f} s, {train['tokens_per_s']:.0f} tokens/s")
    cache = train.get("cache") or {}
    if cache:
        console.print(f"teacher cache: {len(cache['computed_shards'])} shards computed, "
                      f"{len(cache['reused_shards'])} reused ({cache['folder']})")
    for n in metrics.get("notes", []):
        console.print(f"[yellow]note:[/] {n}")
    console.print(f"report: [bold]{run_dir / 'report.html'}[/]")


def _logits_overrides(task, teacher, student, divergence, beta, alpha, temperature, ce_weight, top_k, online,
                      on_policy, lora, epochs, max_steps, lr, batch_size, train_limit, eval_limit, shots) -> dict:
    return {
        "task": {"spec": task}, "teacher": {"spec": teacher}, "student": {"spec": student}, "divergence": divergence, "beta": beta,
        "alpha": alpha, "temperature": temperature, "ce_weight": ce_weight, "top_k": top_k,
        "teacher_mode": None if online is None else ("online" if online else "cached"), "on_policy": on_policy,
        "lora": None if lora is None else {"enabled": lora}, "epochs": epochs, "max_steps": max_steps, "learning_rate": lr, "batch_size": batch_size,
        "train_limit": train_limit, "eval_limit": eval_limit, "shots": shots,
    }


DivOpt = Annotated[str | None, typer.Option(help="fkl, rkl, jsd, tvd, skew_fkl or skew_rkl.")]
BetaOpt = Annotated[float | None, typer.Option(help="JSD β (TRL convention: 0 = forward KL, 1 = reverse KL).")]
AlphaOpt = Annotated[float | None, typer.Option(help="Skew KL α.")]
TempOpt = Annotated[float | None, typer.Option(help="Softmax temperature of the KD term.")]
CeOpt = Annotated[float | None, typer.Option(help="loss = (1 − w)·KD + w·CE on gold answer tokens.")]
TopKOpt = Annotated[int | None, typer.Option(help="Teacher log-probabilities cached per position (+ a rest bucket).")]
OnlineOpt = Annotated[bool | None, typer.Option("--online/--cached", help="Keep the teacher resident instead of caching its logits.")]
OnPolicyOpt = Annotated[bool | None, typer.Option("--on-policy", help="On-policy KD via TRL's DistillationTrainer (teacher resident).")]
TeacherWB = Annotated[str | None, typer.Option(help="Teacher: 'gemma3-270m' (default), 'hf:PATH', a model folder, or 'openai:MODEL' served by vLLM (kd logits, with --base-url).")]
ServedUrlOpt = Annotated[str | None, typer.Option("--base-url", help="A served teacher's vLLM URL (e.g. http://gpu-node:8000/v1): its top-k log-probabilities fill the cache.")]
ServedKeyEnvOpt = Annotated[str | None, typer.Option("--api-key-env", help="NAME of the variable holding the served teacher's key.")]
ShotsOpt = Annotated[int | None, typer.Option(help="k solved training examples in every prompt.")]


@shared_options(spend=True)
def logits_cmd(
    config: ConfigArg = None, task: TaskOpt = None, teacher: TeacherWB = None, student: StudentOpt = None,
    divergence: DivOpt = None, beta: BetaOpt = None, alpha: AlphaOpt = None, temperature: TempOpt = None,
    ce_weight: CeOpt = None, top_k: TopKOpt = None, online: OnlineOpt = None, on_policy: OnPolicyOpt = None,
    lora: LoraOpt = None, epochs: EpochsOpt = None, max_steps: MaxStepsOpt = None, lr: LrOpt = None,
    batch_size: BatchOpt = None, train_limit: TrainLimitOpt = None, eval_limit: EvalLimitOpt = None,
    shots: ShotsOpt = None, run_dir: RunDirOpt = None, base_url: ServedUrlOpt = None, api_key_env: ServedKeyEnvOpt = None,
    tokenizers: Annotated[str | None, typer.Option(
        help="auto (default: align by bytes when teacher and student tokenize differently), same (refuse "
        "different tokenizers) or cross (always ULD on byte-aligned spans).")] = None,
    hybrid: Annotated[bool | None, typer.Option(
        "--hybrid", help="Across tokenizers: add GOLD's hybrid term (tokens both vocabularies share compared one to "
        "one).")] = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """White-box logit KD: the teacher's top-k log-probabilities are computed once and cached on disk
    (resumable shards), then the student (LoRA or full) is trained on them without the teacher in memory.

    Writes teacher_logits/, student/ (the distilled model), train.json, predictions.jsonl, metrics.json and
    report.html; evaluates the student before and after on the same examples.
    """

    def body():
        from stillroom.locking import wait_for_holders

        wait_for_holders(opts.wait)  # this command's --wait holds for every run folder it opens
        from stillroom.kd.trainer import KDLogitsConfig, distill_logits
        from stillroom.runs import run_dir_for

        over = _logits_overrides(task, teacher, student, divergence, beta, alpha, temperature, ce_weight, top_k,
                                 online, on_policy, lora, epochs, max_steps, lr, batch_size, train_limit,
                                 eval_limit, shots)
        over["teacher"].update({"base_url": base_url, "api_key_env": api_key_env})
        over["xtok"] = {"mode": tokenizers, "hybrid": hybrid}
        over["spend"] = opts.spend()
        over["task"] = opts.task(task)
        cfg = load_config(config, KDLogitsConfig, over, "--task and --student", bool(task and student))
        out = run_dir or run_dir_for("kd-logits", cfg)
        _print(distill_logits(cfg, out), out)

    run_guarded(body)


@shared_options()
def hints_cmd(
    config: ConfigArg = None, task: TaskOpt = None, teacher: TeacherWB = None, student: StudentOpt = None,
    layer_map: Annotated[str | None, typer.Option(help="'uniform', 'uniform:N' or 'S:T,S:T' (hidden-state indices).")] = None,
    metric: Annotated[str | None, typer.Option(help="mse or cosine.")] = None,
    hint_weight: Annotated[float | None, typer.Option(help="Weight of the hint loss.")] = None,
    positions: Annotated[str | None, typer.Option(help="answer (default) or all.")] = None,
    divergence: DivOpt = None, temperature: TempOpt = None, ce_weight: CeOpt = None, top_k: TopKOpt = None,
    online: OnlineOpt = None, lora: LoraOpt = None, epochs: EpochsOpt = None, max_steps: MaxStepsOpt = None,
    lr: LrOpt = None, batch_size: BatchOpt = None, train_limit: TrainLimitOpt = None,
    eval_limit: EvalLimitOpt = None, shots: ShotsOpt = None, run_dir: RunDirOpt = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """Hint KD: the logit loss plus hidden-state matching through a learned projection (student width →
    teacher width), MSE or cosine, on a layer mapping (default uniform). Teacher states are cached with its
    logits. Same architecture family and tokenizer only (states are matched position by position); across
    tokenizers, use `kd logits`."""

    def body():
        from stillroom.locking import wait_for_holders

        wait_for_holders(opts.wait)  # this command's --wait holds for every run folder it opens
        from stillroom.kd.trainer import KDLogitsConfig, distill_logits
        from stillroom.runs import run_dir_for

        over = _logits_overrides(task, teacher, student, divergence, None, None, temperature, ce_weight, top_k,
                                 online, None, lora, epochs, max_steps, lr, batch_size, train_limit,
                                 eval_limit, shots)
        over["task"] = opts.task(task)
        over["hints"] = {"enabled": True, "layer_map": layer_map, "metric": metric, "weight": hint_weight,
                         "positions": positions}
        cfg = load_config(config, KDLogitsConfig, over, "--task and --student", bool(task and student))
        out = run_dir or run_dir_for("kd-hints", cfg)
        _print(distill_logits(cfg, out), out)

    run_guarded(body)


@shared_options(spend=True)
def data_cmd(
    config: ConfigArg = None, task: TaskOpt = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher spec: 'gemma3-270m', 'hf:PATH', 'openai:MODEL', ...")] = None,
    teacher_base_url: BaseUrlOpt = None,
    teacher_api_key_env: KeyEnvOpt = None,
    student: StudentOpt = None,
    mode: Annotated[str | None, typer.Option(help="answers (SeqKD), cot (rationales + answers) or demos (few-shot).")] = None,
    filter_correct: Annotated[bool | None, typer.Option("--filter/--no-filter", help="Keep only teacher outputs matching the gold label.")] = None,
    samples: Annotated[int | None, typer.Option(help="Teacher attempts per example (re-sampled while wrong).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Teacher sampling temperature.")] = None,
    demos: Annotated[int | None, typer.Option(help="demos mode: number of teacher-labelled demonstrations.")] = None,
    shots: ShotsOpt = None,
    teacher_shots: Annotated[int | None, typer.Option(help="Gold-labelled shots in the teacher's prompt.")] = None,
    lora: LoraOpt = None, epochs: EpochsOpt = None, max_steps: MaxStepsOpt = None, lr: LrOpt = None,
    batch_size: BatchOpt = None, train_limit: TrainLimitOpt = None, eval_limit: EvalLimitOpt = None,
    run_dir: RunDirOpt = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """Black-box KD from any backend (API teachers included): teacher answers (SeqKD), rationales + answers
    (CoT), or teacher-labelled demonstrations; filtered by correctness against gold labels; then SFT of the
    student (stillroom.train.sft). Teacher calls go through the run's durable cache: reruns repay nothing.
    """

    def body():
        from stillroom.locking import wait_for_holders

        wait_for_holders(opts.wait)  # this command's --wait holds for every run folder it opens
        from stillroom.kd.data import KDDataConfig, distill_data
        from stillroom.runs import run_dir_for

        over = {
            "task": opts.task(task), "student": {"spec": student}, "mode": mode, "filter_correct": filter_correct,
            "teacher": {"spec": teacher, "base_url": teacher_base_url, "api_key_env": teacher_api_key_env},
            "samples": samples, "temperature": temperature, "demos": demos, "shots": shots,
            "teacher_shots": teacher_shots, "lora": None if lora is None else {"enabled": lora}, "epochs": epochs,
            "max_steps": max_steps, "learning_rate": lr, "batch_size": batch_size, "train_limit": train_limit,
            "eval_limit": eval_limit, "spend": opts.spend(),
        }
        cfg = load_config(config, KDDataConfig, over, "--task and --student", bool(task and student))
        out = run_dir or run_dir_for("kd-data", cfg)
        m = distill_data(cfg, out)
        if not m:  # a non-main rank under `accelerate launch`
            return
        d = m["data"]
        acc = "-" if d["teacher_accuracy"] is None else f"{d['teacher_accuracy']:.3f}"
        console.print(f"teacher: {d['examples']} examples, accuracy {acc}, kept {d['kept']}")
        _print(m, out)

    run_guarded(body)


def register(app: typer.Typer) -> None:
    """Add `stillroom kd ...` to the main app."""
    kd_app = typer.Typer(help="Knowledge distillation: teacher logits, hidden-state hints, or teacher text.",
                         no_args_is_help=True)
    app.add_typer(kd_app, name="kd")
    kd_app.command("logits")(logits_cmd)
    kd_app.command("hints")(hints_cmd)
    kd_app.command("data")(data_cmd)
