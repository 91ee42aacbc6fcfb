"""One keep-alive HTTP/1.1 connection to a backend: request bytes out, response head and body chunks in.

An asyncio Protocol fed by the llhttp parser (httptools), so a response costs a few callbacks instead of
aiohttp's client machinery; over TCP, or TLS for https:// backends (asyncio's TLS transport underneath, the
context from `upstream/tls.py`). It only speaks HTTP: reuse, retries and most error wording belong to
`upstream/client.py` and `pipeline/forward.py`. Every wait takes an absolute deadline (loop time) and
raises `BackendTimeoutError` when it passes, so timeouts cost one timer and no task cancellation.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

import httptools

from proxy.config.model import Backend, Tls
from proxy.errors import (
    BackendBodyTooLargeError,
    BackendConnectError,
    BackendProtocolError,
    BackendResetError,
    BackendTimeoutError,
    BackendTlsError,
)
from proxy.upstream.tls import context_for

# Above this many unread body bytes we stop reading the socket until the client side catches up:
# a slow client then slows the runtime's socket instead of growing our memory.
HIGH_WATER_BYTES = 256 * 1024
LOW_WATER_BYTES = 64 * 1024
# A response head (status line and headers) longer than this, or with more headers, is a protocol error:
# nothing a runtime sends may grow our memory before we know what it is (nginx: 8-32 KiB, Envoy: 60 KiB).
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100

Headers = list[tuple[bytes, bytes]]
# Where a connection goes. Connections to the same endpoint are interchangeable; TLS and plain ones to the same
# address, or TLS ones verified differently, are not.
Endpoint = tuple[str, int, Tls | None]


def endpoint_of(backend: Backend) -> Endpoint:
    return (backend.host, backend.port, backend.tls)


class UpstreamConnection(asyncio.Protocol):
    """A connection that carries one exchange at a time; `client.py` decides when it is reused."""

    __slots__ = (
        "_loop", "_transport", "_parser", "_waiter", "_chunks", "_buffered", "_paused",
        "_exc", "_has_length", "_keep_alive", "_busy", "_head_bytes", "status", "headers", "head_done",
        "message_done", "ended_by_eof", "closed", "received_any", "idle_since", "key",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Endpoint) -> None:
        self._loop = loop
        self.key = key
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._exc: Exception | None = None
        self._has_length = False
        self._keep_alive = False
        self._busy = False  # an exchange is under way: bytes are expected
        self._head_bytes = 0
        self.status = 0
        self.headers: Headers = []
        self.head_done = False
        self.message_done = False
        self.ended_by_eof = False  # the body had no length and ended when the runtime closed the connection
        self.closed = False
        self.received_any = False
        self.idle_since = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self._busy or self.message_done:
            # Bytes nobody asked for (on an idle connection, or after the answer ended) could be taken for
            # the next request's answer: the connection can never be trusted again.
            self.abort()
            return
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BackendProtocolError("backend switched protocols"))
            self.abort()
            return
        except httptools.HttpParserError as exc:
            if self.message_done and isinstance(exc.__context__, _SecondResponse):
                self.abort()  # bytes after the answer: drop the connection, not the answer
                return
            self._fail(BackendProtocolError(f"backend sent invalid HTTP: {exc}"))
            self.abort()
            return
        if not self.head_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(BackendProtocolError(f"backend response head larger than {MAX_HEAD_BYTES} bytes"))
                self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and not self.message_done and not self._has_length:
            # Body delimited by connection close (no Content-Length, not chunked): EOF is its end, or a cut
            # we cannot tell from one; the relay checks what it can (a stream's `[DONE]`).
            self.message_done = True
            self.ended_by_eof = True
            self._wake()
        elif not self.message_done and (self.head_done or self._waiter is not None):
            self._fail(BackendResetError("backend closed the connection before the response was complete"))
        self._wake()

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.message_done:  # a second answer in the same read: never let it pass for the next request's
            raise _SecondResponse  # stops the parser; the answer already complete stays good to read

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= MAX_HEADERS:
            self._refuse(BackendProtocolError(f"backend sent more than {MAX_HEADERS} response headers"))
        self.headers.append((name, value))
        lname = name.lower()
        if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
            self._has_length = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = []  # interim (100 Continue, 103 Early Hints): the real answer follows
            return
        self.status = status
        self._keep_alive = self._parser.should_keep_alive()  # only meaningful before the message ends
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER_BYTES and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.head_done:  # the end of an interim response
            return
        self.message_done = True
        self._wake()

    # -- exchange API (used by pipeline/forward.py and upstream/probe.py) ------------------------------

    def start(self, data: bytes) -> None:
        """Write a whole request (head and body in one buffer: one syscall)."""
        assert self._transport is not None
        self._busy = True
        self._transport.write(data)

    async def read_head(self, deadline: float | None, phase: str) -> None:
        while not self.head_done:
            await self._wait(deadline, phase)

    async def read_chunk(self, deadline: float | None, phase: str) -> bytes | None:
        """Next body bytes as they arrived (chunked framing already removed), or None at the end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < LOW_WATER_BYTES and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
                return chunk
            if self.message_done:
                return None
            await self._wait(deadline, phase)

    async def read_body(self, deadline: float | None, phase: str, limit: int | None = None) -> bytes:
        """The whole body; more than `limit` bytes raises `BackendBodyTooLargeError` (nothing is kept)."""
        parts = []
        size = 0
        while (chunk := await self.read_chunk(deadline, phase)) is not None:
            size += len(chunk)
            if limit is not None and size > limit:
                error = BackendBodyTooLargeError(f"backend answer larger than {limit} bytes")
                self._fail(error)
                self.abort()  # the rest is never read: the connection cannot be reused
                raise error
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @property
    def is_reusable(self) -> bool:
        """True when the exchange ended cleanly and both sides agreed to keep the connection."""
        return (
            self.message_done
            and not self.closed
            and self._exc is None
            and not self._chunks
            and self._keep_alive
        )

    def reset_for_reuse(self, now: float) -> None:
        self.status = 0
        self.headers = []
        self.head_done = False
        self.message_done = False
        self.ended_by_eof = False
        self.received_any = False
        self._has_length = False
        self._busy = False
        self._head_bytes = 0
        self.idle_since = now

    def abort(self) -> None:
        """Drop the connection at once: the runtime sees the disconnect and frees its slot."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # -- internals -------------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        if self._exc is None:
            self._exc = exc
        self._wake()

    def _refuse(self, exc: BackendProtocolError) -> None:
        """Stop the parser from a callback: httptools wraps what we raise, so the error is kept first."""
        self._fail(exc)
        raise exc

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, deadline: float | None, phase: str) -> None:
        if self._exc is not None:
            raise self._exc
        if self.closed:
            raise BackendResetError("backend closed the connection")
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = None
        if deadline is not None:
            timer = self._loop.call_at(deadline, _expire, waiter, phase)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._exc is not None:
            raise self._exc


class _SecondResponse(Exception):
    """Raised from the parser's callback when a second response begins after the answer we asked for."""


