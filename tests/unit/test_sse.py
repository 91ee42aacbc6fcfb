"""SseRelay and usage extraction: pure bytes in, bytes out."""

from __future__ import annotations

import pytest

from proxy.errors import BackendProtocolError
from proxy.pipeline.sse import SseRelay, ended_normally, find_usage_object, is_usage_event

TOKEN = b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\n'
DONE = b"data: [DONE]\n\n"


def run(relay: SseRelay, chunks: list[bytes]) -> bytes:
    return b"".join(relay.feed(c) for c in chunks) + relay.finish()


def test_pass_through_returns_each_chunk_untouched_and_reads_usage() -> None:
    relay = SseRelay(strip_usage=False)
    chunks = [TOKEN, TOKEN[:10], TOKEN[10:] + USAGE, DONE]
    outputs = [relay.feed(c) for c in chunks]
    assert outputs == chunks  # never re-framed, never held back
    assert relay.finish() == b""
    assert relay.usage is not None and relay.usage.tokens == (5, 3)


def test_strip_removes_only_the_usage_event() -> None:
    relay = SseRelay(strip_usage=True)
    assert run(relay, [TOKEN, TOKEN + USAGE + DONE]) == TOKEN + TOKEN + DONE
    assert relay.usage is not None and relay.usage.tokens == (5, 3)


@pytest.mark.parametrize("cut", [1, 7, 30, len(USAGE) - 1])
def test_strip_with_usage_event_split_across_chunks(cut: int) -> None:
    relay = SseRelay(strip_usage=True)
    assert run(relay, [TOKEN, USAGE[:cut], USAGE[cut:], DONE]) == TOKEN + DONE
    assert relay.usage is not None and relay.usage.tokens == (5, 3)


def test_strip_mode_sends_complete_events_at_once() -> None:
    relay = SseRelay(strip_usage=True)
    assert relay.feed(TOKEN) == TOKEN  # a whole event is not delayed
    assert relay.feed(TOKEN[:12]) == b""  # half an event waits for its end
    assert relay.feed(TOKEN[12:]) == TOKEN


def test_crlf_framed_events() -> None:
    usage = USAGE.replace(b"\n\n", b"\r\n\r\n")
    token = TOKEN.replace(b"\n\n", b"\r\n\r\n")
    relay = SseRelay(strip_usage=True)
    assert run(relay, [token + usage]) == token
    assert relay.usage is not None and relay.usage.tokens == (5, 3)


def test_usage_null_is_not_a_usage_event() -> None:
    assert not is_usage_event(TOKEN)
    assert is_usage_event(USAGE)
    assert is_usage_event(b'data: {"usage": {"prompt_tokens": 1}}')


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}', (10, 2)),
        (b'{"usage": {"prompt_tokens": 4, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}}', (4, None)),
        (b'{"data":[{"embedding":[0.1,0.2]}],"usage":{"prompt_tokens":3,"total_tokens":3}}', (3, None)),
        # the Responses API and Anthropic's Messages API name them input / output tokens
        (b'{"object":"response","usage":{"input_tokens":7,"input_tokens_details":{"cached_tokens":0},'
         b'"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":12}}', (7, 5)),
        (b'{"type":"message_delta","usage":{"output_tokens":15}}', (None, 15)),
        (b'{"choices":[]}', None),
        (b'{"usage": null}', None),
        (b'{"usage": {"prompt_tokens": 1', None),
    ],
)
def test_find_usage_object(body: bytes, expected: tuple[int | None, int | None] | None) -> None:
    found = find_usage_object(body)
    assert (None if found is None else found.tokens) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # vLLM / OpenAI, the Responses API, Anthropic (input_tokens counts only what was not read from the cache)
        (b'{"usage":{"prompt_tokens":100,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":64}}}',
         (100, 2, 64, None, None)),
        (b'{"usage":{"input_tokens":100,"input_tokens_details":{"cached_tokens":32},"output_tokens":5}}',
         (100, 5, 32, None, None)),
        (b'{"usage":{"input_tokens":36,"cache_read_input_tokens":64,"cache_creation_input_tokens":0,'
         b'"output_tokens":5}}', (100, 5, 64, None, None)),
        # llama.cpp: timings beside the usage, cache_n when usage does not say
        (b'{"usage":{"prompt_tokens":100,"completion_tokens":10},"timings":{"cache_n":60,"prompt_n":40,'
         b'"prompt_ms":12.5,"predicted_n":10,"predicted_ms":80.25}}', (100, 10, 60, 12.5, 80.25)),
        (b'{"usage":{"prompt_tokens":5,"completion_tokens":1},"timings":{"prompt_ms":"x","predicted_ms":-1}}',
         (5, 1, None, None, None)),
    ],
)
def test_cached_tokens_and_runtime_timings(body: bytes, expected: tuple[object, ...]) -> None:
    found = find_usage_object(body)
    assert found is not None
    assert (found.prompt, found.completion, found.cached, found.prefill_ms, found.decode_ms) == expected


