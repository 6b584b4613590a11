"""Which layers can go: angular distance between layers (Gromov et al.) and Block Influence (ShortGPT).

Index convention, used everywhere in `stillroom.prune`: layers are numbered from 0; a block is written
`start:end`, end exclusive, so block `(start, end)` holds layers `start .. end-1` and has size `n = end - start`.
`h[l]` is the residual stream *entering* layer `l` (what transformers returns as `hidden_states[l]`), and `h[L]`
is the output of the last layer, taken *before* the model's final norm. (transformers' `hidden_states[L]` is
after the final norm in several families, which would make the last block look different for the wrong reason,
so the states are recorded with hooks on the decoder layers instead.)

* Angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"):
  `d(l, n) = arccos(cos_sim(h[l], h[l+n])) / pi` on the last token of each calibration text, averaged over the
  texts. Removing block `(l, l+n)` changes the last token's state least where `d(l, n)` is smallest.
* Block Influence (ShortGPT): `BI(l) = 1 - cos(h[l], h[l+1])`, averaged over every (non-padding) token of every
  text, as ShortGPT defines it. The layers with the lowest BI are the cheapest to drop one by one.
"""

from __future__ import annotations

import inspect
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INDEX_CONVENTION = (
    "Layers are 0-based; a block start:end is end-exclusive (layers start..end-1, size n = end - start). "
    "h[l] is the residual stream entering layer l (transformers' hidden_states[l]); h[L] is the last layer's "
    "output before the final norm. d(l, n) = arccos(cos(h[l], h[l+n]))/pi on the last token, averaged over "
    "calibration texts; BI(l) = 1 - cos(h[l], h[l+1]) averaged over all tokens."
)


@dataclass
class LayerAnalysis:
    """Angular distances and Block Influence of one model on one calibration set."""

    num_layers: int
    """L, the number of decoder layers analysed."""
    samples: int
    """Calibration texts averaged over."""
    angular: dict[int, list[float]]
    """Block size n (1..L) -> [d(0, n), d(1, n), ..., d(L-n, n)]."""
    block_influence: list[float]
    """BI(l) for l = 0..L-1."""
    model: str = ""
    """The model analysed (path or spec), for the record."""
    calibration: str = ""
    """Where the calibration texts came from."""
    extra: dict[str, Any] = field(default_factory=dict)

    def best_block(self, n: int) -> tuple[int, int, float]:
        """The block of size n with the smallest angular distance: (start, end exclusive, d)."""
        if n not in self.angular:
            raise ValueError(f"block size {n} not analysed: expected 1..{self.num_layers}")
        row = self.angular[n]
        start = min(range(len(row)), key=lambda i: row[i])
        return start, start + n, row[start]

    def lowest_influence(self, k: int) -> list[int]:
        """The k layers with the lowest Block Influence (ShortGPT's choice), sorted by index."""
        order = sorted(range(self.num_layers), key=lambda i: self.block_influence[i])
        return sorted(order[:k])

    def to_json(self) -> dict:
        """JSON-ready record, with the index convention and the best block per size spelled out."""
        best = {}
        for n in sorted(self.angular):
            s, e, d = self.best_block(n)
            best[str(n)] = {"start": s, "end": e, "drop": f"{s}:{e}", "distance": d}
        return {
            "index_convention": INDEX_CONVENTION,
            "model": self.model,
            "calibration": self.calibration,
            "num_layers": self.num_layers,
            "samples": self.samples,
            "angular_distance": {str(n): row for n, row in sorted(self.angular.items())},
            "best_block": best,
            "block_influence": self.block_influence,
            "block_influence_order": sorted(range(self.num_layers), key=lambda i: self.block_influence[i]),
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict) -> LayerAnalysis:
        """Read back what `to_json` wrote."""
        return cls(
            num_layers=int(data["num_layers"]),
            samples=int(data["samples"]),
            angular={int(n): [float(x) for x in row] for n, row in data["angular_distance"].items()},
            block_influence=[float(x) for x in data["block_influence"]],
            model=data.get("model", ""),
            calibration=data.get("calibration", ""),
        )


def decoder_layers(model: Any):
    """The `nn.ModuleList` of decoder layers of a transformers causal LM (Llama, Qwen2, Mistral, Gemma-3, ...)."""
    import torch.nn as nn

    n = int(_text_config(model).num_hidden_layers)
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "model.decoder.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) == n:
            return obj
    found = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) == 1:
        return found[0]
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected a ModuleList of {n})")


