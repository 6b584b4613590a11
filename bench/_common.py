"""What every benchmark script shares: offline settings, the repo on sys.path, a timestamped log, and a
state file of finished stages so an interrupted benchmark resumes.

Imported as `from _common import ...` (Python puts the script's folder, bench/, on sys.path).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine_load() -> dict:
    """The machine's load when called (UTC time, 1/5/15-minute load averages, `uptime`'s line): a benchmark records
    it at its start and end, since its wall-clock figures on a shared machine mean little without it."""
    import datetime
    import subprocess

    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        line = None
    return {"utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "uptime": line, "cpus": os.cpu_count()}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StateFile:
    """Results of finished stages in a JSON file, written atomically after each one: a rerun skips them."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def _key(self, key: str) -> str:
        return key

    def get(self, key):
        return self.data.get(self._key(key))

    def put(self, key, value) -> None:
        from stillroom.runs import atomic_write_text

        self.data[self._key(key)] = value
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def student_folder(drop: str) -> Path:
    """The embedded Gemma-3 270M with the layers `drop` ('start:end') removed, the student of the KD benchmarks
    and the compare study (built once in the Stillroom cache)."""
    from stillroom.backends.embedded import ensure_embedded_gemma, is_converted
    from stillroom.prune.surgery import parse_block, prune_model_folder
    from stillroom.runs import cache_root

    start, end = parse_block(drop)
    out = cache_root() / "bench" / f"gemma-3-270m-drop{start}-{end}"
    if not is_converted(out):
        prune_model_folder(ensure_embedded_gemma(), start, end, out)
    return out
