"""The simulated runtime must speak vLLM's OpenAI protocol faithfully: the proxy's tests trust it.

Timing is driven by a gating pacer (asyncio.Events) or switched off (ttft 0, tokens_per_second 0), so
nothing here depends on wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer, unused_port

from proxy.sim import protocol as wire
from proxy.sim.prefix_cache import block_hashes
from proxy.sim.runtime import SimConfig, SimRuntime, serve

INSTANT = SimConfig(ttft_ms=0, tokens_per_second=0, prefill_tokens_per_second=0, seed=1)
CHAT = "/v1/chat/completions"

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
ServerFactory = Callable[..., Awaitable[TestServer]]


class GatePacer:
    """Holds every request before token `hold_at` until the test releases it, and reports arrivals."""

    def __init__(self, hold_at: int = 0) -> None:
        self.hold_at = hold_at
        self.arrivals: asyncio.Queue[str] = asyncio.Queue()
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def __call__(self, request_id: str, index: int) -> None:
        if index == self.hold_at:
            self.arrivals.put_nowait(request_id)
            await self.gates[request_id].wait()

    async def next_arrival(self) -> str:
        return await asyncio.wait_for(self.arrivals.get(), 5)


def chat_body(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body, asserting every event is exactly `data: ...\\n\\n`."""
    assert raw.endswith(b"\n\n")
    events = raw.split(b"\n\n")[:-1]
    for e in events:
        assert e.startswith(b"data: ") and b"\n" not in e, e
    return [e[len(b"data: ") :] for e in events]


async def make(
    aiohttp_client: ClientFactory, config: SimConfig = INSTANT, pacer: Any = None
) -> tuple[SimRuntime, TestClient[Any, Any]]:
    sim = SimRuntime(config, pacer)
    return sim, await aiohttp_client(sim.build_app())


async def test_test_server_cancels_handlers_on_disconnect(aiohttp_server: ServerFactory) -> None:
    # aiohttp 3.14's TestServer always passes handler_cancellation=True to its runner; passing it again
    # is a TypeError ("multiple values for keyword argument"), so tests rely on the default.
    server = await aiohttp_server(SimRuntime(INSTANT).build_app())
    assert server.runner is not None and server.runner.server is not None
    assert server.runner.server.handler_cancellation is True


