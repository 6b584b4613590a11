"""The teacher-logit cache: the teacher runs once over the training data, and training reads its top-k
log-probabilities from disk, so the teacher is never in memory while the student trains.

Layout of one cache (a folder under the run folder, named by a hash of everything that determines its content:
teacher, token ids of every example, k, temperature, vocabulary range, hint layers):

    meta.json                      written first; what the cache holds and how it is sharded
    shard-00000.safetensors        examples [0, shard_size)
    shard-00001.safetensors        ...

Each shard holds, for its examples' answer positions (the positions whose logits predict an answer token), rows
concatenated in example order: ``idx`` int32 [P, k] (top-k token ids), ``logp`` float32 [P, k] (their
log-probabilities at the cache's temperature), ``rest`` float32 [P] (log of the remaining mass,
log(1 − Σ top-k p), computed as an exact log-sum-exp) and ``offsets`` int64 [n + 1]; with hints also
``hidden.<layer>`` float16 [H, d] and ``hidden_offsets``. A cross-tokenizer cache (``xtok``, the teacher's own
vocabulary, `stillroom.kd.xtok`) also holds ``tok_logp`` float32 [P] (the teacher's log-probability of the
actual answer token at each position: the merge factor of multi-token spans) and ``byte_offsets`` int32 [P, 2]
(each answer token's UTF-8 byte span, relative to the start of the answer). A shard is written to a temporary file and renamed into
place, so it is either complete or absent: an interrupted build resumes at the first missing shard and never
recomputes a finished one, and a finished cache is opened without loading the teacher at all.

Data preparation shared by the cache and the trainer lives here too: `encode_examples` (prompt + answer token ids,
exactly as the log-likelihood evaluator tokenizes them), `left_pad` and `answer_forward` (one forward that
computes logits only at the answer positions: with left padding they are the last A positions of every row, so
`logits_to_keep` skips the 262k-vocabulary head everywhere else).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from stillroom.errors import ConfigError
from stillroom.kd.losses import LOG_FLOOR, TeacherTargets, topk_targets
from stillroom.runs import atomic_write_text

CACHE_FORMAT = 1
"""Bumped when the shard layout changes (part of the cache key)."""

_ALL_IDS = 2**31 - 1
"""The vocabulary bound of a served teacher whose vocabulary size is unknown (cross-tokenizer: every id kept)."""


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Encoded:
    """One training example as token ids: the prompt, then the answer the loss is computed on."""

    id: str
    prompt_ids: list[int]
    answer_ids: list[int]
    meta: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids


def encode_pair(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) the way the log-likelihood evaluator (and lm-eval) splits them.

    Trailing whitespace of the prompt moves onto the answer; answer ids are `encode(prompt + answer)` minus the
    prompt's ids, so a trained student is scored on exactly the tokens it was trained on.
    """
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:
        prompt, answer = prompt[:-n_spaces], prompt[-n_spaces:] + answer
    ctx = list(tokenizer.encode(prompt))
    whole = list(tokenizer.encode(prompt + answer))
    if whole[: len(ctx)] != ctx:
        # A token merged across the boundary: encode the answer on its own instead.
        return ctx, list(tokenizer.encode(answer, add_special_tokens=False))
    return ctx, whole[len(ctx) :]


def encode_examples(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str, str]],
    *,
    max_length: int = 512,
    append_eos: bool = True,
) -> list[Encoded]:
    """Tokenize (id, prompt, answer) triples. The prompt is cut from the left (after a leading BOS) so that prompt +
    answer fits in `max_length`; with `append_eos` the answer ends with EOS, so the student learns to stop."""
    out = []
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    for ex_id, prompt, answer in pairs:
        p, a = encode_pair(tokenizer, prompt, answer)
        if append_eos and eos is not None:
            a = a + [eos]
        if not a:
            raise ConfigError(f"example {ex_id!r}: the answer {answer!r} encodes to no tokens")
        a = a[: max(1, max_length - 1)]
        room = max_length - len(a)
        if len(p) > room:
            head = p[:1] if bos is not None and p and p[0] == bos else []
            p = head + p[len(p) - (room - len(head)) :] if room > len(head) else p[:room]
        out.append(Encoded(id=str(ex_id), prompt_ids=p, answer_ids=a))
    return out


