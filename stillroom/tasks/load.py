"""`load_task`: one entry point for every task spec (files, local datasets, BIG-bench). It lives apart from
`loaders` because BIG-bench builds on the loaders' record handling: loaders ← bigbench ← load, no cycle."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stillroom.errors import TaskDataError
from stillroom.tasks.bigbench import load_bigbench
from stillroom.tasks.loaders import JSONL_SUFFIXES, _check_file, load_csv, load_hf, load_jsonl
from stillroom.tasks.task import Task, TaskKind


def load_task(
    spec: str,
    *,
    name: str | None = None,
    instruction: str | None = None,
    labels: Sequence[str] | None = None,
    input_field: str = "input",
    label_field: str = "label",
    id_field: str = "id",
    choices_field: str = "choices",
    kind: TaskKind | None = None,
    cache_dir: str | Path | None = None,
) -> Task:
    """Load a task from a spec: `file.jsonl`, `file.csv`, `bigbench:<task>[/<subtask>]` or `hf:<local path>`.

    `kind` is inferred when None: `multiple_choice` when examples carry differing `choices`, `classification`
    when a label set is given or derivable (shared choices, or few repeated labels), else `free_text`.
    `instruction` overrides BIG-bench's own. The field names do not apply to BIG-bench, whose format is fixed.
    Raises `TaskDataError` naming the file, line and field on bad data.
    """
    fields = dict(input_field=input_field, label_field=label_field, id_field=id_field, choices_field=choices_field)
    opts = dict(name=name, instruction=instruction, labels=labels, kind=kind)
    if spec.startswith("bigbench:"):
        return load_bigbench(spec.removeprefix("bigbench:"), cache_dir=cache_dir, **opts)
    if spec.startswith("hf:"):
        return load_hf(spec.removeprefix("hf:"), cache_dir=cache_dir, **fields, **opts)
    path = Path(spec).expanduser()
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return load_jsonl(path, **fields, **opts)
    if suffix == ".csv":
        return load_csv(path, **fields, **opts)
    raise TaskDataError(
        f"unsupported task file type '{path.suffix}': expected a .jsonl or .csv file, 'bigbench:<task>', "
        "or 'hf:<path>' for other formats (.json, .parquet, a saved dataset folder)",
        path=str(path),
    )


def load_texts_task(spec: str, **kwargs) -> Task:
    """A task read for its texts only (pruning calibration, speculative-decoding prompts): labelled data loads as
    usual, and data without a label column loads as free text instead of stopping (no gold label is needed)."""
    try:
        return load_task(spec, **kwargs)
    except TaskDataError as e:
        if kwargs.get("kind") is None and e.field == kwargs.get("label_field", "label") and "--free-text" in str(e):
            return load_task(spec, **{**kwargs, "kind": "free_text"})
        raise
