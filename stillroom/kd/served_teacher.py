"""A teacher on a server: fills the teacher-logit cache through vLLM's teacher-forced `prompt_logprobs`.

`kd logits --teacher openai:MODEL --base-url http://gpu-node:8000/v1` sends each training example (prompt +
answer token ids, exactly the ids the student trains on) to `/v1/completions` with `prompt_logprobs: k`. vLLM
returns, for every prompt position, the k most likely next tokens with their log-probabilities under the teacher;
the answer positions of that are the same top-k rows `build_logit_cache` computes from a local teacher's logits, and
the rest of the mass, log(1 − Σ top-k p), is kept as the tail bucket as before. So a teacher on a GPU cluster
teaches a local student without ever being loaded here.

Limits, each refused with a message: k is at most the server's `max_logprobs` (vLLM's default 20; raise it with
`--max-logprobs`); the log-probabilities are at temperature 1 (vLLM returns the model's own distribution), so the
cache's temperature must be 1; a server has no hidden states, so no hint KD.

Same vocabulary: teacher and student must share a tokenizer, checked by comparing the server's `/tokenize` of a probe
text with the student tokenizer's ids. Across tokenizers (`ServedTokenizer`): the teacher's token ids *and* their
vocabulary pieces come from `/tokenize` (`return_token_strs`), the pieces give each token's bytes, and the cache
holds the teacher's own ids, the actual answer token's log-probability and the byte offsets
(`stillroom.kd.xtok_train`). The server's tokenizer does not say which id is its EOS, so the teacher's answers end
without one (the student's EOS then has no teacher span and is taught by the cross-entropy term only).

Spend and resumption: inside a route (`metered`), every top-k request is a paid teacher call like any other. Its
worst case (every token sent, one generated per sequence) is held against the run's spend cap, or the compare's
ledger, before it is sent; what the server bills is charged to the route's meter and kept in the run's cache as
it arrives (the route's build cost); and its checked result is committed to the run's cache, keyed by the teacher
and the exact request, before the shard is written. A crash or Ctrl-C mid-shard therefore loses no completed
request: the rerun reads them back and sends only the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from stillroom.backends.openai_logprobs import (
    PROBE_TEXT,
    ServerScorer,
    is_openai_api,
    rest_logmass,
    teacher_forced_topk,
    topk_body,
)
from stillroom.errors import BackendError, ConfigError, SpendCapReached
from stillroom.kd.losses import LOG_FLOOR


class _PieceBytes:
    """id → bytes of the tokens a `ServedTokenizer` has seen (special tokens named by the server count as text;
    they occur in prompts, whose offsets are never used)."""

    def __init__(self):
        self.table: dict[int, bytes] = {}

    def __getitem__(self, i: int) -> bytes:
        return self.table.get(int(i), b"")


class ServedTokenizer:
    """The teacher's tokenizer behind a vLLM server, through `/tokenize`: enough of a tokenizer for
    `encode_examples` and cross-tokenizer alignment (ids, and each id's bytes from its vocabulary piece)."""

    bos_token_id = None
    eos_token_id = None  # unknown to the client: the teacher's answers get no EOS

    def __init__(self, scorer: ServerScorer):
        from stillroom.kd.xtok import infer_scheme

        self.scorer = scorer
        self.token_bytes = _PieceBytes()
        _, pieces = scorer.server_tokenize_pieces(PROBE_TEXT)
        self.scheme = infer_scheme(pieces or [])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` from the server; records each id's bytes."""
        from stillroom.kd.xtok import piece_bytes

        ids, pieces = self.scorer.server_tokenize_pieces(text, add_special_tokens=add_special_tokens)
        for i, p in zip(ids, pieces or [], strict=True):
            if i not in self.token_bytes.table:
                self.token_bytes.table[i] = piece_bytes(p, self.scheme)
        return ids


class ServedTeacher:
    """The teacher side of `build_logit_cache` for a model behind a vLLM server (`score_shard`)."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.scorer = ServerScorer(backend)
        self.identity = f"served:{backend.base_url}:{backend.model}"
        """Names the teacher in the cache key (a different server or model gets a different cache)."""
        self.vocab_size: int | None = None
        self.run: Any = None
        """The route's teacher (`metered`): the run's cache and usage meter, which every request goes through."""

    def metered(self, run: Any) -> None:
        """Send every request through a route's teacher (`RouteContext.open_teacher` around `self.backend`: the
        run's durable cache and its usage meter, with the spend cap or the compare's ledger)."""
        if run.backend is not self.backend:
            raise ValueError("the route's teacher must wrap this served teacher's backend")
        self.run = run

    def tokenizer(self) -> ServedTokenizer:
        """The teacher's tokenizer through the server (cross-tokenizer KD); `ConfigError` without `/tokenize`."""
        try:
            return ServedTokenizer(self.scorer)
        except BackendError as exc:
            raise ConfigError(
                f"{self.backend.identity}: cross-tokenizer KD needs the teacher's tokens and their pieces from the "
                f"server's /tokenize (return_token_strs), which failed ({exc}). Serve the teacher with vLLM."
            ) from None

    def check_tokenizer(self, student_tokenizer: Any) -> None:
        """Refuse unless the server tokenizes a probe text to the student tokenizer's ids."""
        try:
            theirs = self.scorer.server_tokenize(PROBE_TEXT)
        except BackendError as exc:
            raise ConfigError(
                f"{self.backend.identity}: cannot check that teacher and student share a tokenizer: the server has "
                f"no usable /tokenize ({exc}). Serve the teacher with vLLM, which has it."
            ) from None
        ours = list(student_tokenizer.encode(PROBE_TEXT))
        if theirs != ours:
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b),
                         min(len(theirs), len(ours)))
            raise ConfigError(
                f"the served teacher ({self.backend.model}) and the student tokenize differently: the probe text "
                f"{PROBE_TEXT!r} is {len(theirs)} tokens on the server and {len(ours)} for the student, first "
                f"difference at token {first} (server {theirs[first:first + 5]}, student {ours[first:first + 5]}). "
                "Logit distillation needs one vocabulary: use a student of the teacher's family, or distil through "
                "text with `stillroom kd data`."
            )

    def score_shard(self, part: Sequence[Any], *, k: int, temperature: float, vocab: int, batch_size: int,
                    pad_id: int = 0, hint_layers: Sequence[int] = (), hint_positions: str = "answer",
                    xtok: bool = False):
        """The shard tensors `build_logit_cache` stores (idx, logp, rest, offsets) and the tokens sent."""
        if hint_layers:
            raise ConfigError("a served teacher has no hidden states to give: hint KD needs a local teacher")
        if float(temperature) != 1.0:
            raise ConfigError(
                f"a served teacher returns log-probabilities at temperature 1, not {temperature:g}: set temperature "
                "1, or use a local teacher"
            )
        batches = [list(part[i : i + batch_size]) for i in range(0, len(part), batch_size)]

        def one(batch):
            return self._topk([e.ids for e in batch], k, [(len(e.prompt_ids), len(e.ids)) for e in batch])

        workers = min(self.backend.max_concurrency, len(batches))
        try:
            if workers <= 1:
                rows_per_batch = [one(b) for b in batches]
            else:
                pool = ThreadPoolExecutor(max_workers=workers)
                try:
                    rows_per_batch = list(pool.map(one, batches))
                except BaseException:
                    # Requests already sent finish and are kept (in the run's cache); no new one starts.
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
                pool.shutdown(wait=True)
        except SpendCapReached as exc:
            raise (self.run.meter.settled_stop(exc) if self.run is not None else exc) from None
        idx, logp, rest, offsets, tok_logp = [], [], [], [0], []
        for batch, (rows, actual) in zip(batches, rows_per_batch, strict=True):
            for lps in actual if xtok else ():
                tok_logp.extend(lps)
            for e, positions in zip(batch, rows, strict=True):
                for top in positions:
                    ids, lps = _fixed_width(top, k, vocab)
                    idx.append(ids)
                    logp.append(lps)
                    rest.append(rest_logmass([x for x in lps if x > LOG_FLOOR], LOG_FLOOR))
                offsets.append(offsets[-1] + len(e.answer_ids))
        tensors = {
            "idx": torch.tensor(idx, dtype=torch.int32),
            "logp": torch.tensor(logp, dtype=torch.float32),
            "rest": torch.tensor(rest, dtype=torch.float32).clamp(min=LOG_FLOOR),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }
        if xtok:
            from stillroom.kd.logit_cache import xtok_offsets

            tensors["tok_logp"] = torch.tensor(tok_logp, dtype=torch.float32).clamp(min=LOG_FLOOR)
            tensors["byte_offsets"] = xtok_offsets(part)
        return tensors, sum(len(e.ids) for e in part)

    def _topk(self, prompts: list[list[int]], k: int, spans: list[tuple[int, int]]):
        """(top-k rows, actual tokens' log-probabilities) of one request: the sequences' positions `spans`
        ([start, stop) each). Metered (`metered`): a completed request is read back from the run's cache; a new
        one holds its worst case against the cap while it runs and is committed the moment it is checked."""
        run = self.run

        def send():
            actual: list = []
            rows = teacher_forced_topk(self.scorer, prompts, k, lambda i: range(*spans[i]), actual=actual)
            return rows, actual

        if run is None:
            return send()
        key = topk_key(self.backend.identity, self.backend.model, prompts, k, spans)
        hit = run.cache.get_topk(key)
        if hit is not None:
            run.meter.record_hit()
            return [[[(int(t), float(lp)) for t, lp in pos] for pos in seq] for seq in hit["rows"]], hit["actual"]
        # vLLM bills exactly the ids sent and the one token it generates per sequence; the bill itself is charged
        # through the backend's usage listener as the reply arrives (retries included).
        reservation = run.meter.reserve(sum(len(p) for p in prompts), len(prompts), run.model, wait=True)
        try:
            rows, actual = send()
        finally:
            run.meter.cancel(reservation)
        run.cache.put_topk(key, identity=self.backend.identity, result={"rows": rows, "actual": actual})
        return rows, actual


def topk_key(identity: str, model: str, prompts: Sequence[Sequence[int]], k: int,
             spans: Sequence[tuple[int, int]]) -> str:
    """Cache key of a top-k request: the teacher, the exact request body, and the positions kept of it."""
    payload = json.dumps({"backend": identity, "completions": {"model": model, **topk_body(prompts, k)},
                          "positions": [[int(a), int(b)] for a, b in spans]}, sort_keys=True)
    return "topk:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _fixed_width(top: list[tuple[int, float]], k: int, vocab: int) -> tuple[list[int], list[float]]:
    """k (id, log-prob) columns: ids outside the student's range dropped (their mass joins the rest), and a short
    row filled with unused ids at the floor log-probability (they carry no mass)."""
    kept = [(t, lp) for t, lp in top if 0 <= t < vocab][:k]
    if len(kept) < min(k, vocab):
        used = {t for t, _ in kept}
        filler = (t for t in range(vocab) if t not in used)
        kept += [(next(filler), LOG_FLOOR) for _ in range(min(k, vocab) - len(kept))]
    return [t for t, _ in kept], [lp for _, lp in kept]


def served_teacher_for(cfg: Any) -> ServedTeacher:
    """The served teacher a `KDLogitsConfig` names (`teacher.spec: openai:MODEL`, `teacher.base_url`), or a
    `ConfigError` saying why it cannot teach this way."""
    from stillroom.backends.openai_compat import OpenAIBackend

    spec = cfg.teacher.spec
    model = spec.partition(":")[2]
    url = cfg.teacher.base_url
    if not url or is_openai_api(url):
        raise ConfigError(
            f"{spec!r}: a served teacher fills the logit cache through vLLM's prompt_logprobs; give --base-url "
            "of a vLLM server (e.g. http://gpu-node:8000/v1). OpenAI's API and servers without prompt "
            "log-probabilities can only teach through text (`stillroom kd data`)."
        )
    for bad, why in (
        (cfg.teacher_mode == "online", "teacher_mode 'online' keeps a local teacher resident; use the cached mode"),
        (getattr(cfg, "on_policy", False), "on-policy KD scores the student's samples with a resident teacher"),
        (cfg.hints.enabled, "hint KD needs the teacher's hidden states, which a server does not return"),
        (getattr(cfg, "eval_teacher", False), "evaluate the served teacher with `stillroom eval --model openai:...`"),
        (cfg.top_k == 0, "top_k 0 (the full distribution) is more than a server returns; use top_k <= its max_logprobs"),
    ):
        if bad:
            raise ConfigError(f"{spec!r} is a served teacher: {why}")
    backend = OpenAIBackend(model, base_url=url, api_key_env=cfg.teacher.api_key_env,
                            max_concurrency=cfg.teacher.max_concurrency)
    return ServedTeacher(backend)