def left_pad(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids / attention_mask / position_ids, and `labels` [B, A]: each row's answer ids aligned
    to the right of an A-wide window (A = longest answer), -100 elsewhere.

    With left padding every row ends with its answer, so the logits predicting answer tokens are, for every row,
    among the last A + 1 positions: one `logits_to_keep=A + 1` forward serves the whole batch.
    """
    length = max(len(e.ids) for e in batch)
    a_max = max(len(e.answer_ids) for e in batch)
    b = len(batch)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, a_max), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        ids = e.ids
        input_ids[i, length - len(ids) :] = torch.tensor(ids)
        mask[i, length - len(ids) :] = 1
        labels[i, a_max - len(e.answer_ids) :] = torch.tensor(e.answer_ids)
    # Explicit positions: left padding must not shift absolute position embeddings (RoPE would not mind).
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


def answer_forward(model: Any, inputs: dict[str, torch.Tensor], *, hidden_layers: Sequence[int] = ()):
    """Forward over a `left_pad` batch computing logits only where the answer is predicted.

    Returns (logits [B, A, V] aligned with `inputs['labels']`, {layer: hidden [B, L, d]} for `hidden_layers`;
    layer 0 is the embedding output, layer i the output of decoder block i).
    """
    a_max = inputs["labels"].size(1)
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        position_ids=inputs["position_ids"],
        logits_to_keep=a_max + 1,
        output_hidden_states=bool(hidden_layers),
        use_cache=False,
    )
    # Position t predicts token t + 1: the last kept position predicts past the end and is dropped.
    logits = out.logits[:, -(a_max + 1) : -1]
    hidden = {j: out.hidden_states[j] for j in hidden_layers} if hidden_layers else {}
    return logits, hidden


# ---------------------------------------------------------------------------------------------- vocabulary


@dataclass
class VocabPlan:
    """How student and teacher vocabularies line up."""

    size: int
    """Shared logit range: both models' logits are truncated to [0, size) before the softmax."""
    note: str = ""


def _id_to_token(tokenizer: Any, n: int) -> list[str | None]:
    table: list[str | None] = [None] * n
    for tok, i in tokenizer.get_vocab().items():
        if 0 <= i < n:
            table[i] = tok
    return table


def check_vocab(student_tok: Any, teacher_tok: Any, student_logits: int, teacher_logits: int) -> VocabPlan:
    """Refuse distillation across different vocabularies; allow the same tokenizer, or one family whose logit
    dimensions are padded differently (then both sides are truncated to the shared range).

    `*_logits` are the models' output dimensions (config.vocab_size), which may exceed the tokenizer's size.
    Raises `ConfigError` naming the sizes and a sample of ids whose token strings differ.
    """
    shared = min(student_logits, teacher_logits)
    n_s, n_t = len(student_tok), len(teacher_tok)
    n_cmp = min(n_s, n_t, shared)
    sizes = (f"student tokenizer {n_s} tokens / {student_logits} logits, "
             f"teacher tokenizer {n_t} tokens / {teacher_logits} logits")
    if student_tok is not teacher_tok:
        s_tab, t_tab = _id_to_token(student_tok, n_cmp), _id_to_token(teacher_tok, n_cmp)
        diff = [i for i in range(n_cmp) if s_tab[i] != t_tab[i]]
        if diff:
            sample = "; ".join(f"id {i}: student {s_tab[i]!r} vs teacher {t_tab[i]!r}" for i in diff[:5])
            raise ConfigError(
                f"student and teacher vocabularies differ ({sizes}): {len(diff)} of the first {n_cmp} token ids map "
                f"to different tokens, e.g. {sample}. Logit distillation needs one vocabulary: use a student of "
                "the teacher's family (same tokenizer, a padded vocabulary is fine), or distil through text with "
                "`stillroom kd data`."
            )
    notes = []
    if student_logits != teacher_logits:
        notes.append(f"logit dimensions differ ({student_logits} vs {teacher_logits}); both truncated to the "
                     f"shared range [0, {shared})")
    if max(n_s, n_t) > shared:
        notes.append(f"token ids >= {shared} exist in one tokenizer only; examples using them are refused")
    elif n_s != n_t:
        notes.append(f"tokenizer sizes differ ({n_s} vs {n_t}) but agree on every shared id")
    return VocabPlan(size=shared, note="; ".join(notes))


def check_ids_in_range(encoded: Sequence[Encoded], size: int) -> None:
    """Every token id must lie in the shared vocabulary range."""
    for e in encoded:
        bad = [t for t in e.ids if t >= size or t < 0]
        if bad:
            raise ConfigError(f"example {e.id!r} uses token id {bad[0]} outside the shared vocabulary [0, {size})")


# ---------------------------------------------------------------------------------------------- the cache


def cache_key(teacher_id: str, encoded: Sequence[Encoded], *, k: int, temperature: float, vocab_size: int,
              hint_layers: Sequence[int] = (), hint_positions: str = "answer", xtok: bool = False) -> str:
    """Hash of everything that determines a cache's content."""
    h = hashlib.sha256()
    head = {"format": CACHE_FORMAT, "teacher": teacher_id, "k": int(k), "temperature": float(temperature),
            "vocab_size": int(vocab_size), "hint_layers": [int(x) for x in hint_layers],
            "hint_positions": hint_positions if hint_layers else None}
    if xtok:
        head["xtok"] = True  # only when set: same-vocabulary caches keep their keys
    h.update(json.dumps(head, sort_keys=True).encode())
    for e in encoded:
        h.update(json.dumps([e.prompt_ids, e.answer_ids]).encode())
    return h.hexdigest()[:20]


def _n_hidden(e: Encoded, positions: str) -> int:
    return len(e.answer_ids) if positions == "answer" else len(e.ids)


class LogitCache:
    """A finished cache, read lazily (memory-mapped safetensors slices), one example at a time."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise ConfigError(f"{self.folder}: not a teacher-logit cache (no meta.json)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        missing = [i for i in range(self.n_shards) if not self.shard_path(i).exists()]
        if missing:
            raise ConfigError(f"{self.folder}: cache incomplete, shards {missing[:5]} missing; rebuild to resume")
        self._open = safe_open
        self._handles: dict[int, Any] = {}
        self._offsets: dict[int, torch.Tensor] = {}
        self._hidden_offsets: dict[int, torch.Tensor] = {}

    @property
    def n(self) -> int:
        return int(self.meta["n_examples"])

    @property
    def shard_size(self) -> int:
        return int(self.meta["shard_size"])

    @property
    def n_shards(self) -> int:
        return (self.n + self.shard_size - 1) // self.shard_size

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def hint_layers(self) -> list[int]:
        return [int(x) for x in self.meta.get("hint_layers", [])]

    def shard_path(self, s: int) -> Path:
        return self.folder / f"shard-{s:05d}.safetensors"

    def __len__(self) -> int:
        return self.n

    def _handle(self, s: int):
        if s not in self._handles:
            f = self._open(str(self.shard_path(s)), framework="pt")
            self._handles[s] = f
            self._offsets[s] = f.get_tensor("offsets")
            if self.hint_layers:
                self._hidden_offsets[s] = f.get_tensor("hidden_offsets")
        return self._handles[s]

    @property
    def xtok(self) -> bool:
        """Whether the cache holds the cross-tokenizer fields (tok_logp, byte_offsets)."""
        return bool(self.meta.get("xtok"))

    def get(self, i: int) -> dict[str, Any]:
        """Example i's targets: {'targets': TeacherTargets over its answer positions, 'hidden': {layer: [H, d]}},
        and for a cross-tokenizer cache 'tok_logp' [A] and 'byte_offsets' [A, 2]."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        s, j = divmod(i, self.shard_size)
        f = self._handle(s)
        a, b = (int(x) for x in self._offsets[s][j : j + 2])
        targets = TeacherTargets(
            idx=f.get_slice("idx")[a:b].long(), logp=f.get_slice("logp")[a:b], rest=f.get_slice("rest")[a:b]
        )
        hidden = {}
        if self.hint_layers:
            ha, hb = (int(x) for x in self._hidden_offsets[s][j : j + 2])
            hidden = {layer: f.get_slice(f"hidden.{layer}")[ha:hb] for layer in self.hint_layers}
        out = {"targets": targets, "hidden": hidden}
        if self.xtok:
            out["tok_logp"] = f.get_slice("tok_logp")[a:b]
            out["byte_offsets"] = f.get_slice("byte_offsets")[a:b]
        return out


@dataclass
class BuildStats:
    """What a build did: which shards it computed and which it found already on disk."""

    folder: Path
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0
    teacher_tokens: int = 0


def build_logit_cache(
    teacher: Any | Callable[[], Any],
    encoded: Sequence[Encoded],
    root: str | Path,
    *,
    teacher_id: str,
    k: int = 64,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    shard_size: int = 256,
    batch_size: int = 8,
    pad_id: int = 0,
    hint_layers: Sequence[int] = (),
    hint_positions: str = "answer",
    extra_meta: dict | None = None,
    progress: bool = True,
    xtok: bool = False,
) -> tuple[LogitCache, BuildStats]:
    """Run the teacher once over `encoded` and store its top-k answer-position log-probabilities under `root`.

    `teacher` is a causal LM, or a zero-argument function returning one: it is called only when some shard is
    missing, so reopening a finished cache never loads the teacher. A served teacher
    (`stillroom.kd.served_teacher.ServedTeacher`, anything with `score_shard`) fills the same shards remotely. `vocab_size` truncates the teacher's logits
    to the range shared with the student (see `check_vocab`); None keeps them all. Resumable: finished shards are
    kept, the rest computed. `extra_meta` is stored in meta.json as is (e.g. the hint layer map). Returns the
    opened cache and what was done.

    `xtok`: a cross-tokenizer cache (teacher's own vocabulary): every encoded example carries its answer tokens'
    byte offsets in ``meta['byte_offsets']``, stored with the teacher's log-probability of each actual answer token.
    """
    import time

    from stillroom.ui import progress_bar

    if hint_positions not in ("answer", "all"):
        raise ConfigError(f"hint_positions must be 'answer' or 'all', got {hint_positions!r}")
    if not encoded:
        raise ConfigError("no training examples to score with the teacher")
    vocab = int(vocab_size) if vocab_size else 0
    if xtok:
        missing = next((e.id for e in encoded if len(e.meta.get("byte_offsets") or ()) != len(e.answer_ids)), None)
        if missing is not None:
            raise ConfigError(f"example {missing!r}: a cross-tokenizer cache needs byte offsets for every answer token")
    key = cache_key(teacher_id, encoded, k=k, temperature=temperature, vocab_size=vocab,
                    hint_layers=hint_layers, hint_positions=hint_positions, xtok=xtok)
    folder = Path(root) / key
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": CACHE_FORMAT, "key": key, "teacher": teacher_id, "n_examples": len(encoded),
            "shard_size": int(shard_size), "k": int(k), "temperature": float(temperature), "vocab_size": vocab,
            "hint_layers": [int(x) for x in hint_layers], "hint_positions": hint_positions,
            "ids": [e.id for e in encoded], **({"xtok": True} if xtok else {}), **(extra_meta or {})}
    meta_path = folder / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        # vocab_size 0 means "the teacher's own", resolved (and recorded) when the teacher was first loaded.
        same = all(old.get(k_) == v for k_, v in meta.items() if not (k_ == "vocab_size" and not vocab))
        if not same:
            raise ConfigError(f"{folder}: existing cache has different settings; delete the folder to rebuild")
        if not vocab:
            meta["vocab_size"] = vocab = int(old.get("vocab_size") or 0)
    stats = BuildStats(folder=folder)
    n_shards = (len(encoded) + shard_size - 1) // shard_size
    todo = []
    for s in range(n_shards):
        (stats.skipped if (folder / f"shard-{s:05d}.safetensors").exists() else todo).append(s)
    if todo:
        model = teacher() if callable(teacher) and not isinstance(teacher, torch.nn.Module) else teacher
        served = hasattr(model, "score_shard")  # a teacher behind a server: no local weights
        t0 = time.perf_counter()
        # Settings that depend on the loaded teacher (its vocabulary) go into meta.json once known.
        if not vocab:
            vocab = int(model.vocab_size if served else model.config.get_text_config().vocab_size) if not (
                served and model.vocab_size is None) else _ALL_IDS
            meta["vocab_size"] = vocab
        atomic_write_text(meta_path, json.dumps(meta) + "\n")
        device = None if served else next(model.parameters()).device
        was_training = False if served else model.training
        if not served:
            model.eval()
        try:
            with progress_bar(transient=True) if progress else _nullbar() as bar:
                total = sum(len(encoded[s * shard_size : (s + 1) * shard_size]) for s in todo)
                job = bar.add_task("teacher logits", total=total) if bar else None
                for s in todo:
                    part = list(encoded[s * shard_size : (s + 1) * shard_size])
                    score = model.score_shard if served else partial(_score_shard, model, device=device)
                    kw = {"xtok": True} if xtok else {}
                    tensors, n_tok = score(part, k=k, temperature=temperature, vocab=vocab, batch_size=batch_size,
                                           pad_id=pad_id, hint_layers=hint_layers, hint_positions=hint_positions,
                                           **kw)
                    _save_atomic(tensors, folder / f"shard-{s:05d}.safetensors", {"n": str(len(part))})
                    stats.computed.append(s)
                    stats.teacher_tokens += n_tok
                    if bar:
                        bar.advance(job, len(part))
        finally:
            if not served:
                model.train(was_training)
        stats.seconds = time.perf_counter() - t0
    elif not meta_path.exists():
        atomic_write_text(meta_path, json.dumps(meta) + "\n")
    return LogitCache(folder), stats


