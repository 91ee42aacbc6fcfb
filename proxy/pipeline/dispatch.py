"""Dispatch: the one way a backend is called — pick, lease, forward, read the first chunk; later, settle.

Client requests (`handler.py`) and shadow copies (`shadow.py`) both come through `Dispatcher.call`, so
both honour the pool's balance policy and turns, runtime load, health, ejection, a runtime's 429 /
Retry-After, and both teach the balancer the backends' speeds. A call is retried on another backend
(at most `attempts` times, within the total deadline) when the runtime could not be reached, answered
5xx or 429, reset, or timed out — but only before any byte went to the client: a stream commits with
its first chunk, a whole answer once it was fully read. Every attempt's lease is released and every
outcome recorded exactly once (`settle`, called by the owner in `finally`), however the request ends.
Policies come from `balancer.py`, `cost.py` and `upstream/ejection.py`; state from `upstream/`.
"""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

from proxy.config.model import HealthSettings, Pool, Route, Snapshot
from proxy.errors import (
    BackendThrottledError,
    ContextLengthError,
    NoHealthyBackendError,
    OverloadedError,
    UpstreamError,
)
from proxy.observe.metrics import Metrics
from proxy.observe.record import CLIENT_CLOSED, RequestRecord
from proxy.pipeline.balancer import in_panic, pick_backend, takes_requests
from proxy.pipeline.cost import (
    Estimate,
    Outcome,
    estimate,
    learn,
    learn_prefix,
    matched_tokens,
    new_model_stats,
    predicted_seconds,
    remember_prefix,
)
from proxy.pipeline.deadlines import Deadlines
from proxy.pipeline.forward import build_request, for_copy, open_exchange
from proxy.pipeline.headers import is_event_stream, retry_after_of
from proxy.pipeline.prompt_blocks import prompt_chain
from proxy.pipeline.request import SCORING_ENDPOINTS, RequestView
from proxy.types import Clock
from proxy.upstream.client import UpstreamClient
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.ejection import record_failure, record_success, record_throttle
from proxy.upstream.queue import NORMAL, WaitQueue
from proxy.upstream.state import BackendState, BackendStates, Lease, ModelStats


# What makes a request move to a route's next fallback pool (`Dispatcher.call`).
FALLBACK_ERRORS = (UpstreamError, OverloadedError, ContextLengthError)
CONTEXT_STATUSES = frozenset({400, 413, 422})  # how runtimes answer a prompt longer than their context
CONTEXT_EXCEEDED = re.compile(
    rb"context_length_exceeded|maximum context length|exceed_context_size|context (?:length|size|window)"
    rb"|prompt is too long|input is too long|tokens \+ `max_new_tokens` must be <="
)
MAX_ERROR_SCAN = 4096


class Attempt:
    """The committed exchange: its lease, connection, and the first chunk (stream) or whole body."""

    __slots__ = ("lease", "conn", "first_chunk", "body", "started", "stats", "health", "est")

    def __init__(
        self, lease: Lease, conn: UpstreamConnection, started: float, stats: ModelStats, health: HealthSettings,
        est: Estimate,
    ) -> None:
        self.lease = lease
        self.conn = conn
        self.started = started
        self.stats = stats  # what this request's pool learns from it
        self.est = est  # what it was priced at (its prompt's block chain, when prefixes are priced)
        self.health = health  # the request's snapshot's, like everything else it decides
        self.first_chunk: bytes | None = None
        self.body: bytes | None = None  # set for whole (non-stream) answers

    @property
    def state(self) -> BackendState:
        return self.lease.state


