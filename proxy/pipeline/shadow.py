"""Shadow mirroring: sampled copies of requests sent to shadow pools, compared with the primary's answer.

The handler calls `mirror()` once the primary has been dispatched (its answer has begun) and
`primary_done()` after relaying it. Copies run in tasks owned here, never awaited by a request, and never
cancelled by a client leaving; per (route, pool) at most `max_concurrency` run and `max_queue` wait, the
rest are dropped and counted. A copy is picked by the same balancer and health state as any request
(without queueing or retries), uses the shared connection pool, and touches no primary metric, cache or
sticky assignment. The comparison (`compare.py`) runs after both sides finished, off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable

from proxy.config.model import Route, Shadow, Snapshot
from proxy.errors import BackendTimeoutError, UpstreamError
from proxy.observe.metrics import Metrics
from proxy.pipeline.balancer import pick_backend
from proxy.pipeline.compare import MAX_CAPTURE_BYTES, Comparison, Side, compare
from proxy.pipeline.cost import estimate, new_model_stats, predicted_seconds
from proxy.pipeline.ejection import record_failure, record_success
from proxy.pipeline.forward import Deadlines, build_request, open_exchange
from proxy.pipeline.request import RequestView
from proxy.pipeline.sse import find_usage_object
from proxy.upstream.pool import ConnectionPool
from proxy.upstream.state import BackendStates, ModelStats

log = logging.getLogger("splitstream.shadow")

RECENT_COMPARISONS = 200


class Pair:
    """One mirrored request: the primary's side and the shadow's, filled in whichever order they finish."""

    __slots__ = ("request_id", "route", "pool", "primary", "shadow")

    def __init__(self, request_id: str, route: str, pool: str) -> None:
        self.request_id = request_id
        self.route = route
        self.pool = pool
        self.primary: Side | None = None
        self.shadow: Side | None = None


class _Job:
    __slots__ = ("pair", "shadow", "route", "view", "path", "started")

    def __init__(self, pair: Pair, shadow: Shadow, route: Route, view: RequestView, path: str) -> None:
        self.pair, self.shadow, self.route, self.view, self.path = pair, shadow, route, view, path
        self.started = 0.0


class ShadowMirror:
    """Owns shadow copies in flight and waiting, and the last comparisons (ids and numbers only)."""

    def __init__(
        self,
        backends: BackendStates,
        upstream: Callable[[], ConnectionPool],
        metrics: Metrics,
        snapshot: Callable[[], Snapshot],
        rng: random.Random | None = None,
    ) -> None:
        self._backends = backends
        self._upstream = upstream
        self._metrics = metrics
        self._snapshot = snapshot
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[tuple[str, str], int] = {}
        self._waiting: dict[tuple[str, str], deque[_Job]] = {}
        self._model_stats: dict[str, ModelStats] = {}  # shadows learn apart: they must not skew primary costs
        self.recent: deque[Comparison] = deque(maxlen=RECENT_COMPARISONS)
        self.compared = asyncio.Event()  # set after each comparison (tests await it)

    def mirror(self, route: Route, view: RequestView, path: str, request_id: str) -> list[Pair]:
        """Start (or queue, or drop) a copy for each of the route's shadows that samples this request."""
        pairs = []
        for shadow in route.shadows:
            if shadow.sample < 1.0 and self._rng.random() >= shadow.sample:
                continue
            key = (route.name, shadow.pool.name)
            if not self._has_room(key, shadow):  # decided before allocating anything: drops are the common case
                self._metrics.count_shadow_drop(*key)
                continue
            pair = Pair(request_id, route.name, shadow.pool.name)
            self._submit(key, _Job(pair, shadow, route, view, path))
            pairs.append(pair)
        return pairs

    def primary_done(self, pairs: list[Pair], side: Side) -> None:
        loop = asyncio.get_running_loop()
        for pair in pairs:
            pair.primary = side
            if pair.shadow is not None:
                loop.call_soon(self._compare, pair)  # after the response went out, not before

    def queued(self) -> dict[str, int]:
        return {f"{route}/{pool}": len(q) for (route, pool), q in self._waiting.items() if q}

    async def idle(self) -> None:
        """Wait until no copy runs or waits (tests and benchmarks; shutdown cancels instead)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for queue in self._waiting.values():
            queue.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- bounded concurrency ------------------------------------------------------------------------

    def _has_room(self, key: tuple[str, str], shadow: Shadow) -> bool:
        if self._running.get(key, 0) < shadow.max_concurrency:
            return True
        queue = self._waiting.get(key)
        return queue is None or len(queue) < shadow.max_queue

    def _submit(self, key: tuple[str, str], job: _Job) -> None:
        if self._running.get(key, 0) < job.shadow.max_concurrency:
            self._start(key, job)
        else:
            self._waiting.setdefault(key, deque()).append(job)

    def _start(self, key: tuple[str, str], job: _Job) -> None:
        self._running[key] = self._running.get(key, 0) + 1
        task = asyncio.create_task(self._run(job), name=f"shadow-{job.pair.request_id}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._finished(key, t))

    def _finished(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._running[key] -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("shadow copy failed unexpectedly", exc_info=task.exception())
        queue = self._waiting.get(key)
        if queue:
            self._start(key, queue.popleft())

    # -- one copy ----------------------------------------------------------------------------------

    async def _run(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        route, pool = job.route.name, job.shadow.pool.name
        job.started = loop.time()
        outcome = "error"
        side = Side(status=0, duration=0.0, ttft=None, prompt_tokens=None, completion_tokens=None,
                    output=b"", is_stream=job.view.is_stream)
        try:
            side = await self._exchange(job)
            outcome = "ok" if side.status < 500 else "error"
        except BackendTimeoutError:
            outcome = "timeout"
        except UpstreamError:
            outcome = "error"
        finally:
            duration = loop.time() - job.started
            self._metrics.shadow_requests_total.labels(route, pool, outcome).inc()
            self._metrics.shadow_duration.labels(route, pool).observe(duration)
            if side.status == 0:  # failed before any answer: a status the comparison can show
                side = Side(502 if outcome == "error" else 504, duration, None, None, None, b"", side.is_stream)
            job.pair.shadow = side
            if job.pair.primary is not None:
                self._compare(job.pair)

    async def _exchange(self, job: _Job) -> Side:
        loop = asyncio.get_running_loop()
        pool = job.shadow.pool
        view = job.view
        model = pool.model or view.model
        stats = self._model_stats.setdefault(model, new_model_stats())
        est = estimate(stats, len(view.body), view.max_tokens, view.endpoint == "embeddings")
        states = [self._backends.get(b) for b in pool.backends]
        costs = [predicted_seconds(s, est) for s in states]
        now = loop.time()
        index = pick_backend(states, costs, job.route.balance, 0, now)
        if index is None:
            raise UpstreamError(f"no shadow backend with room in pool '{pool.name}'")
        state = states[index]
        lease = state.lease(costs[index])
        deadlines = Deadlines(job.route.timeouts, now)
        upstream = self._upstream()
        conn = None
        try:
            payload = view.upstream_body(pool.model)
            request = build_request(state.backend, job.path, payload, job.pair.request_id + "-shadow", view.is_stream)
            conn = await open_exchange(upstream, state.backend, request, deadlines, now, view.is_stream, self._metrics)
            ttft = None
            captured = bytearray()
            deadline = deadlines.first_token(now) if view.is_stream else deadlines.total
            while (chunk := await conn.read_chunk(deadline, "idle" if ttft is not None else "first_token")) is not None:
                if ttft is None:
                    ttft = loop.time() - job.started
                if len(captured) < MAX_CAPTURE_BYTES:
                    captured += chunk
                if view.is_stream:
                    deadline = deadlines.idle(loop.time())
            usage = find_usage_object(bytes(captured[-8192:]) if view.is_stream else bytes(captured))
            record_success(state)
            return Side(conn.status, loop.time() - job.started, ttft if view.is_stream else None,
                        usage[0] if usage else None, usage[1] if usage else None, bytes(captured), view.is_stream)
        except UpstreamError:
            record_failure(state, self._snapshot().health, loop.time())
            raise
        finally:
            if conn is not None:
                upstream.release(conn)
            lease.release()

    def _compare(self, pair: Pair) -> None:
        assert pair.primary is not None and pair.shadow is not None
        result = compare(pair.request_id, pair.route, pair.pool, pair.primary, pair.shadow)
        pair.primary = pair.shadow = None  # drop captured outputs now
        self.recent.append(result)
        self._metrics.record_comparison(result)
        self.compared.set()
        self.compared.clear()
