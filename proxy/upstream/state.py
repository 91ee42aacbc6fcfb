"""Live per-backend state: requests in flight and their predicted load, held as leases.

State only: which backend to pick is `pipeline/balancer.py`'s decision. Counters change only through
`Lease` (taken when a backend is picked, released exactly once in a `finally`), with no await between
read and write, so they are always back to zero when traffic stops. State is keyed by backend identity
(name, url) so a reload that keeps a backend keeps its counters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

from aiohttp import web

from proxy.config.model import Backend
from proxy.upstream.prefix import PrefixIndex
from proxy.upstream.speed import SpeedCurve

# Before a backend has reported anything, assume a modest GPU runtime; the first completions replace these.
PRIOR_PREFILL_TPS = 2000.0  # prompt tokens per second
PRIOR_DECODE_TPS = 30.0  # completion tokens per second, per stream
PREFILL_EVIDENCE_TOKENS = 64000.0
DECODE_EVIDENCE_TOKENS = 8000.0
# A runtime whose prefix cache size is neither configured (`cache_tokens`) nor learned yet: a modest GPU's KV
# cache; corrected from the cached tokens it reports (`pipeline/cost.py`).
DEFAULT_CACHE_TOKENS = 65536.0


class BackendState:
    """Mutable facts about one backend: load, learned speed, health. Policies read and update it;
    gauges read it at scrape time. No await ever sits between a read and a write of these fields.

    `running_area` integrates the sequences it runs (our in-flight requests up to its `concurrency`) over
    time, so a finished request knows how crowded the runtime was while it ran (`Lease.running`)."""

    __slots__ = (
        "backend", "inflight", "predicted_load", "healthy", "prefill", "decode",
        "consecutive_failures", "ejections", "ejected_until", "throttled_until", "next_probe_at",
        "runtime_waiting", "runtime_running", "runtime_kv_usage", "runtime_sampled_at", "ejections_total",
        "completed", "draining", "probe_misses", "served", "served_at_probe",
        "inflight_tokens", "running_area", "running_at", "prefix", "cache_tokens", "prefix_hit_ratio",
    )

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.inflight = 0
        self.predicted_load = 0.0  # predicted seconds of work in flight
        self.inflight_tokens = 0.0  # predicted completion tokens in flight (what a newcomer would slow)
        self.running_area = 0.0  # ∫ sequences running dt (see the class docstring)
        self.running_at = time.monotonic()
        self.healthy = True  # the active probe's verdict (and passive ejection's)
        # Seconds per prompt token, and per completion token of one stream, at r running; memories sized to a few
        # dozen typical requests each (prompts are longer than answers).
        self.prefill = SpeedCurve(PRIOR_PREFILL_TPS, PREFILL_EVIDENCE_TOKENS)
        self.decode = SpeedCurve(PRIOR_DECODE_TPS, DECODE_EVIDENCE_TOKENS)
        self.prefix = PrefixIndex(0)  # what its prefix cache probably holds (least_cost with prefix)
        self.cache_tokens = DEFAULT_CACHE_TOKENS  # learned size of that cache, unless configured
        self.prefix_hit_ratio = 1.0  # share of the predicted cached tokens it reports having held
        self.consecutive_failures = 0
        self.ejections = 0  # ejections in a row (sets the back-off); reset once the backend serves again
        self.ejected_until = 0.0
        self.throttled_until = 0.0  # the runtime's own Retry-After
        self.next_probe_at = 0.0
        self.runtime_waiting = 0.0  # from the runtime's /metrics, when a route asks for it
        self.runtime_running = 0.0
        self.runtime_kv_usage = 0.0
        self.runtime_sampled_at = -1.0
        self.ejections_total = 0
        self.completed = 0  # requests that taught us something about speed
        self.draining: BackendStates | None = None  # set once a reload removed it: forgotten when idle
        self.probe_misses = 0  # active probes failed in a row; `health.failures` of them eject
        self.served = 0  # requests answered (any status below 500): a busy runtime is not a dead one
        self.served_at_probe = 0  # `served` when the last probe ended: did it answer since?

    @property
    def prefill_tps(self) -> float:
        """Prompt tokens per second of one request running alone (what the admin API shows first)."""
        return self.prefill.tokens_per_second(1.0)

    @prefill_tps.setter
    def prefill_tps(self, tps: float) -> None:
        self.prefill.a = 1.0 / tps

    @property
    def decode_tps(self) -> float:
        """Completion tokens per second of one stream running alone."""
        return self.decode.tokens_per_second(1.0)

    @decode_tps.setter
    def decode_tps(self, tps: float) -> None:
        self.decode.a = 1.0 / tps

    @property
    def running(self) -> int:
        """Sequences the runtime runs for us now: our requests in flight, up to its batch slots."""
        return min(self.inflight, self.backend.concurrency)

    @property
    def cache_capacity(self) -> float:
        """Its prefix cache in tokens: configured (`cache_tokens`), else learned."""
        return float(self.backend.cache_tokens) or self.cache_tokens

    def lease(self, cost: float, tokens: float = 0.0) -> Lease:
        """Claim it for one request of `cost` predicted seconds and `tokens` predicted completion tokens."""
        now = time.monotonic()
        self._tick(now)
        self.inflight += 1
        self.predicted_load += cost
        self.inflight_tokens += tokens
        return Lease(self, cost, tokens, now)

    def _tick(self, now: float) -> None:
        self.running_area += min(self.inflight, self.backend.concurrency) * (now - self.running_at)
        self.running_at = now

    def is_healthy(self, now: float) -> bool:
        """Not held out on health (a probe's verdict or an ejection). A runtime's Retry-After is not ill
        health, so a throttled backend still counts as healthy for a pool's panic threshold."""
        return self.healthy and now >= self.ejected_until

    def is_available(self, now: float) -> bool:
        """Takes new requests: healthy, not ejected, not asked by the runtime to back off."""
        return self.is_healthy(now) and now >= self.throttled_until


class ModelStats:
    """What we learned about one upstream model's traffic: body bytes per prompt token, completion length."""

    __slots__ = ("bytes_per_token", "completion_tokens", "samples")

    def __init__(self, bytes_per_token: float, completion_tokens: float) -> None:
        self.bytes_per_token = bytes_per_token
        self.completion_tokens = completion_tokens
        self.samples = 0


class Lease:
    """One request's claim on a backend; `release()` is idempotent (aiohttp `Connection.release`).

    Also what the request tells the cost model when it ends: how many sequences the runtime ran when it was
    picked (`started_among`, itself included; more than `concurrency` means it waited in the runtime's
    queue) and on average while it ran (`running`, set on release), and the cached prompt tokens that were
    predicted for it there (`predicted_cached`)."""

    __slots__ = ("state", "cost", "tokens", "released", "started_at", "started_area", "started_among", "running",
                 "predicted_cached")

    def __init__(self, state: BackendState, cost: float, tokens: float = 0.0, now: float = 0.0) -> None:
        self.state = state
        self.cost = cost
        self.tokens = tokens
        self.released = False
        self.started_at = now
        self.started_area = state.running_area
        self.started_among = state.inflight  # already counted: itself included
        self.running = 1.0
        self.predicted_cached: float | None = None  # None: the route does not price prefixes

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        state = self.state
        now = time.monotonic()
        state._tick(now)
        elapsed = now - self.started_at
        if elapsed > 0:
            self.running = max(1.0, (state.running_area - self.started_area) / elapsed)
        state.inflight -= 1
        state.predicted_load -= self.cost
        state.inflight_tokens -= self.tokens
        if state.inflight == 0:
            state.predicted_load = 0.0  # no float drift left behind once idle
            state.inflight_tokens = 0.0
            if state.draining is not None:
                state.draining.forget(state)


class BackendStates:
    """All backends' state by identity. `sync` adopts a snapshot's backends: a kept backend keeps its state;
    a removed one drains (its state stays while requests are in flight on it) and is forgotten when its last
    lease is released."""

    __slots__ = ("_states", "_configured")

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], BackendState] = {}
        self._configured: frozenset[tuple[str, str]] | None = None  # None until the first sync: keep all

    def get(self, backend: Backend) -> BackendState:
        state = self._states.get(backend.identity)
        if state is None:
            state = self._states[backend.identity] = BackendState(backend)
            if self._configured is not None and backend.identity not in self._configured:
                # A request still on an older snapshot picked a backend that a reload removed: serve it,
                # then forget the state again instead of keeping it forever.
                self._retire(state)
        return state

    def sync(self, backends: Iterable[Backend]) -> None:
        """Adopt a new snapshot's backends; removed ones are forgotten once nothing is in flight on them."""
        wanted = {b.identity: b for b in backends}
        self._configured = frozenset(wanted)
        for identity, state in list(self._states.items()):
            if identity in wanted:
                state.backend = wanted[identity]
                if state.draining is not None:  # removed and added back before it drained: live again
                    state.draining = None
                    state.next_probe_at = 0.0
            elif state.inflight == 0:
                del self._states[identity]
            else:
                self._retire(state)
        for backend in wanted.values():
            self.get(backend)

    def _retire(self, state: BackendState) -> None:
        state.draining = self
        # Not configured, so never probed again; a past probe time would keep the health checker's
        # next wake-up in the past (a busy loop) for as long as the state drains.
        state.next_probe_at = math.inf

    def forget(self, state: BackendState) -> None:
        """Drop a drained state (`Lease.release` calls this when the last request on it ends)."""
        identity = state.backend.identity
        if self._states.get(identity) is state:
            del self._states[identity]

    def __iter__(self) -> Iterator[BackendState]:
        return iter(list(self._states.values()))

    def samples(self, now: float) -> list[tuple[str, int, float, bool]]:
        """(name, in flight, predicted load, takes traffic) per backend, for the scrape-time gauges.

        One sample per name: a backend whose url a reload changed has two states while the old one drains,
        and a series may not appear twice in one scrape; the configured state's health wins."""
        merged: dict[str, tuple[str, int, float, bool]] = {}
        for s in self._states.values():
            name = s.backend.name
            sample = (name, s.inflight, s.predicted_load, s.healthy and now >= s.ejected_until)
            other = merged.get(name)
            if other is not None:
                live = other if s.draining is not None else sample
                sample = (name, other[1] + s.inflight, other[2] + s.predicted_load, live[3])
            merged[name] = sample
        return list(merged.values())


BACKENDS = web.AppKey("BACKENDS", BackendStates)
