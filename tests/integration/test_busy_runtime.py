"""A busy runtime is not a dead one (issue 15 item 13), against a real splitstream process.

llama.cpp's real server on a loaded box answered /health later than the probe's timeout during a burst; that
one failed probe ejected the pool's only backend and the next requests got 503 "No healthy backend". Here a
small runtime answers chat completions at once while its /health hangs (awaits an event nobody sets) or
says 503. The real health checker's probes are waited for by counting the /health requests the runtime
received, and its verdicts read from /metrics, polled with a bound: never a sleep, never a timing threshold.
(Health rounds are no count of probes: a round may find no probe due.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.model import Backend
from proxy.upstream.probe import Probe, probe
from tests.conftest import backend_url
from tests.integration.conftest import Served, ServedFactory

ServerFactory = Callable[..., Awaitable[TestServer]]
MESSAGES = [{"role": "user", "content": "hi"}]
POLL_LIMIT = 60.0  # seconds: a bound on waiting for probe rounds, not a measure of anything
HANGS = 0  # a /health status meaning: never answer
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value


class Runtime:
    """Chat completions answered at once; /health hangs (HANGS) or answers `health_status`."""

    def __init__(self, health_status: int) -> None:
        self.health_status = health_status
        self.never = asyncio.Event()  # nobody sets it: a hanging /health outlives every probe timeout
        self.chats = 0
        self.probes = 0

    async def health(self, request: web.Request) -> web.Response:
        self.probes += 1
        if self.health_status == HANGS:
            await self.never.wait()  # cancelled when the probe gives up and drops the connection
        return web.Response(status=self.health_status)

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.chats += 1
        return web.json_response({
            "id": f"chatcmpl-{self.chats}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app


async def runtimes(aiohttp_server: ServerFactory, health_status: int, n: int) -> list[tuple[Runtime, TestServer]]:
    out = []
    for _ in range(n):
        runtime = Runtime(health_status)
        out.append((runtime, await aiohttp_server(runtime.app())))
    return out


def rules(servers: list[TestServer], health: str) -> str:
    """One route onto a llama.cpp pool of `servers` (b0, b1, ...)."""
    backends = "\n".join(f'  b{i}: {{url: "{backend_url(s)}", kind: llamacpp}}' for i, s in enumerate(servers))
    names = ", ".join(f"b{i}" for i in range(len(servers)))
    return f"""
health: {health}
backends:
{backends}
pools:
  main-pool: {{backends: [{names}], model: "m"}}
routes:
  - {{name: main, match: {{model: "my-model"}}, pool: main-pool}}
"""


async def chat(session: aiohttp.ClientSession, s: Served) -> int:
    async with session.post(s.url("/v1/chat/completions"), json={"model": "my-model", "messages": MESSAGES}) as r:
        await r.read()
        return r.status


async def metrics(session: aiohttp.ClientSession, s: Served) -> Samples:
    """The process's /metrics as {(sample name, sorted labels): value}."""
    async with session.get(s.url("/metrics")) as r:
        assert r.status == 200
        text = await r.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def healthy(m: Samples, backend: str) -> float:
    return float(m[("splitstream_upstream_healthy", (("backend", backend),))])


def panics(m: Samples, pool: str = "main-pool") -> float:
    return float(m.get(("splitstream_upstream_panic_total", (("pool", pool),)), 0.0))


async def test_a_backend_that_serves_while_its_health_hangs_stays_healthy(
    aiohttp_server: ServerFactory, served: ServedFactory
) -> None:
    [(runtime, server)] = await runtimes(aiohttp_server, HANGS, 1)
    # Every probe times out; with failures: 3, three misses in a row would eject the pool's only backend.
    s = await served(rules([server], "{interval: 200ms, unhealthy_interval: 200ms, timeout: 200ms, failures: 3}"))
    async with aiohttp.ClientSession() as session, asyncio.timeout(POLL_LIMIT):
        while runtime.probes < 11:  # traffic through ten probes that timed out (the 11th is under way)
            assert await chat(session, s) == 200
            m = await metrics(session, s)
            assert healthy(m, "b0") == 1.0, s.log[-2000:]
        assert panics(m) == 0.0  # served as a healthy backend, not by panic routing
    assert runtime.chats > 0
    assert "backend b0 is unhealthy" not in s.log


async def test_the_only_backend_ejected_on_probe_timeouts_alone_is_still_served(
    aiohttp_server: ServerFactory, served: ServedFactory
) -> None:
    # No traffic while /health hangs: nothing vouches for the backend, the probes eject it...
    [(runtime, server)] = await runtimes(aiohttp_server, HANGS, 1)
    s = await served(rules([server], "{interval: 100ms, unhealthy_interval: 100ms, timeout: 100ms, failures: 2}"))
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(POLL_LIMIT):
            while healthy(await metrics(session, s), "b0") != 0.0:
                pass
        # ...yet a pool is never ejected into a total outage on probe evidence alone: it routes in panic.
        assert [await chat(session, s) for _ in range(3)] == [200, 200, 200]
        assert panics(await metrics(session, s)) == 3.0
    assert runtime.chats == 3


async def test_a_pool_whose_every_health_check_fails_still_serves_in_panic(
    aiohttp_server: ServerFactory, served: ServedFactory
) -> None:
    pair = await runtimes(aiohttp_server, 503, 2)
    s = await served(rules([server for _, server in pair],
                           "{interval: 100ms, unhealthy_interval: 100ms, failures: 2}"))
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(POLL_LIMIT):
            m = await metrics(session, s)
            while (healthy(m, "b0"), healthy(m, "b1")) != (0.0, 0.0):
                m = await metrics(session, s)
        assert panics(m) == 0.0  # no request yet
        assert [await chat(session, s) for _ in range(4)] == [200] * 4
        m = await metrics(session, s)
        assert panics(m) == 4.0
        assert (healthy(m, "b0"), healthy(m, "b1")) == (0.0, 0.0)  # served, and still out on the probes' word
    assert sum(runtime.chats for runtime, _ in pair) == 4
    assert "backend b0 is unhealthy (probe)" in s.log and "backend b1 is unhealthy (probe)" in s.log


async def test_a_probe_tells_a_timeout_from_a_failure(aiohttp_server: ServerFactory) -> None:
    """What the policy above rests on: a hanging /health is TIMED_OUT; a 503 or a refused connection FAILED."""

    async def llamacpp(health_status: int) -> Backend:
        [(_, server)] = await runtimes(aiohttp_server, health_status, 1)
        assert server.port is not None
        return Backend("b", backend_url(server), "127.0.0.1", server.port, "", kind="llamacpp")

    hanging, loading, up = await llamacpp(HANGS), await llamacpp(503), await llamacpp(200)
    closed = await aiohttp_server(web.Application())
    port = closed.port
    assert port is not None
    await closed.close()  # nothing listens on the port any more: refused
    gone = Backend("b", f"http://127.0.0.1:{port}", "127.0.0.1", port, "", kind="llamacpp")
    assert await probe(hanging, 0.2) is Probe.TIMED_OUT
    assert await probe(loading, 0.2) is Probe.FAILED
    assert await probe(gone, 0.2) is Probe.FAILED
    assert await probe(up, 0.2) is Probe.OK
