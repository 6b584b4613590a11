"""BIG-bench JSON tasks, read straight from the `bigbench` sdist kept in the Stillroom cache.

The `bigbench` sdist is not importable as a package, so it is fetched once with `pip download` into
`<cache>/downloads/` and only the requested `task.json` is pulled out of the archive, into
`<cache>/bigbench/<task>/task.json`. Opening and scanning the 358 MB archive takes seconds, so the list of
tasks is written once to `<cache>/bigbench/index.json` and later extractions stop scanning at their member.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from stillroom.errors import TaskDataError
from stillroom.tasks.loaders import _cache_root, task_from_records
from stillroom.tasks.task import Task, TaskKind

BIGBENCH_VERSION = "1.0.0"
_MEMBER = re.compile(r"^[^/]+/bigbench/benchmark_tasks/(?P<task>[^/]+(?:/[^/]+)?)/(?P<file>task\.json|task\.py)$")
# One folder, optionally one subtask folder; no `..` or absolute paths reach the file system.
_TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")
_INDEX_VERSION = 1


def list_bigbench_tasks(cache_dir: str | Path | None = None) -> list[str]:
    """Names of the BIG-bench JSON tasks (`task` or `task/subtask`), sorted; usable as `bigbench:<name>`.

    Downloads the BIG-bench sdist once if it is not cached, and scans it once to build the index.
    """
    return sorted(_index(_cache_root(cache_dir))["json"])


def load_bigbench(
    task: str,
    *,
    name: str | None = None,
    instruction: str | None = None,
    labels: Sequence[str] | None = None,
    kind: TaskKind | None = None,
    cache_dir: str | Path | None = None,
) -> Task:
    """Load a BIG-bench JSON task, e.g. `sports_understanding` or `bbq_lite_json/age_ambig`.

    `task_prefix` (else `description`) becomes the instruction unless `instruction` is given; the example
    prefixes become the prompt prefixes. Examples with `target_scores` become choices with the top-scored key
    as label (classification when every example has the same choices, else multiple choice); examples with
    only `target` become free text (the first target when it is a list). Ids are `<name>-<index>`.
    """
    task = task.strip().strip("/")
    if not _TASK_NAME.match(task):
        raise TaskDataError(
            f"invalid BIG-bench task name {task!r}: expected 'bigbench:<task>' or 'bigbench:<task>/<subtask>'"
        )
    cache = _cache_root(cache_dir)
    path = bigbench_task_json(task, cache_dir=cache)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskDataError(f"cached BIG-bench task is unreadable ({e}); delete it to extract it again",
                            path=str(path)) from None
    if not isinstance(data, dict):
        raise TaskDataError("expected a JSON object (a BIG-bench task.json)", path=str(path))
    if not data.get("examples"):
        subtasks = [t for t in _index(cache)["json"] if t.startswith(task + "/")]
        if subtasks:
            raise TaskDataError(
                f"BIG-bench task '{task}' has no examples of its own: it is split into subtasks; load one of "
                + ", ".join(f"bigbench:{s}" for s in sorted(subtasks)),
                path=str(path), field="examples",
            )
        raise TaskDataError(f"BIG-bench task '{task}' has no examples", path=str(path), field="examples")
    return task_from_bigbench(data, task, source=str(path), name=name, instruction=instruction,
                              labels=labels, kind=kind)


def task_from_bigbench(
    data: dict,
    task: str,
    *,
    source: str,
    name: str | None = None,
    instruction: str | None = None,
    labels: Sequence[str] | None = None,
    kind: TaskKind | None = None,
) -> Task:
    """Convert a parsed BIG-bench task.json into a Task (see `load_bigbench`)."""
    name = name or task.replace("/", "_")
    examples = data.get("examples") or []
    if not isinstance(examples, list):
        raise TaskDataError("expected 'examples' to be a list", path=source, field="examples")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise TaskDataError(f"example {i}: expected a JSON object", path=source, field="examples")
    # Multiple choice when every example is scored over options, unless the task is graded by generation
    # (e.g. arithmetic: `exact_str_match`, with distractors like "banana" in its target_scores).
    scored = all(isinstance(ex.get("target_scores"), dict) and ex["target_scores"] for ex in examples)
    generative = data.get("preferred_score", "multiple_choice_grade") != "multiple_choice_grade"
    use_scores = scored and not (generative and all("target" in ex for ex in examples))

    records = []
    for i, ex in enumerate(examples):
        rec = {k: v for k, v in ex.items() if k not in ("input", "target", "target_scores")}
        rec.update(id=f"{name}-{i}", input=ex.get("input"))
        if use_scores:
            scores = ex["target_scores"]
            try:
                values = [float(v) for v in scores.values()]
            except (TypeError, ValueError):
                raise TaskDataError(f"example {i}: expected numeric target_scores, got {scores!r}",
                                    path=source, field="target_scores") from None
            keys = list(scores)
            rec["choices"] = keys
            rec["label"] = keys[values.index(max(values))]  # first key on ties
        elif "target" in ex:
            target = ex["target"]
            if isinstance(target, list):
                target = target[0] if target else None
            rec["label"] = target
        else:
            raise TaskDataError(f"example {i}: expected 'target' or 'target_scores'", path=source, field="target")
        records.append((i, rec))

    prefixes = {}
    if isinstance(data.get("example_input_prefix"), str):
        # Stillroom's prompts already separate blocks with a blank line; BIG-bench's leading newline would
        # add a second one.
        prefixes["input_prefix"] = data["example_input_prefix"].lstrip("\n")
    if isinstance(data.get("example_output_prefix"), str):
        # continuations start with a space, so a trailing one would double it
        prefixes["answer_prefix"] = data["example_output_prefix"].rstrip(" ")
    if instruction is None:
        instruction = data.get("task_prefix") or data.get("description") or ""
    return task_from_records(
        records, name=name, source=f"bigbench:{task}", instruction=instruction, labels=labels,
        kind=kind if kind is not None else (None if use_scores else "free_text"), unit="example", **prefixes,
    )


def bigbench_task_json(task: str, cache_dir: str | Path | None = None) -> Path:
    """Path of the task's `task.json` in the cache, extracting it from the BIG-bench archive the first time."""
    cache = _cache_root(cache_dir)
    target = cache / "bigbench" / task / "task.json"
    if target.is_file():
        return target
    archive = bigbench_archive(cache)
    index = _read_index(cache, archive)
    if index is not None:
        _check_known(task, index, archive)
    data, scanned = _scan(archive, task, stop_early=index is not None)
    if scanned is not None:
        index = _write_index(cache, archive, scanned)
        _check_known(task, index, archive)
    if data is None:  # listed in the index but gone from the archive: the index is stale
        raise TaskDataError(f"BIG-bench task '{task}' is not in the archive; delete "
                            f"{cache / 'bigbench' / 'index.json'} and retry", path=str(archive))
    _atomic_write(target, data)
    return target