def _expire(waiter: asyncio.Future[None], phase: str) -> None:
    if not waiter.done():
        waiter.set_exception(BackendTimeoutError(f"backend did not answer within the {phase} timeout"))


async def open_connection(
    loop: asyncio.AbstractEventLoop, backend: Backend, connect_timeout: float
) -> UpstreamConnection:
    """A new connection to the backend, TLS for an https:// one (the handshake within `connect_timeout` too),
    with failures already in our error tree, so the pool and the health probes open sockets (and word their
    errors) the same way."""
    host, port, tls = endpoint = endpoint_of(backend)
    context = _context(backend)
    server_hostname = (tls.server_name or host) if tls is not None else None
    try:
        async with asyncio.timeout(connect_timeout):
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(loop, endpoint), host, port, ssl=context,
                server_hostname=server_hostname, ssl_handshake_timeout=None if context is None else connect_timeout,
            )
    except TimeoutError as exc:
        raise BackendTimeoutError(f"connecting to {host}:{port} timed out") from exc
    except ssl.SSLError as exc:  # before OSError, its base: a handshake that failed, not a refused connection
        raise BackendTlsError(_tls_failure(exc, backend.name, host, port)) from exc
    except OSError as exc:
        raise BackendConnectError(f"cannot connect to backend {host}:{port}: {exc.strerror or exc}") from exc
    return conn  # asyncio and uvloop set TCP_NODELAY on TCP transports already


def _context(backend: Backend) -> ssl.SSLContext | None:
    tls = backend.tls
    if tls is None:
        return None
    try:
        return context_for(tls)
    except OSError as exc:  # the ca_file loaded with the rules, but was removed or broken since
        raise BackendTlsError(f"TLS setup for backend {backend.name!r} failed: tls.ca_file {tls.ca_file!r} "
                              f"cannot be used: {exc}") from exc


def _tls_failure(exc: ssl.SSLError, name: str, host: str, port: int) -> str:
    """The handshake failure in words, without OpenSSL's source location (`(_ssl.c:1006)`)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS verification of backend {name!r} ({host}:{port}) failed: certificate verify failed: "
                f"{exc.verify_message}")
    why = exc.reason.lower().replace("_", " ") if exc.reason else str(exc)
    return f"TLS handshake with backend {name!r} ({host}:{port}) failed: {why}"
