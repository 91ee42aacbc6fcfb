"""Error rendering in the client's API: OpenAI's shape, Anthropic's on the Messages endpoint, and each
endpoint's SSE error event (issue 19)."""

from __future__ import annotations

import orjson
import pytest

from proxy.errors import (
    BackendTimeoutError,
    ClientAuthError,
    NoHealthyBackendError,
    OverloadedError,
    SplitstreamError,
    UnknownModelError,
    error_body,
    sse_error_event,
)


def test_openai_shape_everywhere_but_messages() -> None:
    for endpoint in ("", "chat", "responses", "rerank"):
        body = orjson.loads(error_body(UnknownModelError("no such model"), endpoint))
        assert body == {"error": {"message": "no such model", "type": "invalid_request_error",
                                  "code": "model_not_found"}}


@pytest.mark.parametrize(("error", "kind"), [
    (UnknownModelError("m"), "not_found_error"),
    (ClientAuthError("k"), "authentication_error"),
    (OverloadedError("busy"), "rate_limit_error"),
    (NoHealthyBackendError("none"), "overloaded_error"),
    (BackendTimeoutError("slow"), "api_error"),
])
def test_anthropic_shape_on_messages(error: Exception, kind: str) -> None:
    assert isinstance(error, SplitstreamError)
    body = orjson.loads(error_body(error, "messages"))
    assert body == {"type": "error", "error": {"type": kind, "message": error.message}}


def test_each_endpoint_ends_a_broken_stream_in_its_own_words() -> None:
    error = BackendTimeoutError("backend did not finish")
    chat = sse_error_event(error, "chat")
    assert chat.startswith(b"event: error\ndata: ") and chat.endswith(b"\n\n")
    assert orjson.loads(chat[len(b"event: error\ndata: "):])["error"]["code"] == "backend_timeout"
    responses = orjson.loads(sse_error_event(error, "responses")[len(b"event: error\ndata: "):])
    assert responses == {"type": "error", "code": "backend_timeout", "message": "backend did not finish",
                         "param": None}
    messages = orjson.loads(sse_error_event(error, "messages")[len(b"event: error\ndata: "):])
    assert messages == {"type": "error", "error": {"type": "api_error", "message": "backend did not finish"}}


def test_undecodable_client_text_in_a_message_still_renders() -> None:
    error = UnknownModelError("model `\udcff`")
    for endpoint in ("chat", "messages"):
        assert b"\\\\udcff" in error_body(error, endpoint)
