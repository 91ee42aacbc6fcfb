"""The simulated runtime speaks the APIs agents use, in their real wire shapes: OpenAI Responses, Anthropic
Messages, rerank and score, models/{id}. Each is proven with the vendor's own SDK where one exists (`openai`,
`anthropic`), and with raw bytes for the framing an SDK would forgive.

Timing is driven by the `Gate` pacer or switched off (the `sim` fixture sets ttft 0, tokens_per_second 0).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from proxy.sim.ranking import relevance
from tests.conftest import Gate, SimFactory

RESPONSE_EVENTS_HEAD = ["response.created", "response.in_progress"]
RESPONSE_EVENTS_TAIL = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
MESSAGE_EVENTS_HEAD = ["message_start", "content_block_start", "ping"]
MESSAGE_EVENTS_TAIL = ["content_block_stop", "message_delta", "message_stop"]


def url(server: TestServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def oai_client(server: TestServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url(server, "/v1"), api_key="x", max_retries=0)


def claude_client(server: TestServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url(server, ""), api_key="x", max_retries=0)


def typed_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split a named-event SSE body, asserting each is exactly `event: T\\ndata: {..."type": T...}\\n\\n`."""
    assert raw.endswith(b"\n\n")
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        name_line, data_line = block.split(b"\n")
        assert name_line.startswith(b"event: ") and data_line.startswith(b"data: "), block
        name = name_line[len(b"event: ") :].decode()
        data = orjson.loads(data_line[len(b"data: ") :])
        assert data["type"] == name
        out.append((name, data))
    return out


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[tuple[str, dict[str, Any]]]:
    """Read exactly `count` events off a live stream (each ends with a blank line)."""
    raw = b"".join([await resp.content.readuntil(b"\n\n") for _ in range(count)])
    return typed_events(raw)


# ---- OpenAI Responses


async def test_responses_sdk_non_stream(sim: SimFactory) -> None:
    runtime, server = await sim()
    async with oai_client(server) as oai:
        resp = await oai.responses.create(
            model="sim-model", input="x" * 40, instructions="be brief", max_output_tokens=5
        )
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.status == "completed"
    assert resp.model == "sim-model" and isinstance(resp.created_at, (int, float))
    [item] = resp.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.id.startswith("msg_")
    [part] = item.content
    assert part.type == "output_text" and part.annotations == []
    assert len(resp.output_text.split()) == 5
    assert resp.usage is not None
    # (40 + 8 chars) // 4 + 4 per message (input and instructions).
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (20, 5, 25)
    assert resp.usage.input_tokens_details.cached_tokens == 0
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    assert resp.instructions == "be brief" and resp.max_output_tokens == 5
    assert resp.previous_response_id is None
    assert runtime.stats.completed == 1 and runtime.stats.running == 0
    assert runtime.last_headers is not None and runtime.last_headers["Authorization"] == "Bearer x"


async def test_responses_raw_body_has_store_and_usage_fields(sim: SimFactory) -> None:
    _, server = await sim(default_max_tokens=3)
    async with aiohttp.ClientSession() as session:
        body = {"model": "sim-model", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}
        async with session.post(url(server, "/v1/responses"), json=body) as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            data = await resp.json()
    assert data["store"] is True and data["previous_response_id"] is None
    assert data["max_output_tokens"] is None  # echoed as sent; the default length applies
    assert set(data["usage"]) == {
        "input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details", "total_tokens"
    }
    assert data["usage"]["output_tokens"] == 3
    assert data["output"][0]["content"][0] == {
        "type": "output_text", "text": data["output"][0]["content"][0]["text"], "annotations": [], "logprobs": []
    }


