"""The rollout controller: reads each rollout's state from the store, drives it on the lease holder, applies
its weights (`delivery/weights.py`). One task per app (`app.py` cleanup_ctx) ticks every `tick` seconds;
tests call `tick()` with an injected clock. Lease: LEASE_KEY, set-if-absent with a TTL, renewed each tick,
value = replica id; the others read and follow. Decisions are pure (`state.py`, `analysis.py`); here are the
store I/O, the windows, probes, metrics, logs and webhooks (`webhooks.py`).

Every write of a state (the leader's transitions, operators' actions on any replica) is a compare-and-set
against the bytes the decision was made from; when another writer got there first, the decision is made
again from what it stored (CAS_ATTEMPTS times; then the leader waits for its next tick and an operator gets
a 409), so no transition is lost or overwritten.
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
from proxy.delivery.analysis import Analysis, ShadowPairs, judge, step_spans
from proxy.delivery.state import (
    ADVANCE,
    AWAITING_PROMOTION,
    CANDIDATE_UNHEALTHY,
    HOLD,
    PAUSED,
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
from proxy.delivery.webhooks import WebhookSender, WebhookSettings
from proxy.delivery.weights import RolloutWeights
from proxy.errors import RolloutConflictError, RolloutUnavailableError, StoreUnavailableError, UnknownRolloutError
from proxy.observe.compare import Comparison
from proxy.observe.metrics import Metrics
from proxy.observe.pooled import PooledStats
from proxy.store.base import Store
from proxy.types import Clock
from proxy.upstream.probe import is_reachable
from proxy.upstream.state import BackendStates

log = logging.getLogger("splitstream.rollout")

LEASE_KEY = "splitstream:rollout:lease"
STATE_TTL = 90 * 86400.0  # a finished rollout's state outlives any sane pause between edits of the rules
STATE_REFRESH = 3600.0  # the leader rewrites an unchanged state this often, so its TTL never runs out
CAS_ATTEMPTS = 5  # decisions per tick or operator action when other writers keep getting there first

WATCHED_STATUSES = frozenset({PAUSED, AWAITING_PROMOTION})  # analysed every tick, never advanced by it


@dataclass(frozen=True, slots=True)
class RolloutSettings:
    """How the controller runs. `tick`: seconds between evaluations (None: only explicit `tick()` calls, for
    tests); `lease`: the lease TTL (a replica that stops renewing it is replaced after this long); `webhooks`:
    how transitions are POSTed (`app.py` builds the sender)."""

    clock: Callable[[], float] = time.time
    tick: float | None = 2.0
    lease: float = 10.0
    replica_id: str | None = None
    webhooks: WebhookSettings = WebhookSettings()


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class RolloutController:
    """Rollout state I/O for one process. `is_leader`: whether this replica drove the last tick.

    Given, at wiring time, exactly what it reads and drives: the rules, the weights it applies, the
    per-variant statistics it judges, the shadow comparisons (a callable: the mirror lives upstairs),
    backend state for the candidate's readiness, its metrics, and where transitions are announced."""

    def __init__(
        self,
        store: Store,
        rules: RulesHolder,
        weights: RolloutWeights,
        stats: PooledStats,
        comparisons: Callable[[], Iterable[Comparison]],
        backends: BackendStates,
        metrics: Metrics,
        settings: RolloutSettings = RolloutSettings(),
        backend_clock: Clock | None = None,
        webhooks: WebhookSender | None = None,
    ) -> None:
        self.store = store
        self._rules = rules
        self._weights = weights
        self._stats = stats
        self._comparisons = comparisons
        self._backends = backends
        self._metrics = metrics
        self._backend_clock = backend_clock
        self._webhooks = webhooks
        self.clock = settings.clock
        self.tick_seconds = settings.tick
        self.lease_seconds = settings.lease
        self.replica_id = settings.replica_id or default_replica_id()
        self.is_leader = False
        self._lock = asyncio.Lock()  # one tick or operator action at a time in this process
        self._refreshed: dict[str, float] = {}
        # route name -> (state key, last state seen): what `_restore` writes back if the store loses it.
        self._known: dict[str, tuple[str, RolloutState]] = {}
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
        if held == me:  # ours: renew (a holder that stalled past the TTL may briefly overlap the next one:
            # harmless, each transition is a compare-and-set)
            await self.store.set(LEASE_KEY, me, self.lease_seconds)
        elif not self.is_leader:
            log.info("rollouts: replica %s holds the lease and drives transitions", self.replica_id)
        return True

    async def _tick_route(self, route: Route, now: float) -> None:
        assert route.rollout is not None
        key = state_key(route.name, route.rollout.digest)
        raw = await self.store.get(key)
        if self.is_leader:
            if raw is None:
                raw = await self._restore(route, key, now)
            state = await self._drive(route, key, raw, now)
        else:
            state = decode(raw)
        if state is not None:
            self._known[route.name] = (key, state)
        self._follow(route, state)

    async def _restore(self, route: Route, key: str, now: float) -> bytes | None:
        """The stored bytes for a rollout whose state the store no longer has although this replica saw it
        (a Redis restarted without persistence): its last known state, written back, so the rollout resumes
        where it was instead of starting over at step 0. Nothing writes None over a state on purpose."""
        known = self._known.get(route.name)
        if known is None or known[0] != key:
            return None
        raw = encode(known[1])
        if await self._store_if(key, None, raw, now):
            log.warning("rollout %s: the store had lost its state; restored step %d (%s) from this replica",
                        route.name, known[1].step, known[1].status)
            return raw
        return await self.store.get(key)  # another writer was first: theirs

    async def _drive(self, route: Route, key: str, raw: bytes | None, now: float) -> RolloutState | None:
        """Decide from the stored bytes `raw` and compare-and-set the outcome against them; when another writer
        (an operator, on any replica) stored something first, decide again from that. What is stored now, as
        far as this replica knows."""
        for _ in range(CAS_ATTEMPTS):
            state = decode(raw)  # None: absent, or a value we cannot read (another version's?): replaced
            decided = await self._decide(route, state, now)
            if decided is None:
                fresh = now - self._refreshed.get(key, -STATE_REFRESH) < STATE_REFRESH
                if state is None or raw is None or fresh or await self._store_if(key, raw, raw, now):
                    return state
            else:
                new, action = decided
                if await self._store_if(key, raw, encode(new), now):
                    self._transitioned(route, new, action, state)
                    return new
            raw = await self.store.get(key)  # someone else wrote: decide again from theirs
        log.info("rollout %s: its state changed under this replica %d times in a row; next tick decides",
                 route.name, CAS_ATTEMPTS)
        return decode(raw)

    async def _decide(self, route: Route, state: RolloutState | None, now: float) -> tuple[RolloutState, str] | None:
        """The leader's transition from `state` now, if any (no writes; the analysis reads pooled statistics)."""
        rollout = route.rollout
        assert rollout is not None
        if state is None:
            fresh = await self._start(route, now)
            return (fresh, START) if fresh is not None else None
        analysis = await self._analyse(route, state, now) if state.is_active else None
        decided = next_state(state, rollout, analysis, now) if analysis is not None else None
        if decided is None or analysis is None:
            return None
        new, action = decided
        if action == ADVANCE and not await self._is_candidate_ready(route):
            new, action = hold(state, rollout, now, CANDIDATE_UNHEALTHY, analysis.numbers), HOLD
        return new, action

    async def _start(self, route: Route, now: float) -> RolloutState | None:
        """Step 0, once the candidate answers a health probe (blue-green's check before it takes traffic)."""
        assert route.rollout is not None
        if not await self._is_candidate_ready(route):
            if route.name not in self._waiting:
                log.warning("rollout %s: waiting for candidate %r to answer its health probe", route.name,
                            route.rollout.candidate)
                self._waiting.add(route.name)
            return None
        self._waiting.discard(route.name)
        return initial_state(route.rollout, now)

    async def _store_if(self, key: str, expected: bytes | None, value: bytes, now: float) -> bool:
        """Store `value` if the key still holds `expected` (None: absent); False when another writer got there."""
        if not await self.store.compare_and_set(key, expected, value, STATE_TTL):
            return False
        self._refreshed[key] = now
        return True

    def _follow(self, route: Route, state: RolloutState | None) -> None:
        applied = self._weights.apply(route, state)
        self._metrics.rollout_step.labels(route.name).set(applied.percent)

    # ------------------------------------------------------------------------------------ analysis

    async def _analyse(self, route: Route, state: RolloutState, now: float) -> Analysis:
        """The verdict on the current step from the fleet's pooled numbers since it began (`analysis.py`, pure:
        the spans, the numbers and `now` are its inputs). A store that cannot answer raises
        StoreUnavailableError: the tick then holds every rollout where it is, rather than judge this
        replica's share of the evidence alone."""
        rollout = route.rollout
        assert rollout is not None
        started = min((float(entry["at"]) for entry in state.history), default=state.since)  # the oldest kept
        spans = step_spans(state.since, started, candidate_percent(state, rollout), rollout.interval, now)
        candidate, baseline = (await self._stats.read([route.name], spans)).routes[route.name]
        # Before `due`, and at every tick of a paused or waiting rollout, the data is looked at again and again:
        # only a decisive failure (the early-look threshold) may act then, or false rollbacks would pile up.
        early = now < state.due or state.status in WATCHED_STATUSES
        return judge(rollout, candidate, baseline, self._shadow_pairs(route), early=early)

    async def evidence(self, route: Route, state: RolloutState | None) -> Analysis | None:
        """What the analysis makes of the current step now, on any replica (the leader decides on the same
        numbers); None when the rollout is not running or paused. StoreUnavailableError when the store is down."""
        if state is None or not state.is_active:
            return None
        return await self._analyse(route, state, self.clock())

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
        """An operator's pause | resume | promote | abort, compare-and-set against the state it was decided on
        (whatever the leader or another operator stored in between is decided on again, never overwritten:
        an abort after the leader's advance aborts the advanced rollout, a promote after its rollback is a
        409), and followed here at once (other replicas follow on their next tick)."""
        route = self.route(route_name)
        assert route.rollout is not None
        key = state_key(route.name, route.rollout.digest)
        async with self._lock:
            try:
                raw = await self.store.get(key)
                for _ in range(CAS_ATTEMPTS):
                    state = decode(raw)
                    if state is None:
                        raise RolloutConflictError("The rollout has not started: its candidate has not answered a "
                                                   "health probe yet.")
                    new = operator_action(state, route.rollout, action, self.clock())
                    if await self.store.compare_and_set(key, raw, encode(new), STATE_TTL):
                        break
                    raw = await self.store.get(key)
                else:
                    raise RolloutConflictError(f"The rollout's state changed {CAS_ATTEMPTS} times while this "
                                               f"{action} was applied; nothing changed, try again.")
            except StoreUnavailableError as exc:
                raise RolloutUnavailableError(
                    "The store holding rollout state does not answer; nothing changed.") from exc
            self._transitioned(route, new, action, state)
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

    def _transitioned(self, route: Route, state: RolloutState, action: str, before: RolloutState | None) -> None:
        """Count, log (one line, names and numbers only) and announce (webhooks) one transition this replica
        stored; `before`: what it replaced."""
        assert route.rollout is not None
        self._metrics.rollout_transitions_total.labels(route.name, action).inc()
        entry = state.history[-1] if state.history else {}
        log.info("rollout %s: %s -> %s, candidate %s at %g%% (step %d/%d), reason %s%s", route.name, action,
                 state.status, route.rollout.candidate, candidate_percent(state, route.rollout), state.step + 1,
                 len(route.rollout.steps), entry.get("reason", "-"), _numbers(entry.get("numbers", {})))
        if self._webhooks is not None:
            self._webhooks.announce(route, before, state, action, self.replica_id)


def _numbers(numbers: dict[str, Any]) -> str:
    shown = [f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
             for name, value in numbers.items() if value is not None]
    return ": " + " ".join(shown) if shown else ""


ROLLOUTS = web.AppKey("ROLLOUTS", RolloutController)
