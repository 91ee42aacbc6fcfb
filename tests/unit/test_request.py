"""RequestView: parse once, forward untouched unless the model or stream options must change."""

from __future__ import annotations

import orjson
import pytest

from proxy.errors import InvalidRequestError, MalformedBodyError
from proxy.pipeline.request import parse


def test_untouched_when_nothing_changes() -> None:
    body = b'{"model": "m",  "messages": [], "temperature": 0.70}'
    view = parse("chat", body)
    assert view.upstream_body("m") is body
    assert view.upstream_body(None) is body


def test_model_rename_keeps_every_other_field() -> None:
    body = b'{"model":"client","messages":[{"role":"user","content":"x"}],"temperature":0.7,"tools":[{"a":1}]}'
    out = orjson.loads(parse("chat", body).upstream_body("runtime"))
    assert out == {**orjson.loads(body), "model": "runtime"}


def test_stream_gets_include_usage_and_keeps_other_options() -> None:
    body = b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":false}}'
    view = parse("chat", body)
    assert view.is_stream and not view.wants_usage
    out = orjson.loads(view.upstream_body("m"))
    assert out["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}


def test_stream_that_asked_for_usage_is_untouched() -> None:
    body = b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'
    view = parse("chat", body)
    assert view.wants_usage
    assert view.upstream_body("m") is body


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", MalformedBodyError),
        (b"{", MalformedBodyError),
        (b'"text"', MalformedBodyError),
        (b"{}", InvalidRequestError),
        (b'{"model": ""}', InvalidRequestError),
        (b'{"model": ["a"]}', InvalidRequestError),
    ],
)
def test_bad_bodies(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse("chat", body)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("max_tokens", 100, 100), ("max_completion_tokens", 7, 7), ("max_tokens", -1, None), ("max_tokens", "9", None)],
)
def test_max_tokens(field: str, value: object, expected: int | None) -> None:
    assert parse("chat", orjson.dumps({"model": "m", field: value})).max_tokens == expected


# ------------------------------------------------------------- route max_tokens caps (issue 18) and new APIs


@pytest.mark.parametrize(("endpoint", "given", "sent"), [
    ("chat", {"max_tokens": 100}, {"max_tokens": 8}),
    ("chat", {"max_completion_tokens": 100}, {"max_completion_tokens": 8}),
    ("chat", {"max_tokens": 100, "max_completion_tokens": 50}, {"max_tokens": 8, "max_completion_tokens": 8}),
    ("chat", {}, {"max_tokens": 8}),  # none given: the runtime's default could be its whole context
    ("completions", {"max_tokens": 9}, {"max_tokens": 8}),
    ("responses", {"max_output_tokens": 100}, {"max_output_tokens": 8}),
    ("responses", {}, {"max_output_tokens": 8}),
    ("messages", {"max_tokens": 100}, {"max_tokens": 8}),
])
def test_a_route_cap_lowers_or_sets_the_length_bound(endpoint: str, given: dict[str, int], sent: dict[str, int]) -> None:
    view = parse(endpoint, orjson.dumps({"model": "m", **given}))
    view.apply_cap(8)
    assert view.max_tokens == 8  # what the cost model prices
    out = orjson.loads(view.upstream_body(None))
    assert {key: out[key] for key in sent} == sent


@pytest.mark.parametrize(("endpoint", "body"), [
    ("chat", b'{"model":"m","max_tokens":4}'),  # under the cap
    ("chat", b'{"model":"m","max_tokens":"lots"}'),  # not ours to fix: the runtime refuses it
    ("embeddings", b'{"model":"m","input":"x"}'),  # generates nothing
    ("rerank", b'{"model":"m","query":"q","documents":["a"]}'),
])
def test_a_route_cap_leaves_alone_what_it_does_not_bound(endpoint: str, body: bytes) -> None:
    view = parse(endpoint, body)
    view.apply_cap(8)
    assert view.upstream_body(None) is body


def test_count_tokens_is_not_capped() -> None:
    body = b'{"model":"m","messages":[]}'
    view = parse("messages", body, "/v1/messages/count_tokens")
    view.apply_cap(8)
    assert view.upstream_body(None) is body


@pytest.mark.parametrize("endpoint", ["responses", "messages"])
def test_typed_event_streams_are_forwarded_untouched(endpoint: str) -> None:
    """They always carry usage: no stream_options is added (a runtime may refuse one it does not know)."""
    body = b'{"model":"m","stream":true,"max_tokens":5,"max_output_tokens":5}'
    view = parse(endpoint, body)
    assert view.is_stream and view.wants_usage
    assert view.upstream_body(None) is body
