"""`stillroom pld`: Prompt-Level Distillation from the command line."""

from __future__ import annotations

from typing import Annotated

import typer

from stillroom.options import (
    NO_OPTIONS,
    BaseUrlOpt,
    ConfigArg,
    KeyEnvOpt,
    RunDirOpt,
    Shared,
    TaskOpt,
    shared_options,
)
from stillroom.ui import console, print_results, run_guarded


@shared_options(labels=True, spend=True)
def pld(
    config: ConfigArg = None,
    task: TaskOpt = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher model spec (default: the embedded gemma3-270m).")] = None,
    student: Annotated[str | None, typer.Option(help="Student model spec (default: the embedded gemma3-270m).")] = None,
    teacher_base_url: BaseUrlOpt = None,
    teacher_api_key_env: KeyEnvOpt = None,
    student_base_url: BaseUrlOpt = None,
    student_api_key_env: KeyEnvOpt = None,
    train_limit: Annotated[int | None, typer.Option(help="Extract from a deterministic sample of N training examples.")] = None,
    val_limit: Annotated[int | None, typer.Option(help="Validation examples for the conflict loop.")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Evaluated examples in the final comparison (a deterministic sample).")] = None,
    embedder: Annotated[str | None, typer.Option(help="'minilm' (bundled), 'st:NAME_OR_PATH' or 'openai:MODEL'.")] = None,
    eps: Annotated[float | None, typer.Option(help="DBSCAN eps on cosine distance.")] = None,
    min_samples: Annotated[int | None, typer.Option(help="DBSCAN min_samples.")] = None,
    eps_sweep: Annotated[str | None, typer.Option(help="Comma-separated eps values; the best by validation macro-F1 wins.")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="Conflict-resolution rounds at most.")] = None,
    cot: Annotated[bool | None, typer.Option("--cot/--no-cot", help="Include the chain-of-thought baseline.")] = None,
    ablation: Annotated[bool | None, typer.Option("--ablation/--no-ablation", help="Leave-one-rule-out ablation.")] = None,
    run_dir: RunDirOpt = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """Prompt-Level Distillation: extract rules from the teacher, cluster and consolidate them, repair them from
    the student's errors, and deploy them as the student's system prompt; then compare zero-shot, k-shot,
    chain-of-thought and PLD on the test split. Rerun the same command to resume (no teacher call is repaid).

    Writes rulebook.json, rulebook.md, system_prompt.txt, every rulebook version, extractions.jsonl,
    clusters.json, predictions.jsonl, metrics.json, usage.json and report.html.
    """

    def body():
        from stillroom.config import PLDConfig
        from stillroom.options import load_config
        from stillroom.pld.pipeline import run_pld
        from stillroom.runs import run_dir_for

        sweep = [float(x) for x in eps_sweep.split(",")] if eps_sweep else None
        overrides = {
            "task": opts.task(task),
            "teacher": {"spec": teacher, "base_url": teacher_base_url, "api_key_env": teacher_api_key_env},
            "student": {"spec": student, "base_url": student_base_url, "api_key_env": student_api_key_env},
            "train_limit": train_limit, "val_limit": val_limit, "eval_limit": eval_limit, "embedder": embedder,
            "eps": eps, "min_samples": min_samples, "eps_sweep": sweep, "max_rounds": max_rounds, "cot": cot,
            "ablation": ablation, "spend": opts.spend(),
        }
        cfg = load_config(config, PLDConfig, overrides, "--task", bool(task))
        out = run_dir or run_dir_for("pld", cfg)
        m = run_pld(cfg, out, wait=opts.wait)
        print_results(m["conditions"])
        b = m["build"]
        console.print(f"rulebook: {m['rulebook']['rules']} rules (v{m['rulebook']['version']}, "
                      f"{m['rulebook']['system_prompt_tokens']} tokens); build: {b.get('teacher_calls', 0)} teacher calls, "
                      f"{b['seconds']:.0f} s, ${b.get('teacher_cost_usd', 0.0):.4f}")
        for n in m["notes"]:
            console.print(f"[yellow]note:[/] {n}")
        console.print(f"report: [bold]{out / 'report.html'}[/]")

    run_guarded(body)


def register(app: typer.Typer) -> None:
    """Add `stillroom pld` to the main app."""
    app.command("pld")(pld)
