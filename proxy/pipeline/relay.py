"""Relay: the runtime's answer to the client, chunk by chunk for streams, whole for JSON bodies.

A stream's response head goes out together with its first chunk, so until the first token arrives an
error can still be a proper JSON error (and, later, a fail-over). After that a failure ends the stream
with an SSE `error` event — never a silent truncation. Records TTFT, bytes and token usage as it goes.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from proxy.errors import UpstreamError, sse_error_event
from proxy.observe.metrics import Metrics
from proxy.observe.record import CLIENT_CLOSED, RequestRecord
from proxy.pipeline.deadlines import Deadlines
from proxy.pipeline.headers import response_headers
from proxy.pipeline.request import RequestView
from proxy.pipeline.sse import SseRelay, find_usage_object
from proxy.upstream.connection import UpstreamConnection


def relay_body(conn: UpstreamConnection, body: bytes, record: RequestRecord) -> web.Response:
    """A whole (non-stream) answer, already read: the same bytes, with our headers."""
    if conn.status == 200:
        usage = find_usage_object(body)
        if usage is not None:
            record.prompt_tokens, record.completion_tokens = usage
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
    max_event_bytes: int = 1024 * 1024,
) -> web.StreamResponse:
    """An SSE answer, relayed as it arrives; the usage chunk is kept or stripped as the client asked.

    `first_chunk` was read by dispatch (a stream commits with it). The caller gives the connection back to
    the pool afterwards (which aborts it unless it ended cleanly). `tee`, when given (mirrored or cached
    requests only), is called with every upstream chunk as it arrives.
    """
    sse = SseRelay(strip_usage=not view.wants_usage)
    chunk = first_chunk
    record.ttft = clock() - record.started
    response = web.StreamResponse(status=conn.status, headers=response_headers(conn.headers, record))
    await response.prepare(request)
    try:
        while chunk is not None:
            if tee is not None:
                tee(chunk)
            out = sse.feed(chunk)
            if out:
                await response.write(out)
                record.bytes_out += len(out)
            chunk = await conn.read_chunk(deadlines.idle(clock()), "idle")
        tail = sse.finish()
        if tail:
            await response.write(tail)
            record.bytes_out += len(tail)
    except UpstreamError as exc:
        metrics.count_upstream_error(record.backend, exc)
        record.status, record.error = exc.status, exc.code
        await _write_quietly(response, sse_error_event(exc))
    except ConnectionResetError:
        record.status = CLIENT_CLOSED  # the client is gone; the caller aborts the upstream connection
        return response
    if sse.usage is not None:
        record.prompt_tokens, record.completion_tokens = sse.usage
    await _write_eof_quietly(response)
    return response


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionResetError:
        pass  # client left while we were reporting the upstream failure; nothing more to tell it


async def _write_eof_quietly(response: web.StreamResponse) -> None:
    try:
        await response.write_eof()
    except ConnectionResetError:
        pass
