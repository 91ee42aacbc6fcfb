"""Unit tests for `proxy/pipeline/result_cache.py`: a `Flight` (the leader's bytes as they arrive, then the end)
and `ResultCache.begin` / `end` (miss → lead, twin → follow, stored answer → hit, failing store → bypass), what
gets stored and what does not, and the per-route counts.

The store is a `MemoryStore` on a fixed clock (or a failing / blocking stand-in); waiters are tasks the test
knows to be suspended from an event, never from a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from proxy.config.model import CacheRule
from proxy.errors import StoreUnavailableError
from proxy.observe.metrics import Metrics
from proxy.pipeline.cache_policy import Entry, is_complete_stream
from proxy.pipeline.result_cache import KEY_PREFIX, Flight, ResultCache
from proxy.store.memory import MemoryStore

NOW = 1000.0
JSON = [(b"Content-Type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]
BODY = b'{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"content":"hi"}}]}'
EVENTS = [b'data: {"choices":[{"delta":{"content":"h"}}]}\n\n', b'data: {"choices":[{"delta":{"content":"i"}}]}\n\n']
DONE = b"data: [DONE]\n\n"
RULE = CacheRule(ttl=60.0)


async def suspended(wait: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """A task awaiting `wait()`, returned once it is suspended there."""
    started = asyncio.Event()

    async def run() -> None:
        # a step runs to its first suspension before any callback scheduled during it: once `started` is set,
        # the task is parked inside `wait()`
        asyncio.get_running_loop().call_soon(started.set)
        await wait()

    task = asyncio.create_task(run())
    await started.wait()
    assert not task.done()
    return task


def memory_cache() -> tuple[ResultCache, MemoryStore]:
    store = MemoryStore(clock=lambda: NOW)
    return ResultCache(store, Metrics()), store


def counts(hit: int = 0, miss: int = 0, bypass: int = 0, coalesced: int = 0) -> dict[str, int]:
    return {"hit": hit, "miss": miss, "bypass": bypass, "coalesced": coalesced}


# -- Flight ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "content_type"),
    [
        (JSON, "application/json"),
        ([(b"content-type", b"application/json; charset=utf-8")], "application/json; charset=utf-8"),
        ([(b"X-Other", b"1")], "application/json"),  # no Content-Type: JSON
    ],
)
def test_flight_begin_with_a_whole_body(headers: list[tuple[bytes, bytes]], content_type: str) -> None:
    flight = Flight()
    flight.begin(200, headers, BODY)
    assert (flight.status, flight.is_stream, flight.content_type) == (200, False, content_type)
    assert flight.chunks == [BODY] and flight.size == len(BODY)
    assert not flight.done


def test_flight_begin_without_a_body_is_a_stream() -> None:
    flight = Flight()
    flight.begin(200, SSE, None)
    assert (flight.status, flight.is_stream, flight.content_type) == (200, True, "text/event-stream")
    assert flight.chunks == [] and flight.size == 0
    for event in EVENTS:
        flight.append(event)
    assert flight.size == sum(len(e) for e in EVENTS)


async def test_begin_with_a_body_and_append_wake_waiters() -> None:
    flight = Flight()
    waiter = await suspended(flight.changed)
    flight.begin(200, JSON, BODY)
    await waiter  # woken by the body
    waiter = await suspended(flight.changed)  # a waiter after a change waits for the next one
    flight.append(b"more")
    await waiter
    assert flight.chunks == [BODY, b"more"] and not flight.done


async def test_append_wakes_every_waiter() -> None:
    flight = Flight()
    flight.begin(200, SSE, None)
    waiters = [await suspended(flight.changed) for _ in range(3)]
    flight.append(EVENTS[0])
    await asyncio.gather(*waiters)
    assert flight.chunks == [EVENTS[0]]


async def test_finish_wakes_waiters_and_is_idempotent() -> None:
    flight = Flight()
    flight.begin(200, SSE, None)
    waiter = await suspended(flight.changed)
    flight.finish(True)
    await waiter
    assert flight.done and flight.ok
    late = await suspended(flight.changed)
    flight.finish(False)  # a second end changes nothing and wakes nobody
    assert flight.done and flight.ok
    await asyncio.sleep(0)  # (one turn of the loop: a wake-up would have been delivered)
    assert not late.done()
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late


def test_entry_joins_the_chunks() -> None:
    flight = Flight()
    flight.begin(200, SSE, None)
    for chunk in [*EVENTS, DONE]:
        flight.append(chunk)
    entry = flight.entry()
    assert (entry.is_stream, entry.content_type) == (True, "text/event-stream")
    assert entry.body == b"".join([*EVENTS, DONE])
    whole = Flight()
    whole.begin(200, JSON, BODY)
    assert (whole.entry().is_stream, whole.entry().body) == (False, BODY)


# -- ResultCache.begin -------------------------------------------------------------------------------------


async def test_first_begin_is_a_miss_that_leads() -> None:
    cache, _ = memory_cache()
    lookup = await cache.begin("k", "r")
    assert (lookup.key, lookup.result) == ("k", "miss")
    assert isinstance(lookup.lead, Flight)
    assert lookup.follow is None and lookup.entry is None
    assert cache.summary()["routes"] == {"r": counts(miss=1)}


async def test_a_twin_while_the_flight_is_open_follows_the_same_flight() -> None:
    cache, _ = memory_cache()
    leader = await cache.begin("k", "r")
    twins = [await cache.begin("k", "r") for _ in range(2)]
    other = await cache.begin("other", "r")
    assert all(t.result == "coalesced" and t.follow is leader.lead and t.lead is None for t in twins)
    assert other.result == "miss" and other.lead is not leader.lead
    assert cache.summary()["routes"] == {"r": counts(miss=2, coalesced=2)}
    assert leader.lead is not None
    cache.end("k", leader.lead, ok=False, rule=RULE)
    assert leader.lead.done and not leader.lead.ok  # the followers see the end
    again = await cache.begin("k", "r")  # the flight is forgotten once it ended: a fresh miss
    assert again.result == "miss" and again.lead is not leader.lead


class BlockingStore(MemoryStore):
    """A memory store whose `get` waits until the test opens `gate`."""

    def __init__(self) -> None:
        super().__init__(clock=lambda: NOW)
        self.gate = asyncio.Event()

    async def get(self, key: str) -> bytes | None:
        await self.gate.wait()
        return await super().get(key)


async def test_a_twin_during_the_leaders_store_lookup_follows_it() -> None:
    store = BlockingStore()
    cache = ResultCache(store, Metrics())
    leading = asyncio.create_task(cache.begin("k", "r"))
    await asyncio.sleep(0)  # (yield, not a timed sleep) the leader registers its flight, then waits for the store
    twin = await cache.begin("k", "r")  # no store lookup: the flight is known before the leader's lookup ends
    store.gate.set()
    leader = await leading
    assert leader.result == "miss" and twin.result == "coalesced" and twin.follow is leader.lead


async def test_a_leader_cancelled_during_its_lookup_ends_the_flight_for_its_twins() -> None:
    store = BlockingStore()
    cache = ResultCache(store, Metrics())
    leading = asyncio.create_task(cache.begin("k", "r"))
    await asyncio.sleep(0)
    twin = await cache.begin("k", "r")
    assert twin.follow is not None
    waiter = await suspended(twin.follow.changed)
    leading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leading
    await waiter
    assert twin.follow.done and not twin.follow.ok
    store.gate.set()
    assert (await cache.begin("k", "r")).result == "miss"  # forgotten, not left open forever


# -- ResultCache.end: what is stored -----------------------------------------------------------------------


async def test_a_whole_ok_answer_is_stored_and_later_a_hit() -> None:
    cache, store = memory_cache()
    lead = (await cache.begin("k", "r")).lead
    assert lead is not None
    lead.begin(200, JSON, BODY)
    cache.end("k", lead, ok=True, rule=RULE)
    assert lead.done and lead.ok
    await cache.writes_done()
    assert len(store) == 1
    raw = await store.get(KEY_PREFIX + "k")
    assert raw is not None and Entry.decode(raw) is not None

    hit = await cache.begin("k", "r")
    assert hit.result == "hit" and hit.lead is None and hit.follow is None
    assert hit.entry is not None
    assert (hit.entry.is_stream, hit.entry.content_type, hit.entry.body) == (False, "application/json", BODY)
    assert (await cache.begin("k", "r")).result == "hit"  # a hit leaves no flight behind
    assert cache.summary() == {"routes": {"r": counts(miss=1, hit=2)}, "entries": 1, "bytes": store.size_bytes}


async def test_a_complete_stream_is_stored_as_a_stream() -> None:
    cache, _ = memory_cache()
    lead = (await cache.begin("k", "r")).lead
    assert lead is not None
    lead.begin(200, SSE, None)
    for chunk in [*EVENTS, DONE]:
        lead.append(chunk)
    cache.end("k", lead, ok=True, rule=RULE)
    await cache.writes_done()
    hit = await cache.begin("k", "r")
    assert hit.result == "hit" and hit.entry is not None
    assert (hit.entry.is_stream, hit.entry.content_type) == (True, "text/event-stream")
    assert hit.entry.body == b"".join([*EVENTS, DONE])


async def ended(cache: ResultCache, flight: Flight, ok: bool, rule: CacheRule | None) -> str:
    """End the leader's flight and wait for its write; then what a later identical request finds."""
    cache.end("k", flight, ok=ok, rule=rule)
    assert flight.done and flight.ok == ok
    await cache.writes_done()
    return (await cache.begin("k", "r")).result  # the flight is gone either way: never "coalesced"


