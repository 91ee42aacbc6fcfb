"""Unit tests for `Dispatcher._acquire` (`proxy/pipeline/dispatch.py`): which backend's lease comes back under each
balance policy, fail-over past tried backends, skipping unavailable ones, refusing when full, and the FIFO
hand-off through the pool's `WaitQueue`.

No sockets (the `UpstreamClient` is never opened: `_acquire` does not use it) and no timed sleeps: the backend
clock is a fake the test sets; waiters are tasks the test watches enter the queue by yielding to the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from proxy.config.model import Backend, Balance, HealthSettings, Pool, Route, ServerSettings, Snapshot, Timeouts, Variant
from proxy.errors import NoHealthyBackendError, OverloadedError
from proxy.observe.metrics import Metrics
from proxy.pipeline.cost import Estimate, predicted_seconds
from proxy.pipeline.deadlines import Deadlines
from proxy.pipeline.dispatch import Dispatcher
from proxy.upstream.client import UpstreamClient
from proxy.upstream.queue import NORMAL, WaitQueue
from proxy.upstream.state import BackendState, BackendStates, Lease

NOW = 1000.0  # the fake backend clock's time unless a test moves it
QUEUE_SECONDS = 7.0  # the route's `timeouts.queue`: what an OverloadedError tells the client to wait
NEVER = 60.0  # queue timeout of waiters the test hands a slot itself; only a bug lets it run out
EST = Estimate(400.0, 20.0)  # a request's predicted tokens: 0.2 s prefill + 0.67 s decode at the priors

T = TypeVar("T")


class FakeClock:
    """The backend-state clock (ejection, throttling): a time the test sets."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def backend(name: str, max_inflight: int = 0, weight: float = 1.0) -> Backend:
    return Backend(name, f"http://{name}:8000", name, 8000, "", weight=weight, max_inflight=max_inflight)


class Bench:
    """A dispatcher with one route over pools of hand-built backends, and a way to call `_acquire` on it."""

    def __init__(
        self, *pools: Pool, balance: str = "least_conn", max_queue: int = 1024, clock: FakeClock | None = None
    ) -> None:
        self.pools = {p.name: p for p in pools}
        self.route = Route(
            "r", ("m",), re.compile("m"), (), tuple(Variant(p.name, p) for p in pools),
            timeouts=Timeouts(queue=QUEUE_SECONDS), balance=Balance(balance),
        )
        backends = tuple(b for p in pools for b in p.backends)
        self.snapshot = Snapshot(backends, pools, (self.route,), server=ServerSettings(max_queue=max_queue))
        self.clock = clock or FakeClock()
        self.backends = BackendStates()
        self.backends.sync(backends)
        self.queue = WaitQueue()
        self.dispatcher = Dispatcher(self.backends, UpstreamClient(), self.queue, Metrics(), clock=self.clock)

    def state(self, name: str) -> BackendState:
        return next(s for s in self.backends if s.backend.name == name)

    async def acquire(
        self, pool: str = "p", tried: tuple[str, ...] = (), queue_timeout: float = 0.0
    ) -> Lease:
        deadlines = Deadlines(self.route.timeouts, asyncio.get_running_loop().time())
        return await self.dispatcher._acquire(
            self.snapshot, self.route, self.pools[pool], EST, [self.state(n) for n in tried], deadlines,
            queue_timeout, self.clock, NORMAL,
        )

    def waiter(self, pool: str = "p") -> asyncio.Task[Lease]:
        """A request that will wait in `pool`'s queue (up to NEVER seconds) for a slot."""
        return asyncio.create_task(self.acquire(pool, queue_timeout=NEVER))

    def load(self) -> dict[str, tuple[int, float]]:
        """(in flight, predicted load) per backend."""
        return {s.backend.name: (s.inflight, s.predicted_load) for s in self.backends}


def pool(name: str, *backends: Backend) -> Pool:
    return Pool(name, backends)


