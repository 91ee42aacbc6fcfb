"""Shadow mirroring: sampled copies of requests sent to shadow pools, compared with the primary's answer.

The handler calls `mirror()` once the primary has been dispatched (its answer has begun); the returned
`Mirror` captures the primary's stream (bounded) and, from `primary_done()`, hands its side over to the
comparison. Copies run in tasks owned here, never awaited by a request, and never cancelled by a client
leaving; per (route, pool) at most `max_concurrency` run and `max_queue` wait, the rest are dropped and
counted. A copy is one `Dispatcher.call` like any request — the pool's balance policy and turns, runtime
load, health, 429 / Retry-After, learned speeds — with one attempt and no place in the pool's wait queue.
It touches no primary metric, cache or sticky assignment. The comparison (`observe/compare.py`) runs
after both sides finished, off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque

from aiohttp import web

from proxy.config.model import Route, Shadow, Snapshot
from proxy.errors import BackendTimeoutError, OverloadedError, UpstreamError
from proxy.observe.compare import MAX_CAPTURE_BYTES, Comparison, Side, compare
from proxy.observe.metrics import Metrics
from proxy.observe.record import CLIENT_CLOSED, RequestRecord
from proxy.pipeline.deadlines import Deadlines
from proxy.pipeline.dispatch import Attempt, Dispatcher
from proxy.pipeline.request import RequestView
from proxy.pipeline.sse import find_usage_object

log = logging.getLogger("splitstream.shadow")

RECENT_COMPARISONS = 200
USAGE_TAIL_BYTES = 8192  # a stream's usage chunk is its last event: look for it at the end only


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
    __slots__ = ("pair", "shadow", "snapshot", "route", "view", "path")

    def __init__(
        self, pair: Pair, shadow: Shadow, snapshot: Snapshot, route: Route, view: RequestView, path: str
    ) -> None:
        self.pair, self.shadow, self.snapshot, self.route, self.view, self.path = (
            pair, shadow, snapshot, route, view, path)


class Mirror:
    """The copies of one client request: captures the primary's stream and gives its side to each pair."""

    __slots__ = ("_owner", "_pairs", "_status", "_sent_at", "_is_stream", "_body", "_buffer", "tee")

    def __init__(self, owner: ShadowMirror, pairs: list[Pair], primary: Attempt, is_stream: bool) -> None:
        self._owner = owner
        self._pairs = pairs
        self._status = primary.conn.status  # read now: the connection is reset when it goes back to the client
        self._sent_at = primary.started
        self._is_stream = is_stream
        self._body = primary.body
        self._buffer = bytearray()
        # Where the relay copies a streamed answer's chunks to (bounded); None for a whole answer.
        self.tee = self._capture if primary.body is None else None

    def _capture(self, chunk: bytes) -> None:
        if len(self._buffer) < MAX_CAPTURE_BYTES:
            self._buffer.extend(chunk)

    def primary_done(self, record: RequestRecord) -> None:
        """The primary's answer was relayed (or failed): compare it with each copy once that is done too."""
        output = self._body if self._body is not None else bytes(self._buffer)
        side = side_of(record, self._status, output, self._is_stream, self._sent_at)
        self._owner.primary_done(self._pairs, side)


