"""Every row of the error table in shared/DESIGN.md, as a client sees it: status and OpenAI error body."""

from __future__ import annotations

import asyncio
from typing import Any

from multidict import CIMultiDict

import aiohttp
import openai
import pytest

from tests.conftest import Gate, simple_rules
from tests.processes import free_port

MESSAGES = [{"role": "user", "content": "hi"}]


async def post(url: str, data: Any = None, json: Any = None, headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, json=json, headers=headers) as r:
            return r.status, CIMultiDict(r.headers), await r.json(content_type=None)


def assert_error_shape(body: Any, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize(
    ("data", "headers", "status", "code"),
    [
        (b"{not json", None, 400, "invalid_json"),
        (b"", None, 400, "invalid_json"),
        (b"[1, 2]", None, 400, "invalid_json"),
        (b'{"messages": []}', None, 400, "invalid_request"),
        (b'{"model": 42, "messages": []}', None, 400, "invalid_request"),
        (b'{"model": "nope", "messages": []}', None, 404, "model_not_found"),
        (b'{"model": "my-model"}', {"Content-Type": "text/plain"}, 400, "invalid_content_type"),
        (b'{"model": "my-model", "messages": [], "pad": "' + b"x" * 3000 + b'"}', None, 413, "body_too_large"),
    ],
)
async def test_bad_client_input(sim: Any, proxy: Any, data: bytes, headers: dict[str, str] | None, status: int, code: str) -> None:
    runtime, server = await sim()
    handle = await proxy(simple_rules(server, server_block="server: {max_body_bytes: 2048}"))
    got_status, got_headers, body = await post(
        handle.url("/v1/chat/completions"), data=data, headers=headers or {"Content-Type": "application/json"}
    )
    assert got_status == status
    assert_error_shape(body, code)
    assert got_headers["x-request-id"]
    assert runtime.stats.requests == 0  # nothing bad reaches the runtime


async def test_chunked_body_over_limit_is_413(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(simple_rules(server, server_block="server: {max_body_bytes: 1024}"))

    async def body() -> Any:
        for _ in range(10):
            yield b"x" * 512

    status, _, payload = await post(handle.url("/v1/chat/completions"), data=body(),
                                   headers={"Content-Type": "application/json"})
    assert status == 413
    assert_error_shape(payload, "body_too_large")


async def test_unknown_path_and_method(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(simple_rules(server))
    async with aiohttp.ClientSession() as session:
        async with session.get(handle.url("/v1/nothing-here")) as r:
            assert r.status == 404
            assert_error_shape(await r.json(), "unknown_url")
        async with session.get(handle.url("/v1/chat/completions")) as r:
            assert r.status == 405
            assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_client_keys_required_when_configured(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(simple_rules(server), client_keys=["good-key"])
    bad = openai.AsyncOpenAI(base_url=handle.base_url, api_key="bad-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        await bad.chat.completions.create(model="my-model", messages=MESSAGES)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    good = openai.AsyncOpenAI(base_url=handle.base_url, api_key="good-key")
    await good.chat.completions.create(model="my-model", messages=MESSAGES)
    assert "good-key" not in str(runtime.last_headers)


async def test_proxy_overload_is_429_with_retry_after(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    handle = await proxy(simple_rules(server, server_block="server: {max_inflight: 1}"))
    async with aiohttp.ClientSession() as session:
        held = asyncio.ensure_future(session.post(handle.url("/v1/chat/completions"),
                                                  json={"model": "my-model", "messages": MESSAGES, "max_tokens": 2}))
        await gate.wait_reached(0)
        status, headers, body = await post(handle.url("/v1/chat/completions"), json={"model": "my-model", "messages": MESSAGES})
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert_error_shape(body, "overloaded")
        gate.open_all()
        response = await held
        assert response.status == 200
        response.release()


async def until(predicate: Any) -> None:
    """Yield to the event loop until an in-process condition holds (bounded)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_full_backend_queues_then_answers(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    handle = await proxy(simple_rules(server, backend_extra=", max_inflight: 1"))
    body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 2}
    async with aiohttp.ClientSession() as session:
        first = asyncio.ensure_future(session.post(handle.url("/v1/chat/completions"), json=body))
        await gate.wait_reached(0)
        second = asyncio.ensure_future(session.post(handle.url("/v1/chat/completions"), json=body))
        await until(lambda: handle.dispatcher.queue.waiting("main-pool") == 1)
        assert runtime.stats.requests == 1  # the second one waits in splitstream, not at the runtime
        gate.open_all()
        for response in (await first, await second):
            assert response.status == 200
            response.release()
    assert runtime.stats.requests == 2


@pytest.mark.parametrize("server_block", ["server: {max_queue: 0}", ""])
async def test_full_backend_and_queue_is_429(sim: Any, proxy: Any, server_block: str) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    rules = simple_rules(server, backend_extra=", max_inflight: 1", server_block=server_block,
                         timeouts="    timeouts: {queue: 50ms}")
    handle = await proxy(rules)
    async with aiohttp.ClientSession() as session:
        held = asyncio.ensure_future(session.post(handle.url("/v1/chat/completions"),
                                                  json={"model": "my-model", "messages": MESSAGES, "max_tokens": 2}))
        await gate.wait_reached(0)
        status, headers, body = await post(handle.url("/v1/chat/completions"), json={"model": "my-model", "messages": MESSAGES})
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert_error_shape(body, "overloaded")
        assert handle.dispatcher.queue.waiting("main-pool") == 0
        gate.open_all()
        (await held).release()


async def test_backend_5xx_is_502(sim: Any, proxy: Any) -> None:
    runtime, server = await sim(fail_rate=1.0)
    handle = await proxy(simple_rules(server))
    status, headers, body = await post(handle.url("/v1/chat/completions"), json={"model": "my-model", "messages": MESSAGES})
    assert status == 502
    assert_error_shape(body, "backend_error")
    assert (headers["x-splitstream-route"], headers["x-splitstream-variant"]) == ("main", "main-pool")
    assert headers["x-splitstream-backend"] == "b0"


async def test_backend_4xx_is_relayed(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    # The pool renames to a model the runtime does not serve: its own 404 goes back untouched.
    handle = await proxy(simple_rules(server, model="not-served"))
    status, headers, body = await post(handle.url("/v1/chat/completions"), json={"model": "my-model", "messages": MESSAGES})
    assert status == 404
    assert body["error"]["code"] == "model_not_found"
    assert headers["x-splitstream-route"] == "main"


async def test_backend_gone_between_probes_is_502_unreachable(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(simple_rules(server, server_block="health: {interval: 10m}"))
    await handle.health.wait_round()  # the first probe found it healthy
    await server.close()  # ...and now it is gone, long before the next probe
    status, _, body = await post(handle.url("/v1/chat/completions"), json={"model": "my-model", "messages": MESSAGES})
    assert status == 502
    assert_error_shape(body, "backend_unreachable")
    async with aiohttp.ClientSession() as session:
        async with session.get(handle.url("/metrics")) as r:
            assert 'splitstream_upstream_errors_total{backend="b0",reason="connect"} 3.0' in await r.text()


async def test_dead_backend_found_by_probe_is_503(sim: Any, proxy: Any) -> None:
    # One refused probe ejects (failures: 1), and no panic routing sends requests to the dead backend anyway.
    rules = simple_rules(server_block="health: {failures: 1, panic_threshold: 0}")
    rules = rules.replace("backends:\n", f'backends:\n  dead: {{url: "http://127.0.0.1:{free_port()}"}}\n')
    rules = rules.replace("backends: []", "backends: [dead]")
    handle = await proxy(rules)
    await handle.health.wait_round()
    status, _, body = await post(handle.url("/v1/chat/completions"), json={"model": "my-model", "messages": MESSAGES})
    assert status == 503
    assert_error_shape(body, "no_healthy_backend")


async def test_first_token_timeout_is_504(sim: Any, proxy: Any) -> None:
    gate = Gate()  # never opened: the runtime never produces a token
    runtime, server = await sim(pacer=gate)
    handle = await proxy(simple_rules(server, timeouts="    timeouts: {first_token: 200ms}"))
    status, _, body = await post(handle.url("/v1/chat/completions"),
                                 json={"model": "my-model", "messages": MESSAGES, "stream": True})
    assert status == 504
    assert_error_shape(body, "backend_timeout")
    await asyncio.wait_for(runtime.cancelled_event.wait(), 30)  # the runtime's slot was given back


async def test_total_timeout_non_stream_is_504(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    handle = await proxy(simple_rules(server, timeouts="    timeouts: {total: 300ms}"))
    status, _, body = await post(handle.url("/v1/chat/completions"), json={"model": "my-model", "messages": MESSAGES})
    assert status == 504
    assert_error_shape(body, "backend_timeout")


async def test_stream_cut_ends_with_sse_error_event(sim: Any, proxy: Any) -> None:
    runtime, server = await sim(stream_fail_rate=1.0)
    handle = await proxy(simple_rules(server))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    stream = await client.chat.completions.create(model="my-model", messages=MESSAGES, stream=True, max_tokens=10)
    received = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received.append(chunk)
    assert received, "tokens before the cut reached the client"
    assert caught.value.body["code"] == "backend_reset"
    assert runtime.stats.cut == 1


async def test_idle_timeout_mid_stream_ends_with_error_event(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    handle = await proxy(simple_rules(server, timeouts="    timeouts: {idle: 200ms}"))
    gate.open(0)  # token 0 flows, token 1 never comes
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/chat/completions"),
                                json={"model": "my-model", "messages": MESSAGES, "stream": True}) as r:
            assert r.status == 200
            raw = await r.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[0].startswith(b"data: {")
    assert events[-1].startswith(b"event: error\ndata: ")
    assert b'"code":"backend_timeout"' in events[-1]
    assert b"[DONE]" not in raw
