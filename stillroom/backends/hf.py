"""Local transformers backend: generation and fast, lm-evaluation-harness-exact log-likelihood scoring.

Scoring (`HFBackend.score`) returns exactly what lm-evaluation-harness's `HFLM.loglikelihood` returns for the
same model, so argmax predictions over the options are identical. Tokenization mirrors HFLM:

* `_encode_pair` moves trailing whitespace of the context onto the continuation, encodes
  `whole = context + continuation` and `context` separately, and takes the continuation tokens as
  `whole_enc[len(context_enc):]`;
* the model input is `context_enc + continuation_enc` (note: `context_enc`, not `whole_enc[:len(context_enc)]`;
  when a token merge crosses the context/continuation boundary the two differ, and HFLM feeds the former);
* special tokens follow the tokenizer's default (HFLM's `add_bos_token=None`), except that a string already
  starting with the BOS text is encoded without special tokens; an empty context becomes the BOS (or EOS) token;
* `(context_enc + continuation_enc)[-(max_length + 1):][:-1]` is the model input (left truncation), where
  `max_length` is resolved from the config/tokenizer as HFLM does.

Each continuation token's log-probability is a full-vocabulary log-softmax at the position before it (float32).

Speed. HFLM runs one full forward per (context, continuation) and a log-softmax over every position of the
sequence (the Gemma-3 vocabulary is 262k, so the head and softmax dominate). Here the computation is split along
shared token prefixes, so that each distinct prefix is forward-passed once, and only the logits that are scored
are ever computed:

1. **Shared prefix across requests and calls (the prefix store).** Requests are sorted by their tokens; the
   longest common token prefix of a call (system prompt / rulebook + instruction + few-shot examples) is run
   once, batch 1. Its KV cache (`DynamicCache`, past-state recording on so sliding-window layers keep every
   position) goes into a small LRU keyed by the prefix's token ids (`PREFIX_CACHE_ENTRIES`): a later call
   starts from the stored prefix sharing most tokens with it (cropped where longer) and extends it. A PLD run
   thus computes its rulebook once for every validation round, ablation and final comparison.
2. **Per-request context.** Requests are taken in chunks of `batch_size`; each chunk extends the prefix to the
   chunk's own common prefix, then runs every request's remaining context in one batch. Rows of different
   lengths are laid out left-padded, as `generate` lays out a batch: row i is `pads[i]` padding columns, the
   prefix, its own context; the cache holds the first columns (the prefix shifted right per row, padding
   slots masked), and each row re-runs the few prefix tokens the shift pushed out. Every row's tokens are
   contiguous, so positions and sliding windows are exactly those of the row alone (`logits_to_keep=1`).
3. **Continuations.** Every continuation of the chunk becomes one row `[last context token] + continuation[:-1]`
   over its request's cached context (cache rows selected with `batch_select_indices`), in one batched forward
   with an explicit attention mask and position ids. Logits are computed for these few positions only; this
   is where every scored log-probability comes from.

Because the last context token is run with the continuation rows, a token merge at the boundary needs no special
case. Rows are mathematically identical to the full-sequence computation; float32 results agree with HFLM to ~1e-5.

Generation uses the same store: the prompts of a batch are tokenised in full, their longest common token-id prefix
(leaving each prompt at least one token of its own) comes from the store, laid out per row as above, and
`generate` runs only the columns after it, on the same left-padded batch as without the store, so greedy text is
identical. `prefix_cache=False` (or `STILLROOM_PREFIX_CACHE=0`) turns the store and all sharing across requests
off; `tokens_forwarded` counts the token positions run through the model (padding included).
"""

from __future__ import annotations

import copy
import inspect
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stillroom.backends.base import (
    BackendBase,
    Generation,
    GenerationParams,
    Prompt,
    ScoreRequest,
    Usage,
    normalise_prompt,
)
from stillroom.errors import ConfigError

