"""The embedded store: an in-process dict with per-key expiry and a least-recently-used size bound.

The default when no Redis URL is given; it makes one process consistent, never several replicas. Every
method completes without awaiting, so each is atomic on the event loop (set_if_absent needs no lock).
Reused by anything that wants a bounded TTL map (the response cache).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from proxy.store.quota import QuotaBatch, QuotaTable, Verdict

# Enough for ~100k sticky subjects at a few hundred bytes each; the oldest-used entries go first.
DEFAULT_MAX_ENTRIES = 100_000


class MemoryStore:
    """`Store` in a dict. `clock` (default `time.monotonic`) is injectable so tests can expire keys."""

    __slots__ = ("_entries", "_counts", "_quotas", "_max_entries", "_max_bytes", "_bytes", "_clock")

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key -> (value, expires_at)
        self._counts: OrderedDict[str, tuple[dict[str, float], float]] = OrderedDict()  # add_counts hashes
        self._quotas = QuotaTable(max_entries, clock)  # rate and slot keys, bounded like the entries
        self._max_entries = max_entries
        self._max_bytes = max_bytes  # None: bounded by count only (small values such as sticky variants)
        self._bytes = 0
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Bytes of values held (keys and bookkeeping not counted)."""
        return self._bytes

    def _live(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[key]
            self._bytes -= len(entry[0])
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def _put(self, key: str, value: bytes, ttl: float) -> None:
        old = self._entries.get(key)
        if old is not None:
            self._bytes -= len(old[0])
        self._entries[key] = (value, self._clock() + ttl)
        self._bytes += len(value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries or (
            self._max_bytes is not None and self._bytes > self._max_bytes and self._entries
        ):
            _, (evicted, _) = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        existing = self._live(key)
        if existing is None:
            self._put(key, value, ttl)
        return existing

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._put(key, value, ttl)

    async def delete(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[0])

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes, ttl: float) -> bool:
        if self._live(key) != expected:
            return False
        self._put(key, value, ttl)
        return True

    async def set_many(self, values: Mapping[str, bytes], ttl: float) -> None:
        for key, value in values.items():
            self._put(key, value, ttl)

    async def add_counts(self, increments: Mapping[str, Mapping[str, float]], ttl: float) -> None:
        # Counters live in `_counts` (not the byte entries): a hash of numbers, with the same expiry rule.
        expires = self._clock() + ttl
        for key, fields in increments.items():
            counts = self._live_counts(key)
            if counts is None:
                counts = {}
                self._counts[key] = (counts, expires)
                if len(self._counts) > self._max_entries:
                    self._counts.popitem(last=False)
            else:
                self._counts[key] = (counts, expires)
            for name, amount in fields.items():
                if math.isfinite(amount):  # as Redis: a counter never becomes inf/nan
                    counts[name] = counts.get(name, 0.0) + amount

    async def read_counts(self, keys: Sequence[str]) -> list[dict[str, float]]:
        return [dict(self._live_counts(key) or {}) for key in keys]

    def _live_counts(self, key: str) -> dict[str, float] | None:
        entry = self._counts.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._counts[key]
            return None
        self._counts.move_to_end(key)
        return entry[0]

    async def quota(self, batch: QuotaBatch) -> list[Verdict]:
        return self._quotas.apply(batch)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._counts.clear()
        self._quotas.clear()
        self._bytes = 0