async def test_chat_non_stream_shape_and_usage(aiohttp_client: ClientFactory) -> None:
    sim, client = await make(aiohttp_client)
    resp = await client.post(
        CHAT,
        json=chat_body("x" * 40, max_tokens=5),
        headers={"Authorization": "Bearer k", "X-Request-Id": "rid-1"},
    )
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "sim-model"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    # 40 chars // 4 + 4 for one message's role overhead.
    assert body["usage"] == {"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19}
    assert sim.last_headers is not None
    assert sim.last_headers["Authorization"] == "Bearer k"
    assert sim.last_headers["X-Request-Id"] == "rid-1"  # aiohttp sent it as X-Request-ID
    assert sim.last_headers.get("x-request-id") == "rid-1" and "authorization" in sim.last_headers
    assert sim.last_body == chat_body("x" * 40, max_tokens=5)
    assert (sim.stats.requests, sim.stats.completed, sim.stats.running) == (1, 1, 0)


async def test_default_max_tokens_and_max_completion_tokens(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client, SimConfig(ttft_ms=0, tokens_per_second=0, default_max_tokens=7))
    body = await (await client.post(CHAT, json=chat_body())).json()
    assert body["usage"]["completion_tokens"] == 7
    body = await (await client.post(CHAT, json=chat_body(max_completion_tokens=3))).json()
    assert body["usage"]["completion_tokens"] == 3


async def test_temperature_zero_is_deterministic(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client)

    async def content(body: dict[str, Any]) -> str:
        data = await (await client.post(CHAT, json=body)).json()
        return str(data["choices"][0]["message"]["content"])

    a = await content(chat_body("same prompt", temperature=0, max_tokens=16))
    b = await content(chat_body("same prompt", temperature=0, max_tokens=16))
    c = await content(chat_body("another prompt", temperature=0, max_tokens=16))
    assert a == b
    assert a != c
    # A fresh runtime (another process, another seed) still gives the same text.
    _, other = await make(aiohttp_client, SimConfig(ttft_ms=0, tokens_per_second=0, seed=99))
    data = await (await other.post(CHAT, json=chat_body("same prompt", temperature=0, max_tokens=16))).json()
    assert data["choices"][0]["message"]["content"] == a


async def test_chat_stream_framing(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client)
    resp = await client.post(CHAT, json=chat_body(max_tokens=3, stream=True, temperature=0))
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    events = sse_events(await resp.read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 3
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    for i, c in enumerate(chunks):
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "sim-model"
        [choice] = c["choices"]
        assert choice["index"] == 0 and choice["logprobs"] is None
        assert choice["finish_reason"] == ("length" if i == 2 else None)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    # Same deterministic text as the non-streamed answer to the same request.
    full = await (await client.post(CHAT, json=chat_body(max_tokens=3, temperature=0))).json()
    assert streamed == full["choices"][0]["message"]["content"]


async def test_chat_stream_include_usage(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client)
    body = chat_body(max_tokens=3, stream=True, stream_options={"include_usage": True})
    events = sse_events(await (await client.post(CHAT, json=body)).read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 4
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks[:3])
    last = chunks[3]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}


async def test_completions(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client)
    body = {"model": "sim-model", "prompt": "y" * 20, "max_tokens": 4}
    data = await (await client.post("/v1/completions", json=body)).json()
    assert data["id"].startswith("cmpl-")
    assert data["object"] == "text_completion"
    [choice] = data["choices"]
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert len(choice["text"].split()) == 4
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}

    body = {"model": "sim-model", "prompt": ["ab", "cd"], "max_tokens": 2, "stream": True}
    events = sse_events(await (await client.post("/v1/completions", json=body)).read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["text_completion"] * 2
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]
    assert all(isinstance(c["choices"][0]["text"], str) for c in chunks)