class _nullbar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def _score_shard(model, part, *, device, k, temperature, vocab, batch_size, pad_id, hint_layers, hint_positions,
                 xtok=False):
    idx, logp, rest, offsets = [], [], [], [0]
    tok_logp: list[torch.Tensor] = []
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in hint_layers}
    h_offsets = [0]
    n_tok = 0
    for start in range(0, len(part), batch_size):
        batch = part[start : start + batch_size]
        inputs = {name: t.to(device) for name, t in left_pad(batch, pad_id).items()}
        logits, hs = answer_forward(model, inputs, hidden_layers=hint_layers)
        n_tok += int(inputs["attention_mask"].sum())
        labels = inputs["labels"]
        mask = labels != -100
        # Rows in example order: within each row the answer positions, left to right.
        rows = logits[mask][:, :vocab]
        t = topk_targets(rows, k, temperature)
        if xtok:
            lp = torch.log_softmax(rows.float() / temperature, dim=-1)
            tok_logp.append(lp.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1).clamp(min=LOG_FLOOR).cpu())
        idx.append(t.idx.to(torch.int32).cpu())
        logp.append(t.logp.cpu())
        rest.append(t.rest.cpu())
        for e in batch:
            offsets.append(offsets[-1] + len(e.answer_ids))
        if hint_layers:
            a_max = labels.size(1)
            length = inputs["input_ids"].size(1)
            for layer in hint_layers:
                h = hs[layer]
                if hint_positions == "answer":
                    # The positions whose logits predict answer tokens: [L - A - 1, L - 1) masked like labels.
                    sel = h[:, length - a_max - 1 : length - 1][mask]
                else:
                    sel = h[inputs["attention_mask"].bool()]
                hidden[layer].append(sel.to(torch.float16).cpu())
            for e in batch:
                h_offsets.append(h_offsets[-1] + _n_hidden(e, hint_positions))
    tensors = {
        "idx": torch.cat(idx).contiguous(),
        "logp": torch.cat(logp).float().contiguous(),
        "rest": torch.cat(rest).float().clamp(min=LOG_FLOOR).contiguous(),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
    }
    if xtok:
        tensors["tok_logp"] = torch.cat(tok_logp).float().contiguous()
        tensors["byte_offsets"] = xtok_offsets(part)
    if hint_layers:
        for layer in hint_layers:
            tensors[f"hidden.{layer}"] = torch.cat(hidden[layer]).contiguous()
        tensors["hidden_offsets"] = torch.tensor(h_offsets, dtype=torch.int64)
    return tensors, n_tok


def xtok_offsets(part: Sequence[Encoded]) -> torch.Tensor:
    """[P, 2] int32 answer-token byte offsets of a shard's examples, in row order."""
    rows = [tuple(o) for e in part for o in e.meta["byte_offsets"]]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors to a temporary file in the same folder, fsync, rename: a shard is complete or absent."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
