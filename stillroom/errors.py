"""Errors Stillroom reports to users: one clear message naming the file, line or field at fault."""

from __future__ import annotations


class StillroomError(Exception):
    """Base class for errors that the CLI prints as a single clear message (no traceback)."""


class TaskDataError(StillroomError):
    """Bad task data: names the file, the line (1-based) and the field, and says what was expected."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = path, line, field
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class BackendError(StillroomError):
    """A model backend failed in a way retrying cannot fix (bad key, bad request, missing model)."""


class BadReply(BackendError):
    """A server's reply that is not what was asked for (not JSON, cut off, NaN or infinite log-probabilities, a
    wrong number of tokens or choices). Raised before anything of the reply is cached or scored. `transient`
    replies (cut off, not JSON: a proxy or a restarting server) are retried by the backend's retry loop; garbage
    inside well-formed JSON is not (the server would send it again)."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient
        self.reason = "a malformed reply" if transient else "a bad reply"


class SpendCapReached(StillroomError):
    """The run stopped before exceeding its spend cap. Everything done so far is cached: rerun to resume."""


class ConfigError(StillroomError):
    """A config file or command-line option is invalid."""


class RunFolderRefused(ConfigError):
    """A run folder Stillroom will not write into: not its own (a symlink, another program's files) or unwritable."""
