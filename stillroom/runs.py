"""The run folder: one directory per run holding the resolved config (no secrets), the durable cache,
predictions, metrics, usage and the HTML report. Every file is written atomically, so an interrupted run
never leaves a half-written file behind, and rerunning the same command resumes in the same folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from stillroom.paths import atomic_write_text, cache_root, runs_root, slug

__all__ = ["MARKER", "RunFolder", "atomic_write_text", "cache_root", "claim_run_folder", "digest_of", "identity_of",
           "redact", "run_dir_for", "slug"]

MARKER = ".stillroom-run"
"""The file that makes a folder Stillroom's: written when Stillroom creates a run folder (or adopts an empty one)."""
LEGACY_SIGNS = (".lock", "cache.sqlite", "result.json", "route.json", "compare.json", "usage.json", "angular.json",
               "specdec.json", "selfdistill.json")
"""Run folders made before the marker existed are recognised by their layout: a `config.yaml` next to one of
these files (every earlier route wrote config.yaml and took `.lock` or wrote one of the others as it ran; the last
three are `prune analyze`, `specdec` and `selfdistill`). They get the marker on first use. A folder with only a
`config.yaml` and a `report.html` could be anybody's: refused."""

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)
REDACTED = "***"


def default_runs_root() -> Path:
    """Where run folders go: $STILLROOM_RUNS, else ./runs (see `stillroom.paths`)."""
    return runs_root()


def identity_of(config, leave_out: Iterable[str] = ()) -> dict:
    """The fields of a config that define the work: task and splits, teacher and student identities, method
    settings, seeds and sizes. The one identity function: it reads what each field declares about itself
    (`json_schema_extra`, see `stillroom.config.NOT_IDENTITY` and `EVALUATION_ONLY`): a field marked
    `identity: False` is never part of it (caps, timeouts, concurrency, retries, the key variable's name, prices,
    throughput knobs); a field marked `identity: "<scope>"` is left out when that scope is in `leave_out` (e.g.
    `("evaluation",)`: what shapes a trained student, not how it is evaluated). A plain dict is taken as is."""
    from pydantic import BaseModel

    drop = set(leave_out)

    def walk(obj):
        if isinstance(obj, BaseModel):
            out = {}
            for name, field in type(obj).model_fields.items():
                extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
                marker = extra.get("identity", True)
                if marker is False or (isinstance(marker, str) and marker in drop):
                    continue
                out[name] = walk(getattr(obj, name))
            return out
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [walk(v) for v in obj]
        if isinstance(obj, Path):
            return str(obj)
        return obj

    data = walk(config)
    return json.loads(json.dumps(data, default=str))


