"""Load a task from a JSONL or CSV file, a local Hugging Face dataset, or BIG-bench, validating every line.

Every source is turned into numbered records (plain dicts) and handed to `task_from_records`, so the same
validation and the same kind inference apply whatever the file format. Bad data raises one `TaskDataError`
naming the file, the line (1-based) and the field, and saying what was expected. Loaders only read: a
failed load leaves nothing behind.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stillroom.errors import TaskDataError
from stillroom.tasks.task import Example, Task, TaskKind

KINDS: tuple[str, ...] = ("classification", "multiple_choice", "free_text")
MAX_INFERRED_LABELS = 20
"""At most this many distinct labels (and each used twice on average) make an unlabelled-set task classification."""
DEFAULT_ANSWER_PATTERN = r".*answer\s*:\s*([^\n]+)"
"""Free text: the last `Answer: ...` line (what `render_chat(reason=True)` asks for); greedy `.*` skips earlier ones."""
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_LABEL_CHARS = 200
"""The longest label a classification task may have, in characters. The label set is sent with every request
(in the instruction, and scored as continuations), so one runaway label (a whole document pasted into the label
column) would be paid for on every call; real label names are a few words."""


def load_jsonl(
    path: str | Path,
    *,
    name: str | None = None,
    instruction: str | None = None,
    labels: Sequence[str] | None = None,
    input_field: str = "input",
    label_field: str = "label",
    id_field: str = "id",
    choices_field: str = "choices",
    kind: TaskKind | None = None,
) -> Task:
    """Load a task from a JSON Lines file: one JSON object per line; blank lines are skipped."""
    path = Path(path).expanduser()
    text = _read_utf8(path)
    records: list[tuple[int, dict]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(
                f"malformed JSON: {e.msg} (column {e.colno}); expected one JSON object per line",
                path=str(path), line=lineno,
            ) from None
        if not isinstance(obj, dict):
            raise TaskDataError(
                f"expected a JSON object like {{\"{input_field}\": ..., \"{label_field}\": ...}}, "
                f"got a JSON {_json_type(obj)}",
                path=str(path), line=lineno,
            )
        records.append((lineno, obj))
    return task_from_records(
        records, name=name or path.stem, source=str(path), instruction=instruction, labels=labels, kind=kind,
        input_field=input_field, label_field=label_field, id_field=id_field, choices_field=choices_field,
    )


def load_csv(
    path: str | Path,
    *,
    name: str | None = None,
    instruction: str | None = None,
    labels: Sequence[str] | None = None,
    input_field: str = "input",
    label_field: str = "label",
    id_field: str = "id",
    choices_field: str = "choices",
    kind: TaskKind | None = None,
) -> Task:
    """Load a task from a CSV file with a header row.

    Empty cells count as missing. A `choices` cell holds a JSON list (`["a", "b"]`) or `|`-separated options.
    """
    path = Path(path).expanduser()
    text = _read_utf8(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    records: list[tuple[int, dict]] = []
    prev_end = 0  # reader.line_num counts physical lines, so a quoted multi-line row starts at prev_end + 1
    try:
        for row in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [h.strip() for h in row]
                _check_header(header, path, start)
                header_line = start
                continue
            if len(row) != len(header):
                raise TaskDataError(
                    f"row has {len(row)} fields but the header (line {header_line}) has {len(header)}; "
                    "expected one value per column (quote values that contain commas)",
                    path=str(path), line=start,
                )
            records.append((start, {k: v for k, v in zip(header, row, strict=True)}))
    except csv.Error as e:
        # the error surfaces where parsing gave up; the culprit is usually an unclosed quote where the row began
        raise TaskDataError(
            f"malformed CSV: {e}; expected a well-formed row starting here (is a quote left unclosed?)",
            path=str(path), line=prev_end + 1,
        ) from None
    fields = _Fields(input_field, label_field, id_field, choices_field)
    if header is not None:
        check_columns(header, records, str(path), header_line, fields, kind)
    return task_from_records(
        records, name=name or path.stem, source=str(path), instruction=instruction, labels=labels, kind=kind,
        input_field=input_field, label_field=label_field, id_field=id_field, choices_field=choices_field,
    )


def load_hf(
    path: str | Path,
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
    """Load a task from a local Hugging Face dataset: a `save_to_disk` folder, a data folder or a data file.

    Never touches the hub. All splits are pooled (Stillroom makes its own deterministic splits); the original
    split goes into each example's `meta["hf_split"]`. A `ClassLabel` label column gives label names and,
    unless `labels` is given, the label set in the dataset's order. Errors name the row (1-based, over the
    pooled splits).
    """
    import datasets  # heavy import: only when this form is used

    path = Path(path).expanduser()
    if not path.exists():
        raise TaskDataError("does not exist: expected a saved dataset folder, a data folder or a data file",
                            path=str(path))
    hf_cache = str(_cache_root(cache_dir) / "datasets")
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(path))
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), cache_dir=hf_cache)
        else:
            builder = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv",
                       ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}.get(path.suffix.lower())
            if builder is None:
                raise TaskDataError(
                    f"unsupported data file type '{path.suffix}': expected .jsonl, .json, .csv, .parquet, .arrow "
                    "or .txt, or a dataset folder", path=str(path),
                )
            ds = datasets.load_dataset(builder, data_files=str(path), cache_dir=hf_cache)
    except TaskDataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs one clear message either way
        raise TaskDataError(f"the datasets library could not load it: {type(e).__name__}: {e}",
                            path=str(path)) from e

    parts = list(ds.items()) if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    records: list[tuple[int, dict]] = []
    class_names: tuple[str, ...] | None = None
    for split, part in parts:
        feature = part.features.get(label_field)
        names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        class_names = class_names or names
        for row in part:
            row = dict(row)
            if names is not None and isinstance(row.get(label_field), int):
                # ClassLabel stores indices; -1 means "no label"
                row[label_field] = names[row[label_field]] if row[label_field] >= 0 else None
            if len(parts) > 1:
                row.setdefault("hf_split", split)
            records.append((len(records) + 1, row))
    return task_from_records(
        records, name=name or path.stem, source=str(path), instruction=instruction,
        labels=labels if labels is not None or kind == "free_text" else class_names, kind=kind, unit="row",
        input_field=input_field, label_field=label_field, id_field=id_field, choices_field=choices_field,
    )


def task_from_records(
    records: Iterable[tuple[int, dict]],
    *,
    name: str,
    source: str,
    instruction: str | None = None,
    labels: Sequence[str] | None = None,
    kind: TaskKind | None = None,
    input_field: str = "input",
    label_field: str = "label",
    id_field: str = "id",
    choices_field: str = "choices",
    unit: str = "line",
    answer_pattern: str | None = DEFAULT_ANSWER_PATTERN,
    input_prefix: str | None = None,
    answer_prefix: str | None = None,
) -> Task:
    """Validate numbered records (`(location, dict)`) and build a Task; every loader ends here.

    `unit` names what the location counts ("line" fills `TaskDataError.line`; "row"/"example" go into the
    message). Missing ids become `<name>-<sha1(input)[:12]>`, stable when lines are reordered; two examples with
    the same input therefore collide and are reported as duplicates. Labels keep their order of first
    appearance. `answer_pattern` is only kept for free-text tasks.
    """
    if kind is not None and kind not in KINDS:
        raise TaskDataError(f"unknown task kind {kind!r}: expected one of {', '.join(KINDS)}", path=source)
    fields = _Fields(input_field, label_field, id_field, choices_field)
    records = list(records)
    present = list(dict.fromkeys(k for _, rec in records for k in rec))
    if records and (all(input_field not in rec for _, rec in records)
                    or (kind != "free_text" and all(label_field not in rec for _, rec in records))):
        check_columns(present, records, source, records[0][0] if unit == "line" else None, fields, kind, "field")
    rows = [_parse_record(loc, rec, fields, source, unit) for loc, rec in records]
    if not rows:
        raise TaskDataError(
            f"no examples: the data is empty or has only blank lines; expected at least one record with a "
            f"non-empty '{input_field}'",
            path=source,
        )

    if kind != "free_text" and rows and all(r.label is None for r in rows):
        raise _err(f"the '{label_field}' field has no value in any {unit}: expected the gold label of each example; "
                   "name another label column with --label-field (task.label_field in YAML), or pass --free-text "
                   "(task.free_text: true) for a task without gold labels", source, unit, rows[0].loc, label_field)

    label_set = _dedupe(str(x) for x in labels) if labels is not None else None
    if label_set is not None and not label_set:
        raise TaskDataError("the given label set is empty: expected at least one label", path=source)
    if kind == "free_text" and label_set:
        raise TaskDataError("labels were given but the kind is 'free_text': drop one of them", path=source)

    # A task is labelled when its kind needs gold answers, or (inferred kind) when any example has one:
    # then an unlabelled example is almost surely a mistake, so the first one is reported.
    labelled = kind in ("classification", "multiple_choice") or label_set is not None or (
        kind is None and any(r.label is not None for r in rows)
    )
    if labelled:
        for r in rows:
            if r.label is None:
                first = next((x for x in rows if x.label is not None), None)
                hint = f" (e.g. {unit} {first.loc} has one)" if first else ""
                raise _err(
                    f"missing label: expected field '{label_field}' with the gold answer{hint}; give every "
                    f"example a label (a task without gold labels is chosen with --free-text, task.free_text: true)",
                    source, unit, r.loc, label_field,
                )

    given_labels = label_set is not None
    label_set = _resolve_label_set(rows, label_set, kind, labelled)
    if label_set is not None and not given_labels and all(r.choices is None for r in rows):
        _check_label_collisions(rows, label_set, source, unit, label_field)
    if label_set is not None:
        # Choices equal to the task's label set carry no extra information: the task's labels are the options.
        for r in rows:
            if r.choices is not None and set(r.choices) == set(label_set):
                r.choices = None

    with_choices = [r for r in rows if r.choices is not None]
    if kind is None:
        kind = "multiple_choice" if with_choices else ("classification" if label_set else "free_text")
    if kind == "classification" and label_set:
        _check_label_lengths(rows, label_set, labels is not None, source, unit, label_field)
    if kind == "classification":
        if label_set is None:
            raise TaskDataError(
                "kind 'classification' needs a label set: pass labels or give every example a label", path=source,
            )
        if with_choices:
            r = with_choices[0]
            raise _err(
                f"choices {list(r.choices)} differ from the task's label set {list(label_set)}; expected the same "
                "options on every example for classification (use kind='multiple_choice' for per-example options)",
                source, unit, r.loc, choices_field,
            )
    if kind == "multiple_choice" and label_set is None:
        for r in rows:
            if r.choices is None:
                hint = f" like {unit} {with_choices[0].loc}" if with_choices else ""
                raise _err(
                    f"missing choices: expected field '{choices_field}' with this example's options{hint} "
                    "(or pass labels shared by all examples)",
                    source, unit, r.loc, choices_field,
                )

    if kind != "free_text":
        for r in rows:
            allowed = r.choices or label_set
            if allowed and r.label not in allowed:
                what = "this example's choices" if r.choices else "the allowed labels"
                raise _err(
                    f"label {r.label!r} is not one of {what}: {', '.join(repr(a) for a in allowed)}"
                    + _did_you_mean(r.label, allowed),
                    source, unit, r.loc, label_field,
                )

    seen: dict[str, _Row] = {}
    for r in rows:
        generated = r.id is None
        if generated:
            r.id = f"{name}-{hashlib.sha1(r.input.encode()).hexdigest()[:12]}"
        if r.id in seen:
            why = (
                f" (ids are generated from the input text when field '{id_field}' is missing, so these examples "
                f"have the same input; remove one or give them distinct '{id_field}' values)"
                if generated or seen[r.id].id_generated else "; expected unique ids"
            )
            raise _err(f"duplicate id {r.id!r}: {unit}s {seen[r.id].loc} and {r.loc} both have it{why}",
                       source, unit, r.loc, id_field)
        r.id_generated = generated
        seen[r.id] = r

    examples = [Example(id=r.id, input=r.input, label=r.label, choices=r.choices, meta=r.meta) for r in rows]
    extra = {}
    if input_prefix is not None:
        extra["input_prefix"] = input_prefix
    if answer_prefix is not None:
        extra["answer_prefix"] = answer_prefix
    return Task(
        name=name,
        instruction=instruction or "",
        kind=kind,
        examples=examples,
        labels=label_set if kind != "free_text" else None,
        answer_pattern=answer_pattern if kind == "free_text" else None,
        source=source,
        locations={r.id: (unit, r.loc) for r in rows},
        **extra,
    )


# --- helpers -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fields:
    input: str
    label: str
    id: str
    choices: str


@dataclass
class _Row:
    """A validated record before ids and kind are settled (mutable, unlike Example)."""

    loc: int
    input: str
    label: str | None
    id: str | None
    choices: tuple[str, ...] | None
    meta: dict
    id_generated: bool = False


def _err(message: str, source: str, unit: str, loc: int, field: str | None = None) -> TaskDataError:
    """A TaskDataError at a location: a line fills `.line`; other units are named in the message."""
    if unit == "line":
        return TaskDataError(message, path=source, line=loc, field=field)
    return TaskDataError(f"{unit} {loc}: {message}", path=source, field=field)


def _parse_record(loc: int, rec: dict, f: _Fields, source: str, unit: str) -> _Row:
    if f.input not in rec:
        keys = ", ".join(repr(k) for k in rec) or "none"
        raise _err(f"missing input: expected field '{f.input}' with the example's text (fields present: {keys})",
                   source, unit, loc, f.input)
    value = rec[f.input]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _err(f"expected the input to be a non-empty string, got {_json_type(value)}",
                   source, unit, loc, f.input)
    text = str(value)
    if not text.strip():
        raise _err("empty input: expected a non-empty string", source, unit, loc, f.input)
    label = _scalar(rec.get(f.label), "label", source, unit, loc, f.label)
    ident = _scalar(rec.get(f.id), "id", source, unit, loc, f.id)
    choices = _parse_choices(rec.get(f.choices), source, unit, loc, f.choices)
    meta = {k: v for k, v in rec.items() if k not in (f.input, f.label, f.id, f.choices)}
    return _Row(loc, text, label, ident, choices, meta)


def _scalar(value: Any, what: str, source: str, unit: str, loc: int, field: str) -> str | None:
    """A label or id as a string; None, "" (an empty CSV cell) and a missing field all mean "absent"."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"  # JSON spelling, not Python's
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return value if value.strip() else None
    raise _err(f"expected the {what} to be a string or number, got {_json_type(value)}", source, unit, loc, field)


