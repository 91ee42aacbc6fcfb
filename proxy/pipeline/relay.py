"""Relay: the runtime's answer to the client, chunk by chunk for streams, whole for JSON bodies.

A stream's response head goes out together with its first chunk, so until the first token arrives an
error can still be a proper JSON error (and, later, a fail-over). After that a failure ends the stream
with an SSE `error` event in the endpoint's shape — never a silent truncation. A first token later than the
route's `timeouts.heartbeat` begins the stream early with SSE comments (`Heartbeat`); an error after that is
an error event too. Records TTFT, bytes and token usage as it goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
from aiohttp import web

from proxy.errors import BackendResetError, BackendTimeoutError, SplitstreamError, UpstreamError, sse_error_event
from proxy.observe.metrics import Metrics
from proxy.observe.record import CLIENT_CLOSED, RequestRecord
from proxy.pipeline.deadlines import Deadlines
from proxy.pipeline.headers import response_headers, routing_headers
from proxy.pipeline.request import RequestView
from proxy.pipeline.sse import DEFAULT_MAX_EVENT_BYTES, TERMINAL_EVENTS, SseRelay, find_usage_object
from proxy.upstream.connection import UpstreamConnection

SMALL_WRITE_BYTES = 16 * 1024  # well under any transport's high-water mark
MAX_RUNTIME_ERROR_BYTES = 64 * 1024
# Typed-event streams open with events that carry no token (`response.created`, `message_start`), often before
# the prefill is done: their time to first token is the first text delta's, not the first byte's.
FIRST_TOKEN_MARKERS = {"responses": b"response.output_text.delta", "messages": b"content_block_delta"}


def relay_body(conn: UpstreamConnection, body: bytes, record: RequestRecord) -> web.Response:
    """A whole (non-stream) answer, already read: the same bytes, with our headers."""
    if conn.status == 200:
        usage = find_usage_object(body)
        if usage is not None:
            usage.apply_to(record)
    record.bytes_out = len(body)
    return web.Response(body=body, status=conn.status, headers=response_headers(conn.headers, record))


async def relay_stream(
    request: web.Request,
    conn: UpstreamConnection,
    first_chunk: bytes | None,
    view: RequestView,
    deadlines: Deadlines,
    record: RequestRecord,
    metrics: Metrics,
    clock: Callable[[], float],
    tee: Callable[[bytes], None] | None = None,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    started: web.StreamResponse | None = None,
) -> web.StreamResponse:
    """An SSE answer, relayed as it arrives; the usage chunk is kept or stripped as the client asked.

    `first_chunk` was read by dispatch (a stream commits with it). `clock` is the loop's time (the
    deadlines' clock). The caller gives the connection back to the pool afterwards (which aborts it unless
    it ended cleanly). `tee`, when given (mirrored or cached requests only), is called with every upstream
    chunk as it arrives. The route's total deadline holds for the whole relay, even while data flows, and
    a write the client does not take within the idle timeout ends the request: a client that never reads
    must not pin a backend. `started`: the client's stream when a `Heartbeat` already began it.
    """
    sse = SseRelay(not view.wants_usage, max_event_bytes, view.endpoint)
    chunk = first_chunk
    token_marker = FIRST_TOKEN_MARKERS.get(view.endpoint)
    if token_marker is None:
        record.ttft = clock() - record.started
    response = started
    if response is None:
        response = web.StreamResponse(status=conn.status, headers=response_headers(conn.headers, record))
        await response.prepare(request)
    writing = False
    failure: UpstreamError | None = None
    try:
        async with asyncio.timeout_at(deadlines.total) as deadline:
            while chunk is not None:
                if token_marker is not None and token_marker in chunk:
                    record.ttft, token_marker = clock() - record.started, None
                if tee is not None:
                    tee(chunk)
                out = sse.feed(chunk)
                if out:
                    if _may_wait(request, out):  # only then arm the idle timer: two timer moves per chunk cost
                        writing = True
                        deadline.reschedule(clock() + deadlines.timeouts.idle)  # a full gap, even near the total
                        await response.write(out)
                        deadline.reschedule(deadlines.total)
                        writing = False
                    else:
                        await response.write(out)
                    record.bytes_out += len(out)
                now = clock()
                if now >= deadlines.total:
                    raise BackendTimeoutError("backend did not finish within the total timeout")
                chunk = await conn.read_chunk(deadlines.idle(now), "idle")
            tail = sse.finish()
            if tail:
                writing = True
                deadline.reschedule(clock() + deadlines.timeouts.idle)
                await response.write(tail)
                writing = False
                record.bytes_out += len(tail)
        if conn.ended_by_eof and not sse.saw_done and view.endpoint in TERMINAL_EVENTS:
            raise BackendResetError("backend closed the stream before its last event")
    except UpstreamError as exc:
        failure = exc
    except TimeoutError:
        if writing:  # the client stopped reading: its fault, not the backend's
            return _client_gone(request, response, record)
        failure = BackendTimeoutError("backend did not finish within the total timeout")
    except ConnectionResetError:
        record.status = CLIENT_CLOSED  # the client is gone; the caller aborts the upstream connection
        return response
    grace = deadlines.timeouts.idle  # what is left to say may not wait on a client longer than a gap may
    if failure is not None:
        metrics.count_upstream_error(record.backend, failure)
        record.status, record.error = failure.status, failure.code
        if not await _write_quietly(response, sse_error_event(failure, view.endpoint), grace):
            return _client_gone(request, response, record)
    if sse.usage is not None:
        sse.usage.apply_to(record)
    if not await _write_quietly(response, None, grace):
        return _client_gone(request, response, record)
    return response


class Heartbeat:
    """SSE comments (`: keep-alive`) to a streaming client while its first upstream byte is late.

    Armed before dispatch with one timer; only when the route's `timeouts.heartbeat` passes without an answer
    does it begin the client's stream (200, event-stream, the routing headers known then) and write a comment
    every interval. Dispatch goes on meanwhile — retries and fallback pools included: a comment is not an
    answer. `stop()` ends the beats and says whether the stream was begun; if it was, whatever follows (the
    answer, or an error) must be written into that stream (`relay_stream(started=)`, `end_stream`)."""

    __slots__ = ("_request", "_record", "_interval", "_timer", "_task", "_stop", "response")

    COMMENT = b": keep-alive\n\n"

    def __init__(self, request: web.Request, record: RequestRecord, interval: float) -> None:
        self._request = request
        self._record = record
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None  # made when the beats begin: most streams never need one
        self.response: web.StreamResponse | None = None
        self._timer = asyncio.get_running_loop().call_later(interval, self._begin)

    def _begin(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._beat(self._stop))

    async def _beat(self, stop: asyncio.Event) -> None:
        headers = routing_headers(self._record, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        response = self.response = web.StreamResponse(status=200, headers=headers)
        try:
            await response.prepare(self._request)
            while not stop.is_set():
                await response.write(self.COMMENT)
                try:
                    await asyncio.wait_for(stop.wait(), self._interval)
                except TimeoutError:
                    pass
        except (ConnectionResetError, OSError):
            pass  # the client left: the relay finds out on its first write

    def cancel(self) -> None:
        """The request ends some other way (its client left): no beat may follow."""
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> web.StreamResponse | None:
        """End the beats (never mid-write); the client's stream if they began it, else None."""
        self._timer.cancel()
        if self._task is not None and self._stop is not None:
            self._stop.set()
            await asyncio.shield(self._task)
        return self.response


