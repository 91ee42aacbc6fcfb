"""The upstream client: keep-alive connections to backends, shared by every request of the process.

(aiohttp `connector.py`.) Owns opening (with the connect timeout), reusing and closing
`UpstreamConnection`s. It does not know about requests, routes or retries: `pipeline/forward.py` borrows
a connection, runs one exchange and gives it back with `release()` — which closes it unless the exchange
ended cleanly. One per app, built by `app.py`; it binds to the event loop when the app starts (`open`).
"""

from __future__ import annotations

import asyncio
from collections import deque

from aiohttp import web

from proxy.config.model import Backend
from proxy.upstream.connection import Endpoint, UpstreamConnection, endpoint_of, open_connection

# Runtimes behind uvicorn (vLLM) close idle keep-alive connections after 5 s; reusing one near that edge
# races the close, so older idle connections are dropped instead of reused.
MAX_IDLE_SECONDS = 4.0
MAX_IDLE_PER_BACKEND = 256


class UpstreamClient:
    """Idle connections per endpoint (host, port, TLS settings), most recently used first (warm sockets, fewer
    stale ones). A TLS connection is reused like a plain one: the handshake is paid once per connection."""

    __slots__ = ("_loop", "_idle", "_closed")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # bound by open()
        self._idle: dict[Endpoint, deque[UpstreamConnection]] = {}
        self._closed = True

    def open(self) -> None:
        """Start serving on the running loop (the app's startup)."""
        self._loop = asyncio.get_running_loop()
        self._closed = False

    async def acquire(self, backend: Backend, connect_timeout: float) -> tuple[UpstreamConnection, bool]:
        """A connection ready for one exchange, and whether it was reused (a reused one may be stale)."""
        idle = self._idle.get(endpoint_of(backend))
        if idle:
            oldest_allowed = self._loop.time() - MAX_IDLE_SECONDS
            while idle:
                conn = idle.pop()
                if not conn.closed and conn.idle_since >= oldest_allowed:
                    return conn, True
                conn.close()
        return await open_connection(self._loop, backend, connect_timeout), False

    def release(self, conn: UpstreamConnection) -> None:
        if self._closed or not conn.is_reusable:
            conn.abort()  # unread or half-sent bytes make the socket useless; abort frees the runtime now
            return
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        if len(idle) >= MAX_IDLE_PER_BACKEND:
            idle.popleft().close()
        conn.reset_for_reuse(self._loop.time())
        idle.append(conn)

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


UPSTREAM = web.AppKey("UPSTREAM", UpstreamClient)
