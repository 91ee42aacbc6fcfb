"""`proxy.upstream.probe` against real loopback servers: `http_get` over the project's own HTTP/1.1
connection, `is_reachable`'s fallback, and a runtime-metrics read cut at its size limit.

Uses pytest-aiohttp's `aiohttp_server` (and one raw asyncio server for bytes no aiohttp server would
send). Servers that must stall wait on an event the test sets afterwards, never on a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config.model import Backend
from proxy.upstream import probe
from proxy.upstream.probe import http_get, is_reachable, read_runtime_load
from tests.unit.test_probe import VLLM_METRICS

ServerFactory = Callable[..., Awaitable[TestServer]]


def backend(port: int, kind: str = "vllm", base_path: str = "", api_key: str | None = None) -> Backend:
    return Backend(name="b", url=f"http://127.0.0.1:{port}{base_path}", host="127.0.0.1", port=port,
                   base_path=base_path, kind=kind, api_key=api_key)




async def test_http_get_reads_a_content_length_body(aiohttp_server: ServerFactory) -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Authorization"), request.headers.get("Connection")))
        return web.Response(status=503, body=b"loading")

    app = web.Application()
    app.router.add_get("/prefix/health", handler)
    server = await aiohttp_server(app)
    result = await http_get(backend(server.port, base_path="/prefix", api_key="k"), "/health", 1.0)
    assert result == (503, b"loading")
    assert seen == [("/prefix/health", "Bearer k", "close")]


async def test_http_get_removes_chunked_framing(aiohttp_server: ServerFactory) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"first ", b"second ", b"third"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/metrics", handler)
    server = await aiohttp_server(app)
    assert await http_get(backend(server.port), "/metrics", 1.0) == (200, b"first second third")


async def test_http_get_stops_reading_at_max_bytes(aiohttp_server: ServerFactory) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"x" * 3000)
        await resp.write(b"y" * 3000)
        await release.wait()  # the body never ends: only stopping at max_bytes returns in time
        return resp

    app = web.Application()
    app.router.add_get("/big", handler)
    server = await aiohttp_server(app)
    try:
        status, body = await http_get(backend(server.port), "/big", 2.0, max_bytes=4000)
    finally:
        release.set()
    assert status == 200 and body == b"x" * 3000 + b"y" * 1000


async def test_http_get_on_a_closed_port(aiohttp_server: ServerFactory) -> None:
    server = await aiohttp_server(web.Application())
    port = server.port
    await server.close()
    assert await http_get(backend(port), "/health", 1.0) == (0, b"")


async def test_http_get_gives_up_on_a_silent_server(aiohttp_server: ServerFactory) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/health", handler)
    server = await aiohttp_server(app)
    try:
        assert await http_get(backend(server.port), "/health", 0.2) == (0, b"")
    finally:
        release.set()


@pytest.mark.parametrize(
    "answer",
    [b"this is not HTTP\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", b""],
    ids=["garbage", "cut-body", "silent-close"],
)
async def test_http_get_on_a_broken_exchange(answer: bytes) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        assert await http_get(backend(port), "/health", 1.0) == (0, b"")


# --------------------------------------------------------------------------- probe and load reading


async def test_is_reachable_falls_back_to_v1_models_on_404(aiohttp_server: ServerFactory) -> None:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    server = await aiohttp_server(app)
    assert await is_reachable(backend(server.port, kind="vllm"), 1.0)
    await server.close()
    assert not await is_reachable(backend(server.port, kind="vllm"), 1.0)


async def test_read_runtime_load_drops_the_line_cut_by_max_bytes(
    aiohttp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = 'vllm:num_requests_waiting{model="m"} 3 1700000000000\nvllm:num_requests_running{model="m"} 2\n'

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    load = await read_runtime_load(backend(server.port), 1.0)
    assert load is not None and (load.waiting, load.running) == (3.0, 2.0)
    monkeypatch.setattr(probe, "MAX_METRICS_BYTES", len(text) - 5)  # cuts into the second sample
    load = await read_runtime_load(backend(server.port), 1.0)
    assert load is not None and (load.waiting, load.running) == (3.0, 0.0)
