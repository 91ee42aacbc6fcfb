"""The Store contract, run against both stores (embedded and a real redis-server), plus each one's own
limits: the embedded store's LRU bound, and the Redis store's circuit breaker through a real outage."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from proxy.errors import StoreUnavailableError
from proxy.store.base import Store
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.conftest import FakeClock
from tests.integration.conftest import RedisServer


@dataclass
class Harness:
    """A store under test, a second handle on the same data (another replica, for Redis), and the
    test's way to make a key's TTL run out without sleeping."""

    store: Store
    other: Store
    remaining_ttl: Callable[[str], float]  # seconds the key has left
    expire: Callable[[str], None]  # let the key's TTL run out


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        def remaining(key: str) -> float:
            return store._entries[key][1] - clock()  # test peeks at the expiry it cannot otherwise see

        def expire(key: str) -> None:
            clock.advance(remaining(key))  # exactly the TTL: the entry is gone at its expiry instant

        yield Harness(store, store, remaining, expire)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    first, second = RedisStore(server.url, timeout=5.0), RedisStore(server.url, timeout=5.0)

    def redis_remaining(key: str) -> float:
        reply = server.command(b"PTTL", key.encode())
        return int(reply[1:].strip()) / 1000

    def redis_expire(key: str) -> None:
        assert server.command(b"PEXPIRE", key.encode(), b"0") == b":1\r\n"  # timeout <= 0 expires it now

    yield Harness(first, second, redis_remaining, redis_expire)
    await first.close()
    await second.close()


async def test_get_absent_set_get_delete(harness: Harness) -> None:
    store = harness.store
    assert await store.get("k") is None
    await store.set("k", b"\x00binary\xff", 60)
    assert await store.get("k") == b"\x00binary\xff"
    assert await harness.other.get("k") == b"\x00binary\xff"
    await store.set("k", b"v2", 60)
    assert await store.get("k") == b"v2"
    await store.delete("k")
    assert await store.get("k") is None
    await store.delete("k")  # absent: fine


async def test_set_if_absent_returns_none_when_it_stores_and_the_old_value_when_not(harness: Harness) -> None:
    store = harness.store
    assert await store.set_if_absent("k", b"first", 60) is None
    assert await store.set_if_absent("k", b"second", 60) == b"first"
    assert await harness.other.set_if_absent("k", b"third", 60) == b"first"
    assert await store.get("k") == b"first"


async def test_racing_set_if_absent_has_exactly_one_winner_per_key(harness: Harness) -> None:
    keys = [f"race:{i}" for i in range(200)]
    results: list[bytes | None] = []
    for start in range(0, len(keys), 25):  # 25 racing pairs at a time: under the Redis store's in-flight cap
        results += await asyncio.gather(*(
            s.set_if_absent(k, f"{name}:{k}".encode(), 60)
            for k in keys[start:start + 25] for s, name in ((harness.store, "a"), (harness.other, "b"))
        ))
    for i, key in enumerate(keys):
        a, b = results[2 * i], results[2 * i + 1]
        assert (a is None) != (b is None), (key, a, b)  # one winner
        winner = f"a:{key}".encode() if a is None else f"b:{key}".encode()
        assert (a or b) == winner  # the loser saw the winner's value
        assert await harness.store.get(key) == winner and await harness.other.get(key) == winner


async def test_ttl_is_set_and_expiry_frees_the_key(harness: Harness) -> None:
    store = harness.store
    assert await store.set_if_absent("k", b"v", 30) is None
    assert 29 < harness.remaining_ttl("k") <= 30
    harness.expire("k")
    assert await store.get("k") is None
    assert await store.set_if_absent("k", b"again", 30) is None
    assert await store.get("k") == b"again"
    await store.set("s", b"v", 0.5)  # fractional TTLs are kept (milliseconds in Redis)
    assert 0 < harness.remaining_ttl("s") <= 0.5


async def test_set_if_absent_hit_does_not_refresh_the_ttl_but_set_does(harness: Harness) -> None:
    store = harness.store
    await store.set_if_absent("k", b"v", 10)
    assert await store.set_if_absent("k", b"w", 3600) == b"v"
    assert harness.remaining_ttl("k") <= 10
    await store.set("k", b"w", 3600)
    assert harness.remaining_ttl("k") > 3000


async def test_compare_and_set_stores_only_over_the_expected_value(harness: Harness) -> None:
    store, other = harness.store, harness.other
    assert await store.compare_and_set("v", None, b"1", 60)  # absent, as expected
    assert not await other.compare_and_set("v", None, b"x", 60)  # no longer absent
    assert not await other.compare_and_set("v", b"0", b"x", 60)  # stale expectation
    assert await other.compare_and_set("v", b"1", b"2", 60)
    assert await store.get("v") == b"2"
    assert 0 < harness.remaining_ttl("v") <= 60


async def test_racing_compare_and_set_has_one_winner(harness: Harness) -> None:
    await harness.store.set("v", b"base", 60)
    results = await asyncio.gather(*(s.compare_and_set("v", b"base", b"w%d" % i, 60)
                                     for i, s in enumerate([harness.store, harness.other] * 5)))
    assert sum(results) == 1
    assert await harness.store.get("v") == b"w%d" % results.index(True)


async def test_counts_add_up_across_handles_and_read_in_one_call(harness: Harness) -> None:
    store, other = harness.store, harness.other
    await store.add_counts({"c:a": {"requests": 2, "latency_sum": 0.5}, "c:b": {"requests": 1}}, 60)
    await other.add_counts({"c:a": {"requests": 3, "errors": 1, "bad": float("inf")}}, 60)
    assert await other.read_counts(["c:a", "c:b", "c:none"]) == [
        {"requests": 5.0, "latency_sum": 0.5, "errors": 1.0}, {"requests": 1.0}, {}]
    assert 0 < harness.remaining_ttl("c:b") <= 60 if isinstance(store, RedisStore) else True


async def test_set_many_sets_every_key(harness: Harness) -> None:
    await harness.store.set_many({"m:1": b"one", "m:2": b"two"}, 60)
    assert [await harness.other.get(k) for k in ("m:1", "m:2")] == [b"one", b"two"]


async def test_memory_store_expires_on_its_clock() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    await store.set("k", b"v", 10)
    clock.advance(9.999)
    assert await store.get("k") == b"v"
    clock.advance(0.001)
    assert await store.get("k") is None
    assert len(store) == 0  # an expired entry is dropped when seen


async def test_memory_store_evicts_the_least_recently_used() -> None:
    store = MemoryStore(max_entries=3)
    for key in ("a", "b", "c"):
        await store.set(key, key.encode(), 60)
    assert await store.get("a") == b"a"  # a is now the most recently used; b the least
    assert await store.set_if_absent("d", b"d", 60) is None
    assert len(store) == 3
    assert await store.get("b") is None
    assert [await store.get(k) for k in ("a", "c", "d")] == [b"a", b"c", b"d"]
    assert await store.set_if_absent("c", b"x", 60) == b"c"  # a hit counts as a use: c stays, a goes next
    await store.set("e", b"e", 60)
    assert await store.get("a") is None and await store.get("c") == b"c"


# ---------------------------------------------------------------------------------- Redis outages


async def _unavailable(call: Awaitable[object]) -> None:
    with pytest.raises(StoreUnavailableError):
        await call


async def test_breaker_stops_calls_during_an_outage_and_a_probe_finds_redis_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="splitstream.store")
    clock = FakeClock()
    store = RedisStore(redis_server.url, timeout=5.0, cooldown=1.0, max_cooldown=4.0, clock=clock)
    try:
        await store.set("k", b"v", 60)
        redis_server.stop()
        calls = store.calls
        await _unavailable(store.get("k"))  # the failure that opens the breaker
        assert store.calls == calls + 1 and store.breaker.is_open
        for _ in range(50):  # open: answered at once, Redis is not called
            await _unavailable(store.get("k"))
            await _unavailable(store.set_if_absent("k", b"x", 60))
        assert store.calls == calls + 1
        clock.advance(1.0)
        await _unavailable(store.get("k"))  # the probe, still down: the cooldown doubles
        assert store.calls == calls + 2 and store.breaker.cooldown == 2.0
        clock.advance(1.9)
        await _unavailable(store.get("k"))
        assert store.calls == calls + 2
        clock.advance(0.1)
        await _unavailable(store.get("k"))
        clock.advance(4.0)
        await _unavailable(store.get("k"))
        assert store.breaker.cooldown == 4.0  # capped
        redis_server.start()  # same port, empty (no persistence)
        await _unavailable(store.get("k"))  # still cooling down: not called yet
        probes = store.calls
        clock.advance(4.0)
        assert await store.set_if_absent("k", b"after", 60) is None  # the probe succeeds: closed again
        assert store.calls == probes + 1 and not store.breaker.is_open and store.breaker.cooldown == 1.0
        assert await store.get("k") == b"after"
    finally:
        await store.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "splitstream.store"]
    assert len([m for m in messages if m.startswith("redis unavailable")]) == 1  # once per outage
    assert len([m for m in messages if m.startswith("redis back")]) == 1
    assert all(redis_server.url not in m for m in messages)


async def test_a_redis_that_stops_answering_times_out_into_the_breaker(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout=0.05, clock=FakeClock())
    assert redis_server.proc is not None
    try:
        await store.set("k", b"v", 60)
        redis_server.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        try:
            await _unavailable(store.get("k"))
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        assert store.breaker.is_open
    finally:
        await store.close()


async def test_unreachable_redis_at_start_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    from tests.processes import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", clock=FakeClock())
    try:
        with caplog.at_level(logging.WARNING, logger="splitstream.store"):
            await store.start()
        assert any(r.getMessage().startswith("redis unavailable") for r in caplog.records)
        assert store.breaker.is_open
    finally:
        await store.close()


async def test_calls_beyond_the_in_flight_cap_fall_back_without_opening_the_breaker(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout=5.0, max_connections=4, clock=FakeClock())
    try:
        results = await asyncio.gather(*(store.get(f"k{i}") for i in range(10)), return_exceptions=True)
        assert sum(isinstance(r, StoreUnavailableError) for r in results) == 6
        assert store.calls == 4 and not store.breaker.is_open
        assert await store.get("k") is None  # slots are given back
    finally:
        await store.close()


def test_bad_redis_url_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        RedisStore("http://127.0.0.1:1")