def digest_of(config, leave_out: Iterable[str] = ()) -> str:
    """A short hash of `identity_of(config, leave_out)`: the same work gives the same digest."""
    data = identity_of(config, leave_out)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_dir_for(command: str, config, root: Path | None = None) -> Path:
    """Deterministic run folder for a command and its config, named by what defines the work (never by caps,
    timeouts or concurrency): the same command resumes the same run, also with a higher spend cap."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    task = data.get("task", {}).get("spec", "") if isinstance(data.get("task"), dict) else ""
    return (root or default_runs_root()) / f"{command}-{slug(task)}-{digest_of(config)[:8]}"


def secret_values() -> list[str]:
    """Values of environment variables whose names look like secrets (never written anywhere)."""
    return [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6]


def redact(obj):
    """Replace any secret value (by environment variable name pattern) found in a config-like object."""
    secrets = secret_values()

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        if isinstance(x, str):
            for s in secrets:
                if s in x:
                    x = x.replace(s, REDACTED)
        return x

    return walk(obj)


def _holds(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} entries)" if len(names) > 6 else "")
    return shown


def claim_run_folder(path: str | Path) -> Path:
    """Make sure `path` is a run folder of Stillroom's before anything is written into it, and return it.

    A folder is Stillroom's when it carries `MARKER`, or has the layout of a run folder from an earlier version
    (`LEGACY_SIGNS`). A missing folder is created with the marker; an existing empty one gets it. Anything else
    is refused with `RunFolderRefused` naming the folder and what it holds, before anything is written: a
    symbolic link (whatever it points at), a file, a folder with other files. An unwritable folder is one clear
    error too, not a PermissionError traceback.
    """
    from stillroom.errors import RunFolderRefused

    folder = Path(path)
    if folder.is_symlink():
        raise RunFolderRefused(
            f"run folder {folder} is a symbolic link (to {os.readlink(folder)}): Stillroom writes only into folders "
            "it created, so it will not follow it. Pass the real folder, or a new --run-dir")
    if folder.exists() and not folder.is_dir():
        raise RunFolderRefused(f"run folder {folder} is a file, not a folder: choose another --run-dir")

    def unwritable(exc: OSError) -> RunFolderRefused:
        return RunFolderRefused(
            f"run folder {folder} cannot be written ({exc.strerror or exc}): choose a --run-dir you can write to, or "
            "fix its permissions")

    if folder.is_dir():
        if (folder / MARKER).is_file():
            if not os.access(folder, os.W_OK | os.X_OK):
                raise unwritable(PermissionError(13, "permission denied"))
            return folder
        try:
            names = {p.name for p in folder.iterdir()}
        except OSError as exc:
            raise unwritable(exc) from None
        legacy = "config.yaml" in names and any(n in names for n in LEGACY_SIGNS)
        if names and not legacy:
            raise RunFolderRefused(
                f"run folder {folder} is not a Stillroom run folder: it holds {_holds(folder)} and no {MARKER} file. "
                "Stillroom writes only into an empty folder or one it created, so nothing was written there. "
                "Choose a new or empty --run-dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text(json.dumps({"stillroom_run_folder": 1}) + "\n", encoding="utf-8")
    except OSError as exc:
        raise unwritable(exc) from None
    return folder


MODEL_DONE = ".stillroom-complete"
"""Written into every model folder Stillroom saves (`stillroom.backends.embedded.save_model_folder`)."""


def check_model_destination(path: str | Path) -> Path:
    """Refuse, before any work, a model destination (`--out` of prune apply, heal, merge) that saving would
    destroy: saving replaces the folder whole, so it must be new, empty, or a model folder Stillroom saved."""
    from stillroom.errors import RunFolderRefused

    dest = Path(path)
    if dest.is_symlink():
        raise RunFolderRefused(f"output folder {dest} is a symbolic link (to {os.readlink(dest)}): saving replaces the "
                               "folder whole, so Stillroom will not follow it. Pass a new --out")
    if dest.exists() and not dest.is_dir():
        raise RunFolderRefused(f"output folder {dest} is a file, not a folder: choose another --out")
    if dest.is_dir():
        names = {p.name for p in dest.iterdir()}
        if names and MODEL_DONE not in names and MARKER not in names:
            raise RunFolderRefused(
                f"output folder {dest} is not a model folder Stillroom saved: it holds {_holds(dest)}. Saving would "
                "replace it whole, so nothing was written. Choose a new or empty --out")
    return dest


class RunFolder:
    """A run's directory and the files in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def cache_path(self) -> Path:
        return self.path / "cache.sqlite"

    def file(self, name: str) -> Path:
        return self.path / name

    def save_config(self, config: dict) -> Path:
        """The resolved config, secrets redacted (configs hold only the *names* of key variables anyway)."""
        p = self.file("config.yaml")
        atomic_write_text(p, yaml.safe_dump(redact(config), sort_keys=False, allow_unicode=True))
        return p

    def write_json(self, name: str, obj) -> Path:
        p = self.file(name)
        atomic_write_text(p, json.dumps(redact(obj), indent=2, ensure_ascii=False, default=str) + "\n")
        return p

    def write_jsonl(self, name: str, rows: Iterable[dict]) -> Path:
        p = self.file(name)
        atomic_write_text(p, "".join(json.dumps(redact(r), ensure_ascii=False, default=str) + "\n" for r in rows))
        return p

    def write_text(self, name: str, text: str) -> Path:
        p = self.file(name)
        atomic_write_text(p, text)
        return p

    def read_json(self, name: str, default=None):
        p = self.file(name)
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else default