async def test_responses_sdk_stream_events_in_order(sim: SimFactory) -> None:
    _, server = await sim()
    async with oai_client(server) as oai:
        stream = await oai.responses.create(model="sim-model", input="hello", max_output_tokens=4, stream=True)
        events = [event async for event in stream]
    types = [e.type for e in events]
    assert types == RESPONSE_EVENTS_HEAD + [
        "response.output_item.added", "response.content_part.added"
    ] + ["response.output_text.delta"] * 4 + RESPONSE_EVENTS_TAIL
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created = events[0]
    assert created.type == "response.created"
    assert created.response.status == "in_progress" and created.response.output == [] and created.response.usage is None
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    item_ids = {e.item_id for e in deltas}
    assert len(item_ids) == 1 and all((e.output_index, e.content_index) == (0, 0) for e in deltas)
    text = "".join(e.delta for e in deltas)
    done = events[-4]
    assert done.type == "response.output_text.done" and done.text == text
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.id == created.response.id
    assert completed.response.status == "completed" and completed.response.output_text == text
    assert completed.response.usage is not None and completed.response.usage.output_tokens == len(deltas) == 4


async def test_responses_raw_stream_framing_has_no_done(sim: SimFactory) -> None:
    runtime, server = await sim()
    async with aiohttp.ClientSession() as session:
        body = {"model": "sim-model", "input": "hello", "max_output_tokens": 2, "stream": True}
        async with session.post(url(server, "/v1/responses"), json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            raw = await resp.read()
    assert b"[DONE]" not in raw
    events = typed_events(raw)
    assert events[-1][0] == "response.completed"
    assert events[-1][1]["response"]["usage"]["output_tokens"] == 2
    assert runtime.stats.completed == 1


async def test_responses_previous_response_id(sim: SimFactory) -> None:
    runtime, server = await sim()
    async with oai_client(server) as oai:
        first = await oai.responses.create(model="sim-model", input="x" * 40, max_output_tokens=3)
        assert first.usage is not None
        follow = await oai.responses.create(
            model="sim-model", input="x" * 40, max_output_tokens=3, previous_response_id=first.id
        )
        assert follow.previous_response_id == first.id
        assert follow.usage is not None
        # The follow-up's prompt is the conversation so far plus its own input.
        assert follow.usage.input_tokens == first.usage.total_tokens + first.usage.input_tokens

        fetched = await oai.responses.retrieve(first.id)
        assert fetched.id == first.id and fetched.output_text == first.output_text

        with pytest.raises(openai.BadRequestError) as refused:
            await oai.responses.create(model="sim-model", input="hi", previous_response_id="resp_unknown")
        assert refused.value.status_code == 400
        assert refused.value.code == "previous_response_not_found"
        assert refused.value.param == "previous_response_id"
        assert refused.value.body == {
            "message": "Previous response with id 'resp_unknown' not found.",
            "type": "invalid_request_error",
            "code": "previous_response_not_found",
            "param": "previous_response_id",
        }

        unstored = await oai.responses.create(model="sim-model", input="hi", max_output_tokens=1, store=False)
        assert unstored.store is False
        with pytest.raises(openai.BadRequestError):
            await oai.responses.create(model="sim-model", input="hi", previous_response_id=unstored.id)
        with pytest.raises(openai.NotFoundError):
            await oai.responses.retrieve(unstored.id)
    # A refused request never took a slot.
    assert (runtime.stats.completed, runtime.stats.running) == (3, 0)


async def test_responses_stream_is_stored_once_complete(sim: SimFactory) -> None:
    _, server = await sim()
    async with oai_client(server) as oai:
        stream = await oai.responses.create(model="sim-model", input="hello", max_output_tokens=2, stream=True)
        events = [event async for event in stream]
        completed = events[-1]
        assert completed.type == "response.completed"
        follow = await oai.responses.create(
            model="sim-model", input="more", max_output_tokens=2, previous_response_id=completed.response.id
        )
    assert follow.status == "completed"


async def test_responses_temperature_zero_is_deterministic(sim: SimFactory) -> None:
    _, server = await sim()
    _, other = await sim(seed=99)
    texts = []
    for s in (server, server, other):
        async with oai_client(s) as oai:
            resp = await oai.responses.create(model="sim-model", input="same", max_output_tokens=12, temperature=0)
            texts.append(resp.output_text)
    assert texts[0] == texts[1] == texts[2]


async def test_responses_report_cached_input_tokens_with_the_prefix_cache(sim: SimFactory) -> None:
    _, server = await sim(prefix_cache_tokens=4096)
    long_input = "a question long enough to fill a few sixty-four character blocks " * 3
    async with oai_client(server) as oai:
        first = await oai.responses.create(model="sim-model", input=long_input, max_output_tokens=3)
        follow = await oai.responses.create(model="sim-model", input="and?", max_output_tokens=3,
                                            previous_response_id=first.id)
        stream = await oai.responses.create(model="sim-model", input=long_input, max_output_tokens=2, stream=True)
        completed = [event async for event in stream][-1]
    assert first.usage is not None and follow.usage is not None
    assert first.usage.input_tokens_details.cached_tokens == 0
    # The follow-up's prompt starts with the whole previous conversation, which the cache holds.
    assert 0 < follow.usage.input_tokens_details.cached_tokens < follow.usage.input_tokens
    assert completed.type == "response.completed" and completed.response.usage is not None
    assert 0 < completed.response.usage.input_tokens_details.cached_tokens < completed.response.usage.input_tokens


# ---- Anthropic Messages


async def test_messages_sdk_non_stream(sim: SimFactory) -> None:
    runtime, server = await sim(default_max_tokens=32)
    async with claude_client(server) as claude:
        msg = await claude.messages.create(
            model="sim-model", max_tokens=5, system="be brief", messages=[{"role": "user", "content": "x" * 40}]
        )
        assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
        assert msg.model == "sim-model"
        [block] = msg.content
        assert block.type == "text" and len(block.text.split()) == 5
        assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
        # (40 + 8 chars) // 4 + 4 per message (the user's and the system prompt).
        assert (msg.usage.input_tokens, msg.usage.output_tokens) == (20, 5)

        # max_tokens is a cap: a roomy one lets the answer end on its own at default_max_tokens.
        roomy = await claude.messages.create(
            model="sim-model", max_tokens=4096, messages=[{"role": "user", "content": [{"type": "text", "text": "q"}]}]
        )
        assert roomy.stop_reason == "end_turn" and roomy.usage.output_tokens == 32

        counted = await claude.messages.count_tokens(
            model="sim-model", system="be brief", messages=[{"role": "user", "content": "x" * 40}]
        )
        assert counted.input_tokens == msg.usage.input_tokens
    assert runtime.last_headers is not None and "anthropic-version" in runtime.last_headers
    # anthropic 2.x sends the key as `Authorization: Bearer`; older SDKs and curl send `x-api-key` (below).
    key_headers = (runtime.last_headers.get("x-api-key"), runtime.last_headers.get("authorization"))
    assert key_headers in (("x", None), (None, "Bearer x"))
    assert runtime.stats.completed == 2


async def test_messages_sdk_stream(sim: SimFactory) -> None:
    _, server = await sim()
    async with claude_client(server) as claude:
        async with claude.messages.stream(
            model="sim-model", max_tokens=6, messages=[{"role": "user", "content": "hello"}]
        ) as stream:
            pieces = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        raw_stream = await claude.messages.create(
            model="sim-model", max_tokens=6, messages=[{"role": "user", "content": "hello"}], stream=True
        )
        types = [event.type async for event in raw_stream]
    assert len(pieces) == 6
    assert final.content[0].type == "text" and final.content[0].text == "".join(pieces)
    assert final.usage.output_tokens == 6 and final.usage.input_tokens == 5  # 5 chars // 4 + 4
    assert final.stop_reason == "max_tokens"
    # The SDK drops `ping`; the rest arrive in Anthropic's order.
    assert types == ["message_start", "content_block_start"] + ["content_block_delta"] * 6 + MESSAGE_EVENTS_TAIL


async def test_messages_raw_stream_shapes(sim: SimFactory) -> None:
    _, server = await sim()
    async with aiohttp.ClientSession() as session:
        body = {"model": "sim-model", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(url(server, "/v1/messages"), json=body) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
            events = typed_events(await resp.read())
    names = [name for name, _ in events]
    assert names == MESSAGE_EVENTS_HEAD + ["content_block_delta"] * 3 + MESSAGE_EVENTS_TAIL
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": 5, "output_tokens": 1}  # "hi": 2 chars -> 1, + 4 per message
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[2][1] == {"type": "ping"}
    assert all(data["index"] == 0 and data["delta"]["type"] == "text_delta" for _, data in events[3:6])
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"output_tokens": 3},
    }
    assert events[-1][1] == {"type": "message_stop"}