async def test_embeddings(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client, SimConfig(ttft_ms=0, embedding_dim=12))
    body = {"model": "sim-model", "input": ["alpha", "beta"]}
    data = await (await client.post("/v1/embeddings", json=body)).json()
    assert data["object"] == "list" and data["model"] == "sim-model"
    assert [d["index"] for d in data["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 12 for d in data["data"])
    assert data["data"][0]["embedding"] != data["data"][1]["embedding"]
    assert data["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    single = await (await client.post("/v1/embeddings", json={"model": "sim-model", "input": "alpha"})).json()
    assert single["data"][0]["embedding"] == data["data"][0]["embedding"]
    b64 = {"model": "sim-model", "input": "alpha", "encoding_format": "base64"}
    encoded = (await (await client.post("/v1/embeddings", json=b64)).json())["data"][0]["embedding"]
    decoded = struct.unpack("<12f", base64.b64decode(encoded))
    assert decoded == pytest.approx(data["data"][0]["embedding"], rel=1e-6)


async def test_models_health_metrics(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client, SimConfig(models=("m-a", "m-b"), ttft_ms=0, tokens_per_second=0))
    models = await (await client.get("/v1/models")).json()
    assert models == {
        "object": "list",
        "data": [
            {"id": "m-a", "object": "model", "created": 0, "owned_by": "splitstream-sim"},
            {"id": "m-b", "object": "model", "created": 0, "owned_by": "splitstream-sim"},
        ],
    }
    health = await client.get("/health")
    assert health.status == 200 and await health.read() == b""
    await client.post(CHAT, json={"model": "m-b", "messages": [{"role": "user", "content": "q"}]})
    metrics = await client.get("/metrics")
    assert metrics.status == 200
    text = await metrics.text()
    assert "# TYPE vllm:num_requests_running gauge\n" in text
    assert 'vllm:num_requests_running{model_name="m-a"} 0\n' in text
    assert "# TYPE vllm:num_requests_waiting gauge\n" in text
    assert 'vllm:num_requests_waiting{model_name="m-a"} 0\n' in text
    assert 'vllm:request_success_total{model_name="m-a"} 1\n' in text


@pytest.mark.parametrize(
    ("path", "payload", "status", "code"),
    [
        (CHAT, b"{not json", 400, "invalid_json"),
        (CHAT, b"[1, 2]", 400, "invalid_json"),
        (CHAT, orjson.dumps({"model": "nope", "messages": []}), 404, "model_not_found"),
        (CHAT, orjson.dumps({"messages": []}), 404, "model_not_found"),
        (CHAT, orjson.dumps({"model": "sim-model"}), 400, "invalid_request"),
        (CHAT, orjson.dumps(chat_body(max_tokens=0)), 400, "invalid_request"),
        ("/v1/completions", orjson.dumps({"model": "sim-model", "prompt": 3}), 400, "invalid_request"),
        ("/v1/embeddings", orjson.dumps({"model": "sim-model", "input": 3}), 400, "invalid_request"),
        ("/v1/embeddings", orjson.dumps({"model": "x", "input": "a"}), 404, "model_not_found"),
    ],
)
async def test_invalid_requests(
    aiohttp_client: ClientFactory, path: str, payload: bytes, status: int, code: str
) -> None:
    sim, client = await make(aiohttp_client)
    resp = await client.post(path, data=payload, headers={"Content-Type": "application/json"})
    assert resp.status == status
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    if payload == orjson.dumps({"model": "nope", "messages": []}):
        assert error["message"] == "The model `nope` does not exist."
    assert sim.stats.requests == 1 and sim.stats.completed == 0


async def test_fail_rate_answers_500(aiohttp_client: ClientFactory) -> None:
    sim, client = await make(aiohttp_client, SimConfig(ttft_ms=0, tokens_per_second=0, fail_rate=1.0))
    for path, body in ((CHAT, chat_body(stream=True)), ("/v1/embeddings", {"model": "sim-model", "input": "a"})):
        resp = await client.post(path, json=body)
        assert resp.status == 500
        assert await resp.json() == {
            "error": {"message": "simulated backend failure", "type": "server_error", "code": "internal_error"}
        }
    assert (sim.stats.failed, sim.stats.completed, sim.stats.running) == (2, 0, 0)


async def test_stream_fail_rate_cuts_the_stream(aiohttp_client: ClientFactory) -> None:
    config = SimConfig(ttft_ms=0, tokens_per_second=0, stream_fail_rate=1.0)
    sim, client = await make(aiohttp_client, config)
    resp = await client.post(CHAT, json=chat_body(max_tokens=6, stream=True))
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert sim.stats.cut == 1
    assert sim.stats.completed == 0 and sim.stats.cancelled == 0 and sim.stats.running == 0
    # Non-streamed requests are unaffected by stream_fail_rate.
    ok = await client.post(CHAT, json=chat_body(max_tokens=2))
    assert ok.status == 200


async def test_stream_cut_sends_some_chunks_but_no_done(aiohttp_server: ServerFactory) -> None:
    sim = SimRuntime(SimConfig(ttft_ms=0, tokens_per_second=0, stream_fail_rate=1.0))
    server = await aiohttp_server(sim.build_app())
    reader, writer = await asyncio.open_connection(server.host, server.port)
    payload = orjson.dumps(chat_body(max_tokens=6, stream=True))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    raw = await asyncio.wait_for(reader.read(), 5)  # until the sim drops the connection
    writer.close()
    assert b"Transfer-Encoding: chunked" in raw
    assert raw.count(b"data: {") == 3  # half of 6 tokens
    assert b"[DONE]" not in raw
    assert not raw.endswith(b"0\r\n\r\n")  # no chunked terminator: a crash, not a clean end


async def test_batch_limit_queues_fifo(aiohttp_client: ClientFactory) -> None:
    pacer = GatePacer(hold_at=0)
    config = SimConfig(ttft_ms=0, tokens_per_second=0, max_batch=1)
    sim, client = await make(aiohttp_client, config, pacer)

    task_a = asyncio.create_task(client.post(CHAT, json=chat_body(max_tokens=2)))
    rid_a = await pacer.next_arrival()
    assert (sim.stats.running, sim.stats.waiting) == (1, 0)

    # A streamed request sends its headers before queueing for a slot, so once the client holds the
    # response, the sim has already counted it as waiting.
    resp_b = await client.post(CHAT, json=chat_body(max_tokens=2, stream=True))
    resp_c = await client.post(CHAT, json=chat_body(max_tokens=2, stream=True))
    assert (sim.stats.running, sim.stats.waiting) == (1, 2)
    metrics = await (await client.get("/metrics")).text()
    assert 'vllm:num_requests_waiting{model_name="sim-model"} 2' in metrics

    pacer.gates[rid_a].set()
    assert (await task_a).status == 200
    rid_b = await pacer.next_arrival()  # the oldest waiter got the slot
    assert (sim.stats.running, sim.stats.waiting) == (1, 1)
    pacer.gates[rid_b].set()
    assert sse_events(await resp_b.read())[-1] == b"[DONE]"
    rid_c = await pacer.next_arrival()
    assert [rid_a, rid_b, rid_c] == ["chatcmpl-1", "chatcmpl-2", "chatcmpl-3"]  # served in arrival order
    pacer.gates[rid_c].set()
    assert sse_events(await resp_c.read())[-1] == b"[DONE]"
    assert (sim.stats.running, sim.stats.waiting, sim.stats.completed) == (0, 0, 3)


async def test_client_disconnect_mid_stream_cancels(aiohttp_client: ClientFactory) -> None:
    pacer = GatePacer(hold_at=1)
    sim, client = await make(aiohttp_client, INSTANT, pacer)
    resp = await client.post(CHAT, json=chat_body(max_tokens=4, stream=True))
    first = await resp.content.readuntil(b"\n\n")
    assert first.startswith(b"data: {")
    await pacer.next_arrival()  # the stream is held before its second token
    assert sim.stats.running == 1
    resp.close()  # drops the connection, as a proxy does when its own client leaves
    await asyncio.wait_for(sim.cancelled_event.wait(), 5)
    assert sim.stats.cancelled == 1
    assert (sim.stats.running, sim.stats.waiting, sim.stats.completed) == (0, 0, 0)


async def test_client_disconnect_while_waiting_frees_the_queue(aiohttp_client: ClientFactory) -> None:
    pacer = GatePacer(hold_at=0)
    config = SimConfig(ttft_ms=0, tokens_per_second=0, max_batch=1)
    sim, client = await make(aiohttp_client, config, pacer)
    resp_a = await client.post(CHAT, json=chat_body(max_tokens=1, stream=True))
    rid_a = await pacer.next_arrival()
    resp_b = await client.post(CHAT, json=chat_body(max_tokens=1, stream=True))
    assert sim.stats.waiting == 1
    resp_b.close()
    await asyncio.wait_for(sim.cancelled_event.wait(), 5)
    assert (sim.stats.cancelled, sim.stats.waiting, sim.stats.running) == (1, 0, 1)
    pacer.gates[rid_a].set()
    assert sse_events(await resp_a.read())[-1] == b"[DONE]"
    assert (sim.stats.running, sim.stats.completed) == (0, 1)


async def test_default_pacer_sleeps(aiohttp_client: ClientFactory) -> None:
    # Exercises the sleeping path (TTFT + gaps) without asserting on durations.
    _, client = await make(aiohttp_client, SimConfig(ttft_ms=1, tokens_per_second=2000))
    events = sse_events(await (await client.post(CHAT, json=chat_body(max_tokens=3, stream=True))).read())
    assert len(events) == 4
    assert (await client.post(CHAT, json=chat_body(max_tokens=3))).status == 200


async def test_openai_sdk(aiohttp_server: ServerFactory) -> None:
    sim = SimRuntime(SimConfig(ttft_ms=0, tokens_per_second=0, embedding_dim=16))
    server = await aiohttp_server(sim.build_app())
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0) as oai:
        messages: Any = [{"role": "user", "content": "hi"}]
        chat = await oai.chat.completions.create(model="sim-model", messages=messages, max_tokens=4)
        assert chat.choices[0].message.content and len(chat.choices[0].message.content.split()) == 4
        assert chat.usage is not None and chat.usage.completion_tokens == 4

        stream = await oai.chat.completions.create(
            model="sim-model",
            messages=messages,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        assert len("".join(pieces).split()) == 4
        assert usage is not None and usage.total_tokens == usage.prompt_tokens + 4

        completion = await oai.completions.create(model="sim-model", prompt="once upon", max_tokens=3)
        assert len(completion.choices[0].text.split()) == 3

        emb = await oai.embeddings.create(model="sim-model", input=["a", "b"])  # asks for base64
        assert [len(d.embedding) for d in emb.data] == [16, 16]
        floats = await oai.embeddings.create(model="sim-model", input="a", encoding_format="float")
        assert floats.data[0].embedding == pytest.approx(emb.data[0].embedding, rel=1e-6)

        assert [m.id async for m in oai.models.list()] == ["sim-model"]
        with pytest.raises(openai.NotFoundError):
            await oai.chat.completions.create(model="other", messages=messages)
    assert sim.last_headers is not None and sim.last_headers["Authorization"] == "Bearer x"


async def test_serve_runs_until_cancelled() -> None:
    port = unused_port()
    task = asyncio.create_task(serve(INSTANT, "127.0.0.1", port))
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(5):
                while True:  # readiness: serve() has no started signal, so retry the connect
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                            assert resp.status == 200
                            break
                    except aiohttp.ClientConnectorError:
                        await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ---- prefix cache, batch slowdown, llama.cpp timings

CACHED = SimConfig(ttft_ms=0, tokens_per_second=0, prefill_tokens_per_second=0, seed=1, prefix_cache_tokens=4096)
LONG = "a fairly long user question that spans several cache blocks of sixty-four characters " * 3


def usage_chunk_of(raw: bytes) -> dict[str, Any]:
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    last: dict[str, Any] = orjson.loads(events[-2])
    assert last["choices"] == []
    return last


async def test_a_repeated_prompt_reports_cached_tokens(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client, CACHED)
    first = (await (await client.post(CHAT, json=chat_body(LONG, max_tokens=2))).json())["usage"]
    again = (await (await client.post(CHAT, json=chat_body(LONG, max_tokens=2))).json())["usage"]
    other = (await (await client.post(CHAT, json=chat_body(LONG.upper(), max_tokens=2))).json())["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert 0 < again["prompt_tokens_details"]["cached_tokens"] < again["prompt_tokens"]
    assert other["prompt_tokens_details"] == {"cached_tokens": 0}
    streamed = chat_body(LONG, max_tokens=2, stream=True, stream_options={"include_usage": True})
    usage = usage_chunk_of(await (await client.post(CHAT, json=streamed)).read())["usage"]
    assert usage["prompt_tokens_details"] == again["prompt_tokens_details"]


async def test_a_prompt_of_whole_blocks_still_computes_one_token(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client, CACHED)
    body = {"model": "sim-model", "prompt": "b" * 64 * 4, "max_tokens": 1}  # 4 blocks, 64 tokens
    await client.post("/v1/completions", json=body)
    usage = (await (await client.post("/v1/completions", json=body)).json())["usage"]
    assert (usage["prompt_tokens"], usage["prompt_tokens_details"]) == (64, {"cached_tokens": 63})


async def test_a_conversations_next_turn_hits_the_previous_prompt(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client, CACHED)
    turn = [{"role": "system", "content": "You answer briefly. " * 4}, {"role": "user", "content": LONG}]
    answer = (await (await client.post(CHAT, json={"model": "sim-model", "messages": turn})).json())
    text = answer["choices"][0]["message"]["content"]
    following = [*turn, {"role": "assistant", "content": text}, {"role": "user", "content": "and then?"}]
    usage = (await (await client.post(CHAT, json={"model": "sim-model", "messages": following})).json())["usage"]
    rendered = "".join(wire.turn_text(m["role"], m["content"]) for m in turn)
    previous_blocks = len(block_hashes(rendered, 16 * 4))
    assert previous_blocks >= 3
    assert usage["prompt_tokens_details"]["cached_tokens"] >= previous_blocks * 16
    assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


async def test_bodies_are_unchanged_without_the_new_options(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client)
    _, other = await make(aiohttp_client, SimConfig(ttft_ms=0, tokens_per_second=0, prefill_tokens_per_second=0,
                                                    seed=1, batch_slowdown=0.5))
    for c in (client, other):
        await c.post(CHAT, json=chat_body(LONG, max_tokens=3, temperature=0))
        data = await (await c.post(CHAT, json=chat_body(LONG, max_tokens=3, temperature=0))).json()  # a repeat
        assert set(data) == {"id", "object", "created", "model", "choices", "usage"}
        assert set(data["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
        streamed = chat_body(LONG, max_tokens=2, stream=True, stream_options={"include_usage": True})
        chunk = usage_chunk_of(await (await c.post(CHAT, json=streamed)).read())
        assert set(chunk) == {"id", "object", "created", "model", "choices", "usage"}
        metrics = await (await c.get("/metrics")).text()
        assert "kv_cache_usage_perc" not in metrics and "prefix_cache" not in metrics


async def test_timings_only_when_asked(aiohttp_client: ClientFactory) -> None:
    _, client = await make(aiohttp_client, SimConfig(ttft_ms=0, tokens_per_second=0, report_timings=True))
    data = await (await client.post(CHAT, json=chat_body(LONG, max_tokens=3))).json()
    assert set(data["timings"]) == {"cache_n", "prompt_n", "prompt_ms", "prompt_per_second", "predicted_n",
                                    "predicted_ms", "predicted_per_second"}
    assert (data["timings"]["prompt_n"], data["timings"]["cache_n"]) == (data["usage"]["prompt_tokens"], 0)
    assert data["timings"]["predicted_n"] == 3
    assert "prompt_tokens_details" not in data["usage"]  # the cache is off
    # Without a usage chunk, the stream's last chunk carries them, as llama.cpp's does.
    events = sse_events(await (await client.post(CHAT, json=chat_body(max_tokens=2, stream=True))).read())
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert ["timings" in c for c in chunks] == [False, True]
    _, quiet = await make(aiohttp_client)
    assert "timings" not in await (await quiet.post(CHAT, json=chat_body(max_tokens=2))).json()


async def test_prompt_ms_is_prefill_only_not_the_wait_for_a_slot(aiohttp_client: ClientFactory) -> None:
    pacer = GatePacer(hold_at=0)
    config = SimConfig(ttft_ms=5, tokens_per_second=100, prefill_tokens_per_second=1000, max_batch=1,
                       report_timings=True)
    sim, client = await make(aiohttp_client, config, pacer)
    body = chat_body(LONG, max_tokens=3, stream=True, stream_options={"include_usage": True})
    resp_a = await client.post(CHAT, json=body)
    rid_a = await pacer.next_arrival()
    resp_b = await client.post(CHAT, json=body)  # queued behind A for as long as the test holds A
    assert (sim.stats.running, sim.stats.waiting) == (1, 1)
    pacer.gates[rid_a].set()
    usage_chunk_of(await resp_a.read())
    pacer.gates[await pacer.next_arrival()].set()
    last = usage_chunk_of(await resp_b.read())
    prompt_tokens = last["usage"]["prompt_tokens"]
    assert last["timings"]["prompt_n"] == prompt_tokens
    assert last["timings"]["prompt_ms"] == pytest.approx(5 + prompt_tokens / 1000 * 1000)
    assert last["timings"]["predicted_ms"] == pytest.approx(2 * 10)  # two gaps at 100 tokens/s


async def test_batch_slowdown_applies_to_prefill_and_decode(aiohttp_client: ClientFactory) -> None:
    # With slowdown 1.0 two running sequences each go at half speed; computed times, not wall time, are checked.
    pacer = GatePacer(hold_at=0)
    config = SimConfig(ttft_ms=10, tokens_per_second=100, prefill_tokens_per_second=0, max_batch=2,
                       batch_slowdown=1.0, report_timings=True)
    _, client = await make(aiohttp_client, config, pacer)
    body = chat_body(max_tokens=4, stream=True, stream_options={"include_usage": True})
    resp_a = await client.post(CHAT, json=body)
    rid_a = await pacer.next_arrival()  # A's prefill was computed alone
    resp_b = await client.post(CHAT, json=body)
    rid_b = await pacer.next_arrival()  # B's prefill was computed beside A
    pacer.gates[rid_a].set()  # A decodes while B still holds its slot
    timings_a = usage_chunk_of(await resp_a.read())["timings"]
    pacer.gates[rid_b].set()  # B decodes alone
    timings_b = usage_chunk_of(await resp_b.read())["timings"]
    assert (timings_a["prompt_ms"], timings_b["prompt_ms"]) == (pytest.approx(10), pytest.approx(20))
    assert (timings_a["predicted_ms"], timings_b["predicted_ms"]) == (pytest.approx(60), pytest.approx(30))


async def test_a_non_streamed_answer_under_slowdown_is_paced_in_segments(aiohttp_client: ClientFactory) -> None:
    config = SimConfig(ttft_ms=0, tokens_per_second=100000, prefill_tokens_per_second=0, batch_slowdown=0.5,
                       report_timings=True)
    _, client = await make(aiohttp_client, config)
    data = await (await client.post(CHAT, json=chat_body(max_tokens=30))).json()
    assert data["timings"]["predicted_n"] == 30
    assert data["timings"]["predicted_ms"] == pytest.approx(29 * 0.01)  # alone: full speed


async def test_kv_cache_gauge_and_prefix_counters(aiohttp_client: ClientFactory) -> None:
    pacer = GatePacer(hold_at=1)
    sim, client = await make(aiohttp_client, CACHED, pacer)
    resp = await client.post(CHAT, json=chat_body(LONG, max_tokens=3, stream=True))
    rid = await pacer.next_arrival()  # holds its slot, one token generated
    prompt_tokens = wire.chat_prompt_tokens([{"role": "user", "content": LONG}])
    metrics = await (await client.get("/metrics")).text()
    assert "# TYPE vllm:kv_cache_usage_perc gauge\n" in metrics
    assert f'vllm:kv_cache_usage_perc{{model_name="sim-model"}} {(prompt_tokens + 1) / 4096}\n' in metrics
    assert f'vllm:prefix_cache_queries_total{{model_name="sim-model"}} {prompt_tokens}\n' in metrics
    assert 'vllm:prefix_cache_hits_total{model_name="sim-model"} 0\n' in metrics
    pacer.gates[rid].set()
    await resp.read()
    again = await client.post(CHAT, json=chat_body(LONG, max_tokens=3, stream=True))
    pacer.gates[await pacer.next_arrival()].set()
    await again.read()
    metrics = await (await client.get("/metrics")).text()
    assert 'vllm:kv_cache_usage_perc{model_name="sim-model"} 0.0\n' in metrics
    assert f'vllm:prefix_cache_queries_total{{model_name="sim-model"}} {2 * prompt_tokens}\n' in metrics
    assert 'vllm:prefix_cache_hits_total{model_name="sim-model"} 0\n' not in metrics
    assert sim.stats.running == 0