def bigbench_archive(cache_dir: str | Path | None = None) -> Path:
    """The BIG-bench sdist in `<cache>/downloads/`, downloaded with pip only when none is there yet."""
    downloads = _cache_root(cache_dir) / "downloads"
    exact = downloads / f"bigbench-{BIGBENCH_VERSION}.tar.gz"
    if exact.is_file():
        return exact
    found = sorted(downloads.glob("bigbench-*.tar.gz"))
    if found:
        return found[-1]
    return _download(downloads)


# --- helpers -------------------------------------------------------------------------------------------------


def _download(downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    # pip writes into a private temp folder; the archive is renamed into place only once complete
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"bigbench=={BIGBENCH_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("bigbench-*.tar.gz"))
        if proc.returncode != 0 or not got:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise TaskDataError(
                f"could not download the BIG-bench sdist with `{' '.join(cmd[2:])}`: {tail or 'no archive'}; "
                f"place bigbench-{BIGBENCH_VERSION}.tar.gz in this folder by hand",
                path=str(downloads),
            )
        final = downloads / got[-1].name
        os.replace(got[-1], final)
    return final


def _scan(archive: Path, task: str, stop_early: bool) -> tuple[bytes | None, dict | None]:
    """One pass over the archive: the task's task.json bytes, and (on a full pass) the index of tasks.

    `tarfile.getmember` would scan the whole archive too; walking it ourselves lets one pass both extract
    the member and list every task, and lets later calls stop at the member.
    """
    data: bytes | None = None
    json_tasks: list[str] = []
    programmatic: list[str] = []
    try:
        with tarfile.open(archive) as tf:
            for member in tf:
                m = _MEMBER.match(member.name)
                if not m or not member.isfile():
                    continue
                if m["file"] == "task.py":
                    programmatic.append(m["task"])
                    continue
                json_tasks.append(m["task"])
                if m["task"] == task:
                    f = tf.extractfile(member)
                    data = f.read() if f is not None else None
                    if stop_early:
                        return data, None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TaskDataError(f"cannot read the BIG-bench archive ({e}); delete it to download it again",
                            path=str(archive)) from None
    if stop_early:
        return data, None
    return data, {"json": json_tasks, "programmatic": sorted(set(programmatic) - set(json_tasks))}


def _check_known(task: str, index: dict, archive: Path) -> None:
    if task in index["json"]:
        return
    if task in index["programmatic"]:
        raise TaskDataError(f"BIG-bench task '{task}' is programmatic (task.py): only JSON tasks can be loaded",
                            path=str(archive))
    close = difflib.get_close_matches(task, index["json"], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `stillroom tasks bigbench` for the list"
    raise TaskDataError(f"unknown BIG-bench task '{task}'{hint}", path=str(archive))


def _index(cache: Path) -> dict:
    archive = bigbench_archive(cache)
    index = _read_index(cache, archive)
    if index is None:
        _, scanned = _scan(archive, "", stop_early=False)
        index = _write_index(cache, archive, scanned)
    return index


def _read_index(cache: Path, archive: Path) -> dict | None:
    path = cache / "bigbench" / "index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # an index made from another archive (or by an older Stillroom) is rebuilt rather than trusted
    if not isinstance(index, dict) or index.get("archive") != archive.name or index.get("version") != _INDEX_VERSION:
        return None
    return index


def _write_index(cache: Path, archive: Path, scanned: dict) -> dict:
    index = {"version": _INDEX_VERSION, "archive": archive.name, **scanned}
    _atomic_write(cache / "bigbench" / "index.json", json.dumps(index, indent=1).encode())
    return index


def _atomic_write(target: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers never see a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like any other download
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