async def test_messages_errors_in_anthropic_shape(sim: SimFactory) -> None:
    runtime, server = await sim(max_context=40)
    async with claude_client(server) as claude:
        with pytest.raises(anthropic.BadRequestError) as missing:  # `create` will not send it without max_tokens
            await claude.post(
                "/v1/messages",
                cast_to=anthropic.types.Message,
                body={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert missing.value.body == {
            "type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}
        }
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await claude.messages.create(model="other", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert unknown.value.body == {"type": "error", "error": {"type": "not_found_error", "message": "model: other"}}
        with pytest.raises(anthropic.BadRequestError) as too_long:
            await claude.messages.create(
                model="sim-model", max_tokens=5, messages=[{"role": "user", "content": "x" * 200}]
            )
        assert too_long.value.body["error"]["message"] == "prompt is too long: 54 tokens > 40 maximum"
        with pytest.raises(anthropic.BadRequestError) as too_much:
            await claude.messages.create(model="sim-model", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
        assert too_much.value.body["error"]["message"] == (
            "input length and `max_tokens` exceed context limit: 5 + 50 > 40, "
            "decrease input length or `max_tokens` and try again"
        )
        with pytest.raises(anthropic.BadRequestError):
            await claude.messages.create(model="sim-model", max_tokens=5, messages=[])
    assert runtime.stats.completed == 0 and runtime.stats.running == 0


# ---- rerank and score


async def test_rerank_orders_by_relevance(sim: SimFactory) -> None:
    runtime, server = await sim()
    docs = ["a cat sat", "the quick brown fox", "nothing here", "quick fox"]
    body = {"model": "sim-model", "query": "quick brown fox", "documents": docs}
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, "/v1/rerank"), json=body) as resp:
            assert resp.status == 200
            data = await resp.json()
        async with session.post(url(server, "/v1/rerank"), json={**body, "top_n": 2, "return_documents": True}) as resp:
            top = await resp.json()
    assert set(data) == {"id", "model", "object", "usage", "results"}
    assert data["object"] == "list" and data["model"] == "sim-model" and data["id"].startswith("rerank-")
    assert [r["index"] for r in data["results"]][:2] == [1, 3]  # all three words, then two of three
    scores = [r["relevance_score"] for r in data["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s < 1 for s in scores)
    assert all(set(r) == {"index", "relevance_score"} for r in data["results"])
    # Each pair is read whole: query (15 chars, 3 tokens) + document, per document.
    assert data["usage"] == {"prompt_tokens": 3 * 4 + 2 + 4 + 3 + 2, "total_tokens": 3 * 4 + 2 + 4 + 3 + 2}
    assert top["results"] == [
        {**data["results"][0], "document": {"text": docs[1]}},
        {**data["results"][1], "document": {"text": docs[3]}},
    ]
    assert runtime.stats.completed == 2


async def test_score_pairs_and_shape(sim: SimFactory) -> None:
    _, server = await sim()
    body = {"model": "sim-model", "text_1": "quick fox", "text_2": ["a quick fox", "slow dog"]}
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, "/v1/score"), json=body) as resp:
            assert resp.status == 200
            data = await resp.json()
        mismatch = {"model": "sim-model", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}
        async with session.post(url(server, "/v1/score"), json=mismatch) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert data["id"].startswith("score-") and data["object"] == "list" and data["model"] == "sim-model"
    assert isinstance(data["created"], int)
    assert [(d["index"], d["object"]) for d in data["data"]] == [(0, "score"), (1, "score")]
    assert data["data"][0]["score"] == relevance("quick fox", "a quick fox")
    assert data["data"][0]["score"] > data["data"][1]["score"]
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] == (2 + 2) + (2 + 2)


# ---- models/{id}


async def test_model_by_id(sim: SimFactory) -> None:
    _, server = await sim(models=["sim-model", "org/model-b"])
    async with oai_client(server) as oai:
        card = await oai.models.retrieve("sim-model")
        assert (card.id, card.object, card.owned_by) == ("sim-model", "model", "splitstream-sim")
        with pytest.raises(openai.NotFoundError) as missing:
            await oai.models.retrieve("nope")
        assert missing.value.code == "model_not_found"
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, "/v1/models/org/model-b")) as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "id": "org/model-b", "object": "model", "created": 0, "owned_by": "splitstream-sim"
            }


