"""SseRelay and usage extraction: pure bytes in, bytes out."""

from __future__ import annotations

import pytest

from proxy.errors import BackendProtocolError
from proxy.pipeline.sse import SseRelay, find_usage_object, is_usage_event

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
    assert relay.usage == (5, 3)


def test_strip_removes_only_the_usage_event() -> None:
    relay = SseRelay(strip_usage=True)
    assert run(relay, [TOKEN, TOKEN + USAGE + DONE]) == TOKEN + TOKEN + DONE
    assert relay.usage == (5, 3)


@pytest.mark.parametrize("cut", [1, 7, 30, len(USAGE) - 1])
def test_strip_with_usage_event_split_across_chunks(cut: int) -> None:
    relay = SseRelay(strip_usage=True)
    assert run(relay, [TOKEN, USAGE[:cut], USAGE[cut:], DONE]) == TOKEN + DONE
    assert relay.usage == (5, 3)


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
    assert relay.usage == (5, 3)


def test_usage_null_is_not_a_usage_event() -> None:
    assert not is_usage_event(TOKEN)
    assert is_usage_event(USAGE)
    assert is_usage_event(b'data: {"usage": {"prompt_tokens": 1}}')


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}', (10, 2)),
        (b'{"usage": {"prompt_tokens": 4, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}}', (4, 0)),
        (b'{"data":[{"embedding":[0.1,0.2]}],"usage":{"prompt_tokens":3,"total_tokens":3}}', (3, 0)),
        (b'{"choices":[]}', None),
        (b'{"usage": null}', None),
        (b'{"usage": {"prompt_tokens": 1', None),
    ],
)
def test_find_usage_object(body: bytes, expected: tuple[int, int] | None) -> None:
    assert find_usage_object(body) == expected


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
