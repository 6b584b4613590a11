"""The options the commands share (`stillroom.options.shared_options`): each command has all of its own, under
the same names, and the help of an option that sets a config field is that field's description."""

from __future__ import annotations

import re

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from stillroom.cli import app
from stillroom.config import SpendConfig, TaskConfig
from stillroom.options import NO_OPTIONS, Shared, shared_options

TASK = {"input_field", "label_field", "id_field", "instruction", "instruction_file"}
SPEND = {"max_cost", "max_spend_tokens"}
FIELDS = {**{name: TaskConfig.model_fields[name] for name in (*TASK, "free_text")},
          "max_cost": SpendConfig.model_fields["max_cost_usd"], "max_spend_tokens": SpendConfig.model_fields["max_tokens"]}
"""Shared options that set a config field: their help text is the field's description."""

EXPECTED = {
    "tasks show": TASK | {"labels", "free_text"},
    "eval": TASK | SPEND | {"labels", "free_text", "wait"},
    "pld": TASK | SPEND | {"labels", "wait"},
    "compare": TASK | {"labels", "wait"},
    "kd logits": TASK | SPEND | {"wait"},
    "kd hints": TASK | {"wait"},
    "kd data": TASK | SPEND | {"wait"},
    "gad": TASK | SPEND | {"wait"},
    "prune-heal": TASK | {"wait"},
    "selfdistill": TASK,
    "heal": TASK,
    "merge slerp": TASK,
    "demo": {"wait"},
}
SHARED = TASK | SPEND | {"labels", "free_text", "wait"}


def _commands(group=None, path=()):
    group = group or get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_command_has_its_shared_options_with_the_config_fields_descriptions(command):
    cmd = dict(_commands())[command]
    params = {p.name: p for p in cmd.params}
    for name in sorted(SHARED):
        if name not in EXPECTED[command]:
            assert name not in params, f"{command} has {_flag(name)}"
            continue
        assert name in params and _flag(name) in params[name].opts, f"{command} lost {_flag(name)}"
        if name in FIELDS:
            assert params[name].help == FIELDS[name].description, (command, name)
    out = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "2000"})
    assert out.exit_code == 0, out.output
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", out.output).split())
    for name in EXPECTED[command]:
        assert _flag(name) in text, f"{_flag(name)} missing from `stillroom {command} --help`"
        if name in FIELDS:
            assert " ".join(FIELDS[name].description.split()) in text, (command, name)


def test_every_command_with_a_shared_option_is_checked():
    # A new command that takes a task is listed above (and so checked), not given the options by hand.
    taking = {name for name, cmd in _commands() if {p.name for p in cmd.params} & SHARED}
    assert taking == set(EXPECTED)


def test_shared_options_reach_the_command_as_one_object_from_the_command_line_and_from_python():
    seen = []

    @shared_options(labels=True, spend=True)
    def cmd(spec: str = "t.jsonl", opts: Shared = NO_OPTIONS) -> None:
        seen.append(opts)

    small = typer.Typer()
    small.command()(cmd)
    small.command("other")(lambda: None)
    res = CliRunner().invoke(small, ["cmd", "--label-field", "category", "--labels", "a,b", "--max-cost", "0.5",
                                     "--wait"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == Shared(labels="a,b", label_field="category", max_cost=0.5, wait=True)
    assert seen[-1].spend() == {"max_cost_usd": 0.5, "max_tokens": None}
    task = seen[-1].task("x.csv", seed=3)
    assert task["spec"] == "x.csv" and task["label_field"] == "category" and task["labels"] == "a,b"
    assert task["seed"] == 3 and task["input_field"] is None and "max_cost" not in task
    assert seen[-1].task_given() == {"labels": "a,b", "label_field": "category"}
    refused = CliRunner().invoke(small, ["cmd", "--free-text"])  # not one of this command's options
    assert refused.exit_code == 2 and "--free-text" in refused.output
    cmd(spec="y.jsonl", instruction_file="i.txt")  # called from Python (as `stillroom demo` calls compare)
    assert seen[-1] == Shared(instruction_file="i.txt") and seen[-1].task()["instruction_file"] == "i.txt"