# ---- the shared machinery: slots, pacing, failures, cuts, disconnects


@pytest.mark.parametrize(
    ("path", "body", "head"),
    [
        ("/v1/responses", {"input": "hi", "max_output_tokens": 2}, RESPONSE_EVENTS_HEAD),
        ("/v1/messages", {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}, MESSAGE_EVENTS_HEAD),
    ],
)
async def test_stream_head_arrives_while_waiting_for_a_slot_and_first_token(
    sim: SimFactory, path: str, body: dict[str, Any], head: list[str]
) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate, max_batch=1)
    async with aiohttp.ClientSession() as session:
        # A chat request takes the only slot and is held before its first token.
        chat = asyncio.create_task(
            session.post(url(server, "/v1/chat/completions"),
                         json={"model": "sim-model", "messages": [{"role": "user", "content": "q"}], "max_tokens": 1})
        )
        await gate.wait_reached(0)
        async with session.post(url(server, path), json={"model": "sim-model", "stream": True, **body}) as resp:
            # The API's opening events come before any slot or token, as vLLM sends them.
            assert [name for name, _ in await read_events(resp, len(head))] == head
            assert (runtime.stats.running, runtime.stats.waiting) == (1, 1)
            gate.open(0, 1)
            assert (await chat).status == 200
            rest = typed_events(await resp.read())
    assert rest[-1][0] in ("response.completed", "message_stop")
    assert (runtime.stats.running, runtime.stats.waiting, runtime.stats.completed) == (0, 0, 2)


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/v1/responses", {"input": "hi"},
         {"error": {"message": "simulated backend failure", "type": "server_error", "code": "internal_error"}}),
        ("/v1/responses", {"input": "hi", "stream": True},
         {"error": {"message": "simulated backend failure", "type": "server_error", "code": "internal_error"}}),
        ("/v1/messages", {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
         {"type": "error", "error": {"type": "api_error", "message": "simulated backend failure"}}),
        ("/v1/messages", {"max_tokens": 2, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
         {"type": "error", "error": {"type": "api_error", "message": "simulated backend failure"}}),
        ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}]},
         {"type": "error", "error": {"type": "api_error", "message": "simulated backend failure"}}),
        ("/v1/rerank", {"query": "q", "documents": ["d"]},
         {"error": {"message": "simulated backend failure", "type": "server_error", "code": "internal_error"}}),
        ("/v1/score", {"text_1": "q", "text_2": "d"},
         {"error": {"message": "simulated backend failure", "type": "server_error", "code": "internal_error"}}),
    ],
)
async def test_fail_rate_answers_500_in_each_api_shape(
    sim: SimFactory, path: str, body: dict[str, Any], error: dict[str, Any]
) -> None:
    runtime, server = await sim(fail_rate=1.0)
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, path), json={"model": "sim-model", **body}) as resp:
            assert resp.status == 500 and resp.content_type == "application/json"
            assert await resp.json() == error
    assert (runtime.stats.failed, runtime.stats.completed, runtime.stats.running) == (1, 0, 0)


