"""Tasks: examples with stable ids, a label space and deterministic splits, loaded from files or BIG-bench."""

from __future__ import annotations

from stillroom.tasks.bigbench import bigbench_task_json, list_bigbench_tasks, load_bigbench
from stillroom.tasks.load import load_task
from stillroom.tasks.loaders import load_csv, load_hf, load_jsonl, task_from_records
from stillroom.tasks.task import Example, Splits, Task, TaskKind, sample

__all__ = [
    "Example",
    "Splits",
    "Task",
    "TaskKind",
    "bigbench_task_json",
    "list_bigbench_tasks",
    "load_bigbench",
    "load_csv",
    "load_hf",
    "load_jsonl",
    "load_task",
    "sample",
    "task_from_records",
]