def two(max_inflight: int = 0) -> Pool:
    return pool("p", backend("a", max_inflight), backend("b", max_inflight))


def name(lease: Lease) -> str:
    return lease.state.backend.name


def at_once(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end without letting it suspend: the result (or exception) it reaches in one step.

    Shows a refusal is immediate, without a timing threshold: a coroutine that would wait in the queue
    suspends instead, and this fails the test."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the coroutine suspended (it would have waited)")


async def until(predicate: Callable[[], bool], turns: int = 50) -> None:
    """Yield to the loop until `predicate` holds (tasks run their steps); never a timed sleep."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"still false after {turns} turns of the loop")


def release_all(*leases: Lease) -> None:
    for lease in leases:
        lease.release()


# -- policies ---------------------------------------------------------------------------------------------


async def test_round_robin_alternates_across_calls_with_turns_counted_per_pool() -> None:
    bench = Bench(pool("p", backend("a"), backend("b")), pool("q", backend("c"), backend("d")), balance="round_robin")
    picked = []
    for pool_name in ["p", "q", "p", "q", "p", "p"]:
        lease = await bench.acquire(pool_name)
        picked.append(name(lease))
        lease.release()  # idle again: only the turn decides
    # each pool walks its own turns (one counter for both would give p a, a, a, b and q d, d)
    assert picked == ["a", "c", "b", "d", "a", "b"]
    assert bench.load() == {"a": (0, 0.0), "b": (0, 0.0), "c": (0, 0.0), "d": (0, 0.0)}


async def test_round_robin_passes_a_full_backend_to_the_next_one() -> None:
    bench = Bench(pool("p", backend("a", max_inflight=1), backend("b")), balance="round_robin")
    held = await bench.acquire()  # turn 0: a, now full
    assert name(held) == "a"
    leases = [await bench.acquire() for _ in range(3)]
    assert [name(lease) for lease in leases] == ["b", "b", "b"]  # a's turns go to b
    assert bench.load()["b"][0] == 3
    release_all(held, *leases)
    assert bench.load() == {"a": (0, 0.0), "b": (0, 0.0)}


async def test_least_conn_avoids_the_busier_backend() -> None:
    bench = Bench(two(), balance="least_conn")
    first = await bench.acquire()
    second = await bench.acquire()
    third = await bench.acquire()
    assert [name(first), name(second), name(third)] == ["a", "b", "a"]  # ties go to the earlier backend
    cost = predicted_seconds(first.state, EST)
    assert first.cost == second.cost == third.cost == pytest.approx(cost)
    a, b = bench.state("a"), bench.state("b")
    assert (a.inflight, b.inflight) == (2, 1)
    assert a.predicted_load == pytest.approx(2 * cost) and b.predicted_load == pytest.approx(cost)
    first.release()
    assert name(fourth := await bench.acquire()) == "a"  # 1 and 1: a again (a tie)
    release_all(second, third, fourth)
    assert bench.load() == {"a": (0, 0.0), "b": (0, 0.0)}


async def test_least_cost_prefers_the_backend_that_would_finish_sooner() -> None:
    bench = Bench(two(), balance="least_cost")
    bench.state("a").decode_tps = 15.0  # learned: a decodes at half b's speed (1.53 s for EST against 0.87 s)
    lease = await bench.acquire()
    assert name(lease) == "b"
    assert lease.cost == pytest.approx(predicted_seconds(bench.state("b"), EST))
    assert bench.load() == {"a": (0, 0.0), "b": (1, lease.cost)}
    # b has one in flight (concurrency 1: 0.87 s wait + 0.87 s); a, slower but idle (1.53 s), wins
    second = await bench.acquire()
    assert name(second) == "a"
    assert second.cost == pytest.approx(predicted_seconds(bench.state("a"), EST))
    release_all(lease, second)
    assert bench.load() == {"a": (0, 0.0), "b": (0, 0.0)}


# -- fail-over ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tried", "expected"),
    [
        ((), "a"),
        (("a",), "b"),
        (("a", "b"), "c"),
        (("b", "a"), "c"),
        (("a", "b", "c"), "a"),  # every one was tried: all are candidates again
        (("c",), "a"),
    ],
)
async def test_tried_backends_are_skipped_while_untried_ones_exist(tried: tuple[str, ...], expected: str) -> None:
    bench = Bench(pool("p", backend("a"), backend("b"), backend("c")), balance="least_conn")
    lease = await bench.acquire(tried=tried)
    assert name(lease) == expected
    assert bench.load()[expected][0] == 1
    lease.release()


# -- availability ------------------------------------------------------------------------------------------


def make_unavailable(state: BackendState, how: str) -> None:
    if how == "unhealthy":
        state.healthy = False
    elif how == "ejected":
        state.ejected_until = NOW + 1
    else:
        state.throttled_until = NOW + 1


@pytest.mark.parametrize("how", ["unhealthy", "ejected", "throttled"])
@pytest.mark.parametrize("balance", ["least_cost", "least_conn", "round_robin"])
async def test_unavailable_backends_are_skipped(how: str, balance: str) -> None:
    bench = Bench(two(), balance=balance)
    make_unavailable(bench.state("a"), how)
    leases = [await bench.acquire() for _ in range(3)]
    assert [name(lease) for lease in leases] == ["b", "b", "b"]
    release_all(*leases)
    assert bench.load() == {"a": (0, 0.0), "b": (0, 0.0)}


@pytest.mark.parametrize("balance", ["least_cost", "least_conn", "round_robin"])
async def test_no_available_backend_is_503_at_once_even_with_time_to_queue(balance: str) -> None:
    bench = Bench(two(), balance=balance)
    # Panic routing off: with it, a pool whose every backend is out routes to them anyway (test_balancer.py).
    bench.snapshot = dataclasses.replace(bench.snapshot, health=HealthSettings(panic_threshold=0))
    make_unavailable(bench.state("a"), "unhealthy")
    make_unavailable(bench.state("b"), "ejected")
    with pytest.raises(NoHealthyBackendError) as raised:
        at_once(bench.acquire(queue_timeout=NEVER))
    assert raised.value.status == 503
    assert bench.queue.depths() == {}
    assert bench.load() == {"a": (0, 0.0), "b": (0, 0.0)}


async def test_a_full_backend_is_busy_not_unhealthy() -> None:
    bench = Bench(two(max_inflight=1))
    make_unavailable(bench.state("a"), "throttled")
    held = await bench.acquire()
    assert name(held) == "b"
    with pytest.raises(OverloadedError):  # b is up but full: 429 (try later), not 503
        at_once(bench.acquire())
    held.release()


async def test_availability_reads_the_dispatchers_clock_not_the_loops() -> None:
    clock = FakeClock(5.0)
    bench = Bench(two(), clock=clock)
    a = bench.state("a")
    a.ejected_until = 10.0
    lease = await bench.acquire()
    assert name(lease) == "b"  # fake t=5: still ejected (the loop's clock is long past 10)
    lease.release()
    clock.now = 11.0
    lease = await bench.acquire()
    assert name(lease) == "a"  # fake t=11: back (ties go to the earlier backend)
    lease.release()
    # and the other way round: ejected for an hour by the loop's clock, over by the fake one
    loop_now = asyncio.get_running_loop().time()
    a.ejected_until = loop_now + 3600
    clock.now = loop_now + 7200
    lease = await bench.acquire()
    assert name(lease) == "a"
    lease.release()


# -- full pools --------------------------------------------------------------------------------------------


async def test_all_full_without_queue_time_is_429_at_once_and_leaves_nobody_queued() -> None:
    bench = Bench(two(max_inflight=1))
    held = [await bench.acquire(), await bench.acquire()]
    assert sorted(name(lease) for lease in held) == ["a", "b"]
    before = bench.load()
    with pytest.raises(OverloadedError) as raised:
        at_once(bench.acquire(queue_timeout=0.0))
    assert raised.value.retry_after == QUEUE_SECONDS
    assert raised.value.status == 429
    assert bench.queue.waiting("p") == 0 and bench.queue.depths() == {}
    assert bench.load() == before  # the refused request took nothing
    release_all(*held)
    assert bench.load() == {"a": (0, 0.0), "b": (0, 0.0)}


@pytest.mark.parametrize("max_queue", [0, 1, 2])
async def test_a_full_queue_refuses_at_once(max_queue: int) -> None:
    bench = Bench(two(max_inflight=1), max_queue=max_queue)
    held = [await bench.acquire(), await bench.acquire()]
    waiters = []
    for i in range(max_queue):
        waiters.append(bench.waiter())
        await until(lambda: bench.queue.waiting("p") == i + 1)
    with pytest.raises(OverloadedError) as raised:
        at_once(bench.acquire(queue_timeout=NEVER))  # time enough to wait, but no place in the queue
    assert "queue is full" in str(raised.value)
    assert raised.value.retry_after == QUEUE_SECONDS
    assert bench.queue.waiting("p") == max_queue  # those already waiting keep their places
    for task in waiters:
        task.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert bench.queue.depths() == {}
    release_all(*held)
    assert bench.load() == {"a": (0, 0.0), "b": (0, 0.0)}


async def test_a_freed_slot_goes_to_the_waiters_in_arrival_order() -> None:
    bench = Bench(pool("p", backend("a", max_inflight=1)))
    a = bench.state("a")
    held = await bench.acquire()
    first = bench.waiter()
    await until(lambda: bench.queue.waiting("p") == 1)
    second = bench.waiter()
    await until(lambda: bench.queue.waiting("p") == 2)

    held.release()
    bench.queue.notify()  # as `settle` does
    got = await first
    assert name(got) == "a" and a.inflight == 1
    await until(lambda: bench.queue.waiting("p") == 1)  # woken too (by `first`), no room, back at the head
    assert not second.done()

    got.release()
    bench.queue.notify()
    last = await second
    assert name(last) == "a" and a.inflight == 1
    last.release()
    assert bench.queue.depths() == {}
    assert bench.load() == {"a": (0, 0.0)}


async def test_a_newcomer_does_not_take_a_slot_freed_for_a_waiter() -> None:
    bench = Bench(pool("p", backend("a", max_inflight=1)))
    held = await bench.acquire()
    queued = bench.waiter()
    await until(lambda: bench.queue.waiting("p") == 1)

    held.release()  # a slot is free, but nobody has notified the queue yet
    assert bench.load() == {"a": (0, 0.0)}
    with pytest.raises(OverloadedError):
        at_once(bench.acquire(queue_timeout=0.0))  # behind the waiter, with no time to wait
    assert bench.load() == {"a": (0, 0.0)}  # the newcomer did not take the slot
    assert bench.queue.waiting("p") == 1 and not queued.done()

    bench.queue.notify()
    got = await queued  # the woken waiter takes it
    assert name(got) == "a" and bench.load()["a"][0] == 1
    got.release()
    assert bench.queue.depths() == {}


async def test_a_newcomer_with_time_to_wait_queues_behind_the_waiter() -> None:
    bench = Bench(pool("p", backend("a", max_inflight=1)))
    held = await bench.acquire()
    waiter = bench.waiter()
    await until(lambda: bench.queue.waiting("p") == 1)
    held.release()  # free, not notified
    newcomer = bench.waiter()
    await until(lambda: bench.queue.waiting("p") == 2)  # queued, not served, though a slot is free
    assert bench.load() == {"a": (0, 0.0)}

    bench.queue.notify()
    got = await waiter
    assert not newcomer.done()
    got.release()
    bench.queue.notify()
    last = await newcomer
    last.release()
    assert bench.queue.depths() == {} and bench.load() == {"a": (0, 0.0)}
