"""The simulated runtime's wire layers as pure functions: parsing, limits, event numbering, the response
store, relevance. No sockets (tests/integration/test_sim*.py serve them); seeded RNGs only.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from proxy.sim import messages, ranking, responses
from proxy.sim import protocol as wire
from proxy.sim.runtime import SimConfig

CONFIG = SimConfig(default_max_tokens=8, max_context=0)


def rng() -> random.Random:
    return random.Random(7)


def events(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(block.split(b"\ndata: ")[1]) for block in raw.split(b"\n\n") if block]


def test_response_store_forgets_the_oldest_past_capacity() -> None:
    store = responses.ResponseStore(capacity=2)
    for rid in ("a", "b", "c"):
        store.put(rid, responses.Stored({"id": rid}, 1, ""))
    assert (store.get("a"), len(store)) == (None, 2)
    assert store.get("b") is not None and store.get("c") is not None


def test_response_follow_up_builds_on_the_stored_conversation() -> None:
    store = responses.ResponseStore()
    first = responses.parse({"model": "sim-model", "input": "x" * 40}, CONFIG, rng(), store)
    assert first.store is store and len(first.tokens) == 8  # default_max_tokens
    first.complete()
    follow = responses.parse(
        {"model": "sim-model", "input": "x" * 40, "previous_response_id": first.rid}, CONFIG, rng(), store
    )
    assert follow.prompt_tokens == first.prompt_tokens + (first.prompt_tokens + 8)
    unstored = responses.parse({"model": "sim-model", "input": "hi", "store": False}, CONFIG, rng(), store)
    assert unstored.store is None


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "sim-model", "input": "hi", "previous_response_id": "resp_x"}, 400, "previous_response_not_found"),
        ({"model": "sim-model", "input": []}, 400, "invalid_request"),
        ({"model": "sim-model", "input": "hi", "max_output_tokens": 0}, 400, "invalid_request"),
        ({"model": "sim-model", "input": "hi", "store": "yes"}, 400, "invalid_request"),
        ({"model": "other", "input": "hi"}, 404, "model_not_found"),
    ],
)
def test_responses_refusals(body: dict[str, Any], status: int, code: str) -> None:
    with pytest.raises(wire.BadRequest) as refused:
        responses.parse(body, CONFIG, rng(), responses.ResponseStore())
    assert (refused.value.status, refused.value.code) == (status, code)


def test_response_context_refusal_is_vllms() -> None:
    body = {"model": "sim-model", "input": "x" * 200, "max_output_tokens": 10}
    with pytest.raises(wire.BadRequest) as refused:
        responses.parse(body, SimConfig(max_context=40), rng(), responses.ResponseStore())
    assert (refused.value.status, refused.value.code) == (400, "context_length_exceeded")
    assert refused.value.message.startswith("This model's maximum context length is 40 tokens.")


def test_temperature_zero_text_ignores_the_runtime_rng() -> None:
    store = responses.ResponseStore()
    asked = {"model": "sim-model", "input": "same", "temperature": 0}
    assert (responses.parse(asked, CONFIG, random.Random(1), store).tokens
            == responses.parse(asked, CONFIG, random.Random(2), store).tokens)
    message = {"model": "sim-model", "max_tokens": 9, "temperature": 0, "messages": [{"role": "user", "content": "q"}]}
    texts = [messages.parse(message, CONFIG, random.Random(seed)).tokens for seed in (1, 2)]
    assert texts[0] == texts[1]


def test_response_stream_numbers_every_event_in_order() -> None:
    job = responses.parse({"model": "sim-model", "input": "hi", "max_output_tokens": 2}, CONFIG, rng(),
                          responses.ResponseStore())
    raw = job.head() + b"".join(job.frame(i, t) for i, t in enumerate(job.tokens)) + b"".join(job.tail())
    parsed = events(raw)
    assert [e["sequence_number"] for e in parsed] == list(range(len(parsed)))
    assert parsed[-1]["type"] == "response.completed"
    assert parsed[-1]["response"]["output"][0]["content"][0]["text"] == "".join(job.tokens)


@pytest.mark.parametrize(
    ("max_tokens", "length", "stop_reason"),
    [(5, 5, "max_tokens"), (8, 8, "max_tokens"), (4096, 8, "end_turn")],
)
def test_message_max_tokens_is_a_cap(max_tokens: int, length: int, stop_reason: str) -> None:
    body = {"model": "sim-model", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    job = messages.parse(body, CONFIG, rng())
    assert (len(job.tokens), job.stop_reason) == (length, stop_reason)


@pytest.mark.parametrize(
    ("content", "max_tokens", "message"),
    [
        ("x" * 200, 5, "prompt is too long: 54 tokens > 40 maximum"),
        ("hi", 50, "input length and `max_tokens` exceed context limit: 5 + 50 > 40, "
                   "decrease input length or `max_tokens` and try again"),
    ],
)
def test_message_context_refusals(content: str, max_tokens: int, message: str) -> None:
    body = {"model": "sim-model", "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}
    with pytest.raises(wire.BadRequest) as refused:
        messages.parse(body, SimConfig(max_context=40), rng())
    assert (refused.value.status, refused.value.message) == (400, message)


@pytest.mark.parametrize(
    ("status", "type_"),
    [(400, "invalid_request_error"), (404, "not_found_error"), (500, "api_error"), (529, "overloaded_error")],
)
def test_message_errors_are_typed_by_status(status: int, type_: str) -> None:
    resp = messages.render_error(wire.BadRequest(status, "m", "whatever", None))
    assert resp.status == status
    assert resp.body == orjson.dumps({"type": "error", "error": {"type": type_, "message": "m"}})


def test_relevance_is_deterministic_and_follows_overlap() -> None:
    assert ranking.relevance("quick fox", "a quick fox") == ranking.relevance("quick fox", "a quick fox")
    scores = [ranking.relevance("quick brown fox", d) for d in ("quick brown fox", "quick fox", "fox", "dog")]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= s < 1 for s in scores)


def test_chat_job_tail_is_unchanged() -> None:
    job = wire.Job(chat=True, model="m", rid="r", created=0, prompt_tokens=1, tokens=["a "], include_usage=True)
    assert job.head() == b""
    usage, done = job.tail()
    assert done == b"data: [DONE]\n\n" and usage.startswith(b'data: {"id":"r"')
    assert wire.Job(chat=False, model="m", rid="r", created=0, prompt_tokens=1, tokens=[]).tail() == (wire.DONE,)
