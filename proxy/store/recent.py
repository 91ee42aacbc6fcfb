"""A short in-process memory of the shared store's sticky answers (state only; used by `pipeline/assignment.py`).

Keeps a user's later requests from paying a Redis round trip each, without ever deciding anything itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# How long this process trusts what the shared store said about a subject before asking again. Short next
# to any sticky TTL (days), long enough that a user's conversation costs one round trip, not one per turn.
MEMO_SECONDS = 30.0
MEMO_MAX_ENTRIES = 100_000


class RecentAssignments:
    """What the shared store answered for recent subjects, so their next requests skip the round trip.

    Only the store's own answers are kept, so replicas still agree on every assignment; an entry is
    trusted for at most MEMO_SECONDS and checked against the route's current variants on every use.
    Pointless in front of the embedded store, which is already in-process."""

    __slots__ = ("_entries", "_clock")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._clock = clock

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: str, value: bytes, ttl: float) -> None:
        self._entries[key] = (value, self._clock() + min(ttl, MEMO_SECONDS))
        self._entries.move_to_end(key)
        if len(self._entries) > MEMO_MAX_ENTRIES:
            self._entries.popitem(last=False)
