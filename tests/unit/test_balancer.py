"""Balancer policies over hand-built backend state (no I/O, fixed `now`, deterministic), and panic routing
through the dispatcher's `_acquire` (the `Bench` of test_acquire.py: no sockets)."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.config.model import Backend, HealthSettings
from proxy.errors import NoHealthyBackendError
from proxy.pipeline.balancer import foreign_requests, in_panic, pick_backend, queued_seconds, slowdown_seconds, takes_requests
from proxy.upstream.state import BackendState, BackendStates
from tests.unit.test_acquire import NEVER, Bench, at_once, backend, name, two
from tests.unit.test_acquire import pool as make_pool

NOW = 1000.0


def states(*specs: tuple[float, int, float, int]) -> list[BackendState]:
    """(weight, inflight, predicted load seconds, max_inflight) per backend."""
    out = []
    for i, (weight, inflight, load, limit) in enumerate(specs):
        state = BackendState(Backend(f"b{i}", f"http://h{i}:1", f"h{i}", 1, "", weight=weight, max_inflight=limit))
        state.inflight, state.predicted_load = inflight, load
        out.append(state)
    return out


@pytest.mark.parametrize(
    ("policy", "specs", "costs", "expected"),
    [
        ("least_cost", [(1, 1, 50.0, 0), (1, 5, 10.0, 0)], [1.0, 1.0], 1),  # less work beats fewer requests
        ("least_conn", [(1, 1, 50.0, 0), (1, 5, 10.0, 0)], [1.0, 1.0], 0),
        ("least_cost", [(1, 0, 10.0, 0), (4, 0, 30.0, 0)], [1.0, 1.0], 1),  # load per unit of weight
        ("least_cost", [(1, 0, 0.0, 0), (1, 0, 0.0, 0)], [4.0, 1.0], 1),  # idle: the faster backend for this request
        ("least_conn", [(1, 1, 0.0, 0), (1, 1, 0.0, 0)], [1.0, 1.0], 0),  # ties go to the first
        ("least_cost", [(1, 2, 0.0, 2), (1, 9, 90.0, 0)], [1.0, 1.0], 1),  # full backends are skipped
    ],
)
def test_pick(policy: str, specs: list[tuple[float, int, float, int]], costs: list[float], expected: int) -> None:
    assert pick_backend(states(*specs), costs, policy, 0, NOW) == expected


def test_unavailable_backends_are_never_picked() -> None:
    pool = states((1, 0, 0.0, 0), (1, 9, 99.0, 0), (1, 9, 99.0, 0))
    pool[0].ejected_until = NOW + 1
    pool[1].throttled_until = NOW + 1
    assert pick_backend(pool, [1, 1, 1], "least_cost", 0, NOW) == 2
    pool[2].healthy = False
    assert pick_backend(pool, [1, 1, 1], "least_cost", 0, NOW) is None
    assert pick_backend(pool, [1, 1, 1], "least_cost", 0, NOW + 1) == 0  # ejection and throttle expired


def test_all_full_is_none() -> None:
    assert pick_backend(states((1, 1, 0.0, 1), (1, 3, 0.0, 3)), [1, 1], "least_cost", 0, NOW) is None
    assert pick_backend(states((1, 1, 0.0, 1)), [1], "round_robin", 5, NOW) is None


def test_weighted_round_robin_turns() -> None:
    pool = states((1, 0, 0.0, 0), (2, 0, 0.0, 0))
    assert [pick_backend(pool, [1, 1], "round_robin", turn, NOW) for turn in range(6)] == [0, 1, 1, 0, 1, 1]


def test_runtime_load_counts_only_foreign_requests_and_only_when_fresh() -> None:
    a, b = states((1, 2, 2.0, 0), (1, 2, 2.0, 0))
    a.runtime_waiting, a.runtime_running, a.runtime_sampled_at = 10.0, 2.0, NOW - 1
    assert foreign_requests(a, NOW) == 10.0  # 12 at the runtime, 2 of them ours
    assert pick_backend([a, b], [1.0, 1.0], "least_cost", 0, NOW, runtime_load=True) == 1
    assert pick_backend([a, b], [1.0, 1.0], "least_cost", 0, NOW, runtime_load=False) == 0
    assert foreign_requests(a, NOW + 60) == 0.0  # stale numbers are ignored


def test_lease_release_is_idempotent_and_returns_to_zero() -> None:
    backends = BackendStates()
    state = backends.get(Backend("b", "http://h:1", "h", 1, ""))
    a, b = state.lease(10.5), state.lease(3.25)
    a.release(); a.release()
    assert state.inflight == 1 and state.predicted_load == pytest.approx(3.25)
    b.release()
    assert (state.inflight, state.predicted_load) == (0, 0.0)


def test_least_cost_counts_no_wait_while_a_batch_slot_is_free() -> None:
    fast = BackendState(Backend("fast", "http://f:1", "f", 1, "", concurrency=8))
    slow = BackendState(Backend("slow", "http://s:1", "s", 1, "", concurrency=8))
    fast.inflight, fast.predicted_load = 3, 3.0  # busy, but 5 of its 8 slots are free
    costs = [1.0, 4.0]  # this request takes 1 s on fast, 4 s on slow
    assert pick_backend([fast, slow], costs, "least_cost", 0, NOW) == 0
    fast.inflight, fast.predicted_load = 8, 40.0  # full, 5 s each: a slot frees in ~5/8 s, still worth the wait
    assert pick_backend([fast, slow], costs, "least_cost", 0, NOW) == 0
    fast.predicted_load = 320.0  # full of 40 s generations: a slot frees in ~5 s, the slow one is done in 4
    assert pick_backend([fast, slow], costs, "least_cost", 0, NOW) == 1
    fast.inflight, fast.predicted_load = 12, 60.0  # 4 queued ahead in the runtime: the 5th slot to free
    assert queued_seconds(fast) == pytest.approx(5 * 60.0 / (12 * 8))


def test_concurrency_one_is_the_whole_in_flight_load() -> None:
    a = BackendState(Backend("a", "http://a:1", "a", 1, ""))
    b = BackendState(Backend("b", "http://b:1", "b", 1, ""))
    a.inflight, a.predicted_load = 1, 3.5
    assert pick_backend([a, b], [1.0, 4.0], "least_cost", 0, NOW) == 1  # 3.5 + 1 > 0 + 4
    assert pick_backend([a, b], [1.0, 4.6], "least_cost", 0, NOW) == 0


def test_equal_idle_backends_spread_by_occupancy() -> None:
    a = BackendState(Backend("a", "http://a:1", "a", 1, "", concurrency=4))
    b = BackendState(Backend("b", "http://b:1", "b", 1, "", concurrency=4))
    a.inflight, a.predicted_load = 2, 2.0
    assert pick_backend([a, b], [1.0, 1.0], "least_cost", 0, NOW) == 1


def test_a_newcomer_is_charged_for_slowing_the_streams_already_running() -> None:
    """On a runtime whose streams share its cores (slope = solo speed), joining 3 running streams slows each:
    an idle runtime that would take this request longer than the busy one still wins, once that is counted."""
    fast = BackendState(Backend("fast", "http://f:1", "f", 1, "", concurrency=4))
    slow = BackendState(Backend("slow", "http://s:1", "s", 1, "", concurrency=4))
    fast.decode.a = fast.decode.b = 0.01  # 100 tok/s alone, 25 tok/s each with 4 running
    fast.inflight, fast.inflight_tokens, fast.predicted_load = 3, 600.0, 6.0  # 3 streams of 200 tokens
    assert slowdown_seconds(fast) == pytest.approx(0.01 * 0.5 * 600.0)
    costs = [4 * 0.01 * 100, 5.0]  # 100 tokens: 4 s among 4 on fast, 5 s alone on slow
    assert pick_backend([fast, slow], costs, "least_cost", 0, NOW) == 1  # 4 + 3 s of the others' time > 5
    fast.decode.b = 0.0  # a runtime that batches for free: the newcomer costs the others nothing
    assert slowdown_seconds(fast) == 0.0
    assert pick_backend([fast, slow], [1.0, 3.0], "least_cost", 0, NOW) == 0


def test_consistent_hash_keeps_a_key_on_one_backend_and_moves_only_a_lost_backends_keys() -> None:
    pool = states((1, 0, 0.0, 0), (1, 0, 0.0, 0), (1, 0, 0.0, 0))
    keys = [f"conversation-{i}" for i in range(300)]
    picks = {k: pick_backend(pool, [1.0] * 3, "consistent_hash", 0, NOW, key=k) for k in keys}
    assert all(pick_backend(pool, [1.0] * 3, "consistent_hash", 7, NOW, key=k) == picks[k] for k in keys)
    assert sorted(set(picks.values())) == [0, 1, 2] and min(list(picks.values()).count(i) for i in range(3)) > 50
    pool[1].healthy = False
    moved = {k for k in keys if pick_backend(pool, [1.0] * 3, "consistent_hash", 0, NOW, key=k) != picks[k]}
    assert moved == {k for k in keys if picks[k] == 1}  # only the lost backend's conversations move
    pool[1].healthy = True
    pool[0].inflight = 9  # no key: least_cost
    assert pick_backend(pool, [1.0] * 3, "consistent_hash", 0, NOW) == 1


# -- panic: too few of a pool healthy, so health is disregarded (Envoy's panic threshold) ---------------------


def out(state: BackendState, how: str) -> BackendState:
    if how == "unhealthy":  # a probe's verdict
        state.healthy = False
    elif how == "ejected":  # a passive ejection
        state.healthy, state.ejected_until = False, NOW + 10
    elif how == "throttled":  # the runtime's Retry-After: not ill health
        state.throttled_until = NOW + 10
    return state


@pytest.mark.parametrize(
    ("hows", "threshold", "expected"),
    [
        (["unhealthy"], 50, True),  # the pool's only backend is out: panic, not an outage
        (["ok", "unhealthy"], 50, False),  # half is not fewer than half
        (["ok", "unhealthy", "ejected"], 50, True),  # one in three
        (["ok", "unhealthy", "ejected"], 30, False),
        (["ok", "unhealthy"], 100, True),  # any backend out
        (["unhealthy", "ejected"], 0, False),  # 0 turns panic off
        (["throttled", "unhealthy"], 50, False),  # a throttled backend is healthy, just pacing us
        ([], 50, False),
    ],
)
def test_in_panic_when_fewer_than_the_threshold_are_healthy(
    hows: list[str], threshold: float, expected: bool
) -> None:
    pool = [out(s, how) for s, how in zip(states(*[(1, 0, 0.0, 0)] * len(hows)), hows, strict=True)]
    assert in_panic(pool, NOW, threshold) is expected


@pytest.mark.parametrize("policy", ["least_cost", "least_conn", "round_robin"])
def test_panic_disregards_health_but_not_retry_after_or_room(policy: str) -> None:
    pool = states((1, 0, 0.0, 0), (1, 0, 0.0, 0), (1, 1, 0.0, 1), (1, 0, 0.0, 0))
    for state, how in zip(pool, ["throttled", "ejected", "unhealthy", "unhealthy"], strict=True):
        out(state, how)
    assert pick_backend(pool, [1, 1, 1, 1], policy, 0, NOW) is None  # no panic: nobody takes requests
    picked = {pick_backend(pool, [1, 1, 1, 1], policy, turn, NOW, panic=True) for turn in range(8)}
    assert picked == ({1, 3} if policy == "round_robin" else {1})  # 0 is throttled, 2 is full; ties: first
    assert takes_requests(pool[1], NOW, panic=True) and not takes_requests(pool[1], NOW)
    assert not takes_requests(pool[0], NOW, panic=True)


async def test_dispatcher_routes_a_pool_in_panic_and_counts_it() -> None:
    bench = Bench(two(), balance="least_conn")
    out(bench.state("a"), "unhealthy")
    out(bench.state("b"), "ejected")
    lease = await bench.acquire(queue_timeout=NEVER)  # both out on health alone: served, not 503
    assert name(lease) in {"a", "b"}
    lease.release()
    registry = bench.dispatcher.metrics.registry
    assert registry.get_sample_value("splitstream_upstream_panic_total", {"pool": "p"}) == 1


async def test_dispatcher_without_panic_counts_none() -> None:
    bench = Bench(two(), balance="least_conn")
    out(bench.state("a"), "unhealthy")
    lease = await bench.acquire()  # one of two healthy: no panic, the healthy one
    assert name(lease) == "b"
    lease.release()
    registry = bench.dispatcher.metrics.registry
    assert registry.get_sample_value("splitstream_upstream_panic_total", {"pool": "p"}) is None


async def test_a_pool_in_panic_still_honours_retry_after() -> None:
    bench = Bench(make_pool("p", backend("a"), backend("b"), backend("c")), balance="least_conn")
    out(bench.state("a"), "unhealthy")
    out(bench.state("b"), "ejected")
    out(bench.state("c"), "throttled")  # healthy, but one of three: the pool panics
    with pytest.raises(NoHealthyBackendError):  # a and b were tried; c asked us to wait, panic or not
        at_once(bench.acquire(tried=("a", "b"), queue_timeout=NEVER))
    lease = await bench.acquire()
    assert name(lease) in {"a", "b"}
    lease.release()
    registry = bench.dispatcher.metrics.registry
    assert registry.get_sample_value("splitstream_upstream_panic_total", {"pool": "p"}) == 1


async def test_dispatcher_with_panic_threshold_zero_refuses_at_once() -> None:
    bench = Bench(two(), balance="least_conn")
    bench.snapshot = dataclasses.replace(bench.snapshot, health=HealthSettings(panic_threshold=0))
    out(bench.state("a"), "unhealthy")
    out(bench.state("b"), "ejected")
    with pytest.raises(NoHealthyBackendError):
        at_once(bench.acquire(queue_timeout=NEVER))
