"""The Anthropic Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`), as Anthropic, vLLM and
llama.cpp server speak it: request parsing in Anthropic's words, the message object, the named SSE events, and
Anthropic's error body. Pure shapes over a parsed `MessageJob`; no I/O, no timing (the runtime drives it).

`max_tokens` is required here, and agents send large ones (4096 and up), so it is a cap, not the length: the
answer is `default_max_tokens` long (`end_turn`) unless `max_tokens` cuts it shorter (`max_tokens`).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from proxy.sim import protocol as wire
from proxy.sim.sequence import SequenceState

__all__ = ["MessageJob", "count_tokens", "parse", "render_error"]

# Anthropic's error `type` for each status it uses (docs "Errors"); 529 is its "overloaded".
ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def render_error(e: wire.BadRequest) -> web.Response:
    """Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`, typed by the status."""
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}
    return web.Response(status=e.status, body=orjson.dumps(body), content_type=wire.JSON)


def _model_of(body: dict[str, Any], models: tuple[str, ...]) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise wire.invalid("model: Field required")
    if model not in models:
        raise wire.BadRequest(404, f"model: {model}", "not_found_error", "model_not_found")
    return model


def _prompt_tokens(body: dict[str, Any]) -> int:
    """Tokens of `system` and `messages`, counted as chat counts messages (the system prompt is one more)."""
    messages = body.get("messages")
    if messages is None:
        raise wire.invalid("messages: Field required")
    if not isinstance(messages, list) or not messages:
        raise wire.invalid("messages: at least one message is required")
    chars = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise wire.invalid(f"messages.{i}: each message needs a `role` of 'user' or 'assistant'")
        content = m.get("content")
        if not isinstance(content, (str, list)):
            raise wire.invalid(f"messages.{i}.content: Input should be a valid string or list of content blocks")
        chars += wire.content_chars(content)
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise wire.invalid("system: Input should be a valid string or list of text blocks")
    system_chars = wire.content_chars(system)
    return max(1, (chars + system_chars) // 4) + 4 * (len(messages) + (1 if system else 0))


def _max_tokens(body: dict[str, Any]) -> int:
    n = body.get("max_tokens")
    if n is None:
        raise wire.invalid("max_tokens: Field required")
    if type(n) is not int:
        raise wire.invalid("max_tokens: Input should be a valid integer")
    if n < 1:
        raise wire.invalid("max_tokens: Input should be greater than or equal to 1")
    return n


def _context_exceeded(context: int, prompt_tokens: int, max_tokens: int) -> wire.BadRequest:
    """Anthropic's two refusals: the prompt alone, or prompt plus `max_tokens`, past the context window."""
    if prompt_tokens > context:
        return wire.invalid(f"prompt is too long: {prompt_tokens} tokens > {context} maximum")
    return wire.invalid(
        f"input length and `max_tokens` exceed context limit: {prompt_tokens} + {max_tokens} > {context}, "
        "decrease input length or `max_tokens` and try again"
    )


def count_tokens(body: dict[str, Any], limits: wire.Limits) -> int:
    """`/v1/messages/count_tokens`: the `input_tokens` the same request would be billed."""
    prompt_tokens = _prompt_tokens(body)
    _model_of(body, limits.models)
    return prompt_tokens


def parse(body: dict[str, Any], limits: wire.Limits, rng: random.Random) -> MessageJob:
    # Anthropic (and vLLM) validate the body before looking the model up.
    max_tokens = _max_tokens(body)
    prompt_tokens = _prompt_tokens(body)
    model = _model_of(body, limits.models)
    if 0 < limits.max_context < prompt_tokens + max_tokens:
        raise _context_exceeded(limits.max_context, prompt_tokens, max_tokens)
    n = min(max_tokens, limits.default_max_tokens)
    seed = ("messages", model, body.get("system"), body["messages"], n)
    return MessageJob(
        rid=f"msg_{uuid.uuid4().hex[:24]}",
        model=model,
        prompt_tokens=prompt_tokens,
        tokens=wire.choose_tokens(rng, n, body.get("temperature"), *seed),
        stop_reason="max_tokens" if n == max_tokens else "end_turn",
        system=body.get("system"),
        messages=body["messages"],
    )


@dataclass(slots=True)
class MessageJob:
    """One parsed Messages request (a `Generation`): one text block, index 0."""

    rid: str
    model: str
    prompt_tokens: int
    tokens: list[str]
    stop_reason: str
    system: Any = None  # `system` and `messages` as sent (validated): read only by `prompt_text`
    messages: Any = None
    sequence: SequenceState | None = None

    def _usage(self, output_tokens: int) -> dict[str, int]:
        """Anthropic's usage. With the prefix cache on, `input_tokens` is what was not read from the cache, and
        the cache reads are counted apart (Anthropic's semantics; nothing is billed as written to it)."""
        state = self.sequence
        if state is None or not state.reports_cache:
            return {"input_tokens": self.prompt_tokens, "output_tokens": output_tokens}
        return {
            "input_tokens": self.prompt_tokens - state.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": state.cached_tokens,
            "output_tokens": output_tokens,
        }

    def _reports_cache(self) -> bool:
        return self.sequence is not None and self.sequence.reports_cache

    def _message(self, content: list[dict[str, Any]], stop_reason: str | None, output_tokens: int) -> dict[str, Any]:
        return {
            "id": self.rid,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": self._usage(output_tokens),
        }

    def body(self) -> bytes:
        text = {"type": "text", "text": "".join(self.tokens)}
        return orjson.dumps(self._message([text], self.stop_reason, len(self.tokens)))

    def head(self) -> bytes:
        """The start, before the batch slot; with the prefix cache on it waits for the first token instead,
        since its usage says what was read from the cache, known only once the runtime looked."""
        return b"" if self._reports_cache() else self._start()

    def _start(self) -> bytes:
        """`message_start` (usage so far: the prompt, and one output token as Anthropic reports it), the text
        block's start, and a `ping`."""
        start = {"type": "message_start", "message": self._message([], None, 1)}
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return wire.typed_sse(start) + wire.typed_sse(block) + wire.typed_sse({"type": "ping"})

    def frame(self, index: int, token: str) -> bytes:
        delta = wire.typed_sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}
        )
        return self._start() + delta if index == 0 and self._reports_cache() else delta

    def tail(self) -> tuple[bytes, ...]:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": len(self.tokens)},  # the total so far, not an increment
        }
        return (
            wire.typed_sse({"type": "content_block_stop", "index": 0}),
            wire.typed_sse(delta),
            wire.typed_sse({"type": "message_stop"}),
        )

    def complete(self) -> None:
        pass

    def prompt_text(self) -> str:
        system = wire.turn_text("system", wire.content_text(self.system)) if self.system else ""
        turns = (wire.turn_text(m["role"], wire.content_text(m["content"])) for m in self.messages or ())
        return system + "".join(turns)

    def context_text(self) -> str:
        return self.prompt_text() + wire.turn_text("assistant", "".join(self.tokens))
