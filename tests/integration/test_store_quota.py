"""`Store.quota` against both stores (embedded and a real redis-server): shared GCRA rates and leased slots.

Periods are an hour or more, so the real time that passes between calls on Redis's clock cannot change an
outcome; where a test needs time to pass it calls `age`, which moves the embedded store's clock or moves
every stored time on Redis back by the same amount (the test's one peek at the script's encoding).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from proxy.errors import StoreUnavailableError
from proxy.store.base import Store
from proxy.store.memory import MemoryStore
from proxy.store.quota import Adjust, Claim, QuotaBatch, Rate, Slot, Verdict
from proxy.store.redis import RedisStore
from tests.conftest import FakeClock
from tests.integration.conftest import RedisServer

HOUR = 3600.0
SLACK = 60.0  # seconds of real time a test may take on Redis's clock: far below every interval used here
REQUESTS = Rate("q:req", HOUR, 5.0, 1.0)  # one every 720 s
TOKENS = Rate("q:tok", HOUR, 1000.0, 100.0)  # 100 tokens are 360 s


@dataclass
class Harness:
    """A store under test, a second handle on the same quotas (another replica, for Redis), and a way to
    let time pass for everything stored without sleeping."""

    store: Store
    other: Store
    age: Callable[[float], None]


# Moves every rate anchor (anchor_us, ahead) and lease expiry (score, us) back by ARGV[1] microseconds: to the
# quota script, that much time has passed.
_AGE_SCRIPT = b"""
local shift = tonumber(ARGV[1])
for _, key in ipairs(redis.call('KEYS', '*')) do
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'string' then
    local anchor_us, ahead = struct.unpack('<dd', redis.call('GET', key))
    redis.call('SET', key, struct.pack('<dd', anchor_us - shift, ahead), 'KEEPTTL')
  elseif kind == 'zset' then
    local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      redis.call('ZADD', key, string.format('%.0f', tonumber(entries[i + 1]) - shift), entries[i])
    end
  end
