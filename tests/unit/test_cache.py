"""Cache policy: what is cacheable, exact keys, entry shapes (pure)."""

from __future__ import annotations

import orjson
import pytest

from proxy.pipeline.cache_policy import (
    Entry,
    bypass_reason,
    cache_key,
    is_complete_stream,
    json_to_sse,
    render,
    sse_to_json,
    tenant_of,
)
from proxy.pipeline.request import parse

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 8}


def view(endpoint: str = "chat", **fields: object) -> object:
    return parse(endpoint, orjson.dumps({**BASE, **fields}))


def key(**fields: object) -> str:
    return cache_key(view(**fields), "upstream-model", "route", "tenant")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "cache_control", "force", "reason"),
    [
        ({}, None, None, None),
        ({"temperature": 0.7}, None, None, "not_deterministic"),
        ({"temperature": 0.7}, None, "force", None),
        ({"n": 2}, None, "force", "several_choices"),
        ({}, "no-cache", None, "client_opt_out"),
        ({}, "max-age=0, no-store", None, "client_opt_out"),
        ({"temperature": None}, None, None, "not_deterministic"),
    ],
)
def test_bypass_rules(fields: dict[str, object], cache_control: str | None, force: str | None, reason: str | None) -> None:
    data = {**BASE, **fields}
    if data.get("temperature") is None:
        data.pop("temperature")
    assert bypass_reason(parse("chat", orjson.dumps(data)), cache_control, force, True) == reason


def test_embeddings_are_always_deterministic() -> None:
    assert bypass_reason(parse("embeddings", b'{"model":"e","input":"x"}'), None, None, True) is None


@pytest.mark.parametrize(
    "change",
    [{"max_tokens": 9}, {"messages": [{"role": "user", "content": "hi!"}]}, {"tools": [{"type": "function"}]},
     {"response_format": {"type": "json_object"}}, {"seed": 1}, {"stop": ["x"]}, {"top_p": 0.5}],
)
def test_key_changes_with_every_output_field(change: dict[str, object]) -> None:
    assert key(**change) != key()


def test_key_ignores_key_order_and_delivery_fields() -> None:
    reordered = parse("chat", b'{"max_tokens":8,"temperature":0,"messages":[{"content":"hi","role":"user"}],"model":"m"}')
    assert cache_key(reordered, "upstream-model", "route", "tenant") == key()
    assert key(stream=True, stream_options={"include_usage": True}, user="u1", model="other") == key()


def test_key_covers_upstream_model_route_and_tenant() -> None:
    v = view()
    base = cache_key(v, "stable-model", "r", "t")  # type: ignore[arg-type]
    assert base != cache_key(v, "canary-model", "r", "t")  # type: ignore[arg-type]
    assert base != cache_key(v, "stable-model", "r2", "t")  # type: ignore[arg-type]
    assert base != cache_key(v, "stable-model", "r", "t2")  # type: ignore[arg-type]
    assert tenant_of("Bearer a", False) != tenant_of("Bearer b", False)
    assert tenant_of("Bearer a", True) == tenant_of("Bearer b", True)
    assert "Bearer" not in tenant_of("Bearer a", False)


CHUNKS = [
    {"id": "c1", "created": 5, "model": "m", "object": "chat.completion.chunk",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}], "usage": None},
    {"id": "c1", "created": 5, "model": "m", "object": "chat.completion.chunk",
     "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}], "usage": None},
    {"id": "c1", "created": 5, "model": "m", "object": "chat.completion.chunk", "choices": [],
     "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
]
SSE = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in CHUNKS) + b"data: [DONE]\n\n"


def test_stream_entry_answers_json_client() -> None:
    data = orjson.loads(sse_to_json(SSE, "chat"))
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 2 and data["id"] == "c1" and data["object"] == "chat.completion"


def test_json_entry_answers_stream_client_and_round_trips() -> None:
    body = sse_to_json(SSE, "chat")
    sse = json_to_sse(body, "chat")
    assert is_complete_stream(sse, "chat")
    assert orjson.loads(sse_to_json(sse, "chat")) == orjson.loads(body)


def test_render_strips_usage_unless_asked() -> None:
    entry = Entry(True, "text/event-stream", SSE)
    plain, ctype = render(entry, view(stream=True))  # type: ignore[arg-type]
    assert ctype == "text/event-stream" and b'"usage":{' not in plain and plain.endswith(b"data: [DONE]\n\n")
    with_usage, _ = render(entry, view(stream=True, stream_options={"include_usage": True}))  # type: ignore[arg-type]
    assert with_usage == SSE  # byte-identical replay


def test_entry_codec_and_incomplete_streams() -> None:
    entry = Entry(True, "text/event-stream", SSE)
    decoded = Entry.decode(entry.encode())
    assert decoded is not None and decoded.body == SSE and decoded.is_stream
    assert Entry.decode(b"garbage") is None
    assert not is_complete_stream(SSE[:50], "chat")
    assert not is_complete_stream(SSE.replace(b"data: [DONE]", b'event: error\ndata: {"error":{}}\n\ndata: [DONE]'), "chat")


def test_an_anonymous_client_bypasses_an_unshared_cache() -> None:
    view = parse("chat", b'{"model":"m","temperature":0,"messages":[]}')
    assert bypass_reason(view, None, None, False) == "anonymous"  # no key, cache not shared
    assert bypass_reason(view, None, None, True) is None


@pytest.mark.parametrize(("fields", "reason"), [
    ({"store": False, "temperature": 0}, None),
    ({"temperature": 0}, "stateful"),  # the Responses API stores by default: the runtime keeps it
    ({"store": True, "temperature": 0}, "stateful"),
    ({"store": False, "temperature": 0, "previous_response_id": "resp_1"}, "stateful"),
])
def test_responses_that_hold_server_side_state_are_never_cached(fields: dict[str, object], reason: str | None) -> None:
    view = parse("responses", orjson.dumps({"model": "m", "input": "hi", **fields}))
    assert bypass_reason(view, None, None, True) == reason
    assert bypass_reason(view, None, "force", True) == reason  # not even when forced


def test_typed_event_answers_are_keyed_by_shape_and_replayed_as_stored() -> None:
    plain = parse("messages", b'{"model":"m","max_tokens":4,"temperature":0,"messages":[]}')
    streamed = parse("messages", b'{"model":"m","max_tokens":4,"temperature":0,"messages":[],"stream":true}')
    assert cache_key(plain, "m", "r", "t") != cache_key(streamed, "m", "r", "t")
    counted = parse("messages", b'{"model":"m","max_tokens":4,"temperature":0,"messages":[]}',
                    "/v1/messages/count_tokens")
    assert cache_key(plain, "m", "r", "t") != cache_key(counted, "m", "r", "t")
    stream = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    assert render(Entry(True, "text/event-stream", stream), streamed) == (stream, "text/event-stream")
    assert is_complete_stream(stream, "messages") and not is_complete_stream(stream, "chat")


def test_rerank_and_score_are_deterministic() -> None:
    for endpoint in ("rerank", "score"):
        assert bypass_reason(parse(endpoint, b'{"model":"m","query":"q"}'), None, None, True) is None