@pytest.mark.parametrize(
    ("status", "ok", "rule", "stored"),
    [
        (200, True, RULE, True),
        (200, False, RULE, False),  # the leader failed
        (500, True, RULE, False),
        (429, True, RULE, False),
        (200, True, None, False),  # no rule (a hit, or a cancelled lookup, ending the flight)
        (200, True, CacheRule(ttl=60.0, max_entry_bytes=len(BODY)), True),  # at the limit
        (200, True, CacheRule(ttl=60.0, max_entry_bytes=len(BODY) - 1), False),  # over it
    ],
)
async def test_what_end_stores_of_a_whole_answer(status: int, ok: bool, rule: CacheRule | None, stored: bool) -> None:
    cache, store = memory_cache()
    lead = (await cache.begin("k", "r")).lead
    assert lead is not None
    lead.begin(status, JSON, BODY)
    assert await ended(cache, lead, ok, rule) == ("hit" if stored else "miss")
    assert len(store) == (1 if stored else 0)


@pytest.mark.parametrize(
    ("events", "stored"),
    [
        ([*EVENTS, DONE], True),
        ([*EVENTS, DONE, b"\n"], True),  # whitespace after [DONE] is fine
        ([DONE], True),
        (EVENTS, False),  # cut off: no [DONE]
        ([], False),
        ([EVENTS[0], b'event: error\ndata: {"error":{"message":"x"}}\n\n', DONE], False),  # the runtime's error event
    ],
)
async def test_only_a_complete_stream_is_stored(events: list[bytes], stored: bool) -> None:
    cache, store = memory_cache()
    lead = (await cache.begin("k", "r")).lead
    assert lead is not None
    lead.begin(200, SSE, None)
    for event in events:
        lead.append(event)
    assert is_complete_stream(b"".join(events), "chat") == stored
    assert await ended(cache, lead, True, RULE) == ("hit" if stored else "miss")
    assert len(store) == (1 if stored else 0)


