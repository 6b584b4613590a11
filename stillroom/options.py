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




def load_config(config: Path | None, model, overrides: dict, require: str, have: bool):
    """The command's config: the YAML file with the options laid over it, or the options alone."""
    from stillroom.config import deep_merge, load_yaml_config, validate_config

    if config:
        return load_yaml_config(config, model, overrides)
    if not have:
        raise typer.BadParameter(f"give {require} or a config file")
    return validate_config(model, deep_merge({}, overrides), source="command line")
