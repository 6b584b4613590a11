"""Where Stillroom keeps things: the runs root and the cache root. The one definition of both environment
variables for the whole package (it imports nothing of Stillroom's, so every module may import it)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def runs_root() -> Path:
    """Where run folders go: $STILLROOM_RUNS, else ./runs."""
    return Path(os.environ.get("STILLROOM_RUNS", "runs"))


def cache_root() -> Path:
    """Where downloads and converted models go: $STILLROOM_CACHE, else ~/.cache/stillroom."""
    env = os.environ.get("STILLROOM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stillroom"


def slug(text: str) -> str:
    """A filesystem-safe short name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:48] or "run"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see a partial file."""
    import tempfile

    path = Path(path)
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
