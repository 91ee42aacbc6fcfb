"""Hostile upstreams against a real splitstream process: what a runtime sends may not reach the wrong client,
grow memory, pin a backend or pass a cut answer off as whole. Each test reproduces an attack found in review
(see the hostile-inputs issue) with a small asyncio server that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import Served, ServedFactory
from tests.integration.test_upstream_http import read_request

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "my-model", "messages": MESSAGES}
STREAM = {**CHAT, "stream": True}

# answer(request_index, writer) -> keep the connection open for another request?
Answer = Callable[[int, asyncio.StreamWriter], Awaitable[bool]]


class HostileRuntime:
    """Answers health probes (GETs) politely and inference requests (POSTs) as the test scripts it."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.posts = 0
        self.closed_on_us = asyncio.Event()  # set when splitstream dropped a connection we were writing to
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> HostileRuntime:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                if (await read_request(reader)).startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
                    continue
                index = self.posts
                self.posts += 1
                if not await self.answer(index, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_on_us.set()
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def hostile() -> AsyncIterator[Callable[[Answer], Awaitable[HostileRuntime]]]:
    started: list[HostileRuntime] = []

    async def make(answer: Answer) -> HostileRuntime:
        runtime = await HostileRuntime(answer).start()
        started.append(runtime)
        return runtime

    yield make
    for runtime in started:
        runtime.close()


def rules(runtime: HostileRuntime, server: str = "", timeouts: str = "", health: str = "") -> str:
    return f"""
server: {{{server}}}
{health}
backends:
  b0: {{url: "http://127.0.0.1:{runtime.port}", kind: vllm}}
pools:
  p: {{backends: [b0], model: "sim-model"}}
routes:
  - name: main
    match: {{model: "my-model"}}
    pool: p
    {timeouts}
"""


def json_answer(body: bytes, extra: bytes = b"", status: bytes = b"200 OK") -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, len(body), extra, body))


def completion(text: str) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "model": "sim-model", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


def token_event(text: str) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "sim-model",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
SSE_HEAD_UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def post(s: Served, body: dict[str, Any]) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as session, session.post(s.url("/v1/chat/completions"), json=body) as r:
        if r.content_type == "text/event-stream":
            return r.status, await r.text(), r.headers
        return r.status, await r.json(content_type=None), r.headers


def is_openai_error(body: Any) -> bool:
    return isinstance(body, dict) and {"message", "type", "code"} <= set(body.get("error", {}))


async def metric(s: Served, name: str, *labels: str) -> float:
    """The sum of a metric's samples whose line holds every label given."""
    async with aiohttp.ClientSession() as session, session.get(s.url("/metrics")) as response:
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def eventually(check: Callable[[], Awaitable[bool]], rounds: int = 300) -> bool:
    """Poll a condition the process reaches on its own (a deadline passing), a bounded number of times."""
    for _ in range(rounds):
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


# -- 6: an answer for one client can reach another ---------------------------------------------------


async def test_an_answer_pushed_on_an_idle_connection_never_reaches_the_next_client(
    hostile: Any, served: ServedFactory
) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(json_answer(completion(f"answer {index}")))
        await writer.drain()
        if index == 0:  # ...and an answer nobody asked for, on the now idle keep-alive connection
            writer.write(json_answer(completion("INJECTED")))
            await writer.drain()
        return True

    runtime = await hostile(answer)
    s = await served(rules(runtime))
    seen = []
    for _ in range(3):
        status, body, _ = await post(s, CHAT)
        assert status == 200, body
        seen.append(body["choices"][0]["message"]["content"])
    assert "INJECTED" not in seen
    assert seen[0] == "answer 0"


async def test_two_answers_in_one_read_are_refused_not_queued_for_the_next_client(
    hostile: Any, served: ServedFactory
) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        extra = json_answer(completion("INJECTED")) if index == 0 else b""
        writer.write(json_answer(completion(f"answer {index}")) + extra)  # one write, one segment
        await writer.drain()
        return True

    runtime = await hostile(answer)
    s = await served(rules(runtime))
    seen = [(await post(s, CHAT))[1]["choices"][0]["message"]["content"] for _ in range(3)]
    assert "INJECTED" not in seen


