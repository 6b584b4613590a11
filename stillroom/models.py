"""One home for the model helpers every route uses: resolve a white-box spec to a local folder, load a causal
LM and its tokenizer, build a LoRA config, check bf16, free memory, and measure what a deployment serves
(parameter count, size on disk)."""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any

from stillroom.config import lora_config  # noqa: F401  (re-exported: the one builder lives in config)
from stillroom.errors import ConfigError

EMBEDDED_SPECS = ("gemma3-270m", "embedded", "qwen2.5-coder-0.5b")
"""Specs of the bundled models (`stillroom.backends.embedded.EMBEDDED`)."""


def resolve_model_path(spec: str) -> Path:
    """A local transformers folder for a white-box model spec: 'gemma3-270m' or 'qwen2.5-coder-0.5b' (the
    embedded models, converted on first use), 'hf:PATH', a plain folder, or 'gguf:FILE' (converted once, `gguf_model_folder`). API and scripted
    specs are refused with the reason."""
    if spec in EMBEDDED_SPECS:
        from stillroom.backends.embedded import ensure_embedded

        return Path(ensure_embedded(spec))
    kind, _, rest = spec.partition(":")
    if kind == "gguf" and rest:
        return gguf_model_folder(rest)
    if kind in ("openai", "scripted", "gguf"):
        raise ConfigError(
            f"{spec!r}: this route needs the model's weights as a local transformers folder; an API or scripted "
            "model can only be distilled through text (`stillroom kd data`, `stillroom gad`)"
        )
    path = Path(rest if kind == "hf" and rest else spec).expanduser()
    if not (path / "config.json").exists():
        raise ConfigError(f"{spec!r}: no transformers model folder at {path} (config.json missing)")
    return path


def gguf_model_folder(file: str | Path) -> Path:
    """A transformers folder converted once from a GGUF file (dequantised to float32 by transformers), kept in the
    Stillroom cache under a name derived from the file's path, size and mtime: white-box routes (logit KD's
    teacher, pruning) then load it like any local model. Raises `ConfigError` naming a missing file."""
    from stillroom.backends.embedded import is_converted, save_model_folder
    from stillroom.paths import cache_root

    f = Path(file).expanduser()
    if not f.is_file():
        raise ConfigError(f"'gguf:{file}': no GGUF file at {f}")
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    folder = cache_root() / "models" / "gguf" / f"{f.stem}-{key}"
    if is_converted(folder):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    model = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32)
    return save_model_folder(model, tok, folder)  # atomic: a crash leaves no half-written folder


def why_not_trainable(spec: str) -> str | None:
    """Why the weights a spec names cannot be trained here as a transformers model (None when they can): API and
    scripted models have no weights here; a GGUF file is served by llama.cpp, and a route that trains refuses it
    when it is planned rather than failing inside. (A GGUF *teacher* does give logits: `resolve_model_path`
    converts it once, `gguf_model_folder`, and logit KD reads it like any local model.)"""
    kind = spec.partition(":")[0]
    if kind in ("openai", "scripted"):
        return "is an API model: it cannot be trained"
    if kind == "gguf":
        return ("is a GGUF file: llama.cpp serves it, but it cannot be trained here; give its transformers folder "
                "(hf:PATH) instead")
    return None


def is_white_box(spec: str) -> bool:
    """Whether a spec names weights this process can load and train as a transformers model."""
    return why_not_trainable(spec) is None


def model_fingerprint(path: Path) -> str:
    """Path plus size and mtime of the weight files: a changed checkpoint gets a new teacher cache."""
    parts = [str(Path(path).resolve())]
    for f in sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16] + ":" + Path(path).name


def load_causal_lm(path: str | Path, *, dtype: str = "auto", device: str = "auto"):
    """Load a local causal LM on `device` ('auto': CUDA, else MPS, else CPU; dtype 'auto': float32 on CPU)."""
    from transformers import AutoModelForCausalLM

    from stillroom.backends.hf import resolve_device, resolve_dtype

    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise ConfigError(f"{p}: not a transformers model folder (no config.json)")
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=resolve_dtype(dtype, dev))
    return model.to(dev)


def load_tokenizer(path: str | Path):
    """The tokenizer of a local model folder, with a pad token (EOS, else UNK, when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model_and_tokenizer(path: str | Path, *, dtype: str = "auto", device: str = "auto"):
    """`load_causal_lm` and `load_tokenizer` of one folder."""
    return load_causal_lm(path, dtype=dtype, device=device), load_tokenizer(path)


def bf16_supported(dtype: str = "auto") -> bool:
    """Whether training should run in bfloat16 mixed precision: on CUDA devices that support it, when the
    requested dtype allows it; never on CPU."""
    import torch

    return bool(dtype in ("auto", "bfloat16", "bf16") and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def release_memory() -> None:
    """Return freed model memory (call after dropping the last reference to a model)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merged(model: Any) -> Any:
    """A plain transformers model: LoRA adapters merged in, a KD hint projector removed."""
    if hasattr(model, "kd_projector"):
        del model.kd_projector
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


def parameter_count(model: Any) -> int:
    """Parameters of an in-memory model (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return int(n)


def size_on_disk(folder: str | Path | None) -> int | None:
    """Bytes of a model folder's weight files (safetensors, bin, gguf); None when there is no local folder."""
    if folder is None:
        return None
    p = Path(folder)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    files = [f for pat in ("*.safetensors", "*.bin", "*.gguf") for f in p.glob(pat)]
    return int(sum(f.stat().st_size for f in files)) if files else None


def save_model(model: Any, tokenizer: Any, out_dir: str | Path, record: dict | None = None) -> Path:
    """Save model + tokenizer atomically (temporary folder, then rename), plus `stillroom.json` with `record`."""
    from stillroom.backends.embedded import save_model_folder

    out = save_model_folder(model, tokenizer, Path(out_dir))
    if record is not None:
        from stillroom.runs import atomic_write_text

        atomic_write_text(out / "stillroom.json", json.dumps(record, indent=2) + "\n")
    return out
