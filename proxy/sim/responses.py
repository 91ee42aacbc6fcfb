"""The OpenAI Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`) as vLLM serves it: request
parsing, the response object, the typed SSE events, and the bounded store that `previous_response_id` reads.
Pure shapes over a parsed `ResponseJob`; no I/O, no timing (the runtime drives it as a `Generation`).

Stored state: vLLM stores only with `VLLM_ENABLE_RESPONSES_API_STORE=1` (else `store` is silently ignored); the
sim behaves as vLLM with it on, so `store` defaults to true as in OpenAI's API, and `store: false` keeps nothing.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

import orjson

from proxy.sim import protocol as wire
from proxy.sim.sequence import SequenceState

__all__ = ["ResponseJob", "ResponseStore", "Stored", "not_found", "parse"]

STORE_CAPACITY: Final = 1024  # responses remembered per runtime; vLLM's own store never forgets (a leak)


@dataclass(frozen=True, slots=True)
class Stored:
    """A completed, stored response: its body for `GET`, and what a follow-up's prompt builds on."""

    body: dict[str, Any]
    context_tokens: int  # the conversation so far: its input plus its output
    text: str
    context: str = ""  # the conversation as the prefix cache hashes it (`ResponseJob.context_text`); "" when off


class ResponseStore:
    """Completed responses by id; past `capacity` the oldest is forgotten (a follow-up to it is then refused,
    as one to a response another runtime answered is)."""

    __slots__ = ("_capacity", "_items")

    def __init__(self, capacity: int = STORE_CAPACITY) -> None:
        self._capacity = capacity
        self._items: dict[str, Stored] = {}

    def get(self, rid: str) -> Stored | None:
        return self._items.get(rid)

    def put(self, rid: str, stored: Stored) -> None:
        self._items[rid] = stored
        if len(self._items) > self._capacity:
            del self._items[next(iter(self._items))]  # dicts keep insertion order: this is the oldest

    def __len__(self) -> int:
        return len(self._items)


def not_found(rid: str) -> wire.BadRequest:
    """`GET /v1/responses/{id}` of an id this runtime does not hold (vLLM's and OpenAI's words)."""
    return wire.BadRequest(404, f"Response with id '{rid}' not found.", "invalid_request_error", None)


def previous_not_found(rid: str) -> wire.BadRequest:
    """OpenAI's refusal of an unknown `previous_response_id` (vLLM answers 404 without the code; agents and
    gateways match on the code, so the sim gives OpenAI's)."""
    return wire.BadRequest(
        400,
        f"Previous response with id '{rid}' not found.",
        "invalid_request_error",
        "previous_response_not_found",
        param="previous_response_id",
    )


def _input_tokens(value: Any, instructions: str | None) -> int:
    """Tokens of `input` (a string, or a list of items) plus `instructions`, counted as chat counts messages."""
    if isinstance(value, str):
        chars, messages = len(value), 1
    elif isinstance(value, list) and value:
        chars, messages = 0, len(value)
        for item in value:
            if not isinstance(item, dict):
                raise wire.invalid("each `input` item must be an object")
            if "content" in item:
                chars += wire.content_chars(item["content"])
            else:  # function_call_output and the like carry their text in `output`
                output = item.get("output")
                chars += len(output) if isinstance(output, str) else 0
    else:
        raise wire.invalid("`input` must be a string or a non-empty list of input items")
    if instructions:
        chars += len(instructions)
        messages += 1
    return max(1, chars // 4) + 4 * messages


def _input_text(value: Any) -> str:
    """`input` (validated by `_input_tokens`) as canonical turns: a string is the user's; an item without
    `content` (a tool's output) is its `type`'s turn."""
    if isinstance(value, str):
        return wire.turn_text("user", value)
    parts = []
    for item in value or ():
        role = str(item.get("role") or item.get("type"))
        if "content" in item:
            parts.append(wire.turn_text(role, wire.content_text(item["content"])))
        else:
            output = item.get("output")
            parts.append(wire.turn_text(role, output if isinstance(output, str) else ""))
    return "".join(parts)


def parse(
    body: dict[str, Any], limits: wire.Limits, rng: random.Random, store: ResponseStore
) -> ResponseJob:
    model = wire.model_of(body, limits.models)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise wire.invalid("`instructions` must be a string")
    remember = body.get("store", True)
    if not isinstance(remember, bool):
        raise wire.invalid("`store` must be a boolean")
    prev_id = body.get("previous_response_id")
    prev: Stored | None = None
    if prev_id is not None:
        if not isinstance(prev_id, str):
            raise wire.invalid("`previous_response_id` must be a string")
        prev = store.get(prev_id)
        if prev is None:
            raise previous_not_found(prev_id)
    prompt_tokens = _input_tokens(body.get("input"), instructions) + (prev.context_tokens if prev else 0)
    max_output = wire.positive_int(body, "max_output_tokens")
    n = limits.default_max_tokens if max_output is None else max_output
    if 0 < limits.max_context < prompt_tokens + n:
        raise wire.context_exceeded(limits.max_context, prompt_tokens, n)
    temperature = body.get("temperature")
    prev_text = prev.text if prev else None
    tokens = wire.choose_tokens(rng, n, temperature, "responses", model, instructions, body["input"], prev_text, n)
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_output,
        "metadata": body.get("metadata"),
        "previous_response_id": prev_id,
        "store": remember,
        "temperature": temperature if isinstance(temperature, (int, float)) else 1.0,
    }
    return ResponseJob(
        rid=f"resp_{uuid.uuid4().hex}",
        item_id=f"msg_{uuid.uuid4().hex}",
        model=model,
        created=int(time.time()),
        prompt_tokens=prompt_tokens,
        tokens=tokens,
        echo=echo,
        store=store if remember else None,
        instructions=instructions,
        prompt_input=body["input"],
        prev_context=prev.context if prev else "",
    )


