"""Tenant usage the fleet agrees on: requests, tokens and 429s per tenant over the last minute and day.

`record` adds a finished request to this replica's batch (no I/O); `run` flushes the batch about once a
second into the store with `add_counts` — minute buckets kept two hours, hour buckets kept a day and an
hour — so every replica reads the same numbers (`read`, one `read_counts` of 27 keys). The last minute is
the current minute bucket plus the part of the previous one that still lies within 60 s (prorated); the last
day is the current hour plus the 24 before it, the oldest prorated the same way. A store that cannot answer
loses that batch (logged once per outage), never a request. Keys hold tenant names from the rules only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from proxy.errors import StoreUnavailableError
from proxy.store.base import Store

log = logging.getLogger("splitstream.usage")

PREFIX = "splitstream:tenants:"
MINUTE, HOUR = 60, 3600
MINUTE_KEEP, HOUR_KEEP = 2 * 3600.0, 25 * 3600.0
FLUSH_SECONDS = 1.0
FIELDS = ("requests", "tokens", "limited")


@dataclass(frozen=True, slots=True)
class Usage:
    """One tenant's numbers over a window."""

    requests: float = 0.0
    tokens: float = 0.0
    limited: float = 0.0  # requests refused 429 by the tenant's limits


class TenantUsage:
    """This replica's batch of per-tenant counts and the fleet's pooled windows. `clock`: the fleet's wall
    clock (buckets must line up across replicas)."""

    __slots__ = ("_store", "_clock", "_batch", "_down")

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._batch: dict[str, list[float]] = {}  # tenant -> [requests, tokens, limited]
        self._down = False

    def record(self, tenant: str, tokens: int, limited: bool) -> None:
        counts = self._batch.get(tenant)
        if counts is None:
            counts = self._batch[tenant] = [0.0, 0.0, 0.0]
        counts[0] += 1
        counts[1] += tokens
        if limited:
            counts[2] += 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        batch, self._batch = self._batch, {}
        if not batch:
            return
        now = self._clock()
        fields = {f"{tenant}|{name}": value for tenant, counts in batch.items()
                  for name, value in zip(FIELDS, counts, strict=True) if value}
        try:
            await self._store.add_counts({_key("m", now, MINUTE): fields}, MINUTE_KEEP)
            await self._store.add_counts({_key("h", now, HOUR): fields}, HOUR_KEEP)
        except StoreUnavailableError as exc:
            if not self._down:
                log.warning("tenant usage: store unavailable (%s); this replica's counts are lost until it answers",
                            exc)
            self._down = True
            return
        self._down = False

    async def read(self, tenants: Sequence[str]) -> tuple[dict[str, Usage], dict[str, Usage]]:
        """(last minute, last day) per tenant, the fleet's; raises StoreUnavailableError."""
        await self.flush()
        now = self._clock()
        minutes = [(now - i * MINUTE, MINUTE) for i in range(2)]
        hours = [(now - i * HOUR, HOUR) for i in range(25)]
        keys = [_key("m", at, MINUTE) for at, _ in minutes] + [_key("h", at, HOUR) for at, _ in hours]
        read = await self._store.read_counts(keys)
        last_minute = _window(tenants, read[:2], _oldest_share(now, MINUTE))
        last_day = _window(tenants, read[2:], _oldest_share(now, HOUR))
        return last_minute, last_day


def _key(tier: str, at: float, size: int) -> str:
    return f"{PREFIX}{tier}:{int(at // size) * size}"


def _oldest_share(now: float, size: int) -> float:
    """How much of the oldest bucket still lies in the window (the current bucket is `now % size` along)."""
    return 1.0 - (now % size) / size


def _window(tenants: Sequence[str], buckets: Sequence[dict[str, float]], oldest_share: float) -> dict[str, Usage]:
    numbers: dict[str, Usage] = {}
    for tenant in tenants:
        sums = [0.0, 0.0, 0.0]
        for position, bucket in enumerate(buckets):
            share = oldest_share if position == len(buckets) - 1 else 1.0
            for index, name in enumerate(FIELDS):
                sums[index] += share * bucket.get(f"{tenant}|{name}", 0.0)
        numbers[tenant] = Usage(*sums)
    return numbers


USAGE = web.AppKey("USAGE", TenantUsage)
