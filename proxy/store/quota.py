"""Fleet-wide quotas: the batch types every `Store.quota` takes, and `QuotaTable`, the in-process answer.

Rates use GCRA (generic cell rate algorithm): each limit is one number per key, its TAT (theoretical arrival
time). That makes a check O(1) in time and space, gives an exact Retry-After (the TAT says when the claim
would fit), refills smoothly (no double burst at a window boundary as fixed windows allow), and makes
settling after the fact trivial: giving units back or charging more only moves the number. Concurrency
uses leases with an expiry, so the leases of a replica that crashed run out by themselves.

Both stores follow these rules (`store/memory.py` through this table, `store/redis.py` in one Lua script):

- Rate (T = period/limit): tat0 = max(TAT, now) (absent: now); new = tat0 + cost*T; it admits iff
  new - now <= period (+1e-9); refused, it would admit after new - period - now seconds.
- Claim: all or nothing over its rates and its slot; everything is checked before anything is written.
  `refused` is the first failing index (len(rates) = the slot); `retry_after` the largest wait of the
  failing rates (a full slot: 1.0 s unless a rate says more). remaining = floor((period - (end - now))/T
  + 1e-9), at least 0, and reset = end - now, where end is new when admitted and tat0 when refused.
- Adjust: TAT := max(tat0 + delta*T, now), the key dropped when that is now (full); absent and delta <= 0:
  nothing. Slot: leases with expiry <= now are dropped first; count >= limit refuses, else the lease is
  added (expiry now + ttl). Release removes it; renewal sets now + ttl only if the lease is still live.
- A batch applies adjusts, releases, renewals, then each claim in order, atomically. Rate and slot keys
  must differ (Redis keeps them as a string and a sorted set), and a key appears once per claim (repeats
  are each checked against the state before the claim, not summed).

Precision: an absolute clock (Redis's is Unix time, ~1.8e9 s) keeps only ~2e-7 s in a double, so a burst
that fits exactly could be refused at its last unit. A TAT is therefore kept as (anchor, ahead): the time
it was written and how far ahead of that it lies; all arithmetic happens in small differences from now.
"now" is the injected clock here, the server's TIME on Redis (one clock for every replica).
Pure state (h11 style): no I/O, no awaits.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Float slack for "fits exactly": a burst of `limit` claims of cost 1 must all pass despite rounding.
EPSILON = 1e-9
# A full slot has no time to wait for (a lease ends when its request does): ask the client to retry soon.
SLOT_RETRY_AFTER = 1.0
DEFAULT_MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Rate:
    """One GCRA limit: `limit` units per `period` seconds (burst = limit); this claim takes `cost` units."""

    key: str
    period: float
    limit: float
    cost: float

    def __post_init__(self) -> None:
        # Checked here so a bad number fails where it is made, not as a script error that trips the breaker.
        if not (0.0 < self.period < math.inf and 0.0 < self.limit < math.inf and 0.0 <= self.cost < math.inf):
            raise ValueError(f"rate {self.key!r}: period and limit must be > 0 and cost >= 0, all finite")


@dataclass(frozen=True, slots=True)
class Slot:
    """A concurrency lease: at most `limit` live leases under `key`; this one is `lease`, live `ttl` s
    unless renewed."""

    key: str
    limit: int
    lease: str
    ttl: float

    def __post_init__(self) -> None:
        if not (0.0 < self.ttl < math.inf):
            raise ValueError(f"slot {self.key!r}: ttl must be > 0 and finite")


@dataclass(frozen=True, slots=True)
class Claim:
    """What one request asks for: every rate and the slot, or nothing."""

    rates: tuple[Rate, ...]
    slot: Slot | None = None


@dataclass(frozen=True, slots=True)
class Adjust:
    """Settle a rate after the fact: `delta` units more (positive) or given back (negative)."""

    key: str
    period: float
    limit: float
    delta: float

    def __post_init__(self) -> None:
        if not (0.0 < self.period < math.inf and 0.0 < self.limit < math.inf and math.isfinite(self.delta)):
            raise ValueError(f"adjust {self.key!r}: period and limit must be > 0 and all numbers finite")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to one claim. `refused` is -1 when admitted, else the index of the first refused limit
    (len(claim.rates) = the slot); `retry_after` is 0 when admitted, else seconds until every refused
    limit would admit this same claim. Per rate: whole units `remaining` and seconds until it is full
    (`reset`). `in_use`: live leases under the slot after this claim (0 without a slot)."""

    admitted: bool
    refused: int
    retry_after: float
    remaining: tuple[float, ...]
    reset: tuple[float, ...]
    in_use: int


@dataclass(frozen=True, slots=True)
class QuotaBatch:
    """Everything one request-path step asks of the quotas, answered in one round trip."""

    claims: tuple[Claim, ...] = ()
    adjusts: tuple[Adjust, ...] = ()
    releases: tuple[tuple[str, str], ...] = ()  # (slot key, lease)
    renewals: tuple[tuple[str, str, float], ...] = ()  # (slot key, lease, ttl)


def _remaining_units(period: float, step: float, ahead: float) -> float:
    """Whole units a rate can still take when its TAT lies `ahead` seconds past now."""
    return max(0.0, float(math.floor((period - ahead) / step + EPSILON)))