async def test_early_hints_are_interim_and_the_real_answer_follows(hostile: Any, served: ServedFactory) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0)  # (a separate segment is likelier; either way must work)
        writer.write(json_answer(completion("the real one")))
        await writer.drain()
        return True

    runtime = await hostile(answer)
    s = await served(rules(runtime))
    status, body, _ = await asyncio.wait_for(post(s, CHAT), 30)
    assert status == 200 and body["choices"][0]["message"]["content"] == "the real one"


# -- 7: Retry-After that never ends -------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [b"inf", b"1e12", b"nan", b"Fri, 31 Dec 2999 23:59:59 GMT"])
async def test_a_retry_after_of_forever_benches_a_backend_for_max_ejection_at_most(
    hostile: Any, served: ServedFactory, retry_after: bytes
) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        if index == 0:
            error = b'{"error": {"message": "slow down", "type": "rate_limit", "code": 429}}'
            writer.write(json_answer(error, b"Retry-After: %s\r\n" % retry_after, b"429 Too Many Requests"))
        else:
            writer.write(json_answer(completion("back")))
        await writer.drain()
        return True

    runtime = await hostile(answer)
    s = await served(rules(runtime, health="health: {max_ejection: 1s}"))
    status, body, headers = await post(s, CHAT)
    assert status == 429 and is_openai_error(body)
    assert 1 <= int(headers["Retry-After"]) <= 1
    async with aiohttp.ClientSession() as session, session.get(s.url("/admin/backends")) as response:
        text = await response.text()
    json.loads(text, parse_constant=lambda constant: pytest.fail(f"/admin/backends sent {constant}"))

    async def served_again() -> bool:
        return (await post(s, CHAT))[0] == 200

    assert await eventually(served_again)  # the backend came back (it used to stay benched until restart)


# -- 8: SSE relay is quadratic and unbounded -------------------------------------------------------------


async def test_an_event_longer_than_max_event_bytes_ends_the_stream_with_an_error(
    hostile: Any, served: ServedFactory
) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(SSE_HEAD + chunk(token_event("hello")))
        piece = b"x" * 65536
        try:
            writer.write(chunk(b"data: " + piece))
            for _ in range(200):  # 12.5 MiB of one event, never terminated
                writer.write(chunk(piece))
                await writer.drain()
        except ConnectionError:
            pass
        return False

    runtime = await hostile(answer)
    s = await served(rules(runtime, server="max_event_bytes: 256KiB"))
    status, text, _ = await post(s, STREAM)
    assert status == 200
    assert "hello" in text and "event: error" in text and "backend_protocol_error" in text
    assert "x" * 65536 not in text  # the giant event was not relayed
    assert await metric(s, "splitstream_upstream_errors_total", 'reason="protocol"') >= 1


async def test_the_total_deadline_holds_while_data_keeps_flowing(hostile: Any, served: ServedFactory) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(SSE_HEAD)
        try:
            while True:  # tokens forever, as fast as the proxy takes them
                writer.write(chunk(token_event("t") * 32))
                await writer.drain()
        except ConnectionError:
            return False

    runtime = await hostile(answer)
    s = await served(rules(runtime, timeouts="timeouts: {total: 1s, idle: 1s}"))
    status, text, _ = await asyncio.wait_for(post(s, STREAM), 60)
    assert status == 200 and text.rstrip().endswith("}")
    assert "event: error" in text and "backend_timeout" in text
    await asyncio.wait_for(runtime.closed_on_us.wait(), 30)  # and the runtime was told to stop


# -- 9: a client that never reads ------------------------------------------------------------------------


