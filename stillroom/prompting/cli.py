"""`stillroom eval`: one model, one task split, any prompting condition."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stillroom.options import (
    NO_OPTIONS,
    BaseUrlOpt,
    ConfigArg,
    KeyEnvOpt,
    ModelOpt,
    RunDirOpt,
    Shared,
    TaskOpt,
    shared_options,
)
from stillroom.ui import print_results, run_guarded


@shared_options(labels=True, free_text=True, spend=True)
def eval_cmd(
    task: TaskOpt = None,
    model: ModelOpt = None,
    config: ConfigArg = None,
    split: Annotated[str | None, typer.Option(help="train, val or test.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate a deterministic sample of at most N examples.")] = None,
    shots: Annotated[int | None, typer.Option(help="k solved training examples in the prompt.")] = None,
    system_prompt: Annotated[Path | None, typer.Option(help="Plain-text system prompt file (e.g. an exported rulebook).")] = None,
    rulebook: Annotated[Path | None, typer.Option(help="A PLD rulebook.json (or edited .md/.txt rule list) to deploy as the system prompt.")] = None,
    method: Annotated[str | None, typer.Option(help="auto, loglik, generate or cot.")] = None,
    seed: Annotated[int | None, typer.Option(help="Split and sampling seed.")] = None,
    base_url: BaseUrlOpt = None,
    api_key_env: KeyEnvOpt = None,
    run_dir: RunDirOpt = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """Evaluate a model on a task split: accuracy, macro-F1, per-class F1, invalid answers, latency, tokens, cost.

    Writes config.yaml, predictions.jsonl, metrics.json, usage.json and report.html into the run folder.
    """

    def body():
        from stillroom.config import EvalConfig
        from stillroom.options import load_config
        from stillroom.prompting.job import run_eval
        from stillroom.runs import identity_of, run_dir_for

        overrides = {
            "task": opts.task(task, seed=seed),
            "model": {"spec": model, "base_url": base_url, "api_key_env": api_key_env},
            "eval_split": split, "eval_limit": limit, "shots": shots, "method": method,
            "system_prompt_file": str(system_prompt) if system_prompt else None,
            "spend": opts.spend(),
        }
        cfg = load_config(config, EvalConfig, overrides, "--task", bool(task))
        if cfg.system_prompt_file and not Path(cfg.system_prompt_file).exists():
            from stillroom.errors import ConfigError

            raise ConfigError(f"{cfg.system_prompt_file}: system prompt file does not exist")
        conditions = None
        if rulebook:
            from stillroom.pld.rulebook import load_rulebook
            from stillroom.prompting.job import Condition, default_condition

            if cfg.system_prompt_file:
                raise typer.BadParameter("give --rulebook or --system-prompt, not both")
            rb = load_rulebook(rulebook)
            out = run_dir or run_dir_for("eval", {**identity_of(cfg), "rulebook": rb.to_json()})
            base = default_condition(cfg)
            # The rulebook goes in as the condition's system prompt: nothing is written before the run's inputs
            # are checked (a failed first run leaves no folder); its system_prompt.txt is written after.
            conditions = [Condition(name=f"{base.name} + rulebook ({len(rb.rules)} rules)", shots=base.shots,
                                    system_prompt=rb.system_prompt(), method=base.method)]
        else:
            out = run_dir or run_dir_for("eval", cfg)
        results = run_eval(cfg, out, conditions=conditions, wait=opts.wait)
        if rulebook:
            from stillroom.runs import atomic_write_text

            atomic_write_text(out / "system_prompt.txt", conditions[0].system_prompt + "\n")
            atomic_write_text(out / "rulebook.json", rb.to_json())
        print_results({n: r.metrics for n, r in results.items()})
        from stillroom.runs import RunFolder
        from stillroom.ui import print_notes

        # the run's notes, the warnings of a doubtful result among them (one-class answers, no gold labels)
        print_notes((RunFolder(out).read_json("metrics.json") or {}).get("notes"), out / "report.html")

    run_guarded(body)


def register(app: typer.Typer) -> None:
    """Add `stillroom eval` to the main app."""
    app.command("eval")(eval_cmd)