def _parse_choices(value: Any, source: str, unit: str, loc: int, field: str) -> tuple[str, ...] | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        # CSV cells (and lenient JSONL): a JSON list, else `|`-separated options
        if value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise _err(f"choices look like a JSON list but do not parse: {e.msg}; expected e.g. "
                           '["yes", "no"] or yes|no', source, unit, loc, field) from None
        else:
            value = [c.strip() for c in value.split("|")]
    if not isinstance(value, list | tuple):
        raise _err(f"expected choices as a list of strings, got {_json_type(value)}", source, unit, loc, field)
    out = []
    for c in value:
        if isinstance(c, bool) or not isinstance(c, str | int | float) or not str(c).strip():
            raise _err(f"expected every choice to be a non-empty string, got {c!r}", source, unit, loc, field)
        out.append(str(c))
    if len(out) < 2:
        raise _err(f"expected at least 2 choices, got {len(out)}", source, unit, loc, field)
    dupes = sorted({c for c in out if out.count(c) > 1})
    if dupes:
        raise _err(f"duplicate choices {dupes}: expected distinct options", source, unit, loc, field)
    return tuple(out)


def _resolve_label_set(rows: list[_Row], given: tuple[str, ...] | None, kind: str | None,
                       labelled: bool) -> tuple[str, ...] | None:
    """The task's label set: given, else shared choices, else distinct labels when few and repeated."""
    if given is not None:
        return given
    if kind in ("free_text", "multiple_choice"):
        return None
    if kind == "classification" and any(r.choices is not None for r in rows):
        # the first example's options are the label set; examples whose options differ are reported after
        return next(r.choices for r in rows if r.choices is not None)
    if all(r.choices is not None for r in rows):
        first = set(rows[0].choices)
        if all(set(r.choices) == first for r in rows):
            return _dedupe(c for r in rows for c in r.choices)
        return None
    if any(r.choices is not None for r in rows) or not labelled:
        return None
    distinct = _dedupe(r.label for r in rows)
    # Few distinct labels alone would make every small free-text file "classification" (10 questions have at
    # most 10 answers), so classification also needs labels to repeat: on average twice each.
    if kind == "classification" or (len(distinct) <= MAX_INFERRED_LABELS and len(distinct) * 2 <= len(rows)):
        return distinct
    return None


