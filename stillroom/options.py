"""Options shared by the route commands: every command takes its YAML config as an optional first argument
(command-line options override it) and `--run-dir`; every command that takes a task has the task's column and
instruction options (`shared_options`), their help text the TaskConfig field's description; every command that
pays for calls has the spend caps, their help text the SpendConfig field's."""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from stillroom.config import SpendConfig, TaskConfig

TaskOpt = Annotated[str | None, typer.Option("--task", "-t", help="A .jsonl/.csv file, 'bigbench:NAME' or 'hf:LOCAL_DATASET'.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Model spec (default: the embedded gemma3-270m).")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="Base URL of an OpenAI-compatible server (vLLM, Ollama, llama.cpp, OpenAI).")]
KeyEnvOpt = Annotated[str | None, typer.Option(help="NAME of the environment variable holding the API key (never the key).")]
RunDirOpt = Annotated[Path | None, typer.Option(help="Run folder (default: runs/<command>-<task>-<config hash>; rerun resumes).")]
ConfigArg = Annotated[Path | None, typer.Argument(help="Optional YAML config (every field of the command's config); options override it.")]
LabelsOpt = Annotated[str | None, typer.Option(help="Comma-separated label set, e.g. 'yes,no' (inferred when omitted).")]
TrainLimitOpt = Annotated[int | None, typer.Option(help="Train on a deterministic sample of N training examples.")]
EvalLimitOpt = Annotated[int | None, typer.Option(help="Evaluate on a deterministic sample of N examples.")]
LoraOpt = Annotated[bool | None, typer.Option("--lora/--full", help="LoRA adapters on the student (default) or full fine-tuning.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="If another process holds the run folder, wait for it instead of failing.")]


def field_option(model: type[BaseModel], name: str, *param_decls: str) -> typer.models.OptionInfo:
    """A command-line option for a config field, its help text the field's description (one text for the YAML
    field and the option)."""
    return typer.Option(*param_decls, help=model.model_fields[name].description)


# The task's columns, kind and instruction: the same options on every command that takes a task (the same fields
# in the task block of its YAML config), declared once here and given to a command by `shared_options`.
InputFieldOpt = Annotated[str | None, field_option(TaskConfig, "input_field")]
LabelFieldOpt = Annotated[str | None, field_option(TaskConfig, "label_field")]
IdFieldOpt = Annotated[str | None, field_option(TaskConfig, "id_field")]
FreeTextOpt = Annotated[bool | None, field_option(TaskConfig, "free_text", "--free-text")]
InstructionOpt = Annotated[str | None, field_option(TaskConfig, "instruction")]
InstructionFileOpt = Annotated[Path | None, field_option(TaskConfig, "instruction_file")]
MaxCostOpt = Annotated[float | None, field_option(SpendConfig, "max_cost_usd", "--max-cost")]
MaxSpendTokensOpt = Annotated[int | None, field_option(SpendConfig, "max_tokens", "--max-spend-tokens")]

SHARED_OPTIONS = {"labels": LabelsOpt, "input_field": InputFieldOpt, "label_field": LabelFieldOpt, "id_field": IdFieldOpt,
                  "free_text": FreeTextOpt, "instruction": InstructionOpt, "instruction_file": InstructionFileOpt,
                  "max_cost": MaxCostOpt, "max_spend_tokens": MaxSpendTokensOpt, "wait": WaitOpt}
"""Parameter name → option of everything `shared_options` adds, in their --help order (defaults: `Shared`'s)."""


def task_overrides(spec: str | None = None, *, labels: str | None = None, input_field: str | None = None,
                   label_field: str | None = None, id_field: str | None = None, free_text: bool | None = None,
                   instruction: str | None = None, instruction_file: Path | None = None, **more) -> dict:
    """The task block a command's options lay over its YAML config (None leaves the config's value)."""
    return {"spec": spec, "labels": labels, "input_field": input_field, "label_field": label_field,
            "id_field": id_field, "free_text": free_text or None, "instruction": instruction,
            "instruction_file": str(instruction_file) if instruction_file else None, **more}


@dataclass(frozen=True)
class Shared:
    """The shared options a command was given (`shared_options`); those it does not take stay None."""

    labels: str | None = None
    input_field: str | None = None
    label_field: str | None = None
    id_field: str | None = None
    free_text: bool | None = None
    instruction: str | None = None
    instruction_file: Path | None = None
    max_cost: float | None = None
    max_spend_tokens: int | None = None
    wait: bool = False

    def task(self, spec: str | None = None, **more) -> dict:
        """The task block these options lay over the command's YAML config (`task_overrides`)."""
        task = {k: v for k, v in asdict(self).items() if k not in ("max_cost", "max_spend_tokens", "wait")}
        return task_overrides(spec, **task, **more)

    def spend(self) -> dict:
        """The spend block these options lay over the command's YAML config (SpendConfig)."""
        return {"max_cost_usd": self.max_cost, "max_tokens": self.max_spend_tokens}

    def task_given(self) -> dict:
        """Only the task fields given on the command line (TaskConfig values)."""
        return {k: v for k, v in self.task().items() if v is not None}


NO_OPTIONS = Shared()


def shared_options(*, labels: bool = False, free_text: bool = False, spend: bool = False, wait: bool = True):
    """Give a command the task's column and instruction options (`--input-field`, `--label-field`, `--id-field`,
    `--instruction`, `--instruction-file`), and `--labels`, `--free-text`, the spend caps (`--max-cost`,
    `--max-spend-tokens`) and `--wait` where asked, after its own options. The command declares a last parameter `opts: Shared = NO_OPTIONS` and reads them there; called from
    Python, it takes them as keyword arguments like any other option (missing ones at their defaults)."""
    skip = {"labels": not labels, "free_text": not free_text, "max_cost": not spend, "max_spend_tokens": not spend,
            "wait": not wait}
    names = [n for n in SHARED_OPTIONS if not skip.get(n)]

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "opts"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=getattr(NO_OPTIONS, n),
                                   annotation=SHARED_OPTIONS[n]) for n in names]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            given = {n: kwargs.pop(n) for n in names if n in kwargs}
            return fn(*args, opts=Shared(**given), **kwargs)

        command.__signature__ = inspect.Signature(own + added, return_annotation=None)
        command.__annotations__ = {p.name: p.annotation for p in own + added} | {"return": None}
        return command

    return decorate


def load_config(config: Path | None, model, overrides: dict, require: str, have: bool):
    """The command's config: the YAML file with the options laid over it, or the options alone."""
    from stillroom.config import deep_merge, load_yaml_config, validate_config

    if config:
        return load_yaml_config(config, model, overrides)
    if not have:
        raise typer.BadParameter(f"give {require} or a config file")
    return validate_config(model, deep_merge({}, overrides), source="command line")
