"""Cross-tokenizer alignment: a teacher and a student with different vocabularies see the same text cut into
different tokens; logit distillation compares them on *spans* that end where both cuts agree.

Byte offsets. Every token id maps to the exact bytes it stands for (`TokenBytes`): a ByteLevel BPE piece (Qwen,
Llama-3, GPT-2: one character per byte through GPT-2's byte↔unicode table), a SentencePiece-style piece (Gemma,
Llama-2: '▁' is a space, ``<0xNN>`` a byte-fallback byte), or a special token (no bytes: BOS, EOS, pad). A token
sequence's byte offsets are the running sums of its tokens' byte lengths, checked against the UTF-8 bytes of the
text it encodes (`byte_offsets`), so a span's bytes are exactly equal on both sides by construction, whatever the
text holds (CJK, emoji, accents, a byte-fallback token that is a third of a character).

TRL's `trl.experimental.utils.encode_with_byte_offsets` is not reused for the offsets: it derives byte offsets from
the fast tokenizer's *character* offsets and refuses every tokenizer that is not ByteLevel BPE — Gemma-3, the
embedded student, is SentencePiece-style with byte fallback, and a served teacher has no local tokenizer at all
(its pieces come from vLLM's ``/tokenize``). Token bytes work for both and need no character bookkeeping.

Alignment. Given both sides' offsets over the same bytes, `align` walks them with two pointers and closes a span
whenever both sides reach the same byte boundary: the smallest spans whose bytes are equal on both sides. This is
exactly GOLD's dual-pointer walk, so it calls TRL's `ULDLoss._align_by_byte_offsets`; on top of it, a trailing
remainder whose ends disagree (one side's answer was truncated) is dropped, as are pairs with an empty side.

Merging several tokens on one side of a span (`MERGE_STRATEGIES`, GOLD's ``uld_token_merge_strategy``). Both
give one (unnormalised) distribution per span and side:

* ``"bayesian"`` (default, the chain rule): the distribution predicting the span's *last* token, given the actual
  earlier tokens, times the probabilities of those earlier tokens: P(t1..tn-1) · P(· | t1..tn-1). Its mass is the
  probability of the span's prefix. GOLD's "bayesian" strategy.
* ``"observed"``: the distribution predicting the span's *first* token, times the conditional probabilities of the
  actual later tokens: P(·) · P(t2..tn | t1). GOLD's "observed" strategy uses the same product; GOLD slices its
  logits one position later than the tokens they predict there, Stillroom's rows always predict the span's tokens.

The hybrid term needs to know which teacher tokens are also student tokens: `shared_vocabulary` matches them on
their *bytes* (TRL's `ULDLoss` matches raw vocabulary strings, which never match a ByteLevel 'Ġthe' with a
SentencePiece '▁the', and wrongly match pieces whose strings coincide but whose bytes differ).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from stillroom.errors import ConfigError

MERGE_STRATEGIES = ("bayesian", "observed")
"""How several tokens on one side of an aligned span combine (see the module docstring)."""

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's unicode→byte table (the inverse of `bytes_to_unicode`), as ByteLevel pre-tokenizers use it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def piece_bytes(piece: str, scheme: str) -> bytes:
    """The bytes a vocabulary piece stands for under `scheme` ('bytelevel' or 'sentencepiece')."""
    if scheme == "bytelevel":
        table = _byte_decoder()
        try:
            return bytes(table[ch] for ch in piece)
        except KeyError:
            return piece.encode("utf-8")  # an added token stored as plain text
    m = _BYTE_FALLBACK.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def tokenizer_scheme(tokenizer: Any) -> str:
    """'bytelevel' or 'sentencepiece' for a transformers tokenizer; `ConfigError` for any other kind."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        desc = repr(backend.pre_tokenizer) + repr(backend.decoder)
        if "ByteLevel" in desc:
            return "bytelevel"
        if any(x in desc for x in ("Metaspace", "ByteFallback", "▁")) or "▁" in repr(backend.normalizer):
            return "sentencepiece"
    vocab = tokenizer.get_vocab()
    if any(p.startswith("▁") for p in list(vocab)[:5000]):
        return "sentencepiece"
    if any(p.startswith("Ġ") for p in list(vocab)[:5000]):
        return "bytelevel"
    raise ConfigError(
        f"cross-tokenizer distillation needs each token's bytes; the tokenizer {type(tokenizer).__name__} is "
        "neither ByteLevel BPE nor SentencePiece-style, so its token bytes are unknown"
    )


def infer_scheme(pieces: Sequence[str]) -> str:
    """The scheme of raw vocabulary pieces (e.g. vLLM's `/tokenize` token strings)."""
    if any("▁" in p or _BYTE_FALLBACK.match(p) for p in pieces):
        return "sentencepiece"
    return "bytelevel"