async def test_sdks_see_fail_rate_as_server_errors(sim: SimFactory) -> None:
    _, server = await sim(fail_rate=1.0)
    async with oai_client(server) as oai:
        with pytest.raises(openai.InternalServerError):
            await oai.responses.create(model="sim-model", input="hi")
    async with claude_client(server) as claude:
        with pytest.raises(anthropic.InternalServerError) as failed:
            await claude.messages.create(model="sim-model", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert failed.value.body == {
            "type": "error", "error": {"type": "api_error", "message": "simulated backend failure"}
        }


@pytest.mark.parametrize(
    ("path", "body", "delta", "end"),
    [
        ("/v1/responses", {"input": "hi", "max_output_tokens": 6},
         b"response.output_text.delta", b"response.completed"),
        ("/v1/messages", {"max_tokens": 6, "messages": [{"role": "user", "content": "hi"}]},
         b"content_block_delta", b"message_stop"),
    ],
)
async def test_stream_fail_rate_cuts_mid_stream(
    sim: SimFactory, path: str, body: dict[str, Any], delta: bytes, end: bytes
) -> None:
    runtime, server = await sim(stream_fail_rate=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    payload = orjson.dumps({"model": "sim-model", "stream": True, **body})
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), len(payload), payload)
    )
    raw = await asyncio.wait_for(reader.read(), 5)  # until the sim drops the connection
    writer.close()
    assert b"Transfer-Encoding: chunked" in raw
    assert raw.count(b"event: " + delta + b"\n") == 3  # half of 6 tokens
    assert end not in raw and not raw.endswith(b"0\r\n\r\n")
    assert runtime.stats.cut == 1 and runtime.stats.completed == 0 and runtime.stats.running == 0