DEFAULT_MAX_LENGTH = 2048
"""HFLM's fallback context length when neither config nor tokenizer names one."""
_TOKENIZER_INFINITY = 1000000000000000019884624838656
_LOGITS_BUDGET = 64 * 1024 * 1024
"""Max floats of logits materialised at once while scoring continuations (256 MB in float32)."""
_ROWS_KV_BUDGET = 256 * 1024 * 1024
"""Max bytes of context KV held by continuation rows at once (each row holds its request's context KV)."""
PREFIX_CACHE_ENTRIES = 8
"""Shared-prefix KV caches kept across calls (least recently used dropped first)."""
PREFIX_CACHE_TOKENS = 16384
"""Token positions the kept prefixes may hold together (Gemma-3 270M: ~37 KB each in float32); the newest is
always kept."""


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' if available, else 'mps' if available, else 'cpu'."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    """'auto' -> float32 on CPU/MPS, bfloat16 on CUDA (float16 where bf16 is unsupported)."""
    import torch

    names = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    }
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    return names[dtype]


def resolve_max_length(config: Any, tokenizer: Any) -> int:
    """The model's context length, resolved exactly as lm-eval's HFLM does."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != _TOKENIZER_INFINITY:
        return int(mml)
    return DEFAULT_MAX_LENGTH


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _StopOnStrings:
    """Stopping criterion: a row is done once its generated text contains any stop string."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, list(stops), prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = []
        for row in input_ids[:, self.prompt_len :]:
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFBackend(BackendBase):
    """A local causal LM through transformers: chat/raw generation and log-likelihood scoring.

    `model` is a local folder, a model name already in the local Hugging Face cache (loaded offline), or, with
    `gguf_file=`, the folder holding that GGUF file (dequantised by transformers). `identity` is
    `hf:<resolved path or name>` (`hf:<folder>/<file>:gguf` for GGUF). Use `from_objects` to wrap a model and
    tokenizer built in-process. `prefix_cache` (default: on unless `STILLROOM_PREFIX_CACHE=0`) computes each
    prefix shared by requests once and keeps it across calls; off, every request runs its whole prompt.
    """

    supports_score = True
    supports_chat = True

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        trust_remote_code: bool = False,
        prefix_cache: bool | None = None,
    ):
        import torch  # noqa: F401  (fail early with a clear message if torch is missing)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        path = Path(model).expanduser()
        local = path.exists()
        src = str(path.resolve()) if local else model
        common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if not local:
            common["local_files_only"] = True
        if gguf_file:
            common["gguf_file"] = gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(src, **common)
            hf_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **common)
        except (OSError, ValueError) as e:
            where = f"{src}/{gguf_file}" if gguf_file else src
            raise ConfigError(
                f"cannot load transformers model {where!r}: {e}. Give a local folder, a GGUF file, or a model name "
                "already in the local Hugging Face cache (Stillroom loads models offline)"
            ) from e
        hf_model.to(dev)
        name = f"{src}/{gguf_file}" if gguf_file else src
        identity = f"hf:{name}:gguf" if gguf_file else f"hf:{name}"
        self._setup(hf_model, tokenizer, name=name, identity=identity, batch_size=batch_size,
                    prefix_cache=prefix_cache)

    @classmethod
    def from_objects(cls, model: Any, tokenizer: Any, name: str = "in-memory", batch_size: int = 8,
                     prefix_cache: bool | None = None) -> HFBackend:
        """Wrap an already-built transformers causal LM and tokenizer (tests, notebooks, trained students)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, name=name, identity=f"hf:{name}", batch_size=batch_size,
                    prefix_cache=prefix_cache)
        return self

    def _setup(self, hf_model: Any, tokenizer: Any, *, name: str, identity: str, batch_size: int,
               prefix_cache: bool | None = None) -> None:
        hf_model.eval()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.model = name
        self.identity = identity
        self.batch_size = max(1, int(batch_size))
        self.device = next(hf_model.parameters()).device
        # Pad token as lm-eval's configure_pad_token picks it (unk, else eos).
        if tokenizer.pad_token_id is None:
            if getattr(tokenizer, "unk_token", None):
                tokenizer.pad_token_id = tokenizer.unk_token_id
            elif getattr(tokenizer, "eos_token", None):
                tokenizer.pad_token_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._prefix_text = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        self.max_length = resolve_max_length(hf_model.config, tokenizer)
        text_cfg = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
        layer_types = getattr(text_cfg, "layer_types", None)
        window = getattr(text_cfg, "sliding_window", None)
        uses_window = window is not None and (layer_types is None or any("sliding" in str(t) for t in layer_types))
        self.sliding_window: int | None = int(window) if uses_window else None
        params = inspect.signature(hf_model.forward).parameters
        self._has_logits_to_keep = "logits_to_keep" in params
        # transformers 5.x renamed the `past_key_values` argument and output field to `cache` (the old name warns
        # and goes away); older 5.x releases only know the old name.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._split_head: bool | None = None
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        if prefix_cache is None:
            prefix_cache = os.environ.get("STILLROOM_PREFIX_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")
        self.prefix_cache = bool(prefix_cache)
        self._prefixes: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self.tokens_forwarded = 0
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ tokenization (mirrors lm-eval HFLM)

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """HFLM.tok_encode with `add_bos_token=None`: tokenizer defaults, none when `text` starts with BOS."""
        kwargs: dict[str, Any] = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self._prefix_text and text.startswith(self._prefix_text):
            kwargs["add_special_tokens"] = False
        return list(self.tokenizer.encode(text, **kwargs))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) exactly as lm-eval's `loglikelihood` / `_encode_pair` build them."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if cont and self.prefix_token_id == cont[0]:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ scoring

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Summed log-probability of each continuation given its context (identical to lm-eval HFLM).

        See the module docstring for the prefix-sharing scheme: shared prefix once (KV cache kept across calls),
        each request's remaining context once (batched over requests), then all continuations in one batched
        forward over the cached contexts, computing logits only at the scored positions.
        """
        import torch

        with self._lock, torch.inference_mode():
            return self._score(requests)

    def _score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        out: list[list[float]] = [[0.0] * len(r.continuations) for r in requests]
        # Per request: its scored rows (input tokens, n scored, targets) and its KV-prefix tokens.
        reqs: list[dict] = []
        for ri, r in enumerate(requests):
            if not r.continuations:
                continue
            ctx_cache: dict[str, list[int]] = {}
            rows = []
            for ci, cont in enumerate(r.continuations):
                ctx_enc, cont_enc = self._encode_pair_cached(r.context, cont, ctx_cache)
                if not cont_enc:
                    continue  # empty continuation: log-probability 0
                full = (ctx_enc + cont_enc)[-(self.max_length + 1) :]
                inp = full[:-1]
                n = min(len(cont_enc), len(inp))
                rows.append({"ci": ci, "inp": inp, "n": n, "targets": full[-n:]})
            if not rows:
                continue
            p = min(len(x["inp"]) - x["n"] for x in rows)
            first = rows[0]["inp"]
            for x in rows[1:]:
                p = min(p, _lcp(first, x["inp"]))
            reqs.append({"ri": ri, "rows": rows, "prefix": first[:p]})
        if not reqs:
            return out
        reqs.sort(key=lambda q: q["prefix"])
        global_prefix = reqs[0]["prefix"]
        for q in reqs[1:]:
            global_prefix = global_prefix[: _lcp(global_prefix, q["prefix"])]
        if not self.prefix_cache:
            global_prefix = []  # switched off: nothing is shared across requests
        base_cache = self._prefix_cache(global_prefix)
        G = len(global_prefix)
        chunks = [reqs[i : i + self.batch_size] for i in range(0, len(reqs), self.batch_size)]
        for k, chunk in enumerate(chunks):
            cache = base_cache if len(chunks) == 1 or k == len(chunks) - 1 else _copy_cache(base_cache)
            self._score_chunk(chunk, cache, G, out)
        return out

    def _encode_pair_cached(self, context: str, cont: str, ctx_cache: dict[str, list[int]]):
        if context == "":
            return self.encode_pair(context, cont)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            cont, context = context[-n_spaces:] + cont, context[:-n_spaces]
        if context not in ctx_cache:
            ctx_cache[context] = self.tok_encode(context)
        ctx = ctx_cache[context]
        whole = self.tok_encode(context + cont)
        return ctx, whole[len(ctx) :]

    def _forward(self, input_ids, cache, *, attention_mask=None, position_ids=None, keep: int = 1):
        kwargs: dict[str, Any] = {"input_ids": input_ids, self._cache_arg: cache, "use_cache": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        self.tokens_forwarded += input_ids.numel()
        return self.hf_model(**kwargs)

    def _out_cache(self, output):
        return getattr(output, self._cache_arg)

    def _advance(self, input_ids, cache, *, attention_mask=None, position_ids=None):
        """Run tokens over `cache` (None: a fresh one) only to extend the KV cache; returns the cache."""
        if self._split_head is None:
            self._split_head = self._check_split_head()
        if self._split_head:
            out = self._decoder_forward(input_ids, cache, attention_mask=attention_mask, position_ids=position_ids)
            return self._out_cache(out)
        out = self._forward(input_ids, cache, attention_mask=attention_mask, position_ids=position_ids, keep=1)
        return self._out_cache(out)

    def _new_cache(self):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.hf_model.config)
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()
        return cache

    def _prefix_cache(self, tokens: list[int], private: bool = True):
        """KV cache (batch 1) of `tokens`, a private copy (else the stored one: read it, never run it); None for
        no tokens.

        Built from the stored prefix that shares the most tokens with `tokens` (cropped where it is longer), then
        extended. Up to PREFIX_CACHE_ENTRIES prefixes (PREFIX_CACHE_TOKENS positions) are kept across calls,
        least recently used dropped first: a rulebook, a few-shot block or an instruction is forward-passed once
        per backend, not once per call.
        Stored caches record past states (sliding-window layers keep every position), so they can be cropped
        and re-laid out per row.
        """
        import torch

        if not tokens:
            return None
        key = tuple(tokens)
        if not self.prefix_cache:
            cache = self._new_cache()
            self._advance(torch.tensor([list(key)], dtype=torch.long, device=self.device), cache)
            return cache
        best, done = None, 0
        for k in self._prefixes:
            c = _lcp(k, key)
            if c > done:
                best, done = k, c
        cache = None
        if best is not None:
            self._prefixes.move_to_end(best)
            if done == len(best) == len(key):
                return _copy_cache(self._prefixes[best]) if private else self._prefixes[best]
            cache = _copy_cache(self._prefixes[best])
            if done < len(best) and not _truncate_cache(cache, done):
                cache, done = None, 0
        if cache is None:
            cache, done = self._new_cache(), 0
        if done < len(key):
            ids = torch.tensor([list(key[done:])], dtype=torch.long, device=self.device)
            self._advance(ids, cache)
        # A stored prefix of the new key serves nothing the new key cannot (it is cropped from it): replace it.
        for k in [k for k in self._prefixes if len(k) <= len(key) and key[: len(k)] == k]:
            del self._prefixes[k]
        self._prefixes[key] = cache
        held = sum(len(k) for k in self._prefixes)
        while len(self._prefixes) > 1 and (len(self._prefixes) > PREFIX_CACHE_ENTRIES or held > PREFIX_CACHE_TOKENS):
            held -= len(self._prefixes.popitem(last=False)[0])
        return _copy_cache(cache) if private else cache

    def clear_prefix_cache(self) -> None:
        """Drop every stored shared-prefix KV cache (frees their memory; results do not change)."""
        self._prefixes.clear()

    def _score_chunk(self, chunk: list[dict], cache, G: int, out: list[list[float]]) -> None:
        """Score one chunk of requests sharing the cached prefix of length G (cache batch 1, or None if G=0)."""
        import torch

        # Extend the shared prefix to this chunk's own common prefix (batch 1).
        P = chunk[0]["prefix"]
        for q in chunk[1:]:
            P = P[: _lcp(P, q["prefix"])]
        if len(P) > G and (self.prefix_cache or len(chunk) == 1):
            if cache is None:
                cache = self._new_cache()
            ids = torch.tensor([P[G:]], dtype=torch.long, device=self.device)
            self._advance(ids, cache)
            G = len(P)
        lens = [len(q["prefix"]) - G for q in chunk]
        A = max(lens)
        pads = [A - n for n in lens]
        padded = any(pads)
        B = len(chunk)
        if padded and cache is not None:
            # Left padding, as generate() lays a batch out: row i is pads[i] padding columns, the shared prefix,
            # its own context. Every row's context ends in the same column and its tokens are contiguous, so a
            # sliding window sees exactly what it sees without padding. The cache holds the first G columns
            # (the prefix shifted right by the row's padding); a row re-runs the pads[i] prefix tokens that the
            # shift pushed out of them, the same number of positions that right padding would spend on pads.
            shifted = _left_padded_cache(cache, G, pads)
            if shifted is None:
                # A cache whose positions cannot be re-laid out: one request at a time (no padding at all).
                for q in chunk:
                    self._score_chunk([q], _copy_cache(cache), G, out)
                return
            cache = shifted
        elif cache is not None and B > 1:
            cache.batch_repeat_interleave(B)
        if A > 0:
            ids = torch.full((B, A), self.pad_id, dtype=torch.long, device=self.device)
            for i, q in enumerate(chunk):
                toks = q["prefix"][max(0, G - pads[i]) : G + lens[i]]
                if toks:
                    ids[i, A - len(toks) :] = torch.tensor(toks, dtype=torch.long)
            mask = pos = None
            if padded:
                mask = torch.ones((B, G + A), dtype=torch.long, device=self.device)
                pos = torch.arange(G, G + A, device=self.device).repeat(B, 1)
                for i, pad in enumerate(pads):
                    mask[i, :pad] = 0
                    pos[i] = (pos[i] - pad).clamp(min=0)
            cache = self._advance(ids, cache, attention_mask=mask, position_ids=pos)
        # Continuation rows: everything after the request's prefix (the last context token + continuation[:-1]).
        # A row that is a prefix of another row of the same request (" plausible" vs " impl|ausible": both are
        # predicted from the last context token) is read off the longer row: one forward row per distinct branch.
        groups = []  # (batch row of the request, row tokens, [(member row dict, request)])
        for bi, q in enumerate(chunk):
            mine: list[tuple[int, list[int], list]] = []
            for x in sorted(q["rows"], key=lambda x: -(len(x["inp"]) - len(q["prefix"]))):
                r = x["inp"][len(q["prefix"]) :]
                for g in mine:
                    if g[1][: len(r)] == r:
                        g[2].append((x, q, len(r)))
                        break
                else:
                    mine.append((bi, r, [(x, q, len(r))]))
            groups.extend(mine)
        subs = self._row_batches(groups, _kv_bytes_per_row(cache))
        for j, sub in enumerate(subs):
            sub_cache = cache
            if cache is not None:
                # A forward appends to its cache: every sub-batch but the last works on its own cache object
                # (the selected rows are new tensors; the context KV is not copied otherwise).
                idx = [g[0] for g in sub]
                if j < len(subs) - 1 or idx != list(range(B)):
                    sub_cache = _select_rows(cache, None if idx == list(range(B)) else
                                             torch.tensor(idx, device=self.device))
            self._score_rows(sub, sub_cache, G, A, lens, padded, out)

    def _row_batches(self, groups: list, row_bytes: int = 0) -> list[list]:
        """Split forward rows so that at most ~_LOGITS_BUDGET logits and ~_ROWS_KV_BUDGET bytes of per-row
        context KV (`row_bytes` each) exist at once."""
        vocab = self._vocab_size()
        per_pos = max(1, _LOGITS_BUDGET // max(1, vocab))
        max_rows = max(1, _ROWS_KV_BUDGET // row_bytes) if row_bytes else len(groups)
        subs, cur, npos = [], [], 0
        for g in groups:
            n = len(g[1])
            if cur and (npos + n > per_pos or len(cur) >= max_rows):
                subs.append(cur)
                cur, npos = [], 0
            cur.append(g)
            npos += n
        if cur:
            subs.append(cur)
        return subs

    def _vocab_size(self) -> int:
        cfg = self.hf_model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(getattr(cfg, "vocab_size", 0) or len(self.tokenizer))

    def _score_rows(self, sub, cache, G: int, A: int, lens: list[int], padded: bool, out) -> None:
        """One batched forward of continuation rows over the cached contexts; logits only where scored."""
        import torch

        R, L = len(sub), max(len(g[1]) for g in sub)
        ids = torch.full((R, L), self.pad_id, dtype=torch.long, device=self.device)
        for i, g in enumerate(sub):
            ids[i, : len(g[1])] = torch.tensor(g[1], dtype=torch.long)
        mask = pos = None
        past = G + A if cache is not None else 0
        if cache is not None and padded:
            mask = torch.ones((R, past + L), dtype=torch.long, device=self.device)
            pos = torch.empty((R, L), dtype=torch.long, device=self.device)
            for i, g in enumerate(sub):
                a = lens[g[0]]
                mask[i, : A - a] = 0  # the row's left padding (see _score_chunk)
                pos[i] = torch.arange(G + a, G + a + L, device=self.device)
        # The (row, position) pairs whose next-token distribution is scored, each computed once.
        where: dict[tuple[int, int], int] = {}
        for i, g in enumerate(sub):
            for x, _, rlen in g[2]:
                for t in range(rlen - x["n"], rlen):
                    where.setdefault((i, t), len(where))
        rows_t = torch.tensor([i for i, _ in where], device=self.device)
        pos_t = torch.tensor([t for _, t in where], device=self.device)
        if self._split_head is None:
            self._split_head = self._check_split_head()
        if self._split_head:
            hidden = self._decoder_forward(ids, cache, attention_mask=mask, position_ids=pos).last_hidden_state
            logits = self._head(hidden[rows_t, pos_t])
        else:
            logits = self._forward(ids, cache, attention_mask=mask, position_ids=pos, keep=0).logits[rows_t, pos_t]
        lp = torch.log_softmax(logits.float(), dim=-1)
        for i, g in enumerate(sub):
            for x, q, rlen in g[2]:
                k = [where[(i, t)] for t in range(rlen - x["n"], rlen)]
                tgt = torch.tensor(x["targets"], dtype=torch.long, device=lp.device)
                out[q["ri"]][x["ci"]] = float(lp[k].gather(1, tgt[:, None]).sum())

    def _decoder_forward(self, input_ids, cache, *, attention_mask=None, position_ids=None):
        kwargs: dict[str, Any] = {"input_ids": input_ids, self._cache_arg: cache, "use_cache": True}
        self.tokens_forwarded += input_ids.numel()
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self.hf_model.get_decoder()(**kwargs)

    def _head(self, hidden):
        """The output projection as the model's own forward applies it (incl. Gemma-2 style soft-capping)."""
        import torch

        logits = self.hf_model.get_output_embeddings()(hidden)
        cfg = self.hf_model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _check_split_head(self) -> bool:
        """Whether decoder + output head reproduce the model's logits (then scored positions alone are projected).

        Models that post-process logits some other way fall back to full forwards (still only at the few
        continuation positions per row).
        """
        import torch

        counted = self.tokens_forwarded
        try:
            with torch.no_grad():
                if self.hf_model.get_decoder() is None or self.hf_model.get_output_embeddings() is None:
                    return False
                ids = torch.tensor([[self.prefix_token_id or 0, 5, 7, 11]], device=self.device) % self._vocab_size()
                ref = self.hf_model(input_ids=ids).logits.float()
                mine = self._head(self._decoder_forward(ids, None).last_hidden_state).float()
                return bool(torch.allclose(ref, mine, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max()))))
        except Exception:
            return False
        finally:
            self.tokens_forwarded = counted  # a probe, not work done for a request

    # ------------------------------------------------------------------ generation

    def render(self, prompt: Prompt) -> tuple[str, bool]:
        """Prompt text and whether it came from the chat template (then it carries its own special tokens)."""
        p = normalise_prompt(prompt)
        if isinstance(p, str):
            return p, False
        if self.has_chat_template:
            try:
                text = self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                return str(text), True
            except Exception:  # e.g. a template that rejects a system role
                pass
        from stillroom.backends.base import chat_to_text

        return chat_to_text(p), False

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        text, templated = self.render(prompt)
        if templated:
            return self.tok_encode(text, add_special_tokens=False)
        return self.tok_encode(text)

    def generate(self, prompt: Prompt, params: GenerationParams) -> Generation:
        return self.generate_many([prompt], params)[0]

    def generate_many(self, prompts: list[Prompt], params: GenerationParams) -> list[Generation]:
        """Batched generation (left padding), `batch_size` prompts per `model.generate` call.

        The prompts' longest shared token prefix comes from the prefix store (see the module docstring), so a
        system prompt, rulebook or few-shot block is forward-passed once, not once per prompt or call.
        """
        import torch

        results: list[Generation] = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                results.extend(self._generate_batch(prompts[i : i + self.batch_size], params))
        return results

    def _generation_config(self, params: GenerationParams):
        from transformers import GenerationConfig

        base = getattr(self.hf_model, "generation_config", None)
        eos = getattr(base, "eos_token_id", None) if base is not None else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(1, int(params.max_tokens)),
            "pad_token_id": self.pad_id,
            "eos_token_id": eos,
            "bos_token_id": self.tokenizer.bos_token_id,
        }
        if params.temperature and params.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(params.temperature), top_p=float(params.top_p), top_k=0)
        else:
            kwargs.update(do_sample=False)
        return GenerationConfig(**kwargs)

    def _shared_prompt_cache(self, encoded: list[list[int]], L: int):
        """KV cache of the first columns of the left-padded batch that are a prefix shared by every prompt.

        The split is at a token boundary of each prompt's own tokenisation (the longest common token-id prefix),
        and leaves every prompt at least one token of its own, whose forward yields the first new token.
        """
        P = min(len(e) for e in encoded) - 1
        for e in encoded[1:]:
            P = min(P, _lcp(encoded[0], e))
        if P < 1:
            return None
        base = self._prefix_cache(encoded[0][:P], private=False)  # only read: each row gets its own copy
        return _left_padded_cache(base, P, [L - len(e) for e in encoded])

    def _eos_ids(self, gen_config) -> set[int]:
        eos = gen_config.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list | tuple) else {int(eos)}

    def _generate_batch(self, prompts: list[Prompt], params: GenerationParams) -> list[Generation]:
        import torch
        from transformers import StoppingCriteriaList

        t0 = time.perf_counter()
        limit = max(1, self.max_length - max(1, int(params.max_tokens)))
        encoded = [self._prompt_ids(p)[-limit:] for p in prompts]
        L = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), L), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, L - len(e) :] = torch.tensor(e, dtype=torch.long)
            mask[i, L - len(e) :] = 1
        gen_config = self._generation_config(params)
        stopping = StoppingCriteriaList([_StopOnStrings(self.tokenizer, params.stop, L)]) if params.stop else None
        # The prompts' shared prefix comes from the prefix store; generate() runs only the columns after it.
        cache = self._shared_prompt_cache(encoded, L) if self.prefix_cache else None
        cached = cache.get_seq_length() if cache is not None else 0
        extra = {self._cache_arg: cache} if cache is not None else {}
        if gen_config.do_sample and params.seed is not None:
            torch.manual_seed(int(params.seed) + int(params.n_sample))
        out = self.hf_model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=gen_config,
            stopping_criteria=stopping,
            **extra,
        )
        steps = out.shape[1] - L
        self.tokens_forwarded += len(encoded) * (L - cached + max(0, steps - 1))
        latency = (time.perf_counter() - t0) / len(prompts)
        eos_ids = self._eos_ids(gen_config)
        gens = []
        for i, e in enumerate(encoded):
            new = out[i, L:].tolist()
            finish = "length"
            n_out = len(new)
            for j, t in enumerate(new):
                if t in eos_ids:
                    new, n_out, finish = new[:j], j + 1, "stop"
                    break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if params.stop:
                cut = [text.find(s) for s in params.stop if s and s in text]
                if cut:
                    text, finish = text[: min(cut)], "stop"
            gens.append(Generation(text=text, usage=Usage(input_tokens=len(e), output_tokens=n_out, latency_s=latency),
                                   finish_reason=finish))
        return gens