def _text_config(model: Any):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def residual_states(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 4,
                    max_length: int = 512) -> tuple[Any, Any, int]:
    """Run the calibration texts and collect the residual stream around every layer.

    Returns `(last, bi_sum, n_tokens)`: `last` is a float64 tensor `[texts, L+1, hidden]` of the last token's
    `h[0..L]`; `bi_sum[l]` is the sum over all non-padding tokens of `cos(h[l], h[l+1])`; `n_tokens` their count.
    """
    import torch

    layers = decoder_layers(model)
    L = len(layers)
    captured: dict[int, Any] = {}

    def pre_hook(idx):
        def hook(module, args, kwargs):
            captured[idx] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post_hook(module, args, kwargs, output):
        captured[L] = output[0] if isinstance(output, tuple | list) else output

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[L - 1].register_forward_hook(post_hook, with_kwargs=True))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    lasts, bi_sum, n_tok = [], torch.zeros(L, dtype=torch.float64), 0
    # Only hidden states are needed: skip the (262k-vocabulary) head wherever the model lets us.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                # Right padding: causal attention means padding never changes the real tokens' states.
                enc = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts[i : i + batch_size]]
                T = max(len(e) for e in enc)
                ids = torch.full((len(enc), T), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(enc), T), dtype=torch.long)
                for r, e in enumerate(enc):
                    ids[r, : len(e)] = torch.tensor(e)
                    mask[r, : len(e)] = 1
                captured.clear()
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **keep)
                h = torch.stack([captured[j].double().cpu() for j in range(L + 1)], dim=1)  # [B, L+1, T, H]
                last_pos = mask.sum(1) - 1
                lasts.append(h[torch.arange(len(enc)), :, last_pos])  # [B, L+1, H]
                cos = torch.nn.functional.cosine_similarity(h[:, :-1], h[:, 1:], dim=-1)  # [B, L, T]
                m = mask[:, None, :].double()
                bi_sum += (cos * m).sum(dim=(0, 2))
                n_tok += int(mask.sum())
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return torch.cat(lasts, dim=0), bi_sum, n_tok


def angular_distances(last: Any) -> dict[int, list[float]]:
    """`d(l, n)` for every block size n = 1..L and start l = 0..L-n, from last-token states `[texts, L+1, H]`."""
    import torch

    L = last.shape[1] - 1
    out: dict[int, list[float]] = {}
    for n in range(1, L + 1):
        a, b = last[:, : L + 1 - n], last[:, n:]
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)  # [texts, L+1-n]
        out[n] = (torch.arccos(cos) / math.pi).mean(dim=0).tolist()
    return out


def analyze_layers(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 4, max_length: int = 512,
                   model_name: str = "", calibration: str = "") -> LayerAnalysis:
    """Angular distance for every block and Block Influence for every layer of `model` on `texts`."""
    if not texts:
        raise ValueError("no calibration texts")
    last, bi_sum, n_tok = residual_states(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    bi = [1.0 - float(x) / max(1, n_tok) for x in bi_sum]
    return LayerAnalysis(num_layers=last.shape[1] - 1, samples=last.shape[0], angular=angular_distances(last),
                         block_influence=bi, model=model_name, calibration=calibration)


def load_calibration_texts(spec: str, samples: int | None = None, seed: int = 0) -> list[str]:
    """Calibration texts from a `.txt` file (paragraphs separated by blank lines, else one per line), a `.jsonl`
    file (`text`, else `prompt` + `completion`, else `input` [+ `label`]) or a task spec (each training example's
    prompt as the evaluator renders it, followed by its gold answer). A deterministic sample of `samples`."""
    from stillroom.errors import ConfigError

    path = Path(spec).expanduser()
    texts: list[str]
    if path.suffix.lower() == ".txt":
        if not path.exists():
            raise ConfigError(f"{path}: calibration file does not exist")
        raw = path.read_text(encoding="utf-8")
        paras = [p.strip() for p in raw.split("\n\n") if p.strip()]
        texts = paras if len(paras) > 1 else [x.strip() for x in raw.splitlines() if x.strip()]
    elif path.suffix.lower() in (".jsonl", ".ndjson") and _looks_like_text_jsonl(path):
        texts = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" in row:
                texts.append(str(row["text"]))
            elif "prompt" in row:
                texts.append(str(row["prompt"]) + str(row.get("completion", "")))
    else:
        from stillroom.tasks.load import load_texts_task
        from stillroom.tasks.prompts import continuation, render_prompt

        task = load_texts_task(spec)
        train = task.splits(seed=seed).train
        texts = [render_prompt(task, ex) + (continuation(str(ex.label)) if ex.label is not None else "") for ex in train]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"{spec}: no calibration texts found")
    if samples is not None and samples < len(texts):
        texts = random.Random(seed).sample(texts, samples)
    return texts


def _looks_like_text_jsonl(path: Path) -> bool:
    """A JSONL of raw texts or prompt/completion pairs (else it is read as a task file)."""
    if not path.exists():
        return False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            return isinstance(row, dict) and ("text" in row or "prompt" in row)
    return False


def plot_heatmap(analysis: LayerAnalysis, path: Path) -> Path:
    """Heat map of d(l, n): rows block size n, columns start layer l; the best block of each size is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    L = analysis.num_layers
    grid = np.full((L, L), np.nan)
    for n, row in analysis.angular.items():
        grid[n - 1, : len(row)] = row
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * L + 2), max(4, 0.35 * L + 1.5)))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower")
    for n in analysis.angular:
        s, _, _ = analysis.best_block(n)
        ax.plot(s, n - 1, marker="o", markersize=4, color="red")
    ax.set_xlabel("start layer l (0-based)")
    ax.set_ylabel("block size n")
    ax.set_yticks(range(L), [str(n) for n in range(1, L + 1)])
    ax.set_title("angular distance d(l, n) = arccos(cos(h[l], h[l+n]))/pi (red: best per n)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
