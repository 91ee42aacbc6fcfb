"""Client feedback joined to the variant that served the request: a bounded request-id map and score deltas.

`remember()` runs once per routed request from `observe/record.py` `Recorder.finish()`: one OrderedDict insert,
past `max_requests` one eviction, and, when a store writer is attached (`share`), one list append (all O(1)).
The writer (`pipeline/feedback.py` `JoinWriter`) takes the pending joins in batches and writes them to the
shared store, so POST /v1/feedback works on every replica. `record()` books a score (`pipeline/feedback.py`):
it replaces an earlier score for the same request and keeps the per-(route, variant) changes of count, sum
and sum of squares since the last `drain_deltas()`, which `observe/pooled.py` adds to the fleet's totals
(the A/B report reads those, never a replica's own). Per process, like `observe/stats.py`: ids, hashed
tenants and numbers, never text.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

# ~310 bytes per remembered request: 64 Ki requests cost ~20 MiB. Older ones are joined from the store.
DEFAULT_MAX_REQUESTS = 65_536


@dataclass(slots=True)
class FeedbackTotals:
    """Changes to the scores of one (route, variant): count, sum and sum of squares (what pooled totals add)."""

    count: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, score: float, sign: int = 1) -> None:
        self.count += sign
        self.total += sign * score
        self.squares += sign * score * score


# What a request id is joined to: (route, variant, tenant, score). The tenant is `pipeline/cache_policy.py`
# tenant_of (a hash of the client's Authorization, or "anonymous"); the score is this replica's (None: unscored).
# A plain tuple, not a NamedTuple: the collector untracks exact tuples only.
Served = tuple[str, str, str, float | None]


class _Local(enum.Enum):
    LOCAL = 0


LOCAL: Literal[_Local.LOCAL] = _Local.LOCAL  # `record(previous=LOCAL)`: the previous score is this ledger's
Previous = float | None | Literal[_Local.LOCAL]  # the score a new one replaces: a number, none, or LOCAL


class FeedbackLedger:
    """request id -> `Served` for the last `max_requests` routed requests, and score changes per variant.

    Entries are tuples of strings and floats on purpose: the collector stops tracking such tuples, so
    tens of thousands of entries add nothing to the cost of a full garbage collection (lists would)."""

    __slots__ = ("_served", "_deltas", "_max", "_pending", "_pending_limit", "_batch", "_on_batch",
                 "dropped")

    def __init__(self, max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._deltas: dict[tuple[str, str], FeedbackTotals] = {}
        self._max = max_requests
        self._pending: list[tuple[str, Served]] | None = None  # joins not yet written to the store
        self._pending_limit = 0
        self._batch = 0
        self._on_batch: Callable[[], None] | None = None
        self.dropped = 0  # joins never written because the writer was `_pending_limit` behind

    def share(self, batch: int, limit: int, on_batch: Callable[[], None]) -> None:
        """Keep each newly remembered join for a store writer (`take_pending`); `on_batch` is called when
        `batch` of them wait; past `limit` waiting (the store is slow) new joins stay local only."""
        self._pending = []
        self._batch, self._pending_limit, self._on_batch = batch, limit, on_batch

    def remember(self, request_id: str, route: str, variant: str, tenant: str) -> None:
        """A routed request, under the id splitstream generated for it (never a client's)."""
        served = self._served
        entry: Served = (route, variant, tenant, None)
        served[request_id] = entry
        if len(served) > self._max:
            served.popitem(last=False)
        pending = self._pending
        if pending is not None:
            if len(pending) >= self._pending_limit:
                self.dropped += 1
                return
            pending.append((request_id, entry))
            if len(pending) == self._batch and self._on_batch is not None:
                self._on_batch()

    def take_pending(self) -> list[tuple[str, Served]]:
        """The joins remembered since the last call, oldest first (for the store writer)."""
        pending = self._pending
        if not pending:
            return []
        self._pending = []
        return pending

    def lookup(self, request_id: str) -> Served | None:
        return self._served.get(request_id)

    def record(self, request_id: str, joined: Served, score: float, previous: Previous = LOCAL) -> None:
        """Book `score` for the request `joined` describes (found here or in the store). `previous`: the score
        it replaces (None: its first), or LOCAL for whatever this ledger holds for it. A replacement adds
        count 0, sum new - old and squares new² - old² (so pooled totals count every request once)."""
        if previous is LOCAL:
            mine = self._served.get(request_id)
            previous = mine[3] if mine is not None else None
        route, variant, tenant, _ = joined
        totals = self._deltas.get((route, variant))
        if totals is None:
            totals = self._deltas[(route, variant)] = FeedbackTotals()
        if previous is not None:
            totals.add(previous, -1)
        totals.add(score)
        served = self._served
        served[request_id] = (route, variant, tenant, score)  # an existing key keeps its place in the order
        if len(served) > self._max:
            served.popitem(last=False)

    def drain_deltas(self) -> dict[tuple[str, str], tuple[int, float, float]]:
        """(count, sum, sum of squares) booked per (route, variant) since the last call, then forgotten:
        what this replica adds to pooled totals. A replaced score contributes (0, new - old, new² - old²)."""
        deltas, self._deltas = self._deltas, {}
        return {key: (t.count, t.total, t.squares) for key, t in deltas.items()}


FEEDBACK = web.AppKey("FEEDBACK", FeedbackLedger)
