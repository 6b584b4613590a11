"""One process per run folder.

Two processes writing one run folder would each pay for every call the other has not cached yet, and the
later one's metrics would overwrite the earlier one's. `run_folder_lock` holds an OS file lock (`filelock`,
released by the kernel when the process dies, even by `kill -9`) on `<run folder>/.lock` for as long as a
route writes the folder. A second process gets a `RunFolderBusy` naming the folder and the holder's PID, or,
with `wait=True`, waits its turn and then finds every call the first one made in the cache.

Within one process the lock is re-entrant (a route that calls another on the same folder does not block
itself).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from stillroom.errors import StillroomError

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"
"""Holds the holder's PID: a separate file, because taking the lock may truncate the lock file itself."""

_held: dict[Path, list] = {}  # resolved folder -> [FileLock, depth]
_wait_default = [False]


def wait_for_holders(wait: bool) -> None:
    """Whether this process queues behind another process holding a run folder whenever a caller does not say
    (`wait=None`). Each command's `--wait` sets it once, so the folders a command opens through its routes (a
    compare's route folders, a route's `open_run`) wait too, without every layer passing the flag down."""
    _wait_default[0] = bool(wait)
_held_lock = threading.Lock()


class RunFolderBusy(StillroomError):
    """Another process holds the run folder."""


def lock_holder(path: str | Path) -> int | None:
    """PID of the process holding the run folder's lock, as it recorded it (None when unknown)."""
    try:
        return int((Path(path) / OWNER_NAME).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def _secondary_rank() -> bool:
    """Whether this process is a non-main rank of a multi-process launch (torchrun / accelerate set RANK)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


@contextlib.contextmanager
def run_folder_lock(path: str | Path, wait: bool | None = None) -> Iterator[Path]:
    """Hold the run folder `path` (created if missing, refused if not Stillroom's: `claim_run_folder`) for this
    process.

    Raises `RunFolderBusy` (naming the folder and the holder's PID) when another process holds it, unless
    `wait` (None: what `wait_for_holders` set, else False), in which case it waits until that process is done.
    """
    wait = _wait_default[0] if wait is None else wait
    from stillroom.runs import claim_run_folder

    folder = claim_run_folder(path)  # refuses a folder that is not Stillroom's before anything is written
    if _secondary_rank():
        # The other processes of one `accelerate launch` / torchrun job share the run with its main process,
        # which holds the lock (and makes every teacher call); they must not be refused as a second run.
        yield folder
        return
    key = folder.resolve()
    with _held_lock:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield folder
        finally:
            with _held_lock:
                entry[1] -= 1
        return
    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except PermissionError as exc:
        from stillroom.errors import RunFolderRefused

        raise RunFolderRefused(f"run folder {folder} cannot be written ({exc.strerror}): choose a --run-dir you can "
                               "write to, or fix its permissions") from None
    except Timeout:
        if not wait:
            pid = lock_holder(folder)
            who = f"process {pid}" if pid else "another process"
            raise RunFolderBusy(
                f"run folder {folder} is in use by {who}: two processes on one folder would pay for the same calls "
                "twice. Wait for it to finish, pass --wait to queue behind it, or choose another --run-dir."
            ) from None
        from stillroom.backends.base import notify

        pid = lock_holder(folder)
        notify(f"run folder {folder} is in use by {'process ' + str(pid) if pid else 'another process'}; waiting")
        lock.acquire()
    try:
        (folder / OWNER_NAME).write_text(f"{os.getpid()}\n", encoding="utf-8")
        with _held_lock:
            _held[key] = entry = [lock, 1]
        try:
            yield folder
        finally:
            with _held_lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del _held[key]
    finally:
        if lock_holder(folder) == os.getpid():
            with contextlib.suppress(OSError):
                (folder / OWNER_NAME).unlink()
        lock.release()


_kept = contextlib.ExitStack()


def hold_run_folder(path: str | Path, wait: bool | None = None) -> Path:
    """Take the run folder's lock for the rest of this process (routes that open a folder and write it until
    they exit; the OS releases the lock when the process ends). A folder this process already holds is left
    to the scope that holds it."""
    folder = Path(path)
    with _held_lock:
        if folder.exists() and folder.resolve() in _held:
            return folder
    return _kept.enter_context(run_folder_lock(path, wait=wait))
