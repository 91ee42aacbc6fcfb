"""The OpenAI wire shapes the simulated runtime speaks (chat, completions, models) and what every API layer
shares: the `Generation`/`Pooling` interfaces the runtime drives, token choice, token counting, the canonical
prompt text the prefix cache hashes, the OpenAI error body. Pure functions over parsed jobs; no I/O, no timing
(that is `sim/runtime.py`). The other APIs' shapes are `sim/responses.py`, `sim/messages.py`,
`sim/embeddings.py`, `sim/ranking.py`. Deterministic where the real thing is at temperature 0: same request,
same text.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
from aiohttp import web

from proxy.sim.sequence import SequenceState

# 64 one-word tokens; a token is a word followed by a space so token count == word count.
WORDS: Final[tuple[str, ...]] = tuple(
    w + " "
    for w in (
        "the of and to in is that for it as with was on be by at this from or an are not but all have "
        "one can more when will would there their what about which out up time into only other some "
        "could these two may first then do any like my now over such our man me even most made after "
        "also"
    ).split()
)
assert len(WORDS) == 64

JSON: Final = "application/json"
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE: Final = b"data: [DONE]\n\n"
OWNER: Final = "splitstream-sim"


class BadRequest(Exception):
    """A refused request (validation, unknown model or id, injected failure); each API layer renders it in
    its own error shape (`render_error` here, `sim/messages.py` `render_error`)."""

    __slots__ = ("status", "type", "code", "message", "param")

    def __init__(self, status: int, message: str, type_: str, code: str | None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param  # OpenAI names the offending field on some errors; left out of the body when None


ErrorRenderer = Callable[[BadRequest], web.Response]

FAILURE: Final = BadRequest(500, "simulated backend failure", "server_error", "internal_error")  # fail_rate


class Limits(Protocol):
    """The runtime knobs an API layer reads while parsing (`SimConfig` has them)."""

    @property
    def models(self) -> tuple[str, ...]: ...
    @property
    def default_max_tokens(self) -> int: ...
    @property
    def max_context(self) -> int: ...


class Generation(Protocol):
    """One parsed generation, whatever API it came in by. The runtime owns slots, pacing, failures and
    disconnects and writes what these methods render (`sim/runtime.py` `_generate`, `_stream`)."""

    rid: str  # the pacer's request id
    prompt_tokens: int
    tokens: list[str]  # one word per token, chosen by `choose_tokens`
    # Set by the runtime, before `head`, only when the answer reports the prefix cache or timings: what to say.
    sequence: SequenceState | None

    def body(self) -> bytes:
        """The whole non-streamed answer (JSON)."""
        ...

    def head(self) -> bytes:
        """Stream bytes due before the first token is generated (may be empty)."""
        ...

    def frame(self, index: int, token: str) -> bytes:
        """The stream bytes that carry token `index`: one write, so a relay that buffers is observable."""
        ...

    def tail(self) -> tuple[bytes, ...]:
        """The stream's close after the last token, one write each."""
        ...

    def complete(self) -> None:
        """Called once the whole answer was written (the Responses API remembers it here)."""
        ...

    def prompt_text(self) -> str:
        """The prompt as one canonical text (`turn_text` per message), what the prefix cache hashes; computed
        only when the cache is on."""
        ...

    def context_text(self) -> str:
        """`prompt_text` followed by the answer as the client's next turn repeats it, so that turn's prompt
        starts with it and finds it cached."""
        ...


class Pooling(Protocol):
    """One parsed single-pass request (embeddings, rerank, score): a slot and a prefill, no tokens out."""

    rid: str
    prompt_tokens: int

    def body(self) -> bytes: ...


@dataclass(slots=True)
class Job:
    """One parsed chat or completions request (a `Generation`)."""

    chat: bool
    model: str
    rid: str
    created: int
    prompt_tokens: int
    tokens: list[str]
    include_usage: bool = False
    source: Any = None  # `messages` (chat) or `prompt` (completions), as sent: read only by `prompt_text`
    sequence: SequenceState | None = None

    def body(self) -> bytes:
        return orjson.dumps(full_body(self))

    def head(self) -> bytes:
        return b""

    def frame(self, index: int, token: str) -> bytes:
        return sse(chunk(self, index, token, index == len(self.tokens) - 1))

    def tail(self) -> tuple[bytes, ...]:
        if self.include_usage:
            return sse(usage_chunk(self)), DONE
        return (DONE,)

    def complete(self) -> None:
        pass

    def prompt_text(self) -> str:
        if not self.chat:
            return self.source if isinstance(self.source, str) else "".join(self.source or ())
        return "".join(turn_text(str(m.get("role")), content_text(m.get("content"))) for m in self.source or ())

    def context_text(self) -> str:
        answer = "".join(self.tokens)
        return self.prompt_text() + (turn_text("assistant", answer) if self.chat else answer)


def render_error(e: BadRequest) -> web.Response:
    """OpenAI's (and vLLM's) error body."""
    error: dict[str, Any] = {"message": e.message, "type": e.type, "code": e.code}
    if e.param is not None:
        error["param"] = e.param
    return web.Response(status=e.status, body=orjson.dumps({"error": error}), content_type=JSON)


