"""Library output (progress bars, warnings, transformers' log lines) goes to the run folder's log file, never to
the terminal, while Stillroom's own output stays on stdout."""

from __future__ import annotations

import logging
import warnings

from stillroom.ui import library_output_to


def test_library_bars_and_warnings_go_to_the_log(tmp_path, capsys):
    from tqdm.auto import tqdm
    from transformers.utils import logging as tlog

    log = tmp_path / "run" / "library.log"
    with library_output_to(log):
        for _ in tqdm(range(3), desc="Converting and de-quantizing"):
            pass
        warnings.warn("gradient_checkpointing is deprecated", FutureWarning, stacklevel=1)
        tlog.get_logger("transformers.test").warning("Loading weights: a library line")
        print("stillroom result line")
    out, err = capsys.readouterr()
    text = log.read_text()
    assert "Converting and de-quantizing" in text and "FutureWarning" in text and "a library line" in text
    assert "stillroom result line" in out
    assert "Converting" not in err + out and "FutureWarning" not in err + out and "library line" not in err + out
    # Restored after the block: a warning now reaches the terminal again.
    tlog.get_logger("transformers.test").warning("after the block")
    assert "after the block" not in log.read_text()


def test_no_log_file_when_libraries_say_nothing(tmp_path):
    log = tmp_path / "run" / "library.log"
    with library_output_to(log):
        pass
    assert not log.exists() and not log.parent.exists()


def test_nested_blocks_keep_the_outer_file(tmp_path):
    outer, inner = tmp_path / "a.log", tmp_path / "b.log"
    with library_output_to(outer), library_output_to(inner):
        logging.getLogger("transformers").warning("inner line")
        warnings.warn("inner warning", UserWarning, stacklevel=1)
    assert "inner warning" in outer.read_text() and not inner.exists()
