"""Balancing, health and fail-over against real simulated runtimes (the `proxy` fixture checks that every
backend's in-flight count and predicted load are back to zero after each test)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import aiohttp
import openai
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.upstream.state import PRIOR_DECODE_TPS
from tests.conftest import FakeClock, Gate, backend_url
from tests.integration.conftest import ThrottlerFactory

MESSAGES = [{"role": "user", "content": "hello"}]
FAST_HEALTH = "health: {interval: 50ms, unhealthy_interval: 20ms, failures: 2, ejection: 100ms, max_ejection: 1s}"


def two_backend_rules(a: TestServer, b: TestServer, *, top: str = "", route: str = "", balance: str = "least_cost") -> str:
    return f"""
{top}
backends:
  a: {{url: "{backend_url(a)}", kind: vllm}}
  b: {{url: "{backend_url(b)}", kind: vllm}}
pools:
  both: {{backends: [a, b], model: "sim-model"}}
routes:
  - name: main
    match: {{model: "my-model"}}
    pool: both
    balance: {balance}
{route}
"""


async def chat(client: openai.AsyncOpenAI, **kwargs: Any) -> Any:
    return await client.chat.completions.with_raw_response.create(model="my-model", messages=MESSAGES, **kwargs)


async def wait_until(handle: Any, predicate: Any, rounds: int = 200) -> None:
    """Await health-check rounds until `predicate()` holds (no sleeps; bounded)."""
    for _ in range(rounds):
        if predicate():
            return
        await handle.health.wait_round()
    raise AssertionError("condition not reached after health rounds")


async def test_dead_backend_costs_clients_nothing(sim: Any, proxy: Any) -> None:
    runtime_a, a = await sim()
    runtime_b, b = await sim()
    handle = await proxy(two_backend_rules(a, b, top="health: {interval: 10m}", balance="round_robin"))
    await handle.health.wait_round()
    await a.close()  # dies between probes: clients must not notice
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)
    answers = await asyncio.gather(*(chat(client, max_tokens=2) for _ in range(20)))
    assert all(r.http_response.status_code == 200 for r in answers)
    assert {r.headers["x-splitstream-backend"] for r in answers} == {"b"}
    assert runtime_b.stats.completed == 20
    state_a = next(s for s in handle.backends if s.backend.name == "a")
    assert not state_a.is_available(asyncio.get_running_loop().time())  # ejected after its failures


async def test_failing_backend_is_ejected_then_readmitted(sim: Any, proxy: Any) -> None:
    runtime_a, a = await sim(fail_rate=1.0)
    runtime_b, b = await sim()
    clock = FakeClock()  # the 100 ms ejection lasts until the test moves the clock, on any machine
    handle = await proxy(two_backend_rules(a, b, top=FAST_HEALTH, balance="round_robin"), backend_clock=clock)
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)
    for _ in range(6):
        response = await chat(client, max_tokens=2)
        assert response.http_response.status_code == 200  # a's 500s fail over to b
    assert runtime_a.stats.failed == 2  # ejected after `failures: 2`, then skipped
    state_a = next(s for s in handle.backends if s.backend.name == "a")
    assert state_a.ejections_total == 1
    runtime_a.config = dataclasses.replace(runtime_a.config, fail_rate=0.0)  # a recovers
    clock.advance(0.2)  # past its ejection: the next probe may re-admit it
    await wait_until(handle, lambda: state_a.is_available(clock()))
    backends = {(await chat(client, max_tokens=2)).headers["x-splitstream-backend"] for _ in range(4)}
    assert backends == {"a", "b"}
    async with aiohttp.ClientSession() as session, session.get(handle.url("/metrics")) as r:
        text = await r.text()
    assert 'splitstream_upstream_errors_total{backend="a",reason="status_5xx"} 2.0' in text
    assert 'splitstream_upstream_healthy{backend="a"} 1.0' in text


async def test_stream_broken_after_first_byte_is_not_retried(sim: Any, proxy: Any) -> None:
    runtime_a, a = await sim(stream_fail_rate=1.0)
    runtime_b, b = await sim()
    handle = await proxy(two_backend_rules(a, b, balance="round_robin"))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)
    stream = await client.chat.completions.create(model="my-model", messages=MESSAGES, stream=True, max_tokens=8)
    received = 0
    try:
        async for _ in stream:
            received += 1
    except openai.APIError as exc:
        assert exc.body["code"] == "backend_reset"  # type: ignore[index]
    else:
        raise AssertionError("the cut stream ended without an error event")
    assert received > 0 and runtime_a.stats.cut == 1
    assert runtime_b.stats.requests == 0  # bytes had gone out: no silent switch to another backend


async def test_first_token_timeout_fails_over_before_any_byte(sim: Any, proxy: Any) -> None:
    stuck = Gate()  # a never emits a token
    runtime_a, a = await sim(pacer=stuck)
    runtime_b, b = await sim()
    handle = await proxy(two_backend_rules(a, b, balance="round_robin", route="    timeouts: {first_token: 200ms}"))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)
    stream = await client.chat.completions.create(model="my-model", messages=MESSAGES, stream=True, max_tokens=3)
    chunks = [c async for c in stream]
    assert len(chunks) == 3
    await asyncio.wait_for(runtime_a.cancelled_event.wait(), 30)  # a's slot was given back


async def test_runtime_429_is_honoured_and_failed_over(sim: Any, proxy: Any, throttler: ThrottlerFactory) -> None:
    a, hits = await throttler(retry_after="60")
    runtime_b, b = await sim()
    handle = await proxy(two_backend_rules(a, b, balance="round_robin"))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)
    for _ in range(4):
        assert (await chat(client, max_tokens=2)).headers["x-splitstream-backend"] == "b"
    assert hits == ["/v1/chat/completions"]  # asked once, then left alone for its Retry-After


async def test_all_backends_throttling_gives_429_with_retry_after(proxy: Any, throttler: ThrottlerFactory) -> None:
    a, _ = await throttler(retry_after="7")
    handle = await proxy(f"""