async def test_a_client_that_never_reads_releases_the_backend(hostile: Any, served: ServedFactory) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(SSE_HEAD)
        event = token_event("y" * 1000)
        try:
            while True:
                writer.write(chunk(event * 4))  # small writes: the proxy sees its client fall behind
                await writer.drain()
        except ConnectionError:
            return False

    runtime = await hostile(answer)
    s = await served(rules(runtime, timeouts="timeouts: {total: 600s, idle: 1s}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    body = json.dumps(STREAM).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")  # the stream began; from now on this client reads nothing

    async def released() -> bool:
        return await metric(s, "splitstream_upstream_inflight", 'backend="b0"') == 0

    assert await eventually(released)  # long before the 600 s total
    await asyncio.wait_for(runtime.closed_on_us.wait(), 30)
    writer.transport.abort()


# -- 10: upstream heads and bodies without a size limit ----------------------------------------------------


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"h" * (1024 * 1024) + b"\r\n",
    b"".join(b"X-Many-%d: 1\r\n" % i for i in range(1000)),
])
async def test_an_oversized_response_head_is_a_502(hostile: Any, served: ServedFactory, headers: bytes) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        try:
            writer.write(json_answer(completion("hi"), headers))
            await writer.drain()
        except ConnectionError:
            pass
        return False

    runtime = await hostile(answer)
    s = await served(rules(runtime))
    status, body, _ = await post(s, CHAT)
    assert status == 502 and is_openai_error(body) and body["error"]["code"] == "backend_protocol_error"


async def test_a_body_over_max_upstream_body_bytes_is_a_502(hostile: Any, served: ServedFactory) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        try:
            writer.write(json_answer(b'{"pad": "' + b"p" * (4 * 1024 * 1024) + b'"}'))
            await writer.drain()
        except ConnectionError:
            pass
        return False

    runtime = await hostile(answer)
    s = await served(rules(runtime, server="max_upstream_body_bytes: 1MiB"))
    status, body, _ = await post(s, CHAT)
    assert status == 502 and is_openai_error(body) and body["error"]["code"] == "backend_body_too_large"


# -- 11: a stream cut by EOF ---------------------------------------------------------------------------------


async def test_a_stream_cut_by_eof_before_done_ends_with_an_error_event(hostile: Any, served: ServedFactory) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(SSE_HEAD_UNTIL_CLOSE + token_event("one") + token_event("two"))  # ...and no [DONE]
        await writer.drain()
        return False

    runtime = await hostile(answer)
    s = await served(rules(runtime))
    status, text, _ = await post(s, STREAM)
    assert status == 200 and "two" in text
    assert "event: error" in text and "backend_reset" in text
    assert await metric(s, "splitstream_upstream_errors_total", 'reason="reset"') >= 1


async def test_a_stream_delimited_by_close_that_finishes_is_whole(hostile: Any, served: ServedFactory) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(SSE_HEAD_UNTIL_CLOSE + token_event("one") + b"data: [DONE]\n\n")
        await writer.drain()
        return False

    runtime = await hostile(answer)
    s = await served(rules(runtime))
    status, text, _ = await post(s, STREAM)
    assert status == 200 and text.endswith("data: [DONE]\n\n") and "event: error" not in text


# -- 12: repeated and hop-by-hop headers ---------------------------------------------------------------------


async def test_repeated_headers_are_kept_and_connection_named_ones_are_stripped(
    hostile: Any, served: ServedFactory
) -> None:
    async def answer(index: int, writer: asyncio.StreamWriter) -> bool:
        extra = (b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nConnection: keep-alive, X-Hop-Secret\r\n"
                 b"X-Hop-Secret: internal\r\nX-Kept: yes\r\n")
        writer.write(json_answer(completion("hi"), extra))
        await writer.drain()
        return True

    runtime = await hostile(answer)
    s = await served(rules(runtime))
    async with aiohttp.ClientSession() as session, session.post(s.url("/v1/chat/completions"), json=CHAT) as r:
        assert r.status == 200
        assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert "X-Hop-Secret" not in r.headers and r.headers["X-Kept"] == "yes"
