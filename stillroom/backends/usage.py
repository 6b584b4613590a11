"""Usage accounting and the spend cap.

`UsageMeter` counts every real backend call (tokens, latency, cost) and every cache hit, and enforces a
`SpendCap` over the whole run: spend from earlier invocations on the same run folder (read back from the
durable cache) counts too, so stopping and rerunning never resets the budget.

The cap is enforced *before* each call. A call reserves its worst case (an upper bound of its input tokens,
`stillroom.backends.base.input_token_bound`, plus `max_tokens` of output) under a lock; after the call the
reservation is settled to the actual usage. With many threads in flight, reservations are what stop them
from together overshooting the cap. Should a server ever count more input tokens than the bound, later
reservations are scaled up by the worst ratio seen, so one surprise cannot repeat.

A command that runs several routes (`stillroom compare`) opens one `Ledger` for the whole command
(`command_ledger`): every meter opened while it is active charges it, and the cap is checked against the
command's total (every route, earlier invocations included) with the same reservation rule, instead of each
route's folder on its own.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from stillroom.backends.base import Usage
from stillroom.errors import SpendCapReached
from stillroom.runs import atomic_write_text

__all__ = ["Ledger", "Prices", "SpendCap", "UsageMeter", "active_ledger", "command_ledger", "percentile",
           "write_json_atomic"]


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100), 0.0 for no values. Here, in the lowest layer that needs it (the usage meter's
    latency figures); the evaluator's metrics import it from here."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else 0.0


@dataclass(frozen=True)
class Prices:
    """USD per million input and output tokens for one model (0 for local models)."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """Cost in USD of a call with these token counts."""
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1_000_000


@dataclass(frozen=True)
class SpendCap:
    """Upper bounds on a run's total spend; None means unbounded. Tokens are input + output."""

    max_tokens: int | None = None
    max_cost_usd: float | None = None

    @property
    def active(self) -> bool:
        """Whether any bound is set."""
        return self.max_tokens is not None or self.max_cost_usd is not None


@dataclass(frozen=True)
class Reservation:
    """A call's worst case, held against the cap until the call is settled or cancelled."""

    model: str
    tokens: int
    cost_usd: float
    input_tokens: int = 0


