"""The `Store` protocol: the nine operations the request path may ask of shared state (keys, counts, quotas).

Implementations: `store/memory.py` (embedded, one process) and `store/redis.py` (shared by replicas).
Callers (split assignment, the result cache, rollout state) see only `Store`; `OwnedStore` adds the lifecycle that
`app.py` drives from a `cleanup_ctx`. A store that cannot answer raises `StoreUnavailableError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from proxy.store.quota import QuotaBatch, Verdict


class Store(Protocol):
    """Byte values under string keys, each with a time to live in seconds (> 0)."""

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired."""
        ...

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        """Store `value` unless the key holds a live value; atomic against every other writer.

        Returns None when this call stored `value`, else the value already there (left untouched, its
        TTL not refreshed). Of two racing calls exactly one gets None, and the other gets its value."""
        ...

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store `value`, replacing whatever was there."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the key; absent keys are fine."""
        ...

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes, ttl: float) -> bool:
        """Store `value` only if the key holds exactly `expected` (None: only if absent); atomic against
        every other writer. True when this call stored it. (Versioned state: read, decide, compare-and-set,
        re-read and retry on False.)"""
        ...

    async def set_many(self, values: Mapping[str, bytes], ttl: float) -> None:
        """`set` for many keys in one round trip (batched writes off the request path)."""
        ...

    async def add_counts(self, increments: Mapping[str, Mapping[str, float]], ttl: float) -> None:
        """Add each number to its field of its key's hash (absent fields start at 0) and set each key's TTL,
        in one round trip: counters every replica adds to and any replica reads (pooled statistics)."""
        ...

    async def read_counts(self, keys: Sequence[str]) -> list[dict[str, float]]:
        """Each key's fields and numbers (`{}` when absent), in one round trip."""
        ...

    async def quota(self, batch: QuotaBatch) -> list[Verdict]:
        """Apply the adjusts, releases and renewals, then each claim in order, atomically (one round trip).

        One Verdict per claim, in order; the rules (GCRA rates, leased slots) are in `store/quota.py`.
        Every replica on the same store shares the limits; a claim takes all its limits or none."""
        ...


class OwnedStore(Store, Protocol):
    """A store as the app holds it: `start` when the app starts serving, `close` when it stops."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...