backends:
  a: {{url: "{backend_url(a)}", kind: vllm}}
pools:
  p: {{backends: [a], model: "sim-model"}}
routes:
  - {{name: main, match: {{model: "my-model"}}, pool: p}}
""")
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/chat/completions"), json={"model": "my-model", "messages": MESSAGES}) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "7"
            assert (await r.json())["error"]["code"] == "backend_rate_limited"


async def test_speeds_are_learned_from_real_traffic(sim: Any, proxy: Any) -> None:
    runtime, server = await sim(tokens_per_second=2000.0)
    handle = await proxy(two_backend_rules(server, server).replace("both: {backends: [a, b]", "both: {backends: [a]"))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)
    for _ in range(5):
        stream = await client.chat.completions.create(model="my-model", messages=MESSAGES, stream=True, max_tokens=20)
        [c async for c in stream]
    state = next(s for s in handle.backends if s.backend.name == "a")
    assert state.completed == 5
    assert state.decode_tps > PRIOR_DECODE_TPS  # a 2,000 tok/s runtime is faster than the prior guess
    stats = handle.dispatcher.model_stats["both"]  # learned per pool
    assert stats.completion_tokens < 256 and stats.samples == 5


async def test_runtime_load_is_read_from_runtime_metrics(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime_a, a = await sim(pacer=gate)
    runtime_b, b = await sim()
    handle = await proxy(two_backend_rules(a, b, top=FAST_HEALTH, route="    runtime_load: true")
                         .replace("both: {backends: [a, b]", "both: {backends: [a]"))
    body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 2}
    async with aiohttp.ClientSession() as session:
        held = [asyncio.ensure_future(session.post(handle.url("/v1/chat/completions"), json=body)) for _ in range(3)]
        await gate.wait_reached(0)
        state = next(s for s in handle.backends if s.backend.name == "a")
        await wait_until(handle, lambda: state.runtime_running == 3)
        assert state.runtime_waiting == 0
        gate.open_all()
        for response in await asyncio.gather(*held):
            assert response.status == 200
            response.release()


async def test_loading_llamacpp_backend_is_not_ready(proxy: Any, aiohttp_server: Any) -> None:
    async def loading(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": 503, "message": "Loading model"}}, status=503)

    app = web.Application()
    app.router.add_get("/health", loading)
    server = await aiohttp_server(app)
    # One 503 probe ejects (failures: 1), and no panic routing sends requests to the loading backend anyway.
    handle = await proxy(f"""
health: {{failures: 1, panic_threshold: 0}}
backends:
  l: {{url: "{backend_url(server)}", kind: llamacpp}}
pools:
  p: {{backends: [l]}}
routes:
  - {{name: main, match: {{model: "m"}}, pool: p}}
""")
    await handle.health.wait_round()
    async with aiohttp.ClientSession() as session:
        async with session.get(handle.url("/readyz")) as r:
            assert r.status == 503
        async with session.post(handle.url("/v1/chat/completions"), json={"model": "m", "messages": MESSAGES}) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "no_healthy_backend"