async def test_client_disconnect_mid_message_stream_cancels(sim: SimFactory) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    gate.open(0)
    async with aiohttp.ClientSession() as session:
        body = {"model": "sim-model", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        resp = await session.post(url(server, "/v1/messages"), json=body)
        events = await read_events(resp, len(MESSAGE_EVENTS_HEAD) + 1)
        assert events[-1][0] == "content_block_delta"
        await gate.wait_reached(1)  # held before its second token
        assert runtime.stats.running == 1
        resp.close()
        await asyncio.wait_for(runtime.cancelled_event.wait(), 5)
    assert (runtime.stats.cancelled, runtime.stats.running, runtime.stats.completed) == (1, 0, 0)


async def test_count_tokens_records_the_clients_key_header(sim: SimFactory) -> None:
    runtime, server = await sim()
    async with aiohttp.ClientSession() as session:
        body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(url(server, "/v1/messages/count_tokens"), json=body,
                                headers={"X-Api-Key": "client-key"}) as resp:
            assert await resp.json() == {"input_tokens": 5}
    assert runtime.last_headers is not None and runtime.last_headers["x-api-key"] == "client-key"


async def test_messages_count_cache_reads_apart_from_input_tokens(sim: SimFactory) -> None:
    _, server = await sim(prefix_cache_tokens=4096)
    messages: Any = [{"role": "user", "content": "a question long enough to fill several cache blocks " * 4}]
    system = "You are a terse assistant. " * 5
    async with claude_client(server) as claude:
        prompt_tokens = (await claude.messages.count_tokens(model="sim-model", system=system,
                                                            messages=messages)).input_tokens
        first = await claude.messages.create(model="sim-model", max_tokens=4, system=system, messages=messages)
        again = await claude.messages.create(model="sim-model", max_tokens=4, system=system, messages=messages)
        async with claude.messages.stream(model="sim-model", max_tokens=4, system=system, messages=messages) as stream:
            streamed = await stream.get_final_message()
    assert (first.usage.input_tokens, first.usage.cache_read_input_tokens) == (prompt_tokens, 0)
    assert first.usage.cache_creation_input_tokens == 0
    read = again.usage.cache_read_input_tokens
    assert read is not None and 0 < read < prompt_tokens
    assert again.usage.input_tokens == prompt_tokens - read  # Anthropic's input_tokens excludes cache reads
    assert (streamed.usage.input_tokens, streamed.usage.cache_read_input_tokens) == (prompt_tokens - read, read)


async def test_messages_stream_start_says_the_cache_reads(sim: SimFactory) -> None:
    # With the cache on, message_start goes out with the first token, once the runtime looked the prompt up
    # (before, it could not say what was read from the cache); the events and their order are unchanged.
    _, server = await sim(prefix_cache_tokens=4096)
    body = {"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "blocks " * 40}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, "/v1/messages"), json=body) as resp:
            prompt_tokens = (await resp.json())["usage"]["input_tokens"]
        async with session.post(url(server, "/v1/messages"), json={**body, "stream": True}) as resp:
            events = typed_events(await resp.read())
    assert [name for name, _ in events] == MESSAGE_EVENTS_HEAD + ["content_block_delta"] * 2 + MESSAGE_EVENTS_TAIL
    usage = events[0][1]["message"]["usage"]
    read = usage["cache_read_input_tokens"]
    assert 0 < read < prompt_tokens
    assert usage == {"input_tokens": prompt_tokens - read, "cache_creation_input_tokens": 0,
                     "cache_read_input_tokens": read, "output_tokens": 1}