@dataclass(slots=True)
class ResponseJob:
    """One parsed Responses request (a `Generation`). Its stream numbers every event (`sequence_number`)."""

    rid: str
    item_id: str
    model: str
    created: int
    prompt_tokens: int
    tokens: list[str]
    echo: dict[str, Any]  # request fields the response object repeats
    store: ResponseStore | None  # where `complete` remembers it; None with `store: false`
    seq: int = 0  # the next event's sequence_number
    final: dict[str, Any] | None = None  # the completed response object, built once
    instructions: str | None = None
    prompt_input: Any = None  # `input` as sent (validated): read only by `prompt_text`
    prev_context: str = ""  # the `previous_response_id` conversation's text, when the prefix cache is on
    sequence: SequenceState | None = None
    context: str | None = None  # `context_text`, built once, stored with the response for a follow-up

    def _event(self, event: dict[str, Any]) -> bytes:
        event["sequence_number"] = self.seq
        self.seq += 1
        return wire.typed_sse(event)

    def _envelope(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        """The response object, with vLLM's fields (plus OpenAI's `store`, `error`)."""
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "reasoning": None,
            "service_tier": "auto",
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            **self.echo,
        }

    def _text_part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def _final(self) -> dict[str, Any]:
        if self.final is None:
            n = len(self.tokens)
            state = self.sequence
            cached = state.cached_tokens if state is not None and state.reports_cache else 0  # part of input_tokens
            usage = {
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": n,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + n,
            }
            message = self._message("completed", [self._text_part("".join(self.tokens))])
            self.final = self._envelope("completed", [message], usage)
        return self.final

    def body(self) -> bytes:
        return orjson.dumps(self._final())

    def head(self) -> bytes:
        """`response.created` and `response.in_progress`: vLLM sends both before the engine yields a token."""
        initial = self._envelope("in_progress", [], None)
        return self._event({"type": "response.created", "response": initial}) + self._event(
            {"type": "response.in_progress", "response": initial}
        )

    def frame(self, index: int, token: str) -> bytes:
        opening = b"" if index else self._opening()
        return opening + self._event(
            {
                "type": "response.output_text.delta",
                "item_id": self.item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": token,
                "logprobs": [],
            }
        )

    def _opening(self) -> bytes:
        """The output item and its text part open with the first token, as vLLM sends them."""
        added = self._event(
            {"type": "response.output_item.added", "output_index": 0, "item": self._message("in_progress", [])}
        )
        return added + self._event(
            {
                "type": "response.content_part.added",
                "item_id": self.item_id,
                "output_index": 0,
                "content_index": 0,
                "part": self._text_part(""),
            }
        )

    def tail(self) -> tuple[bytes, ...]:
        final = self._final()
        message = final["output"][0]
        text = message["content"][0]["text"]
        at = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return (
            self._event({"type": "response.output_text.done", **at, "text": text, "logprobs": []}),
            self._event({"type": "response.content_part.done", **at, "part": message["content"][0]}),
            self._event({"type": "response.output_item.done", "output_index": 0, "item": message}),
            self._event({"type": "response.completed", "response": final}),
        )

    def complete(self) -> None:
        if self.store is not None:
            final = self._final()
            text = final["output"][0]["content"][0]["text"]
            self.store.put(self.rid, Stored(final, self.prompt_tokens + len(self.tokens), text, self.context or ""))

    def prompt_text(self) -> str:
        """The previous response's conversation, the instructions, then the input: a follow-up by
        `previous_response_id` and a client resending the whole conversation both extend the last prompt."""
        instructions = wire.turn_text("system", self.instructions) if self.instructions else ""
        return self.prev_context + instructions + _input_text(self.prompt_input)

    def context_text(self) -> str:
        if self.context is None:
            self.context = self.prompt_text() + wire.turn_text("assistant", "".join(self.tokens))
        return self.context
