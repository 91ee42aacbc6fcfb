"""HTTP edge cases of the lean upstream client, against a scripted server on a real socket.

The scripted server answers each request with raw bytes chosen by the test (chunked bodies, Connection:
close, bodies ended by EOF, silent closes, garbage), which no well-behaved runtime would send on demand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.config.model import Backend, Timeouts
from proxy.errors import BackendProtocolError, BackendResetError, BackendTimeoutError
from proxy.observe.metrics import Metrics
from proxy.pipeline.deadlines import Deadlines
from proxy.pipeline.forward import build_request, open_exchange
from proxy.upstream.client import UpstreamClient

# script(connection_index, request_index) -> raw response bytes, or None to close without answering,
# or "hang" to never answer.
Script = Callable[[int, int], bytes | str | None]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request, head and Content-Length body, as the scripted servers of these tests read it."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


class ScriptedServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        n = 0
        try:
            while True:
                self.requests.append(await read_request(reader))
                answer = self.script(index, n)
                n += 1
                if answer is None:
                    break
                if answer == "hang":
                    await asyncio.Event().wait()
                assert isinstance(answer, bytes)
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer or b"Content-Length" not in answer and b"chunked" not in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def backend(self) -> Backend:
        return Backend(name="scripted", url=f"http://127.0.0.1:{self.port}", host="127.0.0.1", port=self.port, base_path="")


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamClient]:
    p = UpstreamClient()
    p.open()
    yield p
    p.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def exchange(pool: UpstreamClient, server: ScriptedServer, timeouts: Timeouts = Timeouts(), stream: bool = False) -> tuple[int, bytes]:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(timeouts, loop.time())
    request = build_request(server.backend(), "/v1/chat/completions", b'{"model":"m"}', "rid-1", stream)
    conn = await open_exchange(pool, server.backend(), request, deadlines, loop.time(), stream, Metrics())
    try:
        body = await conn.read_body(deadlines.total, "total")
        return conn.status, body
    finally:
        pool.release(conn)


async def test_keep_alive_connection_is_reused(pool: UpstreamClient) -> None:
    server = ScriptedServer(lambda c, n: ok(b'{"n":%d}' % n))
    await server.start()
    for n in range(3):
        assert await exchange(pool, server) == (200, b'{"n":%d}' % n)
    assert server.connections == 1


async def test_request_carries_only_our_headers(pool: UpstreamClient) -> None:
    server = ScriptedServer(lambda c, n: ok(b"{}"))
    await server.start()
    await exchange(pool, server)
    head = server.requests[0].split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"post /v1/chat/completions http/1.1")
    assert b"authorization" not in head
    assert b"x-request-id: rid-1" in head
    assert server.requests[0].endswith(b'{"model":"m"}')


async def test_chunked_body_is_decoded(pool: UpstreamClient) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    server = ScriptedServer(lambda c, n: chunked)
    await server.start()
    assert await exchange(pool, server) == (200, b"hello world")
    assert await exchange(pool, server) == (200, b"hello world")
    assert server.connections == 1  # chunked bodies keep the connection reusable


async def test_connection_close_is_not_reused(pool: UpstreamClient) -> None:
    server = ScriptedServer(lambda c, n: ok(b"{}", b"Connection: close\r\n"))
    await server.start()
    await exchange(pool, server)
    await exchange(pool, server)
    assert server.connections == 2


async def test_body_delimited_by_eof(pool: UpstreamClient) -> None:
    server = ScriptedServer(lambda c, n: b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
    await server.start()
    assert await exchange(pool, server) == (200, b"until the end")


async def test_stale_keep_alive_connection_is_retried_once(pool: UpstreamClient) -> None:
    # Connection 0 answers once, then closes when the second request arrives (the keep-alive race).
    server = ScriptedServer(lambda c, n: None if (c, n) == (0, 1) else ok(b'{"c":%d}' % c))
    await server.start()
    assert await exchange(pool, server) == (200, b'{"c":0}')
    assert await exchange(pool, server) == (200, b'{"c":1}')
    assert server.connections == 2


async def test_fresh_connection_closed_without_answer_is_an_error(pool: UpstreamClient) -> None:
    server = ScriptedServer(lambda c, n: None)
    await server.start()
    with pytest.raises(BackendResetError):
        await exchange(pool, server)
    assert server.connections == 1  # a fresh connection is not retried: the runtime may have seen it


async def test_invalid_http_is_a_protocol_error(pool: UpstreamClient) -> None:
    server = ScriptedServer(lambda c, n: b"SMTP ready\r\n\r\n")
    await server.start()
    with pytest.raises(BackendProtocolError):
        await exchange(pool, server)


async def test_silent_backend_times_out(pool: UpstreamClient) -> None:
    server = ScriptedServer(lambda c, n: "hang")
    await server.start()
    with pytest.raises(BackendTimeoutError):
        await exchange(pool, server, Timeouts(total=0.2))


async def test_body_cut_short_is_a_reset(pool: UpstreamClient) -> None:
    server = ScriptedServer(lambda c, n: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly this")
    await server.start()
    with pytest.raises(BackendResetError):
        await exchange(pool, server)