class TokenBytes:
    """id → bytes for one tokenizer (special tokens are empty: they stand for no text)."""

    def __init__(self, tokenizer: Any):
        self.scheme = tokenizer_scheme(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special |= {i for i, t in added.items() if getattr(t, "special", False)}
        vocab = tokenizer.get_vocab()
        size = max(len(tokenizer), max(vocab.values()) + 1)
        table: list[bytes] = [b""] * size
        for piece, i in vocab.items():
            # A byte-fallback piece stands for its byte even where a tokenizer registered it as an added token.
            if i not in special or (self.scheme == "sentencepiece" and _BYTE_FALLBACK.match(piece)):
                table[i] = piece_bytes(piece, self.scheme)
        self.table = table
        self.special = special

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> bytes:
        return self.table[i] if 0 <= i < len(self.table) else b""


def byte_offsets(token_bytes: Sequence[bytes], text: str | bytes | None = None, *,
                 where: str = "text") -> list[tuple[int, int]]:
    """(start, end) byte offsets of consecutive tokens, from their bytes; checked against `text` when given.

    The tokens' bytes must spell `text` (or a prefix of it: the answer may be truncated). A SentencePiece
    tokenizer's synthetic leading space (its dummy prefix) is taken off the first token. Raises `ConfigError`
    naming `where` when the tokens do not spell the text (a tokenizer whose normaliser rewrites text).
    """
    lengths = [len(b) for b in token_bytes]
    shift = 0
    if text is not None:
        want = text.encode("utf-8") if isinstance(text, str) else text
        got = b"".join(token_bytes)
        if not want.startswith(got):
            if got[:1] == b" " and want.startswith(got[1:]) and lengths and lengths[0] >= 1:
                shift = 1
            else:
                raise ConfigError(
                    f"{where}: the tokens spell {got[:80]!r}, not the text {want[:80]!r}; cross-tokenizer alignment "
                    "needs a tokenizer whose tokens reproduce the text byte for byte"
                )
    out, pos = [], 0
    for i, n in enumerate(lengths):
        if i == 0 and shift:
            n -= 1
        out.append((pos, pos + n))
        pos += n
    return out


def align(s_offsets: Sequence[tuple[int, int]], t_offsets: Sequence[tuple[int, int]]) -> list[tuple[list[int], list[int]]]:
    """The smallest spans ending on a byte boundary common to both sides: [(student positions, teacher positions)].

    Both offset lists must start at the same byte. Spans with an empty side and a trailing remainder whose byte
    ends differ (one side truncated) are dropped.
    """
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # a library notice, not for the person at the terminal
    from trl.experimental.gold.gold_trainer import ULDLoss

    s_groups, t_groups = ULDLoss._align_by_byte_offsets([list(o) for o in s_offsets], [list(o) for o in t_offsets])
    out = []
    for sg, tg in zip(s_groups, t_groups, strict=False):
        if not sg or not tg:
            continue
        if s_offsets[sg[-1]][1] != t_offsets[tg[-1]][1]:
            continue  # the leftover after the last common boundary
        out.append((sg, tg))
    return out


def span_bytes(token_bytes: Sequence[bytes], group: Sequence[int]) -> bytes:
    """The bytes of one side of a span."""
    return b"".join(token_bytes[i] for i in group)


def shared_vocabulary(student: TokenBytes, teacher: TokenBytes) -> dict[int, int]:
    """teacher id → student id for the tokens whose bytes exist in both vocabularies (non-empty, unique per side)."""

    def unique(tb: TokenBytes) -> dict[bytes, int]:
        seen: dict[bytes, int] = {}
        dup: set[bytes] = set()
        for i, b in enumerate(tb.table):
            if not b:
                continue
            if b in seen:
                dup.add(b)
            else:
                seen[b] = i
        return {b: i for b, i in seen.items() if b not in dup}

    s_map, t_map = unique(student), unique(teacher)
    return {t_id: s_map[b] for b, t_id in t_map.items() if b in s_map}


@dataclass
class SpanPlan:
    """One example's aligned answer spans, as answer-relative positions on each side."""

    student: list[list[int]]
    teacher: list[list[int]]

    def __len__(self) -> int:
        return len(self.student)


def plan_spans(s_offsets: Sequence[tuple[int, int]], t_offsets: Sequence[tuple[int, int]]) -> SpanPlan:
    """`align` as a `SpanPlan`."""
    pairs = align(s_offsets, t_offsets)
    return SpanPlan(student=[s for s, _ in pairs], teacher=[t for _, t in pairs])