_FREE = Prices()


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON so readers see the old file or the new one, never half of one (temp file + rename)."""
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=True) + "\n")


class UsageMeter:
    """Thread-safe counter of calls, cache hits, tokens, latency and cost, with the run's spend cap.

    `prices` maps model name to `Prices` (models not listed cost 0). `prior` is the spend of earlier
    invocations on the same run folder, as returned by `ResponseCache.total_usage()`; it counts against the
    cap but is reported separately from this invocation's numbers.
    """

    def __init__(
        self,
        prices: Mapping[str, Prices] | None = None,
        cap: SpendCap | None = None,
        prior: dict | None = None,
        ledger: Ledger | None = None,
        ledger_key: tuple[str, str] = ("", ""),
        cache_path: str | Path = "",
    ):
        self.prices: dict[str, Prices] = dict(prices or {})
        self.ledger = ledger
        """The command's ledger: when set, it holds the cap (this meter's own `cap` is not used)."""
        self.ledger_key = ledger_key
        self.cap = cap if cap is not None and cap.active and ledger is None else None
        prior = prior or {}
        self.prior_calls = int(prior.get("calls", 0))
        self.prior_input_tokens = int(prior.get("input_tokens", 0))
        self.prior_output_tokens = int(prior.get("output_tokens", 0))
        self.prior_tokens = self.prior_input_tokens + self.prior_output_tokens
        self.prior_cost_usd = float(prior.get("cost_usd", 0.0))
        self.calls = 0
        self.cache_hits = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_usd = 0.0
        self.latencies: list[float] = []
        self.score_requests = 0
        self.score_input_tokens = 0
        self._reserved_tokens = 0
        self._reserved_cost = 0.0
        self._in_flight = 0
        self.input_scale = 1.0
        """Raised above 1 when a server counted more input tokens than a reservation held."""
        self._lock = threading.Condition(threading.Lock())
        if ledger is not None:
            ledger.attach(ledger_key[0], ledger_key[1], cache_path, prior)

    def price_of(self, model: str) -> Prices:
        """Prices for `model` (free when not listed)."""
        return self.prices.get(model, _FREE)

    @property
    def spent_tokens(self) -> int:
        """Tokens spent by the run so far, earlier invocations included (reservations excluded)."""
        return self.prior_tokens + self.input_tokens + self.output_tokens

    @property
    def spent_cost_usd(self) -> float:
        """USD spent by the run so far, earlier invocations included (reservations excluded)."""
        return self.prior_cost_usd + self.cost_usd

    def reserve(self, estimated_input_tokens: int, max_output_tokens: int, model: str, wait: bool = False) -> Reservation:
        """Hold a call's worst case against the cap, or raise `SpendCapReached` if it could exceed the cap.

        `estimated_input_tokens` must be an upper bound (`input_token_bound`). With `wait`, a call that does
        not fit while others are in flight waits for them to settle (their actual spend is usually far below
        their worst case) and tries again; it raises only when it does not fit with nothing in flight. Call
        before every real backend call; follow with `settle` (after success) or `cancel` (after failure).
        """
        with self._lock:
            tin = int(max(0, int(estimated_input_tokens)) * self.input_scale + 0.999)
            tout = max(0, int(max_output_tokens))
            tokens, cost = tin + tout, self.price_of(model).cost(tin, tout)
        if self.ledger is not None:
            self.ledger.hold(tokens, cost, wait)  # the command's cap, every route's spend and reservations
            with self._lock:
                self._reserved_tokens += tokens
                self._reserved_cost += cost
                self._in_flight += 1
            return Reservation(model=model, tokens=tokens, cost_usd=cost, input_tokens=tin)
        with self._lock:
            while self.cap is not None:
                try:
                    self._check_cap(tokens, cost)
                    break
                except SpendCapReached:
                    if not wait or self._in_flight == 0:
                        raise
                    self._lock.wait()
            self._reserved_tokens += tokens
            self._reserved_cost += cost
            self._in_flight += 1
        return Reservation(model=model, tokens=tokens, cost_usd=cost, input_tokens=tin)

    def _check_cap(self, tokens: int, cost: float) -> None:
        # Called with the lock held: committed spend + every in-flight worst case + this call's worst case.
        cap = self.cap
        assert cap is not None
        busy_tokens = self.spent_tokens + self._reserved_tokens
        busy_cost = self.spent_cost_usd + self._reserved_cost
        over_tokens = cap.max_tokens is not None and busy_tokens + tokens > cap.max_tokens
        over_cost = cap.max_cost_usd is not None and busy_cost + cost > cap.max_cost_usd + 1e-12
        if over_tokens or over_cost:
            exc = SpendCapReached(self._stop_message(tokens, cost, settled=self._in_flight == 0))
            exc.next_tokens, exc.next_cost = tokens, cost
            raise exc

    def _stop_message(self, tokens: int, cost: float, settled: bool) -> str:
        assert self.cap is not None
        spent = _spent_against(self.cap, self.spent_tokens, self.spent_cost_usd, "a cap")
        when = "" if settled else f", {self._in_flight} call(s) still in flight"
        return (
            "spend cap reached: " + "; ".join(spent) + f" (this run folder, earlier invocations included{when}; the "
            f"next call could use up to {tokens:,} tokens / ${cost:.4f}). Nothing is lost: every completed call is "
            "cached, so rerunning with a higher cap resumes where this run stopped."
        )

    def settled_stop(self, exc: SpendCapReached) -> SpendCapReached:
        """The cap error restated with the spend after every in-flight call settled (what was really spent)."""
        if self.ledger is not None:
            return self.ledger.settled_stop(exc)
        with self._lock:
            if self.cap is None:
                return exc
            fresh = SpendCapReached(self._stop_message(getattr(exc, "next_tokens", 0), getattr(exc, "next_cost", 0.0),
                                                       settled=self._in_flight == 0))
            fresh.next_tokens, fresh.next_cost = getattr(exc, "next_tokens", 0), getattr(exc, "next_cost", 0.0)
            return fresh

    def settle(self, reservation: Reservation, usage: Usage) -> float:
        """Replace a reservation by the call's actual usage; returns the call's cost in USD."""
        cost = self.price_of(reservation.model).cost(usage.input_tokens, usage.output_tokens)
        if self.ledger is not None:
            self.ledger.settle(self.ledger_key, reservation, usage.input_tokens + usage.output_tokens, cost)
        with self._lock:
            self._release(reservation)
            if reservation.input_tokens and usage.input_tokens > reservation.input_tokens:
                self.input_scale = max(self.input_scale,
                                       self.input_scale * usage.input_tokens / reservation.input_tokens)
            self.calls += 1
            self.input_tokens += usage.input_tokens
            self.output_tokens += usage.output_tokens
            self.cost_usd += cost
            self.latencies.append(usage.latency_s)
        return cost

    def charge(self, input_tokens: int, output_tokens: int, model: str) -> float:
        """Count spend that had no reservation of its own (a server's scoring or probe request, billed as it
        arrives); returns its cost in USD. The caller held a reservation for the work it belongs to."""
        cost = self.price_of(model).cost(input_tokens, output_tokens)
        if self.ledger is not None:
            self.ledger.charge(self.ledger_key, input_tokens + output_tokens, cost)
        with self._lock:
            self.calls += 1
            self.input_tokens += int(input_tokens)
            self.output_tokens += int(output_tokens)
            self.cost_usd += cost
        return cost

    def cancel(self, reservation: Reservation) -> None:
        """Drop a reservation whose call failed (nothing was spent that we know of)."""
        if self.ledger is not None:
            self.ledger.release(reservation)
        with self._lock:
            self._release(reservation)

    def _release(self, reservation: Reservation) -> None:
        self._reserved_tokens -= reservation.tokens
        self._reserved_cost -= reservation.cost_usd
        self._in_flight -= 1
        self._lock.notify_all()  # calls waiting for room under the cap try again

    def record_hit(self, n: int = 1) -> None:
        """Count answers served from the cache (never charged)."""
        with self._lock:
            self.cache_hits += n

    def record_scores(self, n: int, input_tokens: int) -> None:
        """Count log-likelihood requests scored by a local backend (free: never charged to the cap)."""
        with self._lock:
            self.score_requests += n
            self.score_input_tokens += input_tokens

    def summary(self) -> dict:
        """This invocation's usage, plus the run's totals including earlier invocations (`run_*`; `earlier_*` is
        the part spent by earlier invocations of the run folder)."""
        cap = self.ledger.cap if self.ledger is not None else self.cap
        with self._lock:
            return {
                "calls": self.calls,
                "cache_hits": self.cache_hits,
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "cost_usd": round(self.cost_usd, 8),
                "score_requests": self.score_requests,
                "score_input_tokens": self.score_input_tokens,
                "latency_p50_s": round(percentile(self.latencies, 50), 6),
                "latency_p95_s": round(percentile(self.latencies, 95), 6),
                "run_calls": self.prior_calls + self.calls,
                "run_input_tokens": self.prior_input_tokens + self.input_tokens,
                "run_output_tokens": self.prior_output_tokens + self.output_tokens,
                "run_tokens": self.spent_tokens,
                "run_cost_usd": round(self.spent_cost_usd, 8),
                "earlier_calls": self.prior_calls,
                "earlier_tokens": self.prior_tokens,
                "earlier_cost_usd": round(self.prior_cost_usd, 8),
                "cap_max_tokens": cap.max_tokens if cap else None,
                "cap_max_cost_usd": cap.max_cost_usd if cap else None,
                **({"cap_scope": "command"} if self.ledger is not None and cap else {}),
            }

    def save(self, path: str | Path) -> None:
        """Write `summary()` to `path` as JSON, atomically."""
        write_json_atomic(path, self.summary())


LEDGER_FILE = "ledger.json"


class Ledger:
    """One spend cap for a whole command that runs several routes, each in its own run folder.

    Every meter opened while the ledger is active (`command_ledger`) charges it, under its route (the run
    folder's name) and model. `hold` applies the single-run reservation rule to the command's total: the spend of
    every route, earlier invocations included, plus every in-flight worst case, plus this call's worst case, must
    fit the cap. `ledger.json` in the command's folder lists which (route folder, model) pairs count; a rerun
    reads their spend back from those folders' caches (the durable truth, also after a kill -9), so routes it
    does not run again still count.
    """

    def __init__(self, cap: SpendCap | None, folder: str | Path | None = None, what: str = "command"):
        self.cap = cap if cap is not None and cap.active else None
        self.what = what
        self.folder = Path(folder) if folder is not None else None
        self._spent: dict[tuple[str, str], list] = {}
        """(route, model identity) -> [tokens, cost_usd] spent, earlier invocations included."""
        self._caches: dict[tuple[str, str], str] = {}
        self._in_flight = 0
        self._reserved_tokens = 0
        self._reserved_cost = 0.0
        self._lock = threading.Condition(threading.Lock())
        if self.folder is not None and (self.folder / LEDGER_FILE).exists():
            state = json.loads((self.folder / LEDGER_FILE).read_text(encoding="utf-8"))
            for row in state.get("counted") or []:
                key = (row["route"], row["identity"])
                path = self.folder / row["cache"]
                self._caches[key] = row["cache"]
                self._spent[key] = _cache_spend(path, row["identity"])

    @property
    def by_key(self) -> dict[str, list]:
        """route -> [tokens, cost_usd] (every model of the route together)."""
        out: dict[str, list] = {}
        for (route, _), (t, c) in self._spent.items():
            e = out.setdefault(route, [0, 0.0])
            e[0] += t
            e[1] += c
        return out

    def attach(self, route: str, identity: str, cache_path: str | Path, prior: Mapping | None) -> None:
        """A meter for `identity` in route folder `route` opens; `prior` is its cache's spend for that model so far
        (the truth: at least what this ledger counted for the pair)."""
        prior = prior or {}
        tokens = int(prior.get("input_tokens", 0)) + int(prior.get("output_tokens", 0))
        cost = float(prior.get("cost_usd", 0.0))
        with self._lock:
            entry = self._spent.setdefault((route, identity), [0, 0.0])
            entry[0], entry[1] = max(entry[0], tokens), max(entry[1], cost)
            cache = Path(cache_path)
            if self.folder is not None:
                try:
                    cache = cache.resolve().relative_to(self.folder.resolve())
                except ValueError:
                    cache = cache.resolve()
            self._caches[(route, identity)] = str(cache)
            self._save()

    @property
    def spent_tokens(self) -> int:
        """Tokens spent by the command (every route, earlier invocations included)."""
        return sum(v[0] for v in self._spent.values())

    @property
    def spent_cost_usd(self) -> float:
        """USD spent by the command (every route, earlier invocations included)."""
        return sum(v[1] for v in self._spent.values())

    def hold(self, tokens: int, cost: float, wait: bool = False) -> None:
        """Reserve a call's worst case against the command's cap, or raise `SpendCapReached`."""
        with self._lock:
            while self.cap is not None:
                over_t = self.cap.max_tokens is not None and (
                    self.spent_tokens + self._reserved_tokens + tokens > self.cap.max_tokens)
                over_c = self.cap.max_cost_usd is not None and (
                    self.spent_cost_usd + self._reserved_cost + cost > self.cap.max_cost_usd + 1e-12)
                if not (over_t or over_c):
                    break
                if not wait or self._in_flight == 0:
                    exc = SpendCapReached(self._stop_message(tokens, cost))
                    exc.next_tokens, exc.next_cost = tokens, cost
                    raise exc
                self._lock.wait()
            self._reserved_tokens += tokens
            self._reserved_cost += cost
            self._in_flight += 1

    def release(self, reservation: Reservation) -> None:
        """Drop a held reservation (its call failed or was not made)."""
        with self._lock:
            self._reserved_tokens -= reservation.tokens
            self._reserved_cost -= reservation.cost_usd
            self._in_flight -= 1
            self._lock.notify_all()

    def settle(self, key: tuple[str, str], reservation: Reservation, tokens: int, cost: float) -> None:
        """Replace a reservation by what the call spent, charged to `key` (route, model identity)."""
        with self._lock:
            self._reserved_tokens -= reservation.tokens
            self._reserved_cost -= reservation.cost_usd
            self._in_flight -= 1
            entry = self._spent.setdefault(key, [0, 0.0])
            entry[0] += int(tokens)
            entry[1] += float(cost)
            self._lock.notify_all()

    def charge(self, key: tuple[str, str], tokens: int, cost: float) -> None:
        """Count spend that had no reservation of its own, charged to `key` (route, model identity)."""
        with self._lock:
            entry = self._spent.setdefault(key, [0, 0.0])
            entry[0] += int(tokens)
            entry[1] += float(cost)

    def settled_stop(self, exc: SpendCapReached) -> SpendCapReached:
        """The cap error restated after every in-flight call settled."""
        with self._lock:
            fresh = SpendCapReached(self._stop_message(getattr(exc, "next_tokens", 0), getattr(exc, "next_cost", 0.0)))
        fresh.next_tokens, fresh.next_cost = getattr(exc, "next_tokens", 0), getattr(exc, "next_cost", 0.0)
        return fresh

    def shares(self) -> dict[str, dict]:
        """Each route's spend so far: {key: {'tokens', 'cost_usd'}}."""
        with self._lock:
            return {k: {"tokens": v[0], "cost_usd": round(v[1], 8)} for k, v in self.by_key.items()}

    def _stop_message(self, tokens: int, cost: float) -> str:
        cap = self.cap
        assert cap is not None
        spent = _spent_against(cap, self.spent_tokens, self.spent_cost_usd, f"the {self.what}'s cap")
        shares = ", ".join(
            f"{k} {v[0]:,} tokens" + (f" / ${v[1]:.4f}" if cap.max_cost_usd is not None else "")
            for k, v in sorted(self.by_key.items(), key=lambda kv: -kv[1][0]) if v[0] or v[1])
        when = f"; {self._in_flight} call(s) still in flight" if self._in_flight else ""
        return (
            "spend cap reached: " + "; ".join(spent) + f" (the whole {self.what}: every route, earlier invocations "
            f"included; by route: {shares or 'nothing yet'}{when}; the next call could use up to {tokens:,} tokens / "
            f"${cost:.4f}). Nothing is lost: every completed call is cached, so rerunning with a higher cap resumes "
            "where this run stopped."
        )

    def _save(self) -> None:
        # Called with the lock held: which (route, model) pairs count and where their cache is. Their spend is
        # read back from the caches, never from here, so a kill -9 loses nothing of it.
        if self.folder is None:
            return
        counted = [{"route": r, "identity": i, "cache": c} for (r, i), c in sorted(self._caches.items())]
        write_json_atomic(self.folder / LEDGER_FILE, {"counted": counted})

    def save(self) -> None:
        """Write `ledger.json` (which route folders and models count), so a rerun counts them again."""
        with self._lock:
            self._save()


def _cache_spend(path: Path, identity: str) -> list:
    """[tokens, cost_usd] a run folder's cache records for one model (nothing when the cache is gone)."""
    import sqlite3

    if not path.exists():
        return [0, 0.0]
    with contextlib.closing(sqlite3.connect(path)) as db:
        tin, tout, cost = db.execute("SELECT SUM(input_tokens), SUM(output_tokens), SUM(cost_usd) FROM responses "
                                     "WHERE identity = ?", (identity,)).fetchone()
    return [int(tin or 0) + int(tout or 0), float(cost or 0.0)]


_active: list[Ledger] = []


def active_ledger() -> Ledger | None:
    """The ledger of the command running in this process, if it opened one."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def command_ledger(cap: SpendCap | None, folder: str | Path | None = None, what: str = "command") -> Iterator[Ledger]:
    """Open one ledger for everything run inside the block (each route's meters charge it); saved on exit."""
    ledger = Ledger(cap, folder, what)
    _active.append(ledger)
    try:
        yield ledger
    finally:
        _active.remove(ledger)
        ledger.save()


def _spent_against(cap, tokens: int, cost: float, cap_name: str) -> list[str]:
    """The stop message's spend figures, one per cap set (tokens, USD); shared by a run's meter and a compare's
    ledger so both word a stop the same way."""
    spent = []
    if cap.max_tokens is not None:
        spent.append(f"{tokens:,} tokens spent of {cap_name} of {cap.max_tokens:,}")
    if cap.max_cost_usd is not None:
        spent.append(f"${cost:.4f} spent of {cap_name} of ${cap.max_cost_usd:.4f}")
    return spent
