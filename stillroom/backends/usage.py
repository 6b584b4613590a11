"""Usage accounting and the spend cap.

`UsageMeter` counts every real backend call (tokens, latency, cost) and every cache hit, and enforces a
`SpendCap` over the whole run: spend from earlier invocations on the same run folder (read back from the
durable cache) counts too, so stopping and rerunning never resets the budget.

The cap is enforced *before* each call. A call reserves its worst case (an upper bound of its input tokens,
`stillroom.backends.base.input_token_bound`, plus `max_tokens` of output) under a lock; after the call the
reservation is settled to the actual usage. With many threads in flight, reservations are what stop them
from together overshooting the cap. Should a server ever count more input tokens than the bound, later
reservations are scaled up by the worst ratio seen, so one surprise cannot repeat.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stillroom.backends.base import Usage
from stillroom.errors import SpendCapReached
from stillroom.runs import atomic_write_text

__all__ = ["Prices", "SpendCap", "UsageMeter", "percentile", "write_json_atomic"]


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
    ):
        self.prices: dict[str, Prices] = dict(prices or {})
        self.cap = cap if cap is not None and cap.active else None
        prior = prior or {}
        self.prior_calls = int(prior.get("calls", 0))
        self.prior_tokens = int(prior.get("input_tokens", 0)) + int(prior.get("output_tokens", 0))
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
        cap = self.cap
        assert cap is not None
        spent = []
        if cap.max_tokens is not None:
            spent.append(f"{self.spent_tokens:,} tokens spent of a cap of {cap.max_tokens:,}")
        if cap.max_cost_usd is not None:
            spent.append(f"${self.spent_cost_usd:.4f} spent of a cap of ${cap.max_cost_usd:.4f}")
        when = "" if settled else f", {self._in_flight} call(s) still in flight"
        return (
            "spend cap reached: " + "; ".join(spent) + f" (this run folder, earlier invocations included{when}; the "
            f"next call could use up to {tokens:,} tokens / ${cost:.4f}). Nothing is lost: every completed call is "
            "cached, so rerunning with a higher cap resumes where this run stopped."
        )

    def settled_stop(self, exc: SpendCapReached) -> SpendCapReached:
        """The cap error restated with the spend after every in-flight call settled (what was really spent)."""
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

    def cancel(self, reservation: Reservation) -> None:
        """Drop a reservation whose call failed (nothing was spent that we know of)."""
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
        """This invocation's usage, plus the run's totals including earlier invocations (`run_*`)."""
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
                "run_tokens": self.spent_tokens,
                "run_cost_usd": round(self.spent_cost_usd, 8),
                "cap_max_tokens": self.cap.max_tokens if self.cap else None,
                "cap_max_cost_usd": self.cap.max_cost_usd if self.cap else None,
            }

    def save(self, path: str | Path) -> None:
        """Write `summary()` to `path` as JSON, atomically."""
        write_json_atomic(path, self.summary())