end
return 1
"""


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        yield Harness(store, store, clock.advance)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    first, second = RedisStore(server.url, timeout=5.0), RedisStore(server.url, timeout=5.0)

    def age(seconds: float) -> None:
        shift = str(round(seconds * 1e6)).encode()
        assert server.command(b"EVAL", _AGE_SCRIPT, b"0", shift) == b":1\r\n"

    yield Harness(first, second, age)
    await first.close()
    await second.close()


async def claim(store: Store, *rates: Rate, slot: Slot | None = None) -> Verdict:
    [verdict] = await store.quota(QuotaBatch(claims=(Claim(rates, slot),)))
    return verdict


def lease(name: str, limit: int = 2, ttl: float = HOUR) -> Slot:
    return Slot("q:conc", limit, name, ttl)


async def test_a_burst_up_to_the_limit_then_refusal_with_the_wait(harness: Harness) -> None:
    verdicts = [await claim(harness.store, REQUESTS) for _ in range(5)]
    assert [v.admitted for v in verdicts] == [True] * 5
    assert [v.remaining for v in verdicts] == [(4.0,), (3.0,), (2.0,), (1.0,), (0.0,)]
    assert HOUR - SLACK < verdicts[-1].reset[0] <= HOUR
    refused = await claim(harness.store, REQUESTS)
    assert not refused.admitted and refused.refused == 0 and refused.remaining == (0.0,)
    assert 720.0 - SLACK < refused.retry_after <= 720.0


async def test_time_refills_one_interval_per_unit(harness: Harness) -> None:
    for _ in range(5):
        await claim(harness.store, REQUESTS)
    harness.age(720.0 + SLACK)
    assert [(await claim(harness.store, REQUESTS)).admitted for _ in range(2)] == [True, False]
    harness.age(10 * HOUR)
    assert (await claim(harness.store, REQUESTS)).remaining == (4.0,)


async def test_a_claim_takes_all_its_limits_or_none(harness: Harness) -> None:
    big = Rate("q:tok", HOUR, 1000.0, 1500.0)
    verdict = await claim(harness.store, REQUESTS, big)
    assert not verdict.admitted and verdict.refused == 1 and verdict.remaining == (5.0, 1000.0)
    assert (await claim(harness.store, REQUESTS, TOKENS)).remaining == (4.0, 900.0)  # nothing was taken


async def test_adjusts_give_back_and_charge_debt(harness: Harness) -> None:
    store = harness.store
    predicted = Rate("q:tok", HOUR, 1000.0, 800.0)
    assert (await claim(store, predicted)).admitted
    assert not (await claim(store, Rate("q:tok", HOUR, 1000.0, 300.0))).admitted  # 300 more: only 200 left
    await store.quota(QuotaBatch(adjusts=(Adjust("q:tok", HOUR, 1000.0, -500.0),)))  # 300 were used
    assert (await claim(store, TOKENS)).remaining == (600.0,)
    await store.quota(QuotaBatch(adjusts=(Adjust("q:tok", HOUR, 1000.0, 1000.0),)))  # 1000 more: 400 over
    debt = await claim(store, TOKENS)
    assert not debt.admitted and debt.remaining == (0.0,)
    assert 1800.0 - SLACK < debt.retry_after <= 1800.0  # (1400 + 100 - 1000) tokens at 3.6 s each
    harness.age(1800.0 + SLACK)
    assert (await claim(store, TOKENS)).admitted
    await store.quota(QuotaBatch(adjusts=(Adjust("q:none", HOUR, 1000.0, -10.0),)))  # absent: nothing


async def test_giving_everything_back_leaves_the_limit_full(harness: Harness) -> None:
    await claim(harness.store, TOKENS)
    await harness.store.quota(QuotaBatch(adjusts=(Adjust("q:tok", HOUR, 1000.0, -5000.0),)))
    verdict = await claim(harness.store, Rate("q:tok", HOUR, 1000.0, 1000.0))
    assert verdict.admitted and verdict.remaining == (0.0,)


async def test_slot_limit_release_renewal_and_expiry(harness: Harness) -> None:
    store = harness.store
    assert [(await claim(store, slot=lease(n))).in_use for n in ("a", "b")] == [1, 2]
    full = await claim(store, REQUESTS, slot=lease("c"))
    assert not full.admitted and full.refused == 1 and full.retry_after == 1.0 and full.in_use == 2
    assert full.remaining == (5.0,)
    await store.quota(QuotaBatch(releases=(("q:conc", "a"),)))
    assert (await claim(store, slot=lease("c", ttl=100.0))).in_use == 2  # b and c
    harness.age(90.0)
    await store.quota(QuotaBatch(renewals=(("q:conc", "c", HOUR), ("q:conc", "a", HOUR))))  # a: released
    harness.age(HOUR - 90.0)  # b's expiry; c was renewed until 90 s + an hour
    assert (await claim(store, slot=lease("d"))).in_use == 2  # c and d
    assert not (await claim(store, slot=lease("e"))).admitted
    harness.age(100.0)  # past c's renewed expiry: not renewed again, it runs out
    assert (await claim(store, slot=lease("e"))).in_use == 2  # d and e


async def test_a_large_batch_is_answered_in_order(harness: Harness) -> None:
    rates = [Rate("q:a", HOUR, 100.0, 1.0), Rate("q:b", HOUR, 50.0, 2.0)]
    claims = tuple(Claim((rates[i % 2],)) for i in range(300))
    verdicts = await harness.store.quota(QuotaBatch(claims=claims))
    assert len(verdicts) == 300
    a, b = verdicts[0::2], verdicts[1::2]
    assert [v.admitted for v in a] == [True] * 100 + [False] * 50
    assert [v.admitted for v in b] == [True] * 25 + [False] * 125
    assert [v.remaining[0] for v in a[:100]] == [float(n) for n in range(99, -1, -1)]
    assert [v.remaining[0] for v in b[:25]] == [float(n) for n in range(48, -1, -2)]


async def test_two_replicas_share_the_limits(harness: Harness) -> None:
    once = Rate("q:once", HOUR, 1.0, 1.0)
    assert (await claim(harness.store, once, slot=lease("a", limit=1))).admitted
    refused = await claim(harness.other, once)
    assert not refused.admitted and refused.refused == 0
    assert not (await claim(harness.other, slot=lease("b", limit=1))).admitted
    await harness.other.quota(QuotaBatch(releases=(("q:conc", "a"),)))
    assert (await claim(harness.store, slot=lease("b", limit=1))).admitted


# ------------------------------------------------------------------------------------------ Redis only


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_server.url, timeout=5.0, clock=FakeClock())
    yield store
    await store.close()


async def test_a_batch_is_one_round_trip_and_keys_get_ttls(
    redis_store: RedisStore, redis_server: RedisServer
) -> None:
    calls = redis_store.calls
    await redis_store.quota(QuotaBatch(claims=(Claim((REQUESTS, TOKENS), lease("a", ttl=30.0)),) * 3,
                                       renewals=(("q:conc", "x", 30.0),)))
    assert redis_store.calls == calls + 1

    def pttl(key: bytes) -> int:
        return int(redis_server.command(b"PTTL", key)[1:].strip())

    assert 2160_000 - SLACK * 1000 < pttl(b"q:req") <= 2161_000  # 3 x 720 s ahead, + 1 s
    assert 1080_000 - SLACK * 1000 < pttl(b"q:tok") <= 1081_000
    assert 0 < pttl(b"q:conc") <= 30_000


async def test_the_script_is_loaded_again_after_redis_forgets_it(
    redis_store: RedisStore, redis_server: RedisServer
) -> None:
    assert (await claim(redis_store, REQUESTS)).admitted
    assert redis_server.command(b"SCRIPT", b"FLUSH") == b"+OK\r\n"
    assert (await claim(redis_store, REQUESTS)).remaining == (3.0,)
    assert not redis_store.breaker.is_open


async def test_redis_stopped_is_store_unavailable(redis_store: RedisStore, redis_server: RedisServer) -> None:
    assert (await claim(redis_store, REQUESTS)).admitted
    redis_server.stop()
    with pytest.raises(StoreUnavailableError):
        await claim(redis_store, REQUESTS)
    with pytest.raises(StoreUnavailableError):  # the breaker is open now: answered without the network
        await redis_store.quota(QuotaBatch(releases=(("q:conc", "a"),)))
    assert redis_store.breaker.is_open


async def test_an_empty_batch_costs_no_round_trip(redis_store: RedisStore) -> None:
    assert await redis_store.quota(QuotaBatch()) == []
    assert redis_store.calls == 0
