"""The OpenAI wire shapes the simulated runtime speaks: request parsing helpers, token counting, response
bodies, stream chunks, usage, embeddings. Pure functions over a parsed `Job`; no I/O, no timing (that is
`sim/runtime.py`). Deterministic where the real thing is at temperature 0: same request, same text.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

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
    """Validation failure, turned into an OpenAI error body by the handler."""

    __slots__ = ("status", "type", "code", "message")

    def __init__(self, status: int, message: str, type_: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code


@dataclass(slots=True)
class Job:
    """One parsed generation request."""

    chat: bool
    model: str
    rid: str
    created: int
    prompt_tokens: int
    tokens: list[str]
    include_usage: bool = False


def error_response(status: int, message: str, type_: str, code: str) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": type_, "code": code}})
    return web.Response(status=status, body=body, content_type=JSON)


def invalid(message: str, code: str = "invalid_request") -> BadRequest:
    return BadRequest(400, message, "invalid_request_error", code)


def _content_chars(content: Any) -> int:
    """Characters of a chat message content: a string, or a list of parts whose `text` counts."""
    if isinstance(content, str):
        return len(content)
    if content is None:
        return 0
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise invalid("message content must be a string, a list of content parts or null")


def chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty list")
    chars = 0
    for m in messages:
        if not isinstance(m, dict):
            raise invalid("each message must be an object")
        chars += _content_chars(m.get("content"))
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


def embedding(text: str, dim: int) -> list[float]:
    """A unit vector derived from the text only: same input, same vector, across runs and processes."""
    rng = seeded_rng(text)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def usage(job: Job) -> dict[str, int]:
    n = len(job.tokens)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}


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
    return {
        "id": job.rid,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "choices": [choice],
        "usage": usage(job),
    }


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
    return out


def usage_chunk(job: Job) -> dict[str, Any]:
    return {
        "id": job.rid,
        "object": "chat.completion.chunk" if job.chat else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": [],
        "usage": usage(job),
    }


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise invalid("`input` must be a string or a non-empty list of strings")


def encode_vector(vec: list[float], fmt: str) -> list[float] | str:
    """`base64` is little-endian float32, as OpenAI and vLLM send it (the openai SDK asks for it)."""
    if fmt == "float":
        return vec
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
