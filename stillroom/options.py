"""Options shared by the route commands: every command takes its YAML config as an optional first argument
(command-line options override it) and `--run-dir`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

TaskOpt = Annotated[str | None, typer.Option("--task", "-t", help="A .jsonl/.csv file, 'bigbench:NAME' or 'hf:LOCAL_DATASET'.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Model spec (default: the embedded gemma3-270m).")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="Base URL of an OpenAI-compatible server (vLLM, Ollama, llama.cpp, OpenAI).")]
KeyEnvOpt = Annotated[str | None, typer.Option(help="NAME of the environment variable holding the API key (never the key).")]
RunDirOpt = Annotated[Path | None, typer.Option(help="Run folder (default: runs/<command>-<task>-<config hash>; rerun resumes).")]
ConfigArg = Annotated[Path | None, typer.Argument(help="Optional YAML config (every field of the command's config); options override it.")]
LabelsOpt = Annotated[str | None, typer.Option(help="Comma-separated label set, e.g. 'yes,no' (inferred when omitted).")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="If another process holds the run folder, wait for it instead of failing.")]

# The task's columns, kind and instruction: the same options on every command that takes a task (and the same
# fields in the task block of its YAML config), gathered by `task_overrides`.
InputFieldOpt = Annotated[str | None, typer.Option(help="Column (CSV) or field (JSONL) holding each example's text (default 'input').")]
LabelFieldOpt = Annotated[str | None, typer.Option(help="Column or field holding the gold label (default 'label'), e.g. --label-field category.")]
IdFieldOpt = Annotated[str | None, typer.Option(help="Column or field holding a stable example id (default 'id'; generated when absent).")]
FreeTextOpt = Annotated[bool | None, typer.Option("--free-text", help="The task has open answers and no label set; "
                                                  "needed for data without a label column (then no quality is reported).")]
InstructionOpt = Annotated[str | None, typer.Option(help="Task instruction written before the examples in every prompt.")]
InstructionFileOpt = Annotated[Path | None, typer.Option(help="Plain-text file holding the task instruction.")]


def task_overrides(spec: str | None = None, *, labels: str | None = None, input_field: str | None = None,
                   label_field: str | None = None, id_field: str | None = None, free_text: bool | None = None,
                   instruction: str | None = None, instruction_file: Path | None = None, **more) -> dict:
    """The task block a command's options lay over its YAML config (None leaves the config's value)."""
    return {"spec": spec, "labels": labels, "input_field": input_field, "label_field": label_field,
            "id_field": id_field, "free_text": free_text or None, "instruction": instruction,
            "instruction_file": str(instruction_file) if instruction_file else None, **more}




def load_config(config: Path | None, model, overrides: dict, require: str, have: bool):
    """The command's config: the YAML file with the options laid over it, or the options alone."""
    from stillroom.config import deep_merge, load_yaml_config, validate_config

    if config:
        return load_yaml_config(config, model, overrides)
    if not have:
        raise typer.BadParameter(f"give {require} or a config file")
    return validate_config(model, deep_merge({}, overrides), source="command line")
