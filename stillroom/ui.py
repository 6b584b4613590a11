"""What the user sees in the terminal: the console, the progress bar of every long loop, the error guard of
every command, and the results table. Route CLIs import this module, never `stillroom.cli`."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from stillroom.errors import StillroomError

console = Console()


def progress_bar(transient: bool = False) -> Progress:
    """The progress bar every long loop in Stillroom uses."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
        console=console,
    )


def fail(exc: BaseException) -> None:
    """Print one clear error line and exit with status 2."""
    # soft_wrap: an error line is never broken at the terminal width (logs and tests read it whole).
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    raise typer.Exit(2)


def run_guarded(fn):
    """Run a command body: one clear message for user errors, a resumable stop on Ctrl-C."""
    try:
        return fn()
    except StillroomError as exc:
        fail(exc)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: every completed call is in the run's cache; rerun the same command to resume.")
        raise typer.Exit(130) from None


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_results(named_metrics: Mapping[str, Mapping]) -> None:
    """A short table of the main figures, one row per evaluated condition."""
    t = Table(title="results")
    for col in ("condition", "n", "accuracy", "macro-F1", "invalid", "latency p50 s"):
        t.add_column(col, justify="right")
    for name, m in named_metrics.items():
        t.add_row(name, str(m["n"]), _f(m.get("accuracy")), _f(m.get("macro_f1")), _f(m.get("invalid_rate")),
                  _f(m.get("latency_p50_s")))
    console.print(t)


def print_notes(notes, report_path=None) -> None:
    """The run's notes, then the path of its report."""
    for n in notes or ():
        console.print(f"[yellow]note:[/] {n}")
    if report_path is not None:
        console.print(f"report: [bold]{report_path}[/]")


class _LazyLog:
    """A text stream that creates its file on the first write: a block in which no library says anything
    leaves no empty log behind (and no folder created before the run has checked its config)."""

    _stillroom_log = True
    encoding = "utf-8"

    def __init__(self, path: Path):
        self.path = path
        self._f = None
        self.closed = False

    def write(self, text: str) -> int:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        return self._f.write(text)

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        import io

        raise io.UnsupportedOperation("the library log has no file descriptor")  # callers fall back, as for StringIO

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self.closed = True


_LIBRARY_LOGGERS = ("transformers", "datasets", "trl", "peft", "accelerate", "huggingface_hub", "sentence_transformers")


def _step_bar_callback(log):
    """A transformers `TrainerCallback` that shows training as one of our progress bars (steps done of the
    planned steps) and writes the trainer's log lines (loss, learning rate) to `log` instead of stdout."""
    from transformers import TrainerCallback

    class StepBar(TrainerCallback):
        def __init__(self, *args, **kwargs):
            self.bar = None
            self.job = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = progress_bar(transient=False)
                self.bar.start()
                self.job = self.bar.add_task("training (steps)", total=state.max_steps or None)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(self.job, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                log.write(f"trainer step {state.global_step}: {logs}\n")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return StepBar


@contextlib.contextmanager
def _trainer_bars(log) -> Iterator[None]:
    """While the block runs, every transformers/TRL `Trainer` built reports through `_step_bar_callback`: its
    default progress callback (a tqdm bar, then `tqdm.write` of every log dict) and its `PrinterCallback`
    (`print` of every log dict) both write to stdout, where our bars and tables go, and transformers has no
    switch for that; the trainer looks both names up in its module when it is built, so they are swapped
    there and put back after."""
    import transformers.trainer as tt

    saved = tt.DEFAULT_PROGRESS_CALLBACK, tt.PrinterCallback
    tt.DEFAULT_PROGRESS_CALLBACK = tt.PrinterCallback = _step_bar_callback(log)
    try:
        yield
    finally:
        tt.DEFAULT_PROGRESS_CALLBACK, tt.PrinterCallback = saved


@contextlib.contextmanager
def library_output_to(log_path: str | Path, *, training_bars: bool = False) -> Iterator[Path]:
    """Send what the libraries print (progress bars, warnings, transformers' log lines) to `log_path` while the
    block runs, so the terminal shows only Stillroom's own progress bars and results (on stdout).

    Python-level `sys.stderr` goes to the file (tqdm bars, `warnings`, anything printed there); the handlers of
    the `transformers`, `datasets`, `trl` and `peft` loggers are pointed at it too (they hold the stream they
    were created with), and transformers' and datasets' own bars are switched off. With `training_bars`, a
    trainer built inside shows one of our progress bars and logs its loss lines to the file. Re-entrant: a
    nested block keeps writing to the outer file. Restores everything on exit, also on an exception.
    """
    path = Path(log_path)
    saved_stderr = sys.stderr
    if getattr(saved_stderr, "_stillroom_log", False):  # already inside one: keep its file
        yield path
        return
    f = _LazyLog(path)
    handlers: list[tuple[logging.StreamHandler, object]] = []
    bars: list = []
    import warnings

    saved_showwarning = warnings.showwarning
    try:
        sys.stderr = f
        # warnings.showwarning writes to the sys.stderr it finds at call time, but a caller may have replaced it.
        warnings.showwarning = lambda msg, cat, fn, ln, file=None, line=None: f.write(
            warnings.formatwarning(msg, cat, fn, ln, line))
        for name in _LIBRARY_LOGGERS:
            for h in logging.getLogger(name).handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    handlers.append((h, h.stream))
                    _set_stream(h, f)
        bars = _library_bars_off()
        with _trainer_bars(f) if training_bars else contextlib.nullcontext():
            yield path
    finally:
        for h, stream in handlers:
            _set_stream(h, stream)
        # A library that set up its handler inside the block bound it to the log file: point it back.
        for name in _LIBRARY_LOGGERS:
            for h in logging.getLogger(name).handlers:
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is f:
                    _set_stream(h, saved_stderr)
        for restore in bars:
            restore()
        warnings.showwarning = saved_showwarning
        sys.stderr = saved_stderr
        f.close()


def _set_stream(handler: logging.StreamHandler, stream) -> None:
    """`handler.setStream(stream)`, also when its old stream is already closed (setStream flushes it first)."""
    try:
        handler.setStream(stream)
    except ValueError:
        handler.stream = stream


def _library_bars_off() -> list:
    """Turn off transformers' and datasets' progress bars; return the functions that turn them back on."""
    restore = []
    try:
        from transformers.utils import logging as tlog

        if tlog.is_progress_bar_enabled():
            tlog.disable_progress_bar()
            restore.append(tlog.enable_progress_bar)
    except ImportError:  # pragma: no cover
        pass
    try:
        from datasets.utils import logging as dlog

        if dlog.is_progress_bar_enabled():
            dlog.disable_progress_bar()
            restore.append(dlog.enable_progress_bar)
    except ImportError:  # pragma: no cover
        pass
    return restore