async def test_end_of_a_stale_flight_leaves_the_current_one() -> None:
    cache, _ = memory_cache()
    first = (await cache.begin("k", "r")).lead
    assert first is not None
    cache.end("k", first, ok=False, rule=RULE)
    second = (await cache.begin("k", "r")).lead
    assert second is not None
    cache.end("k", first, ok=False, rule=RULE)  # the first leader ending twice must not forget the second
    twin = await cache.begin("k", "r")
    assert twin.result == "coalesced" and twin.follow is second


# -- a failing store ----------------------------------------------------------------------------------------


class FailingStore:
    """A `Store` that cannot answer anything (Redis down)."""

    def __init__(self) -> None:
        self.sets = 0

    async def get(self, key: str) -> bytes | None:
        raise StoreUnavailableError("down")

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        raise StoreUnavailableError("down")

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.sets += 1
        raise StoreUnavailableError("down")

    async def delete(self, key: str) -> None:
        raise StoreUnavailableError("down")


async def test_a_failing_store_is_a_bypass_that_still_leads() -> None:
    store = FailingStore()
    cache = ResultCache(store, Metrics())
    lookup = await cache.begin("k", "r")
    assert lookup.result == "bypass" and isinstance(lookup.lead, Flight) and lookup.entry is None
    twin = await cache.begin("k", "r")  # the twin still shares the leader's upstream answer
    assert twin.result == "coalesced" and twin.follow is lookup.lead
    lookup.lead.begin(200, JSON, BODY)
    cache.end("k", lookup.lead, ok=True, rule=RULE)
    await cache.writes_done()  # the failed write is swallowed, not raised
    assert store.sets == 1
    assert cache.summary() == {"routes": {"r": counts(bypass=1, coalesced=1)}, "entries": None, "bytes": None}


# -- counts ------------------------------------------------------------------------------------------------


async def test_counts_per_route_match_the_results_and_the_metric() -> None:
    cache, _ = memory_cache()
    metrics = cache._metrics
    a = (await cache.begin("k", "r1")).lead  # miss
    await cache.begin("k", "r1")  # coalesced
    assert a is not None
    a.begin(200, JSON, BODY)
    cache.end("k", a, ok=True, rule=RULE)
    await cache.writes_done()
    await cache.begin("k", "r1")  # hit
    await cache.begin("k2", "r2")  # miss (its flight stays open)
    await cache.begin("k2", "r2")  # coalesced
    cache.bypass("r2")
    expected = {"r1": counts(miss=1, coalesced=1, hit=1), "r2": counts(miss=1, coalesced=1, bypass=1)}
    assert cache.summary()["routes"] == expected
    for route, by_result in expected.items():
        for result, n in by_result.items():
            sample = metrics.registry.get_sample_value(
                "splitstream_cache_requests_total", {"route": route, "result": result}
            )
            assert (sample or 0.0) == n