def _left_padded_cache(base, n: int, pads: list[int]):
    """The first `n` columns of a left-padded batch as a KV cache, from the batch-1 cache of the shared prefix.

    Row i of the batch is `pads[i]` padding columns, then the shared prefix, then its own tokens, exactly as
    `generate` lays out a left-padded batch; its first `n` columns are `min(pads[i], n)` padding slots (zeros;
    the attention mask hides them) followed by the first `n - pads[i]` prefix positions. Keeping today's layout
    keeps every position id, mask and sliding window where the uncached batch has them. The result holds full
    (non-sliding) layers; the sliding-window mask is applied by position, as for any full layer. None if `base`
    does not hold all `n` positions of every layer (then generation runs without it).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    data = []
    for layer in getattr(base, "layers", None) or []:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not getattr(layer, "is_initialized", False) or keys is None or keys.dim() != 4 or keys.shape[-2] < n:
            return None
        keys, values = keys[..., :n, :], values[..., :n, :]
        k = keys.new_zeros((len(pads), *keys.shape[1:]))
        v = values.new_zeros((len(pads), *values.shape[1:]))
        for i, pad in enumerate(pads):
            p = min(pad, n)
            k[i, :, p:] = keys[0, :, : n - p]
            v[i, :, p:] = values[0, :, : n - p]
        data.append((k, v))
    if not data:
        return None
    # Layers take the tensors as they are (DynamicCache(ddp_cache_data=...) would concatenate: a second copy).
    layers = []
    for k, v in data:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        layers.append(layer)
    cache = DynamicCache()
    cache.layers = layers
    return cache


def _truncate_cache(cache, n: int) -> bool:
    """Keep only the first `n` positions of a cache built with past-state recording; False if unsupported.

    Unlike `Cache.crop`, this never loses sliding-window states, because recording keeps them all.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    for layer in layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            return False
        sliding = isinstance(layer, DynamicSlidingWindowLayer)
        if sliding and not (layer.record_past and (not layer.is_initialized or layer.keys.shape[-2] == layer.cumulative_length)):
            return False
    for layer in layers:
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :n, :]
            layer.values = layer.values[..., :n, :]
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = min(layer.cumulative_length, n)
    return True


def _kv_bytes_per_row(cache) -> int:
    """Bytes of KV one batch row of `cache` holds (0 for no cache)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and t.dim() == 4 and t.shape[0]:
                total += t[0].numel() * t.element_size()
    return total


def _select_rows(cache, indices):
    """A new cache object over the batch rows `indices` (None: all) of `cache`, which is left as it is.

    Dynamic layers replace their tensors on update (concatenation) and on row selection, so the layer objects
    are copied shallowly and the KV tensors are shared until selected or extended.
    """
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if indices is not None:
        new.batch_select_indices(indices)
    return new


def _copy_cache(cache):
    """Private copy of a KV cache, so forwards on it never touch the original.

    Dynamic layers only ever replace their tensors (concatenation, slicing, row selection), never write into
    them, so their copy shares the tensors (no KV is copied); any other cache is cloned in full.
    """
    if cache is None:
        return None
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return _select_rows(cache, None)
    return copy.deepcopy(cache)
