"""The `Store` protocol: the four operations the request path may ask of shared key/value state.

Implementations: `store/memory.py` (embedded, one process) and `store/redis.py` (shared by replicas).
Callers (split assignment, the result cache, rollout state) see only `Store`; `OwnedStore` adds the lifecycle that
`app.py` drives from a `cleanup_ctx`. A store that cannot answer raises `StoreUnavailableError`.
"""

from __future__ import annotations

from typing import Protocol


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


class OwnedStore(Store, Protocol):
    """A store as the app holds it: `start` when the app starts serving, `close` when it stops."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...