class ShadowMirror:
    """Owns shadow copies in flight and waiting, and the last comparisons (ids and numbers only)."""

    def __init__(self, dispatcher: Dispatcher, metrics: Metrics, rng: random.Random | None = None) -> None:
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[tuple[str, str], int] = {}
        self._waiting: dict[tuple[str, str], deque[_Job]] = {}
        self.recent: deque[Comparison] = deque(maxlen=RECENT_COMPARISONS)
        self.compared = asyncio.Event()  # set after each comparison (tests await it)

    def mirror(
        self, snapshot: Snapshot, route: Route, view: RequestView, path: str, request_id: str, primary: Attempt
    ) -> Mirror | None:
        """Start (or queue, or drop) a copy for each of the route's shadows that samples this request; the
        `Mirror` of those started, or None when none was."""
        pairs = []
        for shadow in route.shadows:
            if shadow.sample < 1.0 and self._rng.random() >= shadow.sample:
                continue
            key = (route.name, shadow.pool.name)
            if not self._has_room(key, shadow):  # decided before allocating anything: drops are the common case
                self._metrics.count_shadow_drop(*key)
                continue
            pair = Pair(request_id, route.name, shadow.pool.name)
            self._submit(key, _Job(pair, shadow, snapshot, route, view, path))
            pairs.append(pair)
        return Mirror(self, pairs, primary, view.is_stream) if pairs else None

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
        record = RequestRecord(job.pair.request_id + "-shadow", "POST", job.path, loop.time())
        outcome, status, output, sent_at = "error", 0, b"", record.started
        try:
            status, output, sent_at = await self._exchange(job, record)
            outcome = "ok" if status < 500 else "error"
        except BackendTimeoutError:
            outcome = "timeout"
        except (UpstreamError, OverloadedError):
            outcome = "error"  # (a full shadow pool too: copies never wait for a slot)
        finally:
            duration = loop.time() - record.started
            self._metrics.shadow_requests_total.labels(route, pool, outcome).inc()
            self._metrics.shadow_duration.labels(route, pool).observe(duration)
            if status == 0:  # failed before any answer: a status the comparison can show
                side = Side(504 if outcome == "timeout" else 502, duration, None, None, None, b"", job.view.is_stream)
            else:
                side = side_of(record, status, output, job.view.is_stream, sent_at)
            job.pair.shadow = side
            if job.pair.primary is not None:
                self._compare(job.pair)

    async def _exchange(self, job: _Job, record: RequestRecord) -> tuple[int, bytes, float]:
        """(status, output, when it was sent) of one copy, read to its end; settled like any request."""
        loop = asyncio.get_running_loop()
        view = job.view
        deadlines = Deadlines(job.route.timeouts, record.started)
        attempt = await self._dispatcher.call(job.snapshot, job.route, job.shadow.pool, view, job.path, record,
                                              deadlines, attempts=1, queue_timeout=0.0, copy=True)
        status = attempt.conn.status
        try:
            if attempt.body is not None:
                output = attempt.body
                usage = find_usage_object(output) if status == 200 else None
            else:
                record.ttft = loop.time() - record.started
                captured = bytearray(attempt.first_chunk or b"")
                while (chunk := await attempt.conn.read_chunk(deadlines.idle(loop.time()), "idle")) is not None:
                    if len(captured) < MAX_CAPTURE_BYTES:
                        captured += chunk
                output = bytes(captured)
                usage = find_usage_object(output[-USAGE_TAIL_BYTES:])
            if usage is not None:
                usage.apply_to(record)
            return status, output, attempt.started
        except UpstreamError as exc:
            self._metrics.count_upstream_error(record.backend, exc)
            record.status = exc.status  # settle counts it against the backend
            raise
        except asyncio.CancelledError:
            record.status = CLIENT_CLOSED
            raise
        finally:
            self._dispatcher.settle(attempt, record, len(view.body))

    def _compare(self, pair: Pair) -> None:
        assert pair.primary is not None and pair.shadow is not None
        result = compare(pair.request_id, pair.route, pair.pool, pair.primary, pair.shadow)
        pair.primary = pair.shadow = None  # drop captured outputs now
        self.recent.append(result)
        self._metrics.record_comparison(result)
        self.compared.set()
        self.compared.clear()


def side_of(record: RequestRecord, status: int, output: bytes, is_stream: bool, sent_at: float) -> Side:
    """One answer as the comparison sees it, timed from its own send (`sent_at`), for primary and copy alike."""
    now = asyncio.get_running_loop().time()
    ttft = None if record.ttft is None or not is_stream else record.ttft - (sent_at - record.started)
    return Side(record.status or status, now - sent_at, ttft, record.prompt_tokens, record.completion_tokens,
                output, is_stream)


SHADOWS = web.AppKey("SHADOWS", ShadowMirror)
