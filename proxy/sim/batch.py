"""The simulated runtime's batch: `max_batch` slots handed out FIFO (vLLM's "running" and "waiting"), and how
much a full batch slows each sequence. Owns the slot hand-off only; no pacing, no HTTP. `sim/runtime.py` takes a
slot per generation or pooling request and reads `slowdown_factor` before each sleep.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

__all__ = ["BatchSlots", "Occupancy", "slowdown_factor"]


class Occupancy(Protocol):
    """Where the slots count running and waiting requests (`SimStats`, which tests and /metrics read)."""

    running: int
    waiting: int


def slowdown_factor(batch_slowdown: float, running: int) -> float:
    """How much slower each sequence runs with `running` sequences in the batch: 1 + slowdown x (running - 1).

    0 is a GPU batching perfectly (every sequence at full speed while a slot is free); 1.0 is a CPU sharing one
    fixed throughput (each of n sequences at 1/n speed). `running` counts the caller, so it is at least 1.
    """
    if batch_slowdown <= 0 or running <= 1:
        return 1.0
    return 1.0 + batch_slowdown * (running - 1)


class BatchSlots:
    """`size` slots; a freed slot goes to the oldest waiter, never to a newcomer, so requests run in arrival
    order. A request cancelled while queued leaves the queue; one cancelled just after a slot was handed to it
    passes the slot on, so no slot is ever lost."""

    __slots__ = ("_free", "_waiters", "_counts")

    def __init__(self, size: int, counts: Occupancy) -> None:
        if size < 1:
            raise ValueError("max_batch must be >= 1")
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._counts = counts

    async def acquire(self) -> None:
        counts = self._counts
        if self._free > 0 and not self._waiters:
            self._free -= 1
            counts.running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        counts.waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.cancelled():  # still queued (or popped after cancel): leave the queue
                counts.waiting -= 1
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            else:  # a slot was handed over just before the cancel: pass it on
                self.release()
            raise

    def release(self) -> None:
        counts = self._counts
        counts.running -= 1
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                counts.waiting -= 1
                counts.running += 1
                fut.set_result(None)
                return
        self._free += 1
