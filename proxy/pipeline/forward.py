"""Forward: send the upstream request on a pooled connection and wait for the runtime's answer to begin.

Owns the upstream request bytes (client keys never go out: the backend's own key or none; of the client's
headers only trace context and a route's allow-list do), the retry of
a stale keep-alive connection, and turning runtime 5xx answers into our errors. Called by
`pipeline/dispatch.py` only, for client requests and shadow copies alike.
Everything here happens before a byte reaches the client; relaying the body is `pipeline/relay.py`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from proxy.config.model import Backend
from proxy.errors import BackendResetError, BackendStatusError, UpstreamError
from proxy.observe.metrics import Metrics
from proxy.pipeline.deadlines import Deadlines
from proxy.upstream.client import UpstreamClient
from proxy.upstream.connection import UpstreamConnection

# A runtime's error body is read to free the connection; it is not relayed, so it is not read forever.
MAX_ERROR_BODY_BYTES = 64 * 1024
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")  # W3C trace context, always passed on
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")  # the Messages API's protocol version and features
MAX_PASSED_VALUE = 8192
TRACEPARENT = re.compile(r"(traceparent: [0-9a-f]{2}-[0-9a-f]{32}-)[0-9a-f]{16}(-[0-9a-f]{2})")


def passed_headers(headers: Mapping[str, str], allowed: tuple[str, ...], endpoint: str,
                   trace: str | None = None) -> str:
    """The client's header lines a runtime gets (computed once per request): W3C trace context, Anthropic's
    protocol headers on the Messages endpoint, and the route's `headers.forward` allow-list (the loader
    refuses credentials and hop-by-hop names there). Values as sent — aiohttp refused CR/LF — if printable
    and at most MAX_PASSED_VALUE long; a header the client sent twice passes its first value. `trace`: the
    proxy's own span's trace lines (tracing on), sent instead of the client's traceparent and tracestate."""
    names = TRACE_HEADERS if trace is None else ("baggage",)
    if allowed or endpoint == "messages":
        names = (*names, *ANTHROPIC_HEADERS, *allowed) if endpoint == "messages" else (*names, *allowed)
    lines = [trace] if trace is not None else []
    for name in names:
        value = headers.get(name)
        if value is not None and len(value) <= MAX_PASSED_VALUE and value.isascii() and value.isprintable():
            lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


def for_copy(passed: str) -> str:
    """`passed` for a shadow copy: the same trace, a new span id in `traceparent` (the copy is a sibling of
    the primary's call, not the same one)."""
    if "traceparent:" not in passed:
        return passed
    return TRACEPARENT.sub(lambda m: f"{m.group(1)}{os.urandom(8).hex()}{m.group(2)}", passed, count=1)


def build_request(backend: Backend, path: str, body: bytes, request_id: str, stream: bool, passed: str = "",
                  api_key_header: bool = False) -> bytes:
    """Request head and body in one buffer. Only these headers go upstream: none of the client's but those in
    `passed` (`passed_headers`). The backend's own key goes as a Bearer token, and also as `x-api-key` where
    the API expects it there (`api_key_header`: the Messages endpoint)."""
    auth = ""
    if backend.api_key:
        auth = f"Authorization: Bearer {backend.api_key}\r\n"
        if api_key_header:
            auth += f"x-api-key: {backend.api_key}\r\n"
    accept = "text/event-stream" if stream else "application/json"
    head = (
        f"POST {backend.base_path}{path} HTTP/1.1\r\n"
        f"Host: {backend.authority}\r\n"
        f"Content-Type: application/json\r\n"
        f"Accept: {accept}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-Id: {request_id}\r\n"
        f"{passed}{auth}\r\n"
    )
    return head.encode("latin-1") + body


async def open_exchange(
    client: UpstreamClient,
    backend: Backend,
    request_bytes: bytes,
    deadlines: Deadlines,
    now: float,
    stream: bool,
    metrics: Metrics,
) -> UpstreamConnection:
    """A connection whose response head has arrived with a status below 500.

    A reused keep-alive connection that the runtime closed before answering is retried once on a new
    connection (the close raced our request). Runtime 5xx answers raise `BackendStatusError`.
    """
    try:
        conn = await _exchange(client, backend, request_bytes, deadlines, now, stream)
    except UpstreamError as exc:
        metrics.count_upstream_error(backend.name, exc)
        raise
    if conn.status >= 500:
        status = conn.status
        await _discard_body(conn, deadlines)
        client.release(conn)
        error = BackendStatusError(f"The backend '{backend.name}' answered HTTP {status}.")
        metrics.count_upstream_error(backend.name, error)
        raise error
    return conn


async def _exchange(
    client: UpstreamClient, backend: Backend, request_bytes: bytes, deadlines: Deadlines, now: float, stream: bool
) -> UpstreamConnection:
    head_deadline = deadlines.first_token(now) if stream else deadlines.total
    phase = "first_token" if stream else "total"
    for attempt in (0, 1):
        conn, reused = await client.acquire(backend, deadlines.connect(now))
        done = False
        try:
            conn.start(request_bytes)
            await conn.read_head(head_deadline, phase)
            done = True
            return conn
        except BackendResetError:
            if reused and not conn.received_any and attempt == 0:
                continue  # stale keep-alive connection: the runtime never saw this request
            raise
        finally:
            if not done:
                conn.abort()
    raise AssertionError("unreachable")


async def _discard_body(conn: UpstreamConnection, deadlines: Deadlines) -> None:
    """Read a small error body so the connection can be reused; give up on anything else."""
    read = 0
    try:
        while read <= MAX_ERROR_BODY_BYTES:
            chunk = await conn.read_chunk(deadlines.total, "total")
            if chunk is None:
                return
            read += len(chunk)
    except UpstreamError:
        pass  # the status already says the backend failed; client.release drops this connection
    conn.abort()
