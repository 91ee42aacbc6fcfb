"""Unit tests for `proxy.upstream.queue.WaitQueue`: FIFO wake-ups per pool, counts, timeouts, cancellation, and
the hand-off of a wake-up that a leaving waiter had already received.

Waiters are tasks on the test's loop; the test learns that one is in the queue from an event, never a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from proxy.upstream.queue import AGEING_SECONDS, WaitQueue

NEVER = 60.0  # seconds: the timeout of waiters the test wakes itself; only a bug lets it run out (wait() is False)


async def waiter(queue: WaitQueue, pool: str, since: float | None = None, priority: int = 1) -> asyncio.Task[bool]:
    """A task waiting in `pool`, returned once it is in the queue."""
    queued = asyncio.Event()

    async def run() -> bool:
        # wait() queues itself before it first suspends, and a step runs to its first suspension before any
        # callback scheduled during it: when `queued` is set, this waiter is in the queue.
        asyncio.get_running_loop().call_soon(queued.set)
        return await queue.wait(pool, NEVER, since, priority)

    before = queue.waiting(pool)
    task = asyncio.create_task(run())
    await queued.wait()
    assert queue.waiting(pool) == before + 1
    return task


async def first_woken(tasks: Iterable[asyncio.Task[bool]]) -> set[asyncio.Task[bool]]:
    """Which of `tasks` are done once one is. `asyncio.wait` reports a turn after the first finishes, when every
    waiter the same `notify()` woke (or a leaving waiter handed its wake-up to) has finished too, so a wrong or
    extra wake-up shows here at once instead of as a waiter nobody wakes until NEVER."""
    done, _ = await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
    return done


async def test_notify_wakes_the_waiters_of_a_pool_in_arrival_order() -> None:
    queue = WaitQueue()
    tasks = [await waiter(queue, "p") for _ in range(3)]
    for i, expected in enumerate(tasks):
        queue.notify()
        assert await first_woken(tasks[i:]) == {expected}  # one wake-up, one waiter: the head
        assert expected.result() is True
    assert queue.depths() == {}


async def test_notify_wakes_the_head_of_every_pool_and_pools_are_independent() -> None:
    queue = WaitQueue()
    p_first, p_second = await waiter(queue, "p"), await waiter(queue, "p")
    r_only = await waiter(queue, "r")
    queue.notify()
    assert queue.depths() == {"p": 1}
    assert await first_woken([p_first, p_second, r_only]) == {p_first, r_only}
    assert p_first.result() is True and r_only.result() is True
    # a waiter leaving pool "r" changes nothing in pool "p"
    assert await queue.wait("r", 0) is False
    assert queue.depths() == {"p": 1} and not p_second.done()
    queue.notify()
    assert await p_second is True
    assert queue.depths() == {}


@pytest.mark.parametrize("at_head", [True, False])
async def test_a_woken_waiter_that_waits_again_with_its_first_time_goes_first(at_head: bool) -> None:
    queue = WaitQueue()
    since = asyncio.get_running_loop().time()
    first, second = await waiter(queue, "p", since), await waiter(queue, "p")
    queue.notify()
    assert await first_woken([first, second]) == {first}
    # `first` found no room after all and waits again: with its first `since` it keeps its place
    again = await waiter(queue, "p", since if at_head else None)
    queue.notify()
    assert await first_woken([again, second]) == ({again} if at_head else {second})
    queue.notify()
    assert await again is True and await second is True
    assert queue.depths() == {}


async def test_waiting_and_depths_count_per_pool_and_an_emptied_pool_leaves_depths() -> None:
    queue = WaitQueue()
    assert queue.depths() == {} and queue.waiting("p") == 0
    tasks = [await waiter(queue, "p"), await waiter(queue, "r"), await waiter(queue, "r")]
    assert queue.depths() == {"p": 1, "r": 2}
    assert (queue.waiting("p"), queue.waiting("r"), queue.waiting("unknown")) == (1, 2, 0)
    queue.notify()  # the head of each pool: "p" is empty now
    assert queue.depths() == {"r": 1}
    assert (queue.waiting("p"), queue.waiting("r")) == (0, 1)
    queue.notify()
    assert queue.depths() == {} and queue.waiting("r") == 0
    assert await asyncio.gather(*tasks) == [True, True, True]


@pytest.mark.parametrize("timeout", [0.0, 0.001])
async def test_a_lone_waiter_that_times_out_returns_false_and_leaves_the_queue(timeout: float) -> None:
    queue = WaitQueue()
    assert await queue.wait("p", timeout) is False
    assert queue.depths() == {} and queue.waiting("p") == 0


@pytest.mark.parametrize("timeout", [0.0, 0.001])
@pytest.mark.parametrize("at_head", [True, False])
async def test_a_waiter_that_times_out_leaves_the_others_waiting(timeout: float, at_head: bool) -> None:
    queue = WaitQueue()
    other = await waiter(queue, "p")
    since = 0.0 if at_head else None
    assert await queue.wait("p", timeout, since) is False  # ahead of `other`, or behind it
    assert queue.depths() == {"p": 1}
    assert not other.done()  # leaving passed nothing on: it had received no wake-up
    queue.notify()  # the wake-up goes to the waiter still there
    assert await other is True
    assert queue.depths() == {}


@pytest.mark.parametrize("cancelled", [0, 1, 2])
async def test_a_cancelled_waiter_leaves_the_queue_and_the_others_keep_their_order(cancelled: int) -> None:
    queue = WaitQueue()
    tasks = [await waiter(queue, "p") for _ in range(3)]
    leaving = tasks.pop(cancelled)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert queue.depths() == {"p": 2}  # it received no wake-up, so it passed none on
    for i, expected in enumerate(tasks):
        queue.notify()
        assert await first_woken(tasks[i:]) == {expected}
        assert expected.result() is True
    assert queue.depths() == {}


async def test_a_woken_waiter_cancelled_before_it_resumes_hands_the_wake_up_on() -> None:
    queue = WaitQueue()
    first, second, third = [await waiter(queue, "p") for _ in range(3)]
    queue.notify()  # a slot was freed: `first` is woken...
    first.cancel()  # ...but its request is cancelled before the task resumes
    assert await first_woken([first, second, third]) == {first, second}  # `second` woken in its place
    assert first.cancelled()
    assert second.result() is True  # the freed slot is not lost
    assert queue.depths() == {"p": 1}  # and only one waiter took it
    queue.notify()
    assert await third is True


async def test_a_handed_on_wake_up_with_nobody_behind_is_dropped() -> None:
    queue = WaitQueue()
    only = await waiter(queue, "p")
    queue.notify()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    assert queue.depths() == {}
    assert await queue.wait("p", 0) is False  # nothing was kept for a later waiter


async def test_notify_skips_a_waiter_cancelled_but_not_yet_gone() -> None:
    queue = WaitQueue()
    first, second = await waiter(queue, "p"), await waiter(queue, "p")
    first.cancel()  # its future is cancelled now; the task leaves the queue only when it next runs
    queue.notify()  # so the wake-up must go past it, to `second`
    assert queue.depths() == {}
    assert await first_woken([first, second]) == {first, second}
    assert first.cancelled() and second.result() is True


async def test_notify_with_nobody_waiting_is_a_no_op() -> None:
    queue = WaitQueue()
    queue.notify()
    assert queue.depths() == {}
    assert await queue.wait("p", 0) is False  # the wake-up was not kept for a later waiter
    queue.notify()  # the pool's queue exists now, empty
    assert queue.depths() == {} and queue.waiting("p") == 0


async def test_a_higher_class_is_woken_first_and_fifo_holds_within_a_class() -> None:
    queue = WaitQueue()
    now = asyncio.get_running_loop().time()
    low = await waiter(queue, "p", now, priority=2)
    normal_first = await waiter(queue, "p", now, priority=1)
    normal_second = await waiter(queue, "p", now + 0.1, priority=1)
    high = await waiter(queue, "p", now + 0.2, priority=0)
    order = []
    pending = {low, normal_first, normal_second, high}
    while pending:
        queue.notify()
        done = await first_woken(pending)
        assert len(done) == 1
        order.extend(done)
        pending -= done
    assert order == [high, normal_first, normal_second, low]


async def test_a_low_waiter_that_waited_long_enough_goes_before_a_new_high_one() -> None:
    """Ageing: a class yields AGEING_SECONDS per step, so low is late under pressure but never starved."""
    queue = WaitQueue()
    now = asyncio.get_running_loop().time()
    old_low = await waiter(queue, "p", now - 2 * AGEING_SECONDS - 0.5, priority=2)
    new_high = await waiter(queue, "p", now, priority=0)
    queue.notify()
    assert await first_woken([old_low, new_high]) == {old_low}
    queue.notify()
    assert await new_high is True