def invalid(message: str, code: str = "invalid_request") -> BadRequest:
    return BadRequest(400, message, "invalid_request_error", code)


def model_not_found(model: Any) -> BadRequest:
    return BadRequest(404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found")


def model_of(body: dict[str, Any], models: tuple[str, ...]) -> str:
    """The request's model if this runtime serves it; an OpenAI 404 otherwise."""
    model = body.get("model")
    if not isinstance(model, str) or model not in models:
        raise model_not_found(model)
    return model


def model_card(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": OWNER}


def positive_int(body: dict[str, Any], name: str) -> int | None:
    """An optional token limit: absent or null is None, else it must be an int >= 1."""
    n = body.get(name)
    if n is None:
        return None
    if type(n) is not int or n < 1:
        raise invalid(f"`{name}` must be a positive integer")
    return n


def choose_tokens(rng: random.Random, n: int, temperature: Any, *seed: Any) -> list[str]:
    """The text of every generation API: at temperature 0 an RNG seeded from `seed` (the request's content),
    so the same request gives the same text on any runtime; otherwise the runtime's own RNG."""
    return (seeded_rng(*seed) if temperature == 0 else rng).choices(WORDS, k=n)


def content_chars(content: Any) -> int:
    """Characters of a chat message content: a string, or a list of parts whose `text` counts."""
    if isinstance(content, str):
        return len(content)
    if content is None:
        return 0
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise invalid("message content must be a string, a list of content parts or null")


def content_text(content: Any) -> str:
    """The text of a validated message content: the same parts `content_chars` counts, joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def turn_text(role: str, text: str) -> str:
    """One message in the canonical prompt text the prefix cache hashes. Every API renders a conversation as
    these turns in order, so a next turn (the conversation, the answer, a new message) extends the last prompt."""
    return f"<|{role}|>{text}\n"


def chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty list")
    chars = 0
    for m in messages:
        if not isinstance(m, dict):
            raise invalid("each message must be an object")
        chars += content_chars(m.get("content"))
    return max(1, chars // 4) + 4 * len(messages)


def completion_prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, str):
        return max(1, len(prompt) // 4)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return max(1, sum(len(p) for p in prompt) // 4)
    raise invalid("`prompt` must be a string or a non-empty list of strings")


def context_exceeded(context: int, prompt_tokens: int, max_tokens: int) -> BadRequest:
    """vLLM's refusal of a request longer than the model's context (message as vLLM words it; the code is
    OpenAI's `context_length_exceeded`)."""
    return BadRequest(
        400,
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
        "Please reduce the length of the messages or completion.",
        "invalid_request_error",
        "context_length_exceeded",
    )


def max_tokens_of(body: dict[str, Any], default: int) -> int:
    n = body.get("max_tokens")
    if n is None:
        n = body.get("max_completion_tokens")
    if n is None:
        return default
    if type(n) is not int or n < 1:
        raise invalid("`max_tokens` must be a positive integer")
    return n


def seeded_rng(*parts: Any) -> random.Random:
    """An RNG seeded from the request's content, so temperature 0 gives the same text every time."""
    digest = hashlib.blake2b(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def usage(job: Job) -> dict[str, Any]:
    """OpenAI's usage; with the prefix cache on, vLLM's `prompt_tokens_details` (cached tokens are a part of
    `prompt_tokens`, not apart from it)."""
    n = len(job.tokens)
    out: dict[str, Any] = {
        "prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n
    }
    state = job.sequence
    if state is not None and state.reports_cache:
        out["prompt_tokens_details"] = {"cached_tokens": state.cached_tokens}
    return out


def add_timings(event: dict[str, Any], job: Job) -> dict[str, Any]:
    """llama.cpp's `timings` beside the usage of the non-streamed body or the stream's last chunk, when asked."""
    state = job.sequence
    if state is not None and state.reports_timings:
        event["timings"] = state.timings()
    return event


def full_body(job: Job) -> dict[str, Any]:
    text = "".join(job.tokens)
    choice: dict[str, Any]
    if job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text}
        obj = "text_completion"
    choice["finish_reason"] = "length"
    choice["logprobs"] = None
    return add_timings({
        "id": job.rid,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "choices": [choice],
        "usage": usage(job),
    }, job)


def chunk(job: Job, index: int, token: str, last: bool) -> dict[str, Any]:
    finish = "length" if last else None
    if job.chat:
        delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": token, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out: dict[str, Any] = {
        "id": job.rid,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "choices": [choice],
    }
    if job.include_usage:
        out["usage"] = None
    elif last:  # no usage chunk follows: the timings go on the last chunk, as llama.cpp puts them
        add_timings(out, job)
    return out


def usage_chunk(job: Job) -> dict[str, Any]:
    return add_timings({
        "id": job.rid,
        "object": "chat.completion.chunk" if job.chat else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": [],
        "usage": usage(job),
    }, job)


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def typed_sse(event: dict[str, Any]) -> bytes:
    """An SSE event named by its `type` (the Responses and Messages APIs): `event: <type>` then `data:`."""
    name: str = event["type"]
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
