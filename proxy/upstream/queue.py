"""Requests waiting for a backend slot when every backend of their pool is at max_inflight.

State only, bounded by the caller: a request that finds the queue full, or waits past its queue timeout, is
refused (429) by `pipeline/dispatch.py` — never an unbounded pile-up. `notify()` is called whenever a lease
is released; it wakes one waiter of each pool, which retries the pick and, if it still finds no room, waits
again with its place kept (`since`).

Order: each waiter has a priority class (a tenant's: 0 high, 1 normal, 2 low) and is ranked by
`since + class × AGEING_SECONDS`; the smallest rank is woken first. So within a class it is FIFO, a higher
class goes first among requests that arrived at about the same time, and a low request that has waited
2 × AGEING_SECONDS longer than a new high one goes before it: low is served late under pressure, never
starved. (Three deques per pool: a class's ranks only grow, so its head is its smallest.)
"""

from __future__ import annotations

import asyncio
from collections import deque

AGEING_SECONDS = 1.0
CLASSES = 3  # high, normal, low (`config.model.PRIORITIES`)
NORMAL = 1

_Waiter = tuple[float, asyncio.Future[None]]  # (rank, wake-up)


class WaitQueue:
    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: dict[str, tuple[deque[_Waiter], ...]] = {}

    def waiting(self, pool: str) -> int:
        classes = self._waiters.get(pool)
        return sum(len(queue) for queue in classes) if classes else 0

    def depths(self) -> dict[str, int]:
        depths = {pool: sum(len(queue) for queue in classes) for pool, classes in self._waiters.items()}
        return {pool: depth for pool, depth in depths.items() if depth}

    async def wait(self, pool: str, timeout: float, since: float | None = None, priority: int = NORMAL) -> bool:
        """Wait for a wake-up; False when `timeout` seconds passed first. `since`: when this request first
        queued (loop time) — a woken waiter that found no room passes its first `since` to keep its place."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        classes = self._waiters.get(pool)
        if classes is None:
            classes = self._waiters[pool] = tuple(deque() for _ in range(CLASSES))
        queue = classes[priority]
        rank = (loop.time() if since is None else since) + priority * AGEING_SECONDS
        waiter = (rank, future)
        if queue and rank < queue[-1][0]:  # back with its old place: before those who came later
            index = next(i for i, (other, _) in enumerate(queue) if other > rank)
            queue.insert(index, waiter)
        else:
            queue.append(waiter)
        woken = False
        try:
            async with asyncio.timeout(timeout):
                await future
            woken = True
            return True
        except TimeoutError:
            return False
        finally:
            if not future.done():
                future.cancel()
            elif not woken and not future.cancelled():
                self.notify()  # we were handed a free slot but are leaving (cancelled): pass it on
            try:
                queue.remove(waiter)
            except ValueError:
                pass  # already popped by notify()

    def notify(self) -> None:
        """A slot was freed somewhere: wake the best-ranked waiter of each pool."""
        for classes in self._waiters.values():
            while True:
                best: deque[_Waiter] | None = None
                for queue in classes:
                    if queue and (best is None or queue[0][0] < best[0][0]):
                        best = queue
                if best is None:
                    break
                _, future = best.popleft()
                if not future.done():
                    future.set_result(None)
                    break