def _check_label_collisions(rows: list[_Row], label_set: Sequence[str], source: str, unit: str, field: str) -> None:
    """An inferred label set with two labels that differ only in case or surrounding space ('Technical' and
    'technical ') is an error naming both and where each first appears: almost always one class written two
    ways, and scoring them as two classes would be silently wrong. Passing the label set explicitly (--labels)
    keeps them apart on purpose."""
    folded: dict[str, str] = {}
    for lab in label_set:
        key = lab.strip().casefold()
        if key in folded:
            first = {r.label: r.loc for r in reversed(rows) if r.label is not None}
            a, b = folded[key], lab
            raise _err(
                f"labels {a!r} ({unit} {first.get(a, '?')}) and {b!r} ({unit} {first.get(b, '?')}) differ only in "
                "case or surrounding space; write them the same way in the data, or pass the label set explicitly "
                "(--labels, task.labels) if they really are different classes",
                source, unit, first.get(b, rows[0].loc), field,
            )
        folded[key] = lab


def _check_label_lengths(rows: list[_Row], label_set: Sequence[str], given: bool, source: str, unit: str,
                         label_field: str) -> None:
    """Refuse a label of the label set longer than `MAX_LABEL_CHARS`, naming where it came from."""
    for lab in label_set:
        if len(lab) <= MAX_LABEL_CHARS:
            continue
        what = (f"label {lab[:30]!r}... is {len(lab):,} characters long: expected at most {MAX_LABEL_CHARS} "
                "(the label set is sent with every request; shorten the label names)")
        row = next((r for r in rows if r.label == lab or (r.choices and lab in r.choices)), None)
        if given or row is None:
            raise TaskDataError(f"the given {what}", path=source, field="labels")
        raise _err(what, source, unit, row.loc, label_field if row.label == lab else "choices")


