"""The in-process memory of the shared store's sticky answers: bounded, short-lived (fixed clock)."""

from __future__ import annotations

from proxy.store import recent
from proxy.store.recent import MEMO_SECONDS, RecentAssignments


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_remembers_for_at_most_memo_seconds_and_never_past_the_ttl() -> None:
    clock = Clock()
    memo = RecentAssignments(clock)
    memo.put("long", b"canary", ttl=7 * 86400)
    memo.put("short", b"stable", ttl=5.0)
    clock.now += 4.9
    assert memo.get("long") == b"canary" and memo.get("short") == b"stable"
    clock.now += 0.2
    assert memo.get("short") is None  # the store's TTL ended first
    clock.now += MEMO_SECONDS
    assert memo.get("long") is None  # asked again after MEMO_SECONDS, whatever the TTL


def test_bounded(monkeypatch: object) -> None:
    setattr(recent, "MEMO_MAX_ENTRIES", 3)
    try:
        memo = RecentAssignments(Clock())
        for i in range(5):
            memo.put(f"k{i}", b"v", ttl=60)
        assert [memo.get(f"k{i}") for i in range(5)] == [None, None, b"v", b"v", b"v"]
    finally:
        setattr(recent, "MEMO_MAX_ENTRIES", 100_000)
