"""Layer surgery: remove a contiguous block of decoder layers and leave a model that saves, reloads with plain
`AutoModelForCausalLM.from_pretrained`, and generates.

Index convention (see `stillroom.prune.angular`): 0-based, end exclusive; `drop 2:4` removes layers 2 and 3.

What has to change besides the `ModuleList`:

* every per-layer index inside the kept layers (`layer_idx` on the attention module, and on the layer itself in
  some families): the KV cache is addressed by it, so after removing layers 2..3 the old layer 4 must write
  cache slot 2;
* every per-layer list in the config, above all `layer_types` (Gemma-3's sliding/global pattern, Qwen2/Mistral
  sliding windows): a list as long as the old layer count is sliced the same way as the layers, so each kept
  layer keeps its own attention type; Qwen2's `max_window_layers` (a count of leading layers) is recounted;
* `num_hidden_layers`; and for the record `stillroom_removed_layers` (indices in the *original* model, cumulative
  over repeated pruning), `stillroom_original_num_hidden_layers` and `stillroom_kept_layers`.

Pattern fields such as Gemma-3's `_sliding_window_pattern` are only used to build `layer_types` when it is
missing; since the sliced `layer_types` is saved explicitly, they are left as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stillroom.errors import ConfigError
from stillroom.models import save_model  # noqa: F401  (re-exported; it lives below train/, which uses it too)
from stillroom.prune.angular import _text_config, decoder_layers

# Config lists that may happen to be as long as the layer count without being per-layer.
_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "eos_token_id"}


def parse_block(text: str) -> tuple[int, int]:
    """'START:END' (0-based, end exclusive) -> (start, end)."""
    try:
        a, b = text.split(":")
        start, end = int(a), int(b)
    except ValueError:
        raise ConfigError(f"--drop {text!r}: expected START:END, e.g. 10:14 (0-based, end exclusive)") from None
    if start < 0 or end <= start:
        raise ConfigError(f"--drop {text!r}: need 0 <= START < END (end exclusive)")
    return start, end


def drop_layers(model: Any, start: int, end: int) -> list[int]:
    """Remove decoder layers `start .. end-1` from `model` in place; returns the removed layers' original indices.

    Renumbers per-layer indices and slices per-layer config lists (see the module docstring). At least one layer
    must remain.
    """
    import torch.nn as nn

    layers = decoder_layers(model)
    cfg = _text_config(model)
    L = len(layers)
    if not (0 <= start < end <= L):
        raise ConfigError(f"cannot drop {start}:{end} from a model with {L} layers (0-based, end exclusive)")
    if end - start >= L:
        raise ConfigError(f"dropping {start}:{end} would remove all {L} layers")
    keep = [i for i in range(L) if not (start <= i < end)]
    kept_modules = [layers[i] for i in keep]
    # Rebuild the list in place (same ModuleList object, so every reference to it stays valid).
    for i in reversed(range(L)):
        del layers[i]
    for m in kept_modules:
        layers.append(m)
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    original = list(getattr(cfg, "stillroom_kept_layers", None) or range(L))
    removed_now = [original[i] for i in range(start, end)]
    _slice_config(cfg, keep, L)
    if cfg is not model.config and getattr(model.config, "num_hidden_layers", None) == L:
        _slice_config(model.config, keep, L)
    cfg.stillroom_original_num_hidden_layers = int(getattr(cfg, "stillroom_original_num_hidden_layers", None) or L)
    cfg.stillroom_removed_layers = sorted(set(getattr(cfg, "stillroom_removed_layers", None) or []) | set(removed_now))
    cfg.stillroom_kept_layers = [original[i] for i in keep]
    assert isinstance(layers, nn.ModuleList)
    return removed_now


def _slice_config(cfg: Any, keep: list[int], old_layers: int) -> None:
    for key, value in list(cfg.to_dict().items()):
        if key in _NOT_PER_LAYER or key.startswith("stillroom_"):
            continue
        if isinstance(value, list) and len(value) == old_layers and old_layers > 1:
            setattr(cfg, key, [value[i] for i in keep])
    mwl = getattr(cfg, "max_window_layers", None)
    if isinstance(mwl, int):
        # Qwen2-style: the first `max_window_layers` layers use full attention.
        cfg.max_window_layers = sum(1 for i in keep if i < mwl)
    cfg.num_hidden_layers = len(keep)


def load_causal_lm(path: str | Path, dtype: str = "float32"):
    """Model and tokenizer from a local transformers folder (float32 on CPU by default)."""
    from stillroom.models import load_model_and_tokenizer

    return load_model_and_tokenizer(path, dtype=dtype, device="cpu")


def prune_model_folder(model_path: str | Path, start: int, end: int, out_dir: str | Path,
                       analysis: dict | None = None) -> Path:
    """Load a model folder, drop layers `start .. end-1`, and save the pruned model to `out_dir`."""
    model, tok = load_causal_lm(model_path)
    before = len(decoder_layers(model))
    n_params_before = sum(p.numel() for p in model.parameters())
    removed = drop_layers(model, start, end)
    record = {
        "source": str(model_path),
        "drop": f"{start}:{end}",
        "index_convention": "0-based, end exclusive; indices in `removed_layers` refer to the original model",
        "removed_layers": removed,
        "num_hidden_layers": {"before": before, "after": before - len(removed)},
        "parameters": {"before": n_params_before, "after": sum(p.numel() for p in model.parameters())},
    }
    if analysis is not None:
        record["analysis"] = analysis
    return save_model(model, tok, out_dir, record)


def model_folder(spec: str) -> Path:
    """A local transformers folder from a model spec (see `stillroom.models.resolve_model_path`)."""
    from stillroom.models import resolve_model_path

    return resolve_model_path(spec)
