"""Per-variant statistics (`proxy.observe.stats`, `proxy.observe.pooled`): recording into 10-second batches,
what a flush adds to which keys, which buckets hold a window, pooling replicas' numbers back, and a store
outage. Fixed clocks, the embedded store (no sockets, no sleeps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from proxy.errors import StoreUnavailableError
from proxy.observe.histogram import bucket_of
from proxy.observe.metrics import Metrics
from proxy.observe.pooled import PooledStats
from proxy.observe.stats import (
    COARSE,
    FINE,
    FINE_REACH,
    HORIZON,
    HOUR,
    TIERS,
    RequestStats,
    VariantTotals,
    cover,
    fleet_key,
    increments,
    is_variant_error,
    keep,
    percentile,
    route_key,
)
from proxy.store.memory import MemoryStore
from tests.conftest import FakeClock

T0 = 1_800_000_000.0  # a multiple of HOUR: buckets line up with round numbers


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 0.5, None), ([3.0], 0.5, 3.0), ([3.0], 0.95, 3.0), ([1.0, 2.0], 0.5, 1.0), ([1.0, 2.0], 0.95, 2.0),
     ([float(i) for i in range(1, 101)], 0.5, 50.0), ([float(i) for i in range(1, 101)], 0.95, 95.0)],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


@pytest.mark.parametrize(("code", "error"), [
    (None, False), ("invalid_request", False), ("invalid_json", False), ("model_not_found", False),
    ("body_too_large", False), ("invalid_api_key", False), ("overloaded", False), ("backend_rate_limited", False),
    ("internal_error", False),
    ("backend_unreachable", True), ("backend_error", True), ("backend_reset", True), ("backend_timeout", True),
    ("backend_protocol_error", True), ("backend_body_too_large", True), ("no_healthy_backend", True),
    ("upstream_error", True),
])
def test_only_upstream_failures_count_against_a_variant(code: str | None, error: bool) -> None:
    assert is_variant_error(code) is error


# ------------------------------------------------------------------------------------------- recording


def test_a_batch_per_variant_and_ten_seconds_with_timings_of_successes_only() -> None:
    clock = FakeClock(T0 + 1)
    stats = RequestStats(clock)
    stats.record("chat", "stable", 0.2, 0.05, False, 10, 20)
    stats.record("chat", "stable", 0.001, None, True, None, None)  # an error: counted, its timing is not
    stats.record("chat", "canary", 0.3, None, False, 5, 0)
    clock.advance(FINE)  # the next bucket: stable's batch closes
    stats.record("chat", "stable", 0.4, 0.1, False, None, 7)
    drained = {(route, variant, batch.bucket): batch for route, variant, batch in stats.drain()}
    assert stats.drain() == []  # drained: nothing twice
    first = drained[("chat", "stable", int(T0 // FINE))]
    assert (first.requests, first.errors, first.prompt, first.completion) == (2, 1, 10, 20)
    assert first.latency == {bucket_of(0.2): 1} and first.ttft == {bucket_of(0.05): 1}
    assert first.latency_sum == 0.2 and first.latency_squares == pytest.approx(0.04)
    assert drained[("chat", "stable", int(T0 // FINE) + 1)].completion == 7
    assert drained[("chat", "canary", int(T0 // FINE))].fields("canary") == {
        "canary|n": 1.0, "canary|p": 5.0, "canary|ls": 0.3, "canary|lq": pytest.approx(0.09),
        f"canary|l{bucket_of(0.3)}": 1.0}


def test_a_flush_adds_to_the_hashes_of_every_size_with_a_heartbeat() -> None:
    clock = FakeClock(T0 + 12)
    stats = RequestStats(clock)
    stats.record("chat", "stable", 0.2, None, False, None, None)
    clock.advance(FINE)
    stats.record("chat", "stable", 0.2, None, True, None, None)
    tiers = increments(stats.drain(), {("chat", "canary"): (2, 1.5, 1.25)}, "replica-a", T0 + 25)
    fine, coarse = tiers[FINE], tiers[COARSE]
    assert tiers[HOUR][route_key(HOUR, int(T0), "chat")] == coarse[route_key(COARSE, int(T0), "chat")]
    start = int(T0)
    assert fine[route_key(FINE, start + 10, "chat")] == {"stable|n": 1.0, "stable|ls": 0.2,
                                                          "stable|lq": pytest.approx(0.04),
                                                          f"stable|l{bucket_of(0.2)}": 1.0}
    assert fine[route_key(FINE, start + 20, "chat")] == {  # the second batch, and the feedback booked at T0 + 25
        "stable|n": 1.0, "stable|e": 1.0, "canary|fn": 2.0, "canary|fs": 1.5, "canary|fq": 1.25}
    assert coarse[route_key(COARSE, start, "chat")]["stable|n"] == 2.0  # both batches in one coarse bucket
    assert fine[fleet_key(FINE, start + 20)] == {"route|chat": 1.0, "replica|replica-a": 1.0}
    assert coarse[fleet_key(COARSE, start)] == {"route|chat": 2.0, "replica|replica-a": 1.0}
    assert increments([], {}, "idle", T0)[FINE] == {fleet_key(FINE, start): {"replica|idle": 1.0}}  # heartbeat


# --------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    ("span", "now", "expected"),
    [
        ((T0 + 15, T0 + 15), T0 + 15, [(FINE, T0 + 10)]),  # the bucket holding the start, through the end's
        ((T0 + 15, T0 + 42), T0 + 42, [(FINE, T0 + 10), (FINE, T0 + 20), (FINE, T0 + 30), (FINE, T0 + 40)]),
        # whole coarse buckets where they fit, fine ones at the edges
        ((T0 - 20, T0 + 2 * COARSE + 5), T0 + 2 * COARSE + 5,
         [(FINE, T0 - 20), (FINE, T0 - 10), (COARSE, T0), (COARSE, T0 + COARSE), (FINE, T0 + 2 * COARSE)]),
        # a start older than FINE_REACH begins at its coarse bucket (fine ones are gone by then); whole hours
        ((T0 - 2 * COARSE + 125, T0 + FINE_REACH + 2 * COARSE), T0 + FINE_REACH + 2 * COARSE,
         [(COARSE, T0 - 2 * COARSE), (COARSE, T0 - COARSE), (HOUR, T0), (COARSE, T0 + HOUR),
          (COARSE, T0 + HOUR + COARSE), (FINE, T0 + HOUR + 2 * COARSE)]),
    ],
    ids=["one bucket", "fine", "coarse in the middle", "old start and hours"],
)
def test_cover(span: tuple[float, float], now: float, expected: list[tuple[int, float]]) -> None:
    assert cover(span, now) == [(size, int(start)) for size, start in expected]


def test_a_window_never_reaches_past_the_horizon_and_keys_outlive_their_windows() -> None:
    now = T0 + 10 * HORIZON + 125
    buckets = cover((0.0, now), now)
    assert buckets[0] == (HOUR, int(now - HORIZON) // COARSE * COARSE) and len(buckets) < 80  # a day: few hashes
    assert sum(size for size, _ in buckets) == HORIZON + FINE + 125 - 5  # from the 5 minutes holding its start
    assert [keep(size, reach) > reach + size for size, reach in TIERS] == [True] * 3


# ------------------------------------------------------------------------------------------ pooling


def replica(store: MemoryStore, name: str, clock: FakeClock, metrics: Metrics | None = None) -> PooledStats:
    return PooledStats(store, RequestStats(clock), name, metrics or Metrics(), clock)


async def test_replicas_pool_into_the_same_numbers_and_any_of_them_reads_them() -> None:
    clock, store = FakeClock(T0 + 3), MemoryStore()
    a, b = replica(store, "a", clock), replica(store, "b", clock)
    for _ in range(3):
        a._local.record("chat", "stable", 0.2, 0.05, False, 4, 8)
    b._local.record("chat", "stable", 0.4, None, True, None, None)
    b._local.record("chat", "canary", 0.1, None, False, None, None)
    assert await a.flush()
    clock.advance(COARSE)  # b's batch lands a coarse bucket later: the window spans both tiers
    b._local.record("chat", "stable", 0.3, None, False, None, None)
    reading = await b.read(["chat"], [(T0, clock()), (clock() - 5, clock())])
    both, recent = reading.routes["chat"]
    assert reading.fleet[0].replicas == {"a", "b"} and reading.fleet[0].routes == {"chat"}
    assert both.replicas == {"a", "b"} and recent.replicas == {"b"}  # a has not flushed since
    stable = both.of("stable")
    assert (stable.requests, stable.errors, stable.prompt_tokens, stable.completion_tokens) == (5, 1, 12, 24)
    assert stable.latency == {bucket_of(0.2): 3.0, bucket_of(0.3): 1.0}  # the error's timing left out
    assert both.of("canary").requests == 1 and recent.of("stable").requests == 1
    assert (await a.read(["chat"], [(T0, clock())])).routes["chat"][0].variants == both.variants  # any replica
    assert both.of("nope") == VariantTotals()


class DownStore(MemoryStore):
    """The embedded store, but every counter call fails as a Redis that does not answer would."""

    async def add_counts(self, increments: Mapping[str, Mapping[str, float]], ttl: float) -> None:
        raise StoreUnavailableError("down")

    async def read_counts(self, keys: Sequence[str]) -> list[dict[str, float]]:
        raise StoreUnavailableError("down")


async def test_a_store_outage_drops_the_batch_and_reads_raise(caplog: pytest.LogCaptureFixture) -> None:
    clock, metrics = FakeClock(T0), Metrics()
    stats = replica(DownStore(), "a", clock, metrics)
    stats._local.record("chat", "stable", 0.2, None, False, None, None)
    assert not await stats.flush() and not await stats.flush()
    assert stats.dropped == 1 and metrics.stats_flushes_total.labels("dropped")._value.get() == 2
    assert len([r for r in caplog.records if r.name == "splitstream.stats"]) == 1  # once per outage
    with pytest.raises(StoreUnavailableError):
        await stats.read(["chat"], [(T0, T0)])
