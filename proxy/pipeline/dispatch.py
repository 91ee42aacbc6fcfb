"""Dispatch: choose a backend, send, and retry or fail over until the answer has begun — then commit.

A request is retried on another backend (bounded by the route's `retry.attempts` and the total deadline)
when the runtime could not be reached, answered 5xx or 429, reset, or timed out — but only before any
byte went to the client: a stream commits with its first chunk, a whole answer once it was fully read.
Every attempt's lease is released and every outcome recorded exactly once, in `settle` (called by the
handler in `finally`), however the request ends. Policies come from balancer.py, cost.py, ejection.py.
"""

from __future__ import annotations

import asyncio

from proxy.config.model import HealthSettings, Pool, Route, ServerSettings, Snapshot
from proxy.context import ProxyContext
from proxy.errors import (
    BackendThrottledError,
    NoHealthyBackendError,
    OverloadedError,
    UpstreamError,
)
from proxy.observe.record import CLIENT_CLOSED, RequestRecord
from proxy.pipeline.balancer import pick_backend
from proxy.pipeline.cost import Estimate, estimate, learn, new_model_stats, predicted_seconds
from proxy.pipeline.ejection import record_failure, record_success, record_throttle
from proxy.pipeline.forward import Deadlines, build_request, open_exchange
from proxy.pipeline.relay import is_event_stream
from proxy.pipeline.request import RequestView
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.state import BackendState, Lease


class Attempt:
    """The committed exchange: its lease, connection, and the first chunk (stream) or whole body."""

    __slots__ = ("lease", "conn", "first_chunk", "body", "started", "model", "health")

    def __init__(
        self, lease: Lease, conn: UpstreamConnection, started: float, model: str, health: HealthSettings
    ) -> None:
        self.lease = lease
        self.conn = conn
        self.started = started
        self.model = model
        self.health = health  # the request's snapshot's, like everything else it decides
        self.first_chunk: bytes | None = None
        self.body: bytes | None = None  # set for whole (non-stream) answers

    @property
    def state(self) -> BackendState:
        return self.lease.state


async def dispatch(
    context: ProxyContext,
    snapshot: Snapshot,
    route: Route,
    pool: Pool,
    view: RequestView,
    payload: bytes,
    path: str,
    record: RequestRecord,
    deadlines: Deadlines,
) -> Attempt:
    loop_time = asyncio.get_running_loop().time
    model = pool.model or view.model
    stats = context.model_stats.get(model)
    if stats is None:
        stats = context.model_stats[model] = new_model_stats()
    est = estimate(stats, len(view.body), view.max_tokens, view.endpoint == "embeddings")
    tried: list[BackendState] = []
    last_error: UpstreamError | None = None
    for attempt_number in range(1, route.retry_attempts + 1):
        if loop_time() >= deadlines.total:
            break
        try:
            lease = await _acquire(context, snapshot.server, route, pool, est, tried, loop_time(), deadlines)
        except (NoHealthyBackendError, OverloadedError):
            if last_error is not None:
                raise last_error from None  # the failure the client should hear about is the backend's
            raise
        state = lease.state
        record.backend, record.attempts = state.backend.name, attempt_number
        started = loop_time()
        request_bytes = build_request(state.backend, path, payload, record.request_id, view.is_stream)
        conn: UpstreamConnection | None = None
        committed = False
        try:
            conn = await open_exchange(
                context.upstream, state.backend, request_bytes, deadlines, started, view.is_stream, context.metrics
            )
            attempt = Attempt(lease, conn, started, model, snapshot.health)
            if view.is_stream and conn.status == 200 and is_event_stream(conn.headers):
                attempt.first_chunk = await conn.read_chunk(deadlines.first_token(started), "first_token")
            else:
                attempt.body = await conn.read_body(deadlines.total, "total")
                if conn.status == 429:
                    raise BackendThrottledError(
                        f"The backend '{state.backend.name}' is rate limiting.", _retry_after(conn)
                    )
            committed = True
            return attempt
        except UpstreamError as exc:
            if conn is not None:  # open_exchange counted its own errors; these came from reading the answer
                context.metrics.count_upstream_error(state.backend.name, exc)
            _note_failure(snapshot.health, state, exc, loop_time())
            last_error = exc
            tried.append(state)
        finally:
            if not committed:
                if conn is not None:
                    context.upstream.release(conn)
                lease.release()
                context.queue.notify()
    assert last_error is not None or loop_time() >= deadlines.total
    raise last_error if last_error is not None else NoHealthyBackendError("The request ran out of time.")


def settle(context: ProxyContext, attempt: Attempt, record: RequestRecord, body_bytes: int) -> None:
    """After the relay: give the connection and lease back, and learn from how it went."""
    status = record.status or attempt.conn.status  # record.status is set only when the relay failed
    context.upstream.release(attempt.conn)  # (resets the connection's status for its next exchange)
    attempt.lease.release()
    context.queue.notify()
    state = attempt.state
    now = asyncio.get_running_loop().time()
    if status >= 500:
        record_failure(state, attempt.health, now)
        return
    if status == CLIENT_CLOSED:
        return
    record_success(state)
    if status == 200 and (record.prompt_tokens or record.completion_tokens):
        stats = context.model_stats.get(attempt.model)
        if stats is not None:
            ttft = None if record.ttft is None else record.ttft - (attempt.started - record.started)
            learn(stats, state, body_bytes, record.prompt_tokens or 0, record.completion_tokens or 0, ttft,
                  now - attempt.started)


async def _acquire(
    context: ProxyContext,
    server: ServerSettings,
    route: Route,
    pool: Pool,
    est: Estimate,
    tried: list[BackendState],
    now: float,
    deadlines: Deadlines,
) -> Lease:
    """A lease on the best backend not tried yet; waits in the pool's FIFO queue while all are full."""
    get = context.backends.get
    candidates = [get(b) for b in pool.backends]
    if tried:  # fail over to backends not tried yet, when there are any
        candidates = [s for s in candidates if s not in tried] or candidates
    queue = context.queue
    loop_time = asyncio.get_running_loop().time
    queue_deadline = min(now + route.timeouts.queue, deadlines.total)
    waited = False
    while True:
        now = loop_time()
        if waited or not queue.waiting(pool.name):  # newcomers queue behind those already waiting (FIFO)
            costs = [predicted_seconds(s, est) for s in candidates]
            index = pick_backend(candidates, costs, route.balance, context.next_turn(pool.name), now,
                                 route.runtime_load)
            if index is not None:
                if waited:
                    queue.notify()  # others may fit too (several slots freed at once)
                return candidates[index].lease(costs[index])
            if not any(s.is_available(now) for s in candidates):
                raise NoHealthyBackendError(f"No healthy backend in pool '{pool.name}'.")
        if queue.waiting(pool.name) >= server.max_queue:
            raise OverloadedError(f"Every backend of pool '{pool.name}' is busy and the queue is full.",
                                  retry_after=route.timeouts.queue)
        if now >= queue_deadline or not await queue.wait(pool.name, queue_deadline - now, at_head=waited):
            raise OverloadedError(f"Every backend of pool '{pool.name}' stayed busy for "
                                  f"{route.timeouts.queue:g}s.", retry_after=route.timeouts.queue)
        waited = True


def _note_failure(health: HealthSettings, state: BackendState, exc: UpstreamError, now: float) -> None:
    if isinstance(exc, BackendThrottledError):
        record_throttle(state, exc.retry_after or 1.0, now)
    else:
        record_failure(state, health, now)


def _retry_after(conn: UpstreamConnection) -> float:
    for name, value in conn.headers:
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return 1.0
    return 1.0
