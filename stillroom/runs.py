"""The run folder: one directory per run holding the resolved config (no secrets), the durable cache,
predictions, metrics, usage and the HTML report. Every file is written atomically, so an interrupted run
never leaves a half-written file behind, and rerunning the same command resumes in the same folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import yaml

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)
REDACTED = "***"


def default_runs_root() -> Path:
    """Where run folders go: $STILLROOM_RUNS, else ./runs."""
    return Path(os.environ.get("STILLROOM_RUNS", "runs"))


def cache_root() -> Path:
    """Where downloads and converted models go: $STILLROOM_CACHE, else ~/.cache/stillroom."""
    return Path(os.environ.get("STILLROOM_CACHE", Path.home() / ".cache" / "stillroom")).expanduser()


def slug(text: str) -> str:
    """A filesystem-safe short name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:48] or "run"


def run_dir_for(command: str, config: dict, root: Path | None = None) -> Path:
    """Deterministic run folder for a command and its resolved config: the same command resumes the same run."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    task = config.get("task", {}).get("spec", "") if isinstance(config.get("task"), dict) else ""
    return (root or default_runs_root()) / f"{command}-{slug(task)}-{digest}"


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def start_run(cfg, run_dir: str | Path):
    """The common start of a route: load the task, take the run folder (one process at a time,
    `stillroom.locking`), save the (redacted) config and split the task.

    `cfg` is any route config with a `task: TaskConfig` field. Returns (run, config_dict, task, splits).
    """
    from stillroom.locking import hold_run_folder
    from stillroom.tasks import load_task

    # The task is loaded first, so a bad task leaves no run folder behind.
    task = load_task(cfg.task.spec, instruction=cfg.task.instruction, labels=cfg.task.labels)
    hold_run_folder(run_dir)
    run = RunFolder(run_dir)
    config_dict = cfg.model_dump(mode="json")
    run.save_config(config_dict)
    splits = task.splits(seed=cfg.task.seed, val_fraction=cfg.task.val_fraction, test_fraction=cfg.task.test_fraction)
    return run, config_dict, task, splits
