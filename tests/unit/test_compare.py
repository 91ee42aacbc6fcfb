"""Primary/shadow comparison on known outputs: statuses, ratios, token deltas, similarity."""

from __future__ import annotations

import base64
import struct

import orjson
import pytest

from proxy.observe.compare import Side, compare, extract_output, similarity


def chat_body(text: str, completion: int = 3) -> bytes:
    return orjson.dumps({"object": "chat.completion", "choices": [{"message": {"content": text}}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": completion}})


def stream_body(*tokens: str) -> bytes:
    events = [b"data: " + orjson.dumps({"choices": [{"delta": {"content": t}}]}) + b"\n\n" for t in tokens]
    return b"".join(events) + b"data: [DONE]\n\n"


def side(output: bytes, status: int = 200, duration: float = 1.0, ttft: float | None = None,
         completion: int | None = 3, is_stream: bool = False) -> Side:
    return Side(status, duration, ttft, 5, completion, output, is_stream)


def test_identical_answers() -> None:
    result = compare("r1", "chat", "next", side(chat_body("the cat sat")), side(chat_body("the cat sat"), duration=2.0))
    assert result.status_match and result.exact_match and result.similarity == 1.0
    assert result.latency_ratio == 2.0 and result.completion_tokens_delta == 0


def test_different_text_scores_partial_similarity() -> None:
    result = compare("r", "chat", "next", side(chat_body("a b c d")), side(chat_body("a b x d"), completion=5))
    assert not result.exact_match
    assert result.similarity == pytest.approx(0.75)
    assert result.completion_tokens_delta == 2


def test_stream_is_assembled_and_ttft_compared() -> None:
    primary = side(stream_body("hello ", "world"), ttft=0.1, is_stream=True)
    shadow = side(stream_body("hello ", "world"), ttft=0.3, is_stream=True)
    result = compare("r", "chat", "next", primary, shadow)
    assert result.exact_match and result.ttft_ratio == pytest.approx(3.0)


def test_status_mismatch_and_failed_shadow() -> None:
    result = compare("r", "chat", "next", side(chat_body("x")), side(b"", status=502, completion=None))
    assert not result.status_match and result.shadow_status == 502
    assert result.similarity is None and result.completion_tokens_delta is None


def test_stream_error_event_has_no_output() -> None:
    raw = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\nevent: error\ndata: {"error":{"code":"x"}}\n\n'
    assert extract_output(side(raw, is_stream=True)) is None


def test_embeddings_use_cosine_and_decode_base64() -> None:
    vector = [0.6, 0.8, 0.0]
    floats = orjson.dumps({"object": "list", "data": [{"embedding": vector}]})
    encoded = base64.b64encode(struct.pack("<3f", *vector)).decode()
    b64 = orjson.dumps({"object": "list", "data": [{"embedding": encoded}]})
    a, b = extract_output(side(floats)), extract_output(side(b64))
    assert isinstance(b, list) and b == pytest.approx(vector)
    assert similarity(a, [0.8, 0.6, 0.0])[1] == pytest.approx(0.96)


# ------------------------------------------------------------------- the agents' APIs (issue 19)


def _side(output: bytes, is_stream: bool) -> Side:
    return Side(status=200, duration=1.0, ttft=None, prompt_tokens=None, completion_tokens=None, output=output,
                is_stream=is_stream)


def test_text_of_responses_and_messages_answers() -> None:
    response = (b'{"id":"resp_1","object":"response","output":[{"type":"message","content":'
                b'[{"type":"output_text","text":"Hello there","annotations":[]}]}]}')
    message = b'{"id":"msg_1","type":"message","content":[{"type":"text","text":"Hello there"}]}'
    assert extract_output(_side(response, False)) == "Hello there"
    assert extract_output(_side(message, False)) == "Hello there"
    responses_stream = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hello"}\n\n'
                        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":" there"}\n\n')
    messages_stream = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                       b'"delta":{"type":"text_delta","text":"Hello there"}}\n\n')
    assert extract_output(_side(responses_stream, True)) == "Hello there"
    assert extract_output(_side(messages_stream, True)) == "Hello there"
    broken = b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"x"}}\n\n'
    assert extract_output(_side(messages_stream + broken, True)) is None


def test_rerank_and_score_compare_as_score_vectors() -> None:
    rerank = b'{"results":[{"index":1,"relevance_score":0.2},{"index":0,"relevance_score":0.9}]}'
    score = b'{"object":"list","data":[{"index":0,"object":"score","score":0.5}]}'
    assert extract_output(_side(rerank, False)) == [0.9, 0.2]
    assert extract_output(_side(score, False)) == [0.5]
