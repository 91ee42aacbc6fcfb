"""The background health checker: probes backends when due and reads runtime load for routes that use it.

One task per app (started in `app.py`'s cleanup_ctx). Each round probes the backends whose probe is due
(healthy ones every `health.interval`, unhealthy ones and those on a miss streak every
`health.unhealthy_interval`), applies the results through `upstream/ejection.py` (which ejects only after
`health.failures` misses, and counts no timeout while the backend serves), refreshes runtime metrics for
backends of `runtime_load` routes (their variants' pools and their shadows'), then sleeps until the next
deadline. A round that fails unexpectedly is logged and the next one runs: probing is what re-admits
ejected backends. `wait_round` lets tests await a round instead of sleeping; `clock` is the backend-state
clock (tests pass a fake one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_async.aio import time as timed
from prometheus_async.types import Observer

from proxy.config.model import Pool, Route, Snapshot
from proxy.upstream.ejection import record_probe
from proxy.upstream.probe import Probe, probe, read_runtime_load
from proxy.upstream.state import BackendState, BackendStates

log = logging.getLogger("splitstream.health")

RUNTIME_LOAD_INTERVAL = 1.0  # how often runtime /metrics are read for runtime_load routes
MAX_SLEEP = 0.5  # re-read the snapshot at least this often (a reload may add backends)


class HealthChecker:
    """Probes and runtime-load reads for every configured backend; each round is timed into `round_seconds`."""

    __slots__ = ("_states", "_snapshot", "_clock", "_round_seconds", "_round", "_next_load_read")

    def __init__(
        self, states: BackendStates, snapshot: Callable[[], Snapshot], clock: Callable[[], float],
        round_seconds: Observer,
    ) -> None:
        self._states = states
        self._snapshot = snapshot
        self._clock = clock
        self._round_seconds = round_seconds
        self._round: asyncio.Condition | None = None  # made on the running loop, by the first waiter or round
        self._next_load_read = 0.0

    async def run(self) -> None:
        """Probe forever (`app.py` cancels it)."""
        while True:
            try:
                await timed(self._round_seconds, self.check_once())
            except Exception:  # a bug in one round must not end probing, and with it re-admission
                log.exception("health round failed; the next one runs as scheduled")
            async with self._condition():
                self._condition().notify_all()
            now = self._clock()
            wake = min((s.next_probe_at for s in self._states), default=now + MAX_SLEEP)
            await asyncio.sleep(max(0.0, min(wake - now, MAX_SLEEP)))

    async def check_once(self) -> None:
        """One round: probe the backends that are due, and read runtime loads when that is due."""
        snapshot = self._snapshot()
        now = self._clock()
        due = [s for s in self._states if now >= s.next_probe_at and _is_configured(s, snapshot)]
        if due:
            await self._probe(due, snapshot)
        if now >= self._next_load_read:
            self._next_load_read = now + RUNTIME_LOAD_INTERVAL
            await self._read_loads(snapshot)

    def _condition(self) -> asyncio.Condition:
        if self._round is None:
            self._round = asyncio.Condition()
        return self._round

    async def wait_round(self) -> None:
        """Return after the next completed round (tests await this instead of sleeping)."""
        condition = self._condition()
        async with condition:
            await condition.wait()

    async def _probe(self, due: list[BackendState], snapshot: Snapshot) -> None:
        settings = snapshot.health
        results = await asyncio.gather(*(probe(s.backend, settings.timeout) for s in due))
        now = self._clock()
        for state, outcome in zip(due, results, strict=True):
            was_healthy = state.healthy
            # A timeout is passed on as such: on a loaded box it is no miss while requests are served.
            record_probe(state, outcome is Probe.OK, settings, now, timed_out=outcome is Probe.TIMED_OUT)
            if was_healthy != state.healthy:
                log.warning("backend %s is %s (probe)", state.backend.name, "healthy" if state.healthy else "unhealthy")

    async def _read_loads(self, snapshot: Snapshot) -> None:
        wanted = {b.identity for route in snapshot.routes if route.runtime_load for pool in _pools(route)
                  for b in pool.backends}
        states = [s for s in self._states if s.backend.identity in wanted]
        if not states:
            return
        timeout = snapshot.health.timeout
        loads = await asyncio.gather(*(read_runtime_load(s.backend, timeout) for s in states))
        now = self._clock()
        for state, load in zip(states, loads, strict=True):
            if load is not None:
                state.runtime_waiting, state.runtime_running = load.waiting, load.running
                state.runtime_kv_usage = load.kv_usage
                state.runtime_sampled_at = now


def _pools(route: Route) -> list[Pool]:
    """Every pool a route sends requests to: its variants' and its shadows' (they pick by the same policy)."""
    return [v.pool for v in route.variants] + [s.pool for s in route.shadows]


def _is_configured(state: BackendState, snapshot: Snapshot) -> bool:
    return any(b.identity == state.backend.identity for b in snapshot.backends)


HEALTH = web.AppKey("HEALTH", HealthChecker)
