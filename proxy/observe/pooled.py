"""Pooled statistics I/O: this replica's batches flushed into the shared store, and windows read back from it.

`PooledStats.run()` (a task `app.py` starts in a cleanup_ctx) flushes about once a second what `RequestStats`
holds and the feedback scores booked since (`FeedbackLedger.drain_deltas`), with this replica's heartbeat: one
pipelined `add_counts` per bucket size (the sizes have different TTLs). A store that cannot answer loses
that batch — counted in splitstream_stats_flushes_total{result="dropped"}, logged once per outage — and never
blocks or fails a request. `read()` flushes this replica's own batch first (a process reads what it has just
served), then fetches every key its windows need with one `read_counts`; when the store cannot answer it raises
StoreUnavailableError, and callers hold rather than decide on part of the evidence (this replica's alone).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from proxy.errors import StoreUnavailableError
from proxy.observe.metrics import Metrics
from proxy.observe.stats import (
    TIERS,
    FeedbackDeltas,
    Reading,
    RequestStats,
    Span,
    count_requests,
    cover,
    fleet_of,
    increments,
    keep,
    keys_of,
    pool,
)
from proxy.store.base import Store

log = logging.getLogger("splitstream.stats")

FLUSH_SECONDS = 1.0  # a replica's numbers reach the others within about this long


class PooledStats:
    """Flushes `local` into `store` and reads pooled windows. `replica`: this replica's id (its heartbeat
    field); `clock`: the fleet's wall clock, the same `local` buckets by."""

    __slots__ = ("_store", "_local", "replica", "_metrics", "_clock", "_feedback", "_lock", "_down", "dropped")

    def __init__(self, store: Store, local: RequestStats, replica: str, metrics: Metrics,
                 clock: Callable[[], float] = time.time,
                 feedback: Callable[[], FeedbackDeltas] | None = None) -> None:
        self._store = store
        self._local = local
        self.replica = replica
        self._metrics = metrics
        self._clock = clock
        self._feedback = feedback
        self._lock = asyncio.Lock()  # one flush at a time: the loop's and a reader's
        self._down = False
        self.dropped = 0  # requests whose numbers were lost to store outages (since start)

    async def run(self) -> None:
        """Flush every FLUSH_SECONDS until cancelled (`app.py` flushes once more after cancelling)."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception:  # a bug, not an outage (flush handles those): keep serving and flushing
                log.exception("pooled statistics: flush failed")

    async def flush(self) -> bool:
        """Add this replica's batch to the store; False when the store did not take it (the batch is lost)."""
        async with self._lock:
            drained = self._local.drain()
            batches = increments(drained, self._feedback() if self._feedback else {}, self.replica, self._clock())
            try:
                for size, reach in TIERS:
                    await self._store.add_counts(batches[size], keep(size, reach))
            except StoreUnavailableError as exc:
                self._metrics.stats_flushes_total.labels("dropped").inc()
                self.dropped += count_requests(drained)
                if not self._down:
                    log.warning("pooled statistics: store unavailable (%s): dropping this replica's batches "
                                "until it answers; rollouts hold meanwhile", exc)
                    self._down = True
                return False
        self._metrics.stats_flushes_total.labels("ok").inc()
        if self._down:
            log.info("pooled statistics: store answers again (%d requests' numbers lost since start)", self.dropped)
            self._down = False
        return True

    async def read(self, routes: Sequence[str], spans: Sequence[Span]) -> Reading:
        """Each route's numbers over each span (as of now) and each span's fleet, from one `read_counts`;
        StoreUnavailableError when the store cannot answer."""
        await self.flush()
        now = self._clock()
        covers = [cover(span, now) for span in spans]
        keys = list(dict.fromkeys(key for buckets in covers for key in keys_of(routes, buckets)))
        read = dict(zip(keys, await self._store.read_counts(keys), strict=True))
        fleet = [fleet_of(buckets, read) for buckets in covers]
        return Reading({route: [pool(route, buckets, read, seen) for buckets, seen in zip(covers, fleet, strict=True)]
                        for route in routes}, fleet)

    def now(self) -> float:
        return self._clock()


POOLED = web.AppKey("POOLED", PooledStats)
