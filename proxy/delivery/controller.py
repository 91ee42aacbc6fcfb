"""The rollout controller: reads each rollout's state from the store, drives it on the lease holder, applies
its weights (`delivery/weights.py`). One task per app (`app.py` cleanup_ctx) ticks every `tick` seconds;
tests call `tick()` with an injected clock. Lease: LEASE_KEY, set-if-absent with a TTL, renewed each tick,
value = replica id; the others read and follow. Decisions are pure (`state.py`, `analysis.py`); here are the
store I/O, the windows, probes, metrics and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.config.model import Route, RulesHolder
from proxy.delivery.analysis import Analysis, ShadowPairs, Window, analyse
from proxy.delivery.state import (
    ADVANCE,
    CANDIDATE_UNHEALTHY,
    HOLD,
    START,
    RolloutState,
    candidate_percent,
    decode,
    encode,
    hold,
    initial_state,
    next_state,
    operator_action,
    state_key,
)
from proxy.delivery.weights import RolloutWeights
from proxy.errors import RolloutConflictError, RolloutUnavailableError, StoreUnavailableError, UnknownRolloutError
from proxy.observe.compare import Comparison
from proxy.observe.metrics import Metrics
from proxy.observe.stats import RequestStats
from proxy.store.base import Store
from proxy.types import Clock
from proxy.upstream.probe import is_reachable
from proxy.upstream.state import BackendStates

log = logging.getLogger("splitstream.rollout")

LEASE_KEY = "splitstream:rollout:lease"
STATE_TTL = 90 * 86400.0  # a finished rollout's state outlives any sane pause between edits of the rules
STATE_REFRESH = 3600.0  # the leader rewrites an unchanged state this often, so its TTL never runs out


@dataclass(frozen=True, slots=True)
class RolloutSettings:
    """How the controller runs. `tick`: seconds between evaluations (None: only explicit `tick()` calls, for
    tests); `lease`: the lease TTL (a replica that stops renewing it is replaced after this long)."""

    clock: Callable[[], float] = time.time
    tick: float | None = 2.0
    lease: float = 10.0
    replica_id: str | None = None


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class _Checkpoint:
    """This replica's counters of a route's variants when it first saw the current step: the step's window
    is everything recorded since (a restarted replica's window starts at its start)."""

    __slots__ = ("key", "marks")

    def __init__(self, key: tuple[str, int, float], marks: dict[str, tuple[int, int]]) -> None:
        self.key = key
        self.marks = marks


class RolloutController:
    """Rollout state I/O for one process. `is_leader`: whether this replica drove the last tick.

    Given, at wiring time, exactly what it reads and drives: the rules, the weights it applies, the
    per-variant statistics it judges, the shadow comparisons (a callable: the mirror lives upstairs),
    backend state for the candidate's readiness, and its metrics."""

    def __init__(
        self,
        store: Store,
        rules: RulesHolder,
        weights: RolloutWeights,
        stats: RequestStats,
        comparisons: Callable[[], Iterable[Comparison]],
        backends: BackendStates,
        metrics: Metrics,
        settings: RolloutSettings = RolloutSettings(),
        backend_clock: Clock | None = None,
    ) -> None:
        self.store = store
        self._rules = rules
        self._weights = weights
        self._stats = stats
        self._comparisons = comparisons
        self._backends = backends
        self._metrics = metrics
        self._backend_clock = backend_clock
        self.clock = settings.clock
        self.tick_seconds = settings.tick
        self.lease_seconds = settings.lease
        self.replica_id = settings.replica_id or default_replica_id()
        self.is_leader = False
        self._lock = asyncio.Lock()  # one tick or operator action at a time in this process
        self._checkpoints: dict[str, _Checkpoint] = {}
        self._refreshed: dict[str, float] = {}
        self._waiting: set[str] = set()  # routes whose candidate failed its start probe (logged once)
        self._store_down = False

    # ------------------------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Tick forever (`app.py` cancels it); a failing tick is logged and the next one tries again."""
        assert self.tick_seconds is not None
        while True:
            await asyncio.sleep(self.tick_seconds)
            await self.tick_logged()

    async def tick_logged(self) -> None:
        try:
            await self.tick()
        except Exception:  # a bug, not an outage (those are handled in tick): keep serving and ticking
            log.exception("rollout tick failed")

    async def tick(self) -> None:
        """Read (and, as the lease holder, drive) every rollout of the running rules, then apply the weights."""
        async with self._lock:
            await self._tick(self.clock())

    async def _tick(self, now: float) -> None:
        routes = [route for route in self._rules.current.routes if route.rollout is not None]
        for name in self._weights.retain({route.name for route in routes}):
            self._checkpoints.pop(name, None)
            with contextlib.suppress(KeyError):
                self._metrics.rollout_step.remove(name)
        if not routes:
            return
        try:
            self.is_leader = await self._hold_lease()
            for route in routes:
                await self._tick_route(route, now)
        except StoreUnavailableError as exc:
            if not self._store_down:
                log.warning("rollouts: store unavailable (%s): weights stay as they are, no transitions", exc)
            self._store_down = True
            return
        if self._store_down:
            log.info("rollouts: store answers again")
            self._store_down = False

    async def _hold_lease(self) -> bool:
        me = self.replica_id.encode()
        held = await self.store.set_if_absent(LEASE_KEY, me, self.lease_seconds)
        if held is not None and held != me:
            if self.is_leader:
                log.info("rollouts: lease lost to %s", held.decode("utf-8", "replace"))
            return False
        if held == me:  # ours: renew (a holder that stalled past the TTL may briefly overlap the next one)
            await self.store.set(LEASE_KEY, me, self.lease_seconds)
        elif not self.is_leader:
            log.info("rollouts: replica %s holds the lease and drives transitions", self.replica_id)
        return True

    async def _tick_route(self, route: Route, now: float) -> None:
        assert route.rollout is not None
        key = state_key(route.name, route.rollout.digest)
        raw = await self.store.get(key)
        state = decode(raw)
        if self.is_leader:
            state = await self._drive(route, key, state, raw is not None, now)
        self._follow(route, state)

    async def _drive(self, route: Route, key: str, state: RolloutState | None, present: bool,
                     now: float) -> RolloutState | None:
        rollout = route.rollout
        assert rollout is not None
        if state is None:
            return await self._start(route, key, present, now)
        analysis = self._analyse(route, state, now) if state.is_active else None
        decided = next_state(state, rollout, analysis, now) if analysis is not None else None
        if decided is None or analysis is None:
            if now - self._refreshed.get(key, -STATE_REFRESH) >= STATE_REFRESH:
                await self._write(route, key, state, state)
            return state
        new, action = decided
        if action == ADVANCE and not await self._is_candidate_ready(route):
            new, action = hold(state, rollout, now, CANDIDATE_UNHEALTHY, analysis.numbers), HOLD
        written = await self._write(route, key, state, new)
        if written is new:
            self._transitioned(route, new, action)
        return written

    async def _start(self, route: Route, key: str, present: bool, now: float) -> RolloutState | None:
        """Step 0, once the candidate answers a health probe (blue-green's check before it takes traffic)."""
        assert route.rollout is not None
        if not await self._is_candidate_ready(route):
            if route.name not in self._waiting:
                log.warning("rollout %s: waiting for candidate %r to answer its health probe", route.name,
                            route.rollout.candidate)
                self._waiting.add(route.name)
            return None
        self._waiting.discard(route.name)
        fresh = initial_state(route.rollout, now)
        if present:  # a value we cannot read (another version's?): replace it
            await self.store.set(key, encode(fresh), STATE_TTL)
        else:
            existing = await self.store.set_if_absent(key, encode(fresh), STATE_TTL)
            if existing is not None:  # another replica started it a moment ago
                return decode(existing)
        self._refreshed[key] = now
        self._transitioned(route, fresh, START)
        return fresh

    async def _write(self, route: Route, key: str, read: RolloutState, new: RolloutState) -> RolloutState | None:
        """Store `new` unless someone (an operator, on any replica) wrote since `read`; what is stored now."""
        current = decode(await self.store.get(key))
        if current is None or current.version != read.version:
            return current  # decide again on the next tick, from theirs
        await self.store.set(key, encode(new), STATE_TTL)
        self._refreshed[key] = self.clock()
        return new

    def _follow(self, route: Route, state: RolloutState | None) -> None:
        applied = self._weights.apply(route, state)
        self._metrics.rollout_step.labels(route.name).set(applied.percent)
        if state is not None:
            self._checkpoint(route, state)

    # ------------------------------------------------------------------------------------ analysis

    def _checkpoint(self, route: Route, state: RolloutState) -> _Checkpoint:
        assert route.rollout is not None
        key = (route.rollout.digest, state.step, state.since)
        checkpoint = self._checkpoints.get(route.name)
        if checkpoint is None or checkpoint.key != key:
            marks = {}
            for variant in route.variants:
                stats = self._stats.get(route.name, variant.name)
                marks[variant.name] = (stats.requests, stats.errors) if stats is not None else (0, 0)
            checkpoint = self._checkpoints[route.name] = _Checkpoint(key, marks)
        return checkpoint

    def _analyse(self, route: Route, state: RolloutState, now: float) -> Analysis:
        rollout = route.rollout
        assert rollout is not None
        marks = self._checkpoint(route, state).marks
        # At 100 % the baseline serves nothing: compare with what it served before (its recent requests).
        before = candidate_percent(state, rollout) >= 100.0
        candidate = self._window(route.name, rollout.candidate, marks)
        baseline = self._window(route.name, rollout.baseline, marks, whole_ring=before)
        return analyse(rollout, candidate, baseline, self._shadow_pairs(route), early=now < state.due)

    def _window(self, route: str, variant: str, marks: dict[str, tuple[int, int]], whole_ring: bool = False) -> Window:
        stats = self._stats.get(route, variant)
        if stats is None:
            return Window()
        if whole_ring:
            samples = list(stats.samples)
            return Window.of(len(samples), sum(1 for sample in samples if sample[3]), samples)
        requests, errors = marks.get(variant, (0, 0))
        count = stats.requests - requests
        return Window.of(count, stats.errors - errors, stats.tail(count))

    def _shadow_pairs(self, route: Route) -> ShadowPairs | None:
        """The mirror's recent comparisons of this route against the candidate's pool, if it shadows it."""
        assert route.rollout is not None
        pool = next(v.pool.name for v in route.variants if v.name == route.rollout.candidate)
        if not any(shadow.pool.name == pool for shadow in route.shadows):
            return None
        pairs = [c for c in self._comparisons() if c.route == route.name and c.pool == pool]
        return ShadowPairs(
            pairs=len(pairs),
            shadow_failed=sum(1 for c in pairs if c.shadow_status >= 500 > c.primary_status),
            primary_failed=sum(1 for c in pairs if c.primary_status >= 500 > c.shadow_status),
        )

    async def _is_candidate_ready(self, route: Route) -> bool:
        """Some backend of the candidate's pool is available to the balancer and answers its probe now."""
        assert route.rollout is not None
        pool = next(v.pool for v in route.variants if v.name == route.rollout.candidate)
        now = self._backend_clock() if self._backend_clock else asyncio.get_running_loop().time()
        timeout = self._rules.current.health.timeout
        usable = [b for b in pool.backends if self._backends.get(b).is_available(now)]
        return any(await asyncio.gather(*(is_reachable(b, timeout) for b in usable)))

    # --------------------------------------------------------------------------------- operators

    def route(self, name: str) -> Route:
        for route in self._rules.current.routes:
            if route.name == name and route.rollout is not None:
                return route
        raise UnknownRolloutError(f"No route `{name[:128]}` with a rollout in the running rules.")

    async def read(self, route: Route) -> RolloutState | None:
        """The stored state (what the leader last wrote); this replica's last view if the store is down."""
        assert route.rollout is not None
        try:
            return decode(await self.store.get(state_key(route.name, route.rollout.digest)))
        except StoreUnavailableError:
            return self._weights.state_of(route.name)

    async def act(self, route_name: str, action: str) -> tuple[Route, RolloutState]:
        """An operator's pause | resume | promote | abort, applied to the stored state and followed here at once
        (other replicas follow on their next tick)."""
        route = self.route(route_name)
        assert route.rollout is not None
        key = state_key(route.name, route.rollout.digest)
        async with self._lock:
            try:
                state = decode(await self.store.get(key))
                if state is None:
                    raise RolloutConflictError("The rollout has not started: its candidate has not answered a "
                                               "health probe yet.")
                new = operator_action(state, route.rollout, action, self.clock())
                # Last writer wins between this read and write (one round trip; the Store protocol has no
                # compare-and-set); the leader checks the version before each of its writes.
                await self.store.set(key, encode(new), STATE_TTL)
            except StoreUnavailableError as exc:
                raise RolloutUnavailableError(
                    "The store holding rollout state does not answer; nothing changed.") from exc
            self._transitioned(route, new, action)
            self._follow(route, new)
        return route, new

    async def close(self) -> None:
        """Give the lease up (if ours) so another replica, or this one restarted, takes over at once."""
        if not self.is_leader:
            return
        with contextlib.suppress(StoreUnavailableError):
            if await self.store.get(LEASE_KEY) == self.replica_id.encode():
                await self.store.delete(LEASE_KEY)
        self.is_leader = False

    # ------------------------------------------------------------------------------------ reporting

    def _transitioned(self, route: Route, state: RolloutState, action: str) -> None:
        """Count and log one transition: one line, names and numbers only."""
        assert route.rollout is not None
        self._metrics.rollout_transitions_total.labels(route.name, action).inc()
        entry = state.history[-1] if state.history else {}
        log.info("rollout %s: %s -> %s, candidate %s at %g%% (step %d/%d), reason %s%s", route.name, action,
                 state.status, route.rollout.candidate, candidate_percent(state, route.rollout), state.step + 1,
                 len(route.rollout.steps), entry.get("reason", "-"), _numbers(entry.get("numbers", {})))


def _numbers(numbers: dict[str, Any]) -> str:
    shown = [f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
             for name, value in numbers.items() if value is not None]
    return ": " + " ".join(shown) if shown else ""


ROLLOUTS = web.AppKey("ROLLOUTS", RolloutController)