class Dispatcher:
    """The parts a backend call needs: backend state, the upstream client, the wait queue, what was learned.

    `clock` is the backend-state clock (ejection, throttling, availability); None means the event loop's.
    Deadlines and durations always use the loop's time, which the connection's timers run on."""

    __slots__ = ("backends", "client", "queue", "metrics", "model_stats", "_clock", "_turns")

    def __init__(
        self, backends: BackendStates, client: UpstreamClient, queue: WaitQueue, metrics: Metrics,
        clock: Clock | None = None,
    ) -> None:
        self.backends = backends
        self.client = client
        self.queue = queue
        self.metrics = metrics
        # Learned per pool (see pipeline/cost.py): keyed by names from the rules, never by what a client sent.
        self.model_stats: dict[str, ModelStats] = {}
        self._clock = clock
        self._turns: dict[str, int] = {}  # per-pool request counter for round_robin

    async def call(
        self,
        snapshot: Snapshot,
        route: Route,
        pool: Pool,
        view: RequestView,
        path: str,
        record: RequestRecord,
        deadlines: Deadlines,
        *,
        attempts: int,
        queue_timeout: float,
        priority: int = NORMAL,
        est: Estimate | None = None,
        fallback: tuple[Pool, ...] = (),
        pinned: str | None = None,
        copy: bool = False,
        key: str | None = None,
    ) -> Attempt:
        """The committed exchange with a backend of `pool` — or, when `pool` cannot answer, of the first of
        `fallback` that can.

        `queue_timeout`: how long to wait in a pool's queue while every backend is full (0: never wait —
        shadow copies must not stand in line with client requests); `priority`: the request's class there
        (a tenant's). `est`: the request's size if the caller already priced it (`estimate`). `fallback`:
        pools tried in order, one already tried skipped, when a pool had no healthy backend, its queue was
        full or timed out, every try failed before the first byte, or a runtime said the prompt does not
        fit its context; each move is counted and `record.fallback` names the pool that answers. `pinned`: the
        one backend of `pool` that may answer (it holds state the request needs); no fallback then. `copy`:
        a shadow copy (its trace context gets a span id of its own). `key`: what `consistent_hash` hashes."""
        if est is None:
            est = self.estimate(pool, view, route)
        if not fallback or pinned is not None:
            return await self._call_pool(snapshot, route, pool, view, path, record, deadlines, attempts,
                                         queue_timeout, priority, est, False, pinned, copy, key)
        remaining = [p for p in fallback if p.name != pool.name]  # the rules list each pool once
        while True:
            try:
                return await self._call_pool(snapshot, route, pool, view, path, record, deadlines, attempts,
                                             queue_timeout, priority, est, bool(remaining), pinned, copy, key)
            except FALLBACK_ERRORS as exc:
                if not remaining or asyncio.get_running_loop().time() >= deadlines.total:
                    raise
                nxt = remaining.pop(0)
                self.metrics.count_fallback(route.name, pool.name, nxt.name, exc)
                pool = nxt
                record.fallback = nxt.name

    async def _call_pool(
        self,
        snapshot: Snapshot,
        route: Route,
        pool: Pool,
        view: RequestView,
        path: str,
        record: RequestRecord,
        deadlines: Deadlines,
        attempts: int,
        queue_timeout: float,
        priority: int,
        est: Estimate,
        may_fall_back: bool,
        pinned: str | None,
        copy: bool,
        key: str | None,
    ) -> Attempt:
        """`call` within one pool: at most `attempts` tries on its backends. `may_fall_back`: a runtime's
        context-length refusal raises `ContextLengthError` (another pool may hold it) instead of being the
        answer."""
        loop_time = asyncio.get_running_loop().time
        clock = self._clock or loop_time
        stats = self._stats(pool)
        payload = view.upstream_body(pool.model)
        passed = for_copy(view.passed) if copy else view.passed
        anthropic = view.endpoint == "messages"
        tried: list[BackendState] = []
        last_error: UpstreamError | None = None
        for attempt_number in range(1, attempts + 1):
            if loop_time() >= deadlines.total:
                break
            try:
                lease = await self._acquire(snapshot, route, pool, est, tried, deadlines, queue_timeout, clock,
                                            priority, pinned, key)
            except (NoHealthyBackendError, OverloadedError):
                if last_error is not None:
                    raise last_error from None  # the failure the client should hear about is the backend's
                raise
            state = lease.state
            record.backend, record.attempts = state.backend.name, record.attempts + 1
            started = loop_time()
            request_bytes = build_request(state.backend, path, payload, record.request_id, view.is_stream, passed,
                                          anthropic)
            conn: UpstreamConnection | None = None
            committed = False
            try:
                conn = await open_exchange(
                    self.client, state.backend, request_bytes, deadlines, started, view.is_stream, self.metrics
                )
                attempt = Attempt(lease, conn, started, stats, snapshot.health, est)
                if view.is_stream and conn.status == 200 and is_event_stream(conn.headers):
                    attempt.first_chunk = await conn.read_chunk(deadlines.first_token(started), "first_token")
                else:
                    attempt.body = await conn.read_body(deadlines.total, "total",
                                                        snapshot.server.max_upstream_body_bytes)
                    if conn.status == 429:
                        raise BackendThrottledError(
                            f"The backend '{state.backend.name}' is rate limiting.",
                            retry_after_of(conn.headers, snapshot.health.max_ejection),
                        )
                    if may_fall_back and conn.status in CONTEXT_STATUSES and says_context_exceeded(attempt.body):
                        raise ContextLengthError(
                            f"The prompt does not fit the context of pool '{pool.name}'.")
                committed = True
                return attempt
            except UpstreamError as exc:
                if conn is not None:  # open_exchange counted its own errors; these came from reading the answer
                    self.metrics.count_upstream_error(state.backend.name, exc)
                _note_failure(snapshot.health, state, exc, clock())
                last_error = exc
                tried.append(state)
            except ContextLengthError:
                record_success(state)  # the runtime is fine; the request is too long for this pool
                raise
            finally:
                if not committed:
                    if conn is not None:
                        self.client.release(conn)
                    lease.release()
                    self.queue.notify()
        assert last_error is not None or loop_time() >= deadlines.total
        raise last_error if last_error is not None else NoHealthyBackendError("The request ran out of time.")

    def estimate(self, pool: Pool, view: RequestView, route: Route) -> Estimate:
        """The request's predicted size in tokens, from what the pool's model taught so far, and its prompt's
        block chain when the route prices prefixes (least_cost with `prefix`)."""
        balance = route.balance
        chain = None
        if balance.prefix and balance.policy == "least_cost":
            chain = prompt_chain(view.endpoint, view.data, len(view.body))
        return estimate(self._stats(pool), len(view.body), view.max_tokens, view.endpoint in SCORING_ENDPOINTS,
                        chain)

    def _stats(self, pool: Pool) -> ModelStats:
        stats = self.model_stats.get(pool.name)
        if stats is None:
            stats = self.model_stats[pool.name] = new_model_stats()
        return stats

    def settle(self, attempt: Attempt, record: RequestRecord, body_bytes: int) -> None:
        """After the answer was relayed (or read): give the connection and lease back, learn from how it went."""
        status = record.status or attempt.conn.status  # record.status is set only when the relay failed
        self.client.release(attempt.conn)  # (resets the connection's status for its next exchange)
        attempt.lease.release()
        self.queue.notify()
        state = attempt.state
        loop_now = asyncio.get_running_loop().time()
        if status >= 500:
            record_failure(state, attempt.health, self._clock() if self._clock else loop_now)
            return
        if status == CLIENT_CLOSED:
            return
        record_success(state)
        if status != 200 or not (record.prompt_tokens or record.completion_tokens):
            return
        lease = attempt.lease
        ttft = None if record.ttft is None else record.ttft - (attempt.started - record.started)
        outcome = Outcome(body_bytes, record.prompt_tokens or 0, record.completion_tokens or 0, ttft,
                          loop_now - attempt.started, cached_tokens=record.cached_tokens,
                          prefill_ms=record.runtime_prefill_ms, decode_ms=record.runtime_decode_ms,
                          started_among=lease.started_among, running=lease.running)
        learn(attempt.stats, state, outcome, loop_now)
        if lease.predicted_cached is not None and record.cached_tokens is not None:
            learn_prefix(state, attempt.est, lease.predicted_cached, record.cached_tokens)
            self.metrics.count_prefix(state.backend.name, lease.predicted_cached, record.cached_tokens)

    def next_turn(self, pool_name: str) -> int:
        turn = self._turns.get(pool_name, 0)
        self._turns[pool_name] = turn + 1
        return turn

    async def _acquire(
        self,
        snapshot: Snapshot,
        route: Route,
        pool: Pool,
        est: Estimate,
        tried: list[BackendState],
        deadlines: Deadlines,
        queue_timeout: float,
        clock: Clock,
        priority: int,
        pinned: str | None = None,
        key: str | None = None,
    ) -> Lease:
        """A lease on the best backend not tried yet; waits in the pool's queue (by priority class, FIFO
        within one, `upstream/queue.py`) while all are full.

        Panic (too few of the pool healthy, `balancer.in_panic`) is judged over the whole pool, tried or not,
        and every lease taken in panic is counted for the pool."""
        get = self.backends.get
        members = [get(b) for b in pool.backends if pinned is None or b.name == pinned]
        candidates = members
        if tried:  # fail over to backends not tried yet, when there are any
            candidates = [s for s in members if s not in tried] or members
        queue = self.queue
        loop_time = asyncio.get_running_loop().time
        queue_deadline = min(loop_time() + queue_timeout, deadlines.total)
        max_queue = snapshot.server.max_queue
        since: float | None = None  # when this request first queued: it keeps that place when woken too early
        while True:
            now = clock()
            waited = since is not None
            if waited or not queue.waiting(pool.name):  # newcomers queue behind those already waiting
                panic = in_panic(members, now, snapshot.health.panic_threshold)
                matched = [matched_tokens(s, est) for s in candidates] if est.chain is not None else None
                costs = [predicted_seconds(s, est, matched[i] if matched else 0.0) for i, s in enumerate(candidates)]
                index = pick_backend(candidates, costs, route.balance.policy, self.next_turn(pool.name), now,
                                     route.runtime_load, panic, key)
                if index is not None:
                    if waited:
                        queue.notify()  # others may fit too (several slots freed at once)
                    if panic:
                        self.metrics.count_panic(pool.name)
                    chosen = candidates[index]
                    lease = chosen.lease(costs[index], est.completion_tokens)
                    if matched is not None:
                        lease.predicted_cached = matched[index]
                        remember_prefix(chosen, est)
                    return lease
                if not any(takes_requests(s, now, panic) for s in candidates):
                    raise NoHealthyBackendError(f"No healthy backend in pool '{pool.name}'.")
            if queue.waiting(pool.name) >= max_queue:
                raise OverloadedError(f"Every backend of pool '{pool.name}' is busy and the queue is full.",
                                      retry_after=route.timeouts.queue)
            left = queue_deadline - loop_time()
            if since is None:
                since = loop_time()
            if left <= 0 or not await queue.wait(pool.name, left, since, priority):
                raise OverloadedError(f"Every backend of pool '{pool.name}' stayed busy for "
                                      f"{route.timeouts.queue:g}s.", retry_after=route.timeouts.queue)


def says_context_exceeded(body: bytes) -> bool:
    """Whether a runtime's error body says the prompt (plus max_tokens) exceeds its context: OpenAI's
    `context_length_exceeded`, vLLM's "maximum context length", llama.cpp's `exceed_context_size_error`,
    TGI's "must be <= N" validation, Anthropic-style "prompt is too long". Read from an error body already
    bounded by `server.max_upstream_body_bytes`; only its start is searched."""
    return CONTEXT_EXCEEDED.search(body[:MAX_ERROR_SCAN].lower()) is not None


def _note_failure(health: HealthSettings, state: BackendState, exc: UpstreamError, now: float) -> None:
    if isinstance(exc, BackendThrottledError):
        record_throttle(state, exc.retry_after or 1.0, now)
    else:
        record_failure(state, health, now)


DISPATCHER = web.AppKey("DISPATCHER", Dispatcher)
