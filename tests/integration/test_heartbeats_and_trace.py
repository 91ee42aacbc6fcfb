"""Issue 19 items 5 and 6: keep-alive comments while a stream's first token is late, and the headers a runtime
gets from the client (trace context, a route's allow-list — never the client's key).

Real sockets: splitstream, simulated runtimes held at their first token by a Gate (so "late" is the test's
decision, not a clock's), the `openai` SDK as the client where the point is that real clients cope.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai

from tests.conftest import Gate, backend_url

# The HTTP library the openai SDK is built on (httpx; `httpx2` in its newer releases): the test watches the
# bytes the SDK reads through a transport of that library.
httpx: Any = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")

MESSAGES = [{"role": "user", "content": "hi"}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def rules(primary: Any, route_extra: str = "", fallback: Any = None) -> str:
    fallback_backend = f'  fb-1: {{url: "{backend_url(fallback)}", kind: vllm}}' if fallback is not None else ""
    fallback_pool = "  fb: {backends: [fb-1], model: sim-model}" if fallback is not None else ""
    fallback_line = "    fallback: [fb]" if fallback is not None else ""
    return f"""
backends:
  b1: {{url: "{backend_url(primary)}", kind: vllm}}
{fallback_backend}
pools:
  p: {{backends: [b1], model: sim-model}}
{fallback_pool}
routes:
  - name: chat
    match: {{model: my-model}}
    pool: p
    retry: {{attempts: 1}}
{fallback_line}
{route_extra}
"""


async def read_events(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The raw SSE blocks (comments included) as they arrive."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            yield block


async def test_a_late_first_token_gets_comments_then_the_tokens(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    handle = await proxy(rules(server, "    timeouts: {heartbeat: 50ms, first_token: 30s}"))
    body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    blocks: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/chat/completions"), json=body) as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
            assert response.headers["x-splitstream-backend"] == "b1"
            async for block in read_events(response):
                blocks.append(block)
                if blocks.count(b": keep-alive") == 3:
                    gate.open_all()  # three beats while the runtime sat on its first token: now answer
    comments = [b for b in blocks if b.startswith(b":")]
    data = [b for b in blocks if b.startswith(b"data:")]
    assert len(comments) >= 3
    assert blocks.index(data[0]) > blocks.index(comments[-1])  # every comment came before the first token
    assert data[-1] == b"data: [DONE]"
    assert runtime.stats.completed == 1


async def test_the_openai_sdk_reads_through_the_comments(sim: Any, proxy: Any) -> None:
    gate = Gate()
    _, server = await sim(pacer=gate)
    handle = await proxy(rules(server, "    timeouts: {heartbeat: 50ms}"))
    beats = asyncio.Event()

    class Spy(httpx.AsyncBaseTransport):  # type: ignore[misc]
        """Passes bytes through to the SDK, and says when a keep-alive comment went by."""

        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            response = await self.inner.handle_async_request(request)
            upstream = response.stream
            assert isinstance(upstream, httpx.AsyncByteStream)

            class Watched(httpx.AsyncByteStream):  # type: ignore[misc]
                async def __aiter__(self) -> AsyncIterator[bytes]:
                    async for chunk in upstream:
                        if b": keep-alive" in chunk:
                            beats.set()
                        yield chunk

                async def aclose(self) -> None:
                    await upstream.aclose()

            response.stream = Watched()
            return response

    async with httpx.AsyncClient(transport=Spy()) as http:
        api = openai.AsyncOpenAI(base_url=handle.url("/v1"), api_key="x", http_client=http, max_retries=0)
        stream = await api.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=3, stream=True)

        async def collect() -> str:
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        reading = asyncio.create_task(collect())
        await beats.wait()  # the SDK has read a comment ...
        gate.open_all()  # ... and only then do tokens follow
        text = await reading
    assert len(text.split()) == 3


async def test_a_failure_after_the_comments_ends_as_an_sse_error_event(sim: Any, proxy: Any) -> None:
    gate = Gate()  # never opened: the runtime never sends its first token
    _, server = await sim(pacer=gate)
    handle = await proxy(rules(server, "    timeouts: {heartbeat: 50ms, first_token: 400ms}"))
    body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(handle.url("/v1/chat/completions"), json=body) as response:
                assert response.status == 200  # the head went out with the first comment
                blocks = [block async for block in read_events(response)]
    finally:
        gate.open_all()
    assert blocks[0] == b": keep-alive"
    assert blocks[-1].startswith(b"event: error\ndata: ")
    assert b'"code":"backend_timeout"' in blocks[-1]
    assert not any(b.startswith(b"data:") for b in blocks)


async def test_fallback_still_happens_after_the_comments(sim: Any, proxy: Any) -> None:
    """A comment is not an answer: the fallback pool still takes a request whose pool never started."""
    gate = Gate()
    primary, primary_server = await sim(pacer=gate)
    rescuer, rescuer_server = await sim()
    text = rules(primary_server, "    timeouts: {heartbeat: 50ms, first_token: 400ms}", fallback=rescuer_server)
    handle = await proxy(text)
    body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(handle.url("/v1/chat/completions"), json=body) as response:
                blocks = [block async for block in read_events(response)]
    finally:
        gate.open_all()
    assert blocks[0] == b": keep-alive"
    assert blocks[-1] == b"data: [DONE]"
    assert not any(b.startswith(b"event: error") for b in blocks)
    assert primary.stats.requests == 1 and rescuer.stats.completed == 1


async def test_no_comments_when_the_first_token_is_in_time(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(rules(server))  # default heartbeat: 15 s
    body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/chat/completions"), json=body) as response:
            raw = await response.read()
    assert not raw.startswith(b":") and b"keep-alive" not in raw
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_trace_context_and_allowed_headers_reach_the_runtime_and_the_shadow(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    shadow, shadow_server = await sim()
    text = rules(server, '    headers: {forward: [x-tenant-tag]}\n    shadow: [{pool: mirror, sample: 1.0}]')
    text = text.replace("pools:\n", f'pools:\n  mirror: {{backends: [m1], model: sim-model}}\n').replace(
        "backends:\n", f'backends:\n  m1: {{url: "{backend_url(shadow_server)}", kind: vllm}}\n')
    handle = await proxy(text, client_keys=["client-secret"])
    headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc", "baggage": "team=search",
               "x-tenant-tag": "blue", "x-other": "not forwarded", "Authorization": "Bearer client-secret"}
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/chat/completions"), headers=headers,
                                json={"model": "my-model", "messages": MESSAGES, "max_tokens": 2}) as response:
            assert response.status == 200
            await response.read()
    seen = runtime.last_headers
    assert seen is not None
    assert seen["traceparent"] == TRACEPARENT
    assert seen["tracestate"] == "vendor=abc" and seen["baggage"] == "team=search"
    assert seen["x-tenant-tag"] == "blue"
    assert "x-other" not in seen
    assert "authorization" not in seen  # the client's key never goes upstream (the backend has none here)
    await handle.shadows.idle()  # the copy has been answered
    assert shadow.last_headers is not None
    copied = shadow.last_headers["traceparent"]
    assert re.fullmatch(rf"00-{TRACE_ID}-[0-9a-f]{{16}}-01", copied)  # the same trace ...
    assert copied != TRACEPARENT  # ... as a span of its own
