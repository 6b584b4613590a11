"""The durable response cache: a completed call is never paid for twice.

`ResponseCache` is one SQLite file per run folder (WAL mode, one connection per thread and per process,
every row committed on its own), so several threads and several processes can write to it at once, and a
run killed at any moment (even `kill -9`) keeps every answer it had received. `CachedBackend` wraps any
backend: hits are served from the file without a backend call; misses are charged to the `UsageMeter`
(which enforces the spend cap) and written the moment each answer arrives.

Calls to a remote backend run on worker threads, even one at a time, while the main thread only waits: so a
first Ctrl-C lets the calls already sent finish and be cached (nothing paid for is lost), and a second one
aborts at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path

from stillroom.backends.base import (
    Backend,
    Generation,
    GenerationParams,
    Prompt,
    ScoreRequest,
    Usage,
    input_token_bound,
    normalise_prompt,
    notify,
    request_key,
)
from stillroom.backends.usage import UsageMeter
from stillroom.errors import BackendError, SpendCapReached

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    text TEXT NOT NULL,
    finish_reason TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    latency_s REAL NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS scores (
    key TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    loglik TEXT NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    latency_s REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS topk (
    key TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""

# Long enough to ride out another process's write burst; SQLite retries internally until then.
_BUSY_TIMEOUT_MS = 60_000


def request_json(identity: str, prompt: Prompt, params: GenerationParams) -> str:
    """The request as stored next to its answer (for audits and for rebuilding datasets from the cache)."""
    return json.dumps(
        {"backend": identity, "params": params.as_dict(), "prompt": normalise_prompt(prompt)},
        sort_keys=True,
        ensure_ascii=False,
    )


class ResponseCache:
    """SQLite store of answers keyed by `request_key(identity, prompt, params)`.

    Safe for concurrent writers. Within a process, threads share one connection behind a lock: SQLite
    serialises writes anyway, and a connection per thread would leak one file handle per worker thread of
    every batch. Across processes, WAL lets readers and a writer proceed together and `busy_timeout` queues
    the writers. A process that inherits the object through `fork` opens its own connection. Every `put` is
    its own committed transaction, so nothing finished is lost when the process dies, even by `kill -9`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._query("SELECT 1")  # create the file and schema now, so errors surface at open time

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit, so each INSERT is durable the moment it returns.
        conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss too, not only a killed process; an fsync is cheap next to a model call.
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        return conn

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            # A connection inherited through fork must not be used in the child: open a fresh one there.
            if self._db is None or self._pid != os.getpid():
                self._db, self._pid = self._connect(), os.getpid()
            return self._db.execute(sql, args).fetchall()

    def get(self, key: str) -> Generation | None:
        """The cached answer for `key` (with `usage.cached=True`), or None."""
        rows = self._query(
            "SELECT text, finish_reason, input_tokens, output_tokens, latency_s FROM responses WHERE key = ?",
            (key,),
        )
        if not rows:
            return None
        text, finish, tin, tout, latency = rows[0]
        return Generation(
            text=text,
            usage=Usage(input_tokens=tin, output_tokens=tout, latency_s=latency, cached=True),
            finish_reason=finish,
        )

    def put(
        self,
        key: str,
        *,
        identity: str,
        model: str,
        request: str,
        generation: Generation,
        cost_usd: float = 0.0,
    ) -> None:
        """Store one answer and commit it immediately. The first answer stored for a key wins."""
        u = generation.usage
        self._query(
            "INSERT OR IGNORE INTO responses (key, identity, model, request, text, finish_reason, input_tokens, "
            "output_tokens, latency_s, cost_usd, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                identity,
                model,
                request,
                generation.text,
                generation.finish_reason,
                int(u.input_tokens),
                int(u.output_tokens),
                float(u.latency_s),
                float(cost_usd),
                time.time(),
            ),
        )

    def put_spend(self, *, identity: str, model: str, what: str, input_tokens: int, output_tokens: int,
                  cost_usd: float) -> None:
        """Record spend that has no answer to cache (a server's scoring, top-k or probe request) as its own row,
        so the run's totals (`total_usage`, the spend cap of a rerun) count it. Its key never matches a request."""
        import uuid

        self._query(
            "INSERT INTO responses (key, identity, model, request, text, finish_reason, input_tokens, output_tokens, "
            "latency_s, cost_usd, created_at) VALUES (?, ?, ?, ?, '', 'billed', ?, ?, 0, ?, ?)",
            (f"billed:{uuid.uuid4().hex}", identity, model, json.dumps({"billed": what}), int(input_tokens),
             int(output_tokens), float(cost_usd), time.time()),
        )

    def get_score(self, key: str) -> tuple[list[float], float] | None:
        """Cached log-likelihoods for a score request key and the latency they took, or None."""
        rows = self._query("SELECT loglik, latency_s FROM scores WHERE key = ?", (key,))
        return ([float(x) for x in json.loads(rows[0][0])], float(rows[0][1])) if rows else None

    def put_score(self, key: str, *, identity: str, loglik: list[float], input_tokens: int = 0,
                  latency_s: float = 0.0) -> None:
        """Store one request's log-likelihoods and commit them immediately."""
        self._query(
            "INSERT OR IGNORE INTO scores (key, identity, loglik, input_tokens, latency_s, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, identity, json.dumps([float(x) for x in loglik]), int(input_tokens), float(latency_s), time.time()),
        )

    def get_topk(self, key: str):
        """A served teacher's checked top-k reply for a request key (`stillroom.kd.served_teacher`), or None."""
        rows = self._query("SELECT result FROM topk WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def put_topk(self, key: str, *, identity: str, result) -> None:
        """Store one served top-k request's checked result (JSON) and commit it immediately. Its spend is not
        here: the server's bill is recorded as it arrives (`put_spend`), so the run's totals count it once."""
        self._query("INSERT OR IGNORE INTO topk (key, identity, result, created_at) VALUES (?, ?, ?, ?)",
                    (key, identity, json.dumps(result), time.time()))

    def total_usage(self, identity: str | None = None) -> dict:
        """Spend recorded in the file (all backends, or one `identity`): calls, input/output tokens, cost."""
        sql = "SELECT COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost_usd) FROM responses"
        args: tuple = ()
        if identity is not None:
            sql, args = sql + " WHERE identity = ?", (identity,)
        n, tin, tout, cost = self._query(sql, args)[0]
        return {
            "calls": n or 0,
            "input_tokens": tin or 0,
            "output_tokens": tout or 0,
            "cost_usd": cost or 0.0,
        }

    def journal_mode(self) -> str:
        """SQLite's journal mode for this file ('wal')."""
        return self._query("PRAGMA journal_mode")[0][0]

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM responses")[0][0]

    def __contains__(self, key: str) -> bool:
        return bool(self._query("SELECT 1 FROM responses WHERE key = ?", (key,)))

    def close(self) -> None:
        """Close this process's connection (a later call reopens it)."""
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None


def score_key(identity: str, request: ScoreRequest) -> str:
    """Stable cache key of a log-likelihood request (distinct from every completion key)."""
    payload = json.dumps(
        {"backend": identity, "score": {"context": request.context, "continuations": list(request.continuations)}},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CachedBackend:
    """Any backend behind the durable cache and the usage meter; implements the `Backend` interface.

    `calls` counts real backend calls made through this wrapper (one per prompt sent), and `score_calls` the
    log-likelihood requests scored by the backend, so a resumed run can be checked to repeat nothing.
    """

    def __init__(self, backend: Backend, cache: ResponseCache, meter: UsageMeter | None = None):
        self.backend = backend
        self.cache = cache
        self.meter = meter if meter is not None else UsageMeter()
        self.calls = 0
        self.score_calls = 0
        self.last_score_latencies: list[float] = []
        self._lock = threading.Lock()
        if hasattr(backend, "usage_listener"):
            backend.usage_listener = self._billed  # a server's scoring requests are paid for too

    def _billed(self, input_tokens: int, output_tokens: int) -> None:
        """A scoring, top-k or probe request the server billed: charged to the meter and kept in the cache."""
        cost = self.meter.charge(input_tokens, output_tokens, self.model)
        self.cache.put_spend(identity=self.identity, model=self.model, what="scoring", input_tokens=input_tokens,
                             output_tokens=output_tokens, cost_usd=cost)

    # --- delegated interface -------------------------------------------------------------------------------
    @property
    def identity(self) -> str:
        return self.backend.identity

    @property
    def model(self) -> str:
        return self.backend.model

    @property
    def supports_score(self) -> bool:
        """Whether the backend scores. A server's answer comes from one probe (billed, so held against the cap
        and charged) whose result is kept in the cache: a rerun does not probe, and pays nothing, again."""
        scorer = getattr(self.backend, "scorer", None) if self._remote else None
        if scorer is not None and getattr(scorer, "_capability", None) is None:
            self._probe_once(scorer)
        return self.backend.supports_score

    def _probe_once(self, scorer) -> None:
        from dataclasses import asdict

        from stillroom.backends.openai_logprobs import PROBE_TEXT, ServerCapability

        key = "capability:" + hashlib.sha256(self.identity.encode("utf-8")).hexdigest()
        hit = self.cache.get(key)
        if hit is not None:
            scorer._capability = ServerCapability(**json.loads(hit.text))
            return
        # Worst case of the probe: the probe text sent twice (token ids, then text), a token back each time.
        reservation = self.meter.reserve(2 * self._estimate_input(PROBE_TEXT), 2, self.model)
        try:
            capability = scorer.capability
        finally:
            self.meter.cancel(reservation)
        self.cache.put(key, identity=self.identity, model=self.model, request=json.dumps({"probe": "capability"}),
                       generation=Generation(text=json.dumps(asdict(capability)), usage=Usage(0, 0, 0.0),
                                             finish_reason="capability"))

    @property
    def supports_chat(self) -> bool:
        return self.backend.supports_chat

    @property
    def exact_tokens(self) -> bool:
        return bool(getattr(self.backend, "exact_tokens", False))

    @property
    def context_tokens(self) -> int | None:
        from stillroom.backends.base import context_window

        return context_window(self.backend)

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Log-likelihoods, cached like completions: a resumed run re-scores nothing.

        A local backend's scoring is free (the meter counts its requests and tokens); a server's is charged like
        completions (its worst case held against the cap while it runs, what the server billed charged after). Misses go to the backend in one call, so requests that share a
        prefix still share its forward pass. `last_score_latencies` holds each request's share of the time it
        took when it was scored (also for cache hits), so reports keep the real latency after a resume.
        """
        if not self.backend.supports_score:
            return self.backend.score(requests)  # raises NotImplementedError with the backend's own message
        keys = [score_key(self.identity, r) for r in requests]
        out: list[list[float] | None] = [None] * len(requests)
        latencies = [0.0] * len(requests)
        for i, key in enumerate(keys):
            hit = self.cache.get_score(key)
            if hit is not None:
                out[i], latencies[i] = hit
        hits = sum(o is not None for o in out)
        if hits:
            self.meter.record_hit(hits)
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            t0 = time.perf_counter()
            reservation = None
            if self._remote:
                # A server bills scoring: hold its worst case (every continuation's prompt, one token out each)
                # against the cap while it runs; what it billed is charged through `_billed` as replies arrive.
                n = sum(len(requests[i].continuations) for i in todo)
                bound = sum(self._estimate_input(requests[i].context + c) for i in todo for c in requests[i].continuations)
                reservation = self.meter.reserve(bound, n, self.model)
            try:
                scored = self.backend.score([requests[i] for i in todo])
            finally:
                if reservation is not None:
                    self.meter.cancel(reservation)
            share = (time.perf_counter() - t0) / len(todo)
            for i, sc in zip(todo, scored, strict=True):
                # Whatever the backend, a NaN or a positive infinity is never cached: a rerun would replay it.
                # (-inf stays: a continuation a local model gives probability 0 is a real, if extreme, answer.)
                if len(sc) != len(requests[i].continuations) or any(math.isnan(float(x)) or float(x) == math.inf
                                                                   for x in sc):
                    raise BackendError(
                        f"{self.identity}: scoring {requests[i].context[:40]!r} gave {list(sc)!r}: expected "
                        f"{len(requests[i].continuations)} log-likelihoods, none NaN. Nothing of it was cached")
            tokens = 0
            for i, sc in zip(todo, scored, strict=True):
                n = self.backend.count_tokens(requests[i].context)
                tokens += n
                self.cache.put_score(keys[i], identity=self.identity, loglik=list(sc), input_tokens=n, latency_s=share)
                out[i], latencies[i] = [float(x) for x in sc], share
            self.meter.record_scores(len(todo), tokens)
            with self._lock:
                self.score_calls += len(todo)
        self.last_score_latencies = latencies
        return out  # type: ignore[return-value]

    def count_tokens(self, text: str) -> int:
        """Delegated to the wrapped backend."""
        return self.backend.count_tokens(text)

    # --- generation ----------------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: GenerationParams) -> Generation:
        """A cached answer (no backend call), or a real call that is charged, cached and returned."""
        key = request_key(self.identity, prompt, params)
        hit = self.cache.get(key)
        if hit is not None:
            self.meter.record_hit()
            return hit
        if self._remote:
            return self._run_threaded([(key, prompt)], params)[key]
        return self._call_one(key, prompt, params)

    @property
    def _remote(self) -> bool:
        # Backends that pay per request declare a concurrency (OpenAI-compatible); local ones batch instead.
        return getattr(self.backend, "max_concurrency", None) is not None

    def generate_many(self, prompts: list[Prompt], params: GenerationParams) -> list[Generation]:
        """Answers in input order: hits from the cache first, then the misses, each committed as it arrives.

        Identical prompts in one batch are sent once. A backend with a `max_concurrency` gets that many worker
        threads (one included); otherwise misses go through `backend.generate_many` in chunks of its
        `batch_size`. If a call fails (or the spend cap is reached, or Ctrl-C arrives), in-flight calls still
        finish and are cached before the error propagates; calls not yet started are not made.
        """
        keys = [request_key(self.identity, p, params) for p in prompts]
        results: list[Generation | None] = [None] * len(prompts)
        misses: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key in misses:
                misses[key].append(i)
                continue
            hit = self.cache.get(key)
            if hit is not None:
                results[i] = hit
                self.meter.record_hit()
            else:
                misses[key] = [i]
        if misses:
            todo = [(key, prompts[idx[0]]) for key, idx in misses.items()]
            if self._remote:
                answers = self._run_threaded(todo, params)
            else:
                answers = self._run_batched(todo, params)
            for key, gen in answers.items():
                for i in misses[key]:
                    results[i] = gen
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _estimate_input(self, prompt: Prompt) -> int:
        # Only a cap (the run's, or the command's ledger's) needs the bound; skip the tokenizer otherwise.
        ledger = getattr(self.meter, "ledger", None)
        if self.meter.cap is None and (ledger is None or ledger.cap is None):
            return 0
        return input_token_bound(self.backend, prompt)

    def _commit(
        self, key: str, prompt: Prompt, params: GenerationParams, gen: Generation, cost: float
    ) -> None:
        self.cache.put(
            key,
            identity=self.identity,
            model=self.model,
            request=request_json(self.identity, prompt, params),
            generation=gen,
            cost_usd=cost,
        )

    def _call_one(self, key: str, prompt: Prompt, params: GenerationParams,
                  stop: threading.Event | None = None) -> Generation | None:
        # With `stop` (worker threads), a call near the cap waits for the others to settle before it is
        # refused, and returns None without calling if the batch was stopped meanwhile (Ctrl-C, an error).
        reservation = self.meter.reserve(self._estimate_input(prompt), params.max_tokens, self.model,
                                         wait=stop is not None)
        if stop is not None and stop.is_set():
            self.meter.cancel(reservation)
            return None
        try:
            gen = self.backend.generate(prompt, params)
        except BaseException:
            self.meter.cancel(reservation)
            raise
        with self._lock:
            self.calls += 1
        cost = self.meter.settle(reservation, gen.usage)
        self._commit(key, prompt, params, gen, cost)
        return gen

    def _run_threaded(
        self, todo: list[tuple[str, Prompt]], params: GenerationParams
    ) -> dict[str, Generation]:
        workers = max(1, min(int(self.backend.max_concurrency or 1), len(todo)))  # type: ignore[attr-defined]
        out: dict[str, Generation] = {}
        errors: list[BaseException] = []
        queue = deque(todo)
        lock = threading.Lock()
        stop = threading.Event()
        busy = [0]
        running = [workers]

        def work() -> None:
            try:
                _work()
            finally:
                with lock:
                    running[0] -= 1

        def _work() -> None:
            while not stop.is_set():
                with lock:
                    if not queue:
                        return
                    key, prompt = queue.popleft()
                    busy[0] += 1
                try:
                    gen = self._call_one(key, prompt, params, stop=stop)
                    if gen is not None:
                        with lock:
                            out[key] = gen
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread below
                    with lock:
                        errors.append(exc)
                    stop.set()  # start no new calls; those already running finish and are cached
                finally:
                    with lock:
                        busy[0] -= 1

        # Daemon threads: after a second Ctrl-C the process exits without waiting for them.
        threads = [threading.Thread(target=work, daemon=True, name=f"stillroom-call-{i}") for i in range(workers)]
        for t in threads:
            t.start()
        try:
            _wait_zero(running)
        except KeyboardInterrupt:
            stop.set()
            with lock:
                n = busy[0]
            if n:
                notify(f"interrupted: letting {n} call(s) already sent finish and be cached; press Ctrl-C again to "
                       "abort at once")
                _wait_zero(running)  # a second KeyboardInterrupt propagates from here and abandons them
                notify(f"the {n} in-flight call(s) finished and are cached")
            raise
        if errors:
            exc = errors[0]
            if isinstance(exc, SpendCapReached):
                raise self.meter.settled_stop(exc) from None
            raise exc
        return out

    def _run_batched(self, todo: list[tuple[str, Prompt]], params: GenerationParams) -> dict[str, Generation]:
        size = max(1, int(getattr(self.backend, "batch_size", 1) or 1))
        out: dict[str, Generation] = {}
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            reservations = []
            try:
                for _, prompt in chunk:
                    reservations.append(
                        self.meter.reserve(self._estimate_input(prompt), params.max_tokens, self.model)
                    )
                gens = self.backend.generate_many([p for _, p in chunk], params)
            except BaseException:
                for r in reservations:
                    self.meter.cancel(r)
                raise
            with self._lock:
                self.calls += len(chunk)
            for (key, prompt), gen, r in zip(chunk, gens, reservations, strict=True):
                cost = self.meter.settle(r, gen.usage)
                self._commit(key, prompt, params, gen, cost)
                out[key] = gen
        return out


def _wait_zero(counter: list[int]) -> None:
    """Sleep in short slices until `counter[0]` is 0. Polling, not `Thread.join` or a lock: a Ctrl-C that lands
    inside `join` can leave a still-running thread reported as finished, and one that lands inside a `with
    lock` can leave the lock held. Reading an int needs neither."""
    while counter[0]:
        time.sleep(0.02)