async def end_stream(response: web.StreamResponse, error: SplitstreamError, view: RequestView,
                     record: RequestRecord, grace: float) -> web.StreamResponse:
    """A begun stream (heartbeats) whose request failed before an answer: the endpoint's SSE error event."""
    record.status, record.error = error.status, error.code
    if not await _write_quietly(response, sse_error_event(error, view.endpoint), grace) or \
            not await _write_quietly(response, None, grace):
        record.status = CLIENT_CLOSED
    return response


def runtime_error(conn: UpstreamConnection, body: bytes) -> SplitstreamError:
    """A runtime's non-stream answer to a stream whose client already got heartbeats, as an error to end that
    stream with: its status, and its own message and code when its body says them (the OpenAI shape)."""
    message, code = f"The backend answered HTTP {conn.status} instead of a stream.", "upstream_error"
    try:
        data = orjson.loads(body[:MAX_RUNTIME_ERROR_BYTES])
        inner = data.get("error") if isinstance(data, dict) else None
        if isinstance(inner, dict):
            if isinstance(inner.get("message"), str):
                message = inner["message"][:1024]
            if isinstance(inner.get("code"), str):
                code = inner["code"][:64]
    except orjson.JSONDecodeError:
        pass
    error = SplitstreamError(message)
    error.status, error.code = (conn.status if conn.status != 200 else 502), code
    error.type = "invalid_request_error" if 400 <= conn.status < 500 else "api_error"
    return error


def _may_wait(request: web.Request, data: bytes) -> bool:
    """Whether writing `data` may wait for the client. aiohttp waits only while the transport paused
    writing (its buffer above the high-water mark, 64 KiB); with the buffer empty and a small chunk that
    cannot happen, which is every chunk while the client keeps up."""
    transport = request.transport
    return transport is None or transport.get_write_buffer_size() > 0 or len(data) > SMALL_WRITE_BYTES


def _client_gone(request: web.Request, response: web.StreamResponse, record: RequestRecord) -> web.StreamResponse:
    """A client that stopped reading: drop its connection (what is buffered for it is discarded). A backend
    failure already recorded stays the outcome: the client leaving does not excuse it."""
    if record.error is None:
        record.status = CLIENT_CLOSED
    if request.transport is not None:
        request.transport.abort()
    return response


async def _write_quietly(response: web.StreamResponse, data: bytes | None, timeout: float) -> bool:
    """Write `data` (None: end the response); False when the client left or did not take it in time."""
    try:
        async with asyncio.timeout(timeout):
            if data is None:
                await response.write_eof()
            else:
                await response.write(data)
    except (ConnectionResetError, TimeoutError):
        return False
    return True
