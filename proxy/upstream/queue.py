"""Requests waiting for a backend slot when every backend of their pool is at max_inflight.

State only, FIFO per pool and bounded: a request that finds the queue full, or waits past its queue
timeout, is refused (429) by the caller — never an unbounded pile-up. `notify()` is called whenever a
lease is released; it wakes the head waiter of each pool, which retries the pick and, if it still finds
no room, waits again at the head. Used by `pipeline/dispatch.py`.
"""

from __future__ import annotations

import asyncio
from collections import deque


class WaitQueue:
    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    def waiting(self, pool: str) -> int:
        queue = self._waiters.get(pool)
        return len(queue) if queue else 0

    def depths(self) -> dict[str, int]:
        return {pool: len(queue) for pool, queue in self._waiters.items() if queue}

    async def wait(self, pool: str, timeout: float, at_head: bool = False) -> bool:
        """Wait for a wake-up; False when `timeout` seconds passed first. `at_head` keeps a woken waiter's place."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault(pool, deque())
        if at_head:
            queue.appendleft(future)
        else:
            queue.append(future)
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
                queue.remove(future)
            except ValueError:
                pass  # already popped by notify()

    def notify(self) -> None:
        """A slot was freed somewhere: wake the first waiter of each pool."""
        for queue in self._waiters.values():
            while queue:
                future = queue.popleft()
                if not future.done():
                    future.set_result(None)
                    break
