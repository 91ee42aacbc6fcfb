"""The background health checker: probes backends when due and reads runtime load for routes that use it.

One task per app (started in `app.py`'s cleanup_ctx). Each round probes the backends whose probe is due
(healthy ones every `health.interval`, unhealthy ones every `health.unhealthy_interval`), applies the
results through `pipeline/ejection.py`, refreshes runtime metrics for backends of `runtime_load` routes,
then sleeps until the next deadline. `rounds` lets tests await a round instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from proxy.config.model import Snapshot
from proxy.pipeline.ejection import record_probe
from proxy.upstream.probe import is_reachable, read_runtime_load
from proxy.upstream.state import BackendState, BackendStates

log = logging.getLogger("splitstream.health")

RUNTIME_LOAD_INTERVAL = 1.0  # how often runtime /metrics are read for runtime_load routes
MAX_SLEEP = 0.5  # re-read the snapshot at least this often (a reload may add backends)


class HealthChecker:
    __slots__ = ("_states", "_snapshot", "_round", "_loop")

    def __init__(self, states: BackendStates, snapshot: Callable[[], Snapshot]) -> None:
        self._states = states
        self._snapshot = snapshot
        self._round = asyncio.Condition()
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        next_load_read = 0.0
        while True:
            snapshot = self._snapshot()
            now = self._loop.time()
            due = [s for s in self._states if now >= s.next_probe_at and _is_configured(s, snapshot)]
            if due:
                await self._probe(due, snapshot)
            if now >= next_load_read:
                await self._read_loads(snapshot)
                next_load_read = now + RUNTIME_LOAD_INTERVAL
            async with self._round:
                self._round.notify_all()
            wake = min((s.next_probe_at for s in self._states), default=now + MAX_SLEEP)
            await asyncio.sleep(max(0.0, min(wake - self._loop.time(), MAX_SLEEP)))

    async def wait_round(self) -> None:
        """Return after the next completed round (tests await this instead of sleeping)."""
        async with self._round:
            await self._round.wait()

    async def _probe(self, due: list[BackendState], snapshot: Snapshot) -> None:
        settings = snapshot.health
        results = await asyncio.gather(*(is_reachable(s.backend, settings.timeout) for s in due))
        now = self._loop.time()
        for state, ok in zip(due, results, strict=True):
            was_healthy = state.healthy
            record_probe(state, ok, settings, now)
            if was_healthy != state.healthy:
                log.warning("backend %s is %s (probe)", state.backend.name, "healthy" if state.healthy else "unhealthy")

    async def _read_loads(self, snapshot: Snapshot) -> None:
        wanted = {
            b.identity for route in snapshot.routes if route.runtime_load
            for v in route.variants for b in v.pool.backends
        }
        states = [s for s in self._states if s.backend.identity in wanted]
        if not states:
            return
        timeout = snapshot.health.timeout
        loads = await asyncio.gather(*(read_runtime_load(s.backend, timeout) for s in states))
        now = self._loop.time()
        for state, load in zip(states, loads, strict=True):
            if load is not None:
                state.runtime_waiting, state.runtime_running = load.waiting, load.running
                state.runtime_kv_usage = load.kv_usage
                state.runtime_sampled_at = now


def _is_configured(state: BackendState, snapshot: Snapshot) -> bool:
    return any(b.identity == state.backend.identity for b in snapshot.backends)