# Per key: a rate's (anchor, ahead) -- its TAT is anchor + ahead -- or a slot's leases (lease -> expiry).
class _Leases(dict[str, float]):
    """A slot's live leases (lease -> expiry) and a lower bound of the soonest expiry: a claim scans for
    expired leases only once one can have expired, so a tenant with thousands in flight costs O(1) per
    claim, not O(leases). (Renewals only push expiries later, so the bound may be low, never high.)"""

    __slots__ = ("soonest",)

    def __init__(self) -> None:
        super().__init__()
        self.soonest = math.inf


_State = tuple[float, float] | _Leases


class QuotaTable:
    """The quota rules in a dict: the embedded store's quotas, and the local fallback when Redis is down.

    Keys come from caller input, so at most `max_keys` are kept; the least recently used goes first (its
    limit starts full again, the price of a bound). Every call completes without awaiting."""

    __slots__ = ("_state", "_max_keys", "_clock")

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._state: OrderedDict[str, _State] = OrderedDict()
        self._max_keys = max_keys
        self._clock = clock

    def __len__(self) -> int:
        return len(self._state)

    def clear(self) -> None:
        self._state.clear()

    def apply(self, batch: QuotaBatch) -> list[Verdict]:
        """Adjusts, releases and renewals, then each claim in order; one Verdict per claim."""
        now = self._clock()
        for adjust in batch.adjusts:
            self._adjust(adjust, now)
        for key, lease in batch.releases:
            self._release(key, lease)
        for key, lease, ttl in batch.renewals:
            self._renew(key, lease, ttl, now)
        return [self._claim(claim, now) for claim in batch.claims]

    def _claim(self, claim: Claim, now: float) -> Verdict:
        refused, retry = -1, 0.0
        starts: list[float] = []
        ends: list[float] = []
        for index, rate in enumerate(claim.rates):
            start = self._ahead(rate.key, now)
            end = start + rate.cost * (rate.period / rate.limit)
            if end > rate.period + EPSILON:
                if refused < 0:
                    refused = index
                retry = max(retry, end - rate.period)
            starts.append(start)
            ends.append(end)
        slot, leases, in_use = claim.slot, None, 0
        if slot is not None:
            leases = self._leases(slot.key, now)
            in_use = 0 if leases is None else len(leases)
            if in_use >= slot.limit:
                refused = len(claim.rates) if refused < 0 else refused
                retry = max(retry, SLOT_RETRY_AFTER)
        if refused >= 0:
            return _verdict(claim, refused, retry, starts, in_use)
        for rate, end in zip(claim.rates, ends):
            self._put(rate.key, (now, end))
        if slot is not None:
            leases = _Leases() if leases is None else leases
            leases[slot.lease] = expiry = now + slot.ttl
            leases.soonest = min(leases.soonest, expiry)
            self._put(slot.key, leases)  # (again: the rates' puts may have pushed it out of a full table)
            in_use = len(leases)
        return _verdict(claim, -1, 0.0, ends, in_use)

    def _adjust(self, adjust: Adjust, now: float) -> None:
        ahead = max(self._ahead(adjust.key, now) + adjust.delta * (adjust.period / adjust.limit), 0.0)
        if ahead > 0.0:
            self._put(adjust.key, (now, ahead))
        elif isinstance(self._state.get(adjust.key), tuple):
            del self._state[adjust.key]  # full again: the same as absent (absent stays absent)

    def _release(self, key: str, lease: str) -> None:
        leases = self._state.get(key)
        if isinstance(leases, _Leases):
            leases.pop(lease, None)
            if not leases:
                del self._state[key]

    def _renew(self, key: str, lease: str, ttl: float, now: float) -> None:
        leases = self._leases(key, now)
        if leases is not None and lease in leases:
            leases[lease] = now + ttl

    def _ahead(self, key: str, now: float) -> float:
        """Seconds the rate's TAT lies past now (0 when absent or past): max(TAT, now) - now."""
        state = self._state.get(key)
        if not isinstance(state, tuple):
            return 0.0
        self._state.move_to_end(key)
        anchor, ahead = state
        return max((anchor - now) + ahead, 0.0)  # anchor - now is exact; the rest are small numbers

    def _leases(self, key: str, now: float) -> _Leases | None:
        """The slot's live leases (expired ones dropped), or None when it has none."""
        leases = self._state.get(key)
        if not isinstance(leases, _Leases):
            return None
        if leases.soonest <= now:
            for lease in [lease for lease, expiry in leases.items() if expiry <= now]:
                del leases[lease]
            leases.soonest = min(leases.values(), default=math.inf)
        if not leases:
            del self._state[key]
            return None
        self._state.move_to_end(key)
        return leases

    def _put(self, key: str, state: _State) -> None:
        self._state[key] = state
        self._state.move_to_end(key)
        if len(self._state) > self._max_keys:
            self._state.popitem(last=False)


def _verdict(claim: Claim, refused: int, retry: float, aheads: list[float], in_use: int) -> Verdict:
    """`aheads`: per rate, how far past now its TAT lies after this claim (new if admitted, tat0 if not)."""
    return Verdict(
        admitted=refused < 0,
        refused=refused,
        retry_after=retry,
        remaining=tuple(_remaining_units(rate.period, rate.period / rate.limit, ahead)
                        for rate, ahead in zip(claim.rates, aheads)),
        reset=tuple(aheads),
        in_use=in_use,
    )