def test_a_giant_event_is_held_once_and_refused_past_the_cap() -> None:
    relay = SseRelay(strip_usage=True, max_event_bytes=1000)
    assert relay.feed(b"data: " + b"x" * 400) == b""
    assert relay.feed(b"x" * 400) == b""
    with pytest.raises(BackendProtocolError):
        relay.feed(b"x" * 400)


def test_a_blank_line_split_across_chunks_still_ends_the_event() -> None:
    relay = SseRelay(strip_usage=True)
    assert relay.feed(b"data: one\n") == b""
    assert relay.feed(b"\ndata: tw") == b"data: one\n\n"
    assert relay.feed(b"o\r\n") == b""
    assert relay.feed(b"\r\n") == b"data: two\r\n\r\n"


def test_saw_done_tells_a_finished_stream_from_a_cut_one() -> None:
    finished, cut, unterminated = SseRelay(False), SseRelay(False), SseRelay(False)
    finished.feed(b"data: {}\n\ndata: [DONE]\n\n")
    cut.feed(b"data: {}\n\n")
    unterminated.feed(b"data: {}\n\ndata: [DONE]")
    for relay in (finished, cut, unterminated):
        relay.finish()
    assert finished.saw_done and not cut.saw_done and unterminated.saw_done


# ------------------------------------------------------------------------ the typed-event APIs (issue 19)

MESSAGES_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":'
    b'"assistant","content":[],"model":"m","stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":25,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b'event: ping\ndata: {"type":"ping"}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":15}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
RESPONSES_STREAM = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1",'
    b'"object":"response","status":"in_progress","output":[],"usage":null}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":1,'
    b'"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","sequence_number":2,"response":{"id":"resp_1",'
    b'"object":"response","status":"completed","usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},'
    b'"output_tokens":3,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":12}}}\n\n'
)


@pytest.mark.parametrize("split", [1, 7, 64, 10_000])
def test_messages_usage_is_merged_from_its_two_events_and_nothing_is_stripped(split: int) -> None:
    relay = SseRelay(strip_usage=False, endpoint="messages")
    out = b"".join(relay.feed(MESSAGES_STREAM[i:i + split]) for i in range(0, len(MESSAGES_STREAM), split))
    out += relay.finish()
    assert out == MESSAGES_STREAM
    assert relay.usage is not None and relay.usage.tokens == (25, 15)  # input from message_start, output from message_delta
    assert relay.saw_done


def test_responses_usage_comes_from_response_completed() -> None:
    relay = SseRelay(strip_usage=False, endpoint="responses")
    assert relay.feed(RESPONSES_STREAM) == RESPONSES_STREAM
    relay.finish()
    assert relay.usage is not None and relay.usage.tokens == (9, 3)  # `"usage": null` of response.created is not a usage event
    assert relay.saw_done


@pytest.mark.parametrize(("endpoint", "stream", "ended"), [
    ("messages", MESSAGES_STREAM, True),
    ("messages", MESSAGES_STREAM.rsplit(b"event: message_stop", 1)[0], False),
    ("responses", RESPONSES_STREAM, True),
    ("responses", RESPONSES_STREAM.rsplit(b"event: response.completed", 1)[0], False),
    ("responses", b'event: response.failed\ndata: {"type":"response.failed"}\n\n', True),
    ("chat", b"data: {}\n\ndata: [DONE]\n\n", True),
    ("chat", b"data: {}\n\n", False),
    ("rerank", b"", True),  # no stream rule: nothing to check
])
def test_each_endpoint_has_its_own_last_event(endpoint: str, stream: bytes, ended: bool) -> None:
    assert ended_normally(stream, endpoint) is ended