def _dedupe(items: Iterable[Any]) -> tuple:
    """Distinct items in order of first appearance (stable label order)."""
    return tuple(dict.fromkeys(items))


def _did_you_mean(label: str | None, allowed: Sequence[str]) -> str:
    if label is None:
        return ""
    folded = {a.strip().casefold(): a for a in allowed}
    if label.strip().casefold() in folded:
        return f" (did you mean {folded[label.strip().casefold()]!r}? labels are case- and space-sensitive)"
    close = difflib.get_close_matches(label, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise TaskDataError("file does not exist: expected a .jsonl or .csv task file", path=str(path))
    if path.is_dir():
        raise TaskDataError("is a directory: expected a .jsonl or .csv task file (use 'hf:<folder>' for a "
                            "dataset folder)", path=str(path))
    if not path.is_file():
        # A device, a FIFO or a socket (also through a symlink: /dev/zero is endless, a FIFO may never end): read
        # nothing from it.
        target = f" (a link to {path.resolve()})" if path.is_symlink() else ""
        raise TaskDataError(f"is not a regular file{target}: expected a .jsonl or .csv task file", path=str(path))


def _read_utf8(path: Path) -> str:
    """The file's text with newlines normalised; a non-UTF-8 byte is reported by line and byte offset."""
    _check_file(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM (Excel writes one)
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise TaskDataError(
            f"not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start - line_start} of the line "
            f"(offset {e.start} in the file); expected UTF-8 text, re-save the file as UTF-8",
            path=str(path), line=line,
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _check_header(header: list[str], path: Path, line: int) -> None:
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise TaskDataError(f"duplicate column names {dupes} in the header: expected distinct names",
                            path=str(path), line=line)


def check_columns(columns: Sequence[str], records: Sequence[tuple[int, dict]], source: str, line: int | None,
                  fields: _Fields, kind: str | None, what: str = "column") -> None:
    """Stop at load when the input column, or (unless free text was chosen) the label column, is missing from
    every record: one error naming the columns there are, the options that name them (--input-field,
    --label-field, or --free-text), and a guess from the data (the longest text is the input; a column with few,
    repeated values is the label). A renamed label column therefore never turns a task into free text."""
    cols = list(columns)
    no_input = fields.input not in cols
    no_label = kind != "free_text" and fields.label not in cols
    if not (no_input or no_label):
        return
    guess_input, guess_label = _guess_fields(cols, [r for _, r in records], fields)
    missing, options, example = [], [], []
    if no_input:
        missing.append(f"no '{fields.input}' {what} (the example's text)")
        options.append("--input-field (task.input_field in YAML)")
        if guess_input:
            example.append(f"--input-field {guess_input}")
    if no_label:
        missing.append(f"no '{fields.label}' {what} (the gold label)")
        options.append("--label-field (task.label_field in YAML)")
        if guess_label:
            example.append(f"--label-field {guess_label}")
    hint = f", here probably {' '.join(example)}" if example else ""
    free = (", or pass --free-text (task.free_text: true) for a task without gold labels" if no_label else "")
    listed = ", ".join(cols) if cols else "none"
    raise TaskDataError(
        f"{' and '.join(missing)}: the {what}s are {listed}; name {'them' if len(missing) > 1 else 'it'} with "
        f"{' and '.join(options)}{hint}{free}",
        path=source, line=line, field=fields.input if no_input else fields.label,
    )


def _guess_fields(cols: list[str], rows: list[dict], fields: _Fields) -> tuple[str | None, str | None]:
    """(input, label) guessed from the values: the input is the column with the longest text on average; the
    label the column with the fewest distinct values, when they repeat (an id column's values never do)."""
    known = {fields.input, fields.label, fields.id, fields.choices}
    cand = [c for c in cols if c not in known or c in (fields.input, fields.label)]

    def values(c):
        return [str(r[c]) for r in rows if isinstance(r.get(c), str | int | float) and str(r[c]).strip()]

    stats = {c: values(c) for c in cand}
    stats = {c: v for c, v in stats.items() if v}
    text = fields.input if fields.input in stats else max(
        (c for c in stats if c != fields.label), key=lambda c: sum(map(len, stats[c])) / len(stats[c]), default=None)
    repeated = [c for c, v in stats.items() if c != text and len(set(v)) <= MAX_INFERRED_LABELS
                and len(set(v)) * 2 <= len(v)]
    label = fields.label if fields.label in stats else min(repeated, key=lambda c: len(set(stats[c])), default=None)
    return text, label


def _cache_root(cache_dir: str | Path | None) -> Path:
    from stillroom.paths import cache_root  # one definition of $STILLROOM_CACHE for the whole package

    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
