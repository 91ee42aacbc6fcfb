"""The request view: the client's body parsed once, and the upstream body derived from it.

Parsing happens here and nowhere else (orjson, once). The upstream body is the client's bytes untouched
unless something must change (the model name, or `stream_options.include_usage` for a stream); then it is
re-serialised once. Pure: no aiohttp, no I/O — `pipeline/body.py` reads the bytes, `pipeline/handler.py` calls `parse`.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import InvalidRequestError, MalformedBodyError

MAX_MODEL_LENGTH = 256  # longer names match no sane rule; refused before they reach a glob, a log or a map
# orjson parses nesting up to 1024 levels but serialises only 254: a deeper body could be read but never
# forwarded (a rewrite would fail as our 500). Refused at parse time, as the client's error.
MAX_NESTING = 254

# Client path → endpoint name used in rules (`match.endpoints`) and logs.
ENDPOINT_BY_PATH = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
GENERATING_ENDPOINTS = frozenset({"chat", "completions"})  # those a route's `max_tokens` cap applies to
TOKEN_LIMIT_KEYS = ("max_tokens", "max_completion_tokens")


class RequestView:
    """What the pipeline needs to know about one client request; `body` is kept for untouched forwarding."""

    __slots__ = ("endpoint", "body", "data", "model", "is_stream", "wants_usage", "max_tokens", "cap")

    def __init__(self, endpoint: str, body: bytes, data: dict[str, Any], model: str) -> None:
        self.endpoint = endpoint
        self.body = body
        self.data = data
        self.model = model
        self.is_stream = data.get("stream") is True
        options = data.get("stream_options")
        self.wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
        self.max_tokens = max_tokens if type(max_tokens) is int and max_tokens > 0 else None
        self.cap: int | None = None  # a route's max_tokens cap the upstream body must apply

    def apply_cap(self, cap: int | None) -> None:
        """A route's `max_tokens` cap: a larger max_tokens / max_completion_tokens is lowered to it, and one is
        set when the client gave neither (the runtime's own default may be its whole context). A value that is
        not a positive integer is left for the runtime to refuse. `max_tokens` (the cost model's) is capped."""
        if cap is None or self.endpoint not in GENERATING_ENDPOINTS:
            return
        data = self.data
        if any(_exceeds(data.get(key), cap) for key in TOKEN_LIMIT_KEYS) or not any(k in data for k in TOKEN_LIMIT_KEYS):
            self.cap = cap
            self.max_tokens = cap if self.max_tokens is None else min(self.max_tokens, cap)

    def upstream_body(self, pool_model: str | None) -> bytes:
        """Bytes for the runtime: the model renamed, usage requested for streams, the route's max_tokens cap
        applied, nothing else touched."""
        rename = pool_model is not None and pool_model != self.model
        add_usage = self.is_stream and not self.wants_usage
        cap = self.cap
        if not rename and not add_usage and cap is None:
            return self.body
        data = dict(self.data)
        if rename:
            data["model"] = pool_model
        if cap is not None:
            present = [key for key in TOKEN_LIMIT_KEYS if key in data]
            for key in present:
                if _exceeds(data[key], cap):
                    data[key] = cap
            if not present:
                data["max_tokens"] = cap
        if add_usage:
            options = self.data.get("stream_options")
            data["stream_options"] = {**options, "include_usage": True} if isinstance(options, dict) else {
                "include_usage": True
            }
        return orjson.dumps(data)


def _exceeds(value: Any, cap: int) -> bool:
    return type(value) is int and value > cap


def parse(endpoint: str, body: bytes) -> RequestView:
    """Validate the parts splitstream relies on; everything else is the runtime's business."""
    if not body:
        raise MalformedBodyError("We could not parse the JSON body of your request: the body is empty.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBodyError(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedBodyError("The request body must be a JSON object.")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("You must provide a model parameter (a non-empty string).")
    if len(model) > MAX_MODEL_LENGTH:
        raise InvalidRequestError(f"The model parameter is longer than {MAX_MODEL_LENGTH} characters.")
    # Nesting past the limit needs that many opening brackets: counting bytes (C speed) spares the walk.
    if body.count(b"[") + body.count(b"{") > MAX_NESTING and _is_deeper_than(data, MAX_NESTING):
        raise InvalidRequestError(f"The request body nests deeper than {MAX_NESTING} levels.")
    return RequestView(endpoint, body, data, model)


def _is_deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON containers nest more than `limit` levels (iterative: no recursion a client controls).

    Only called with what orjson parsed (at most 1024 levels), and it stops at the first container past
    the limit, so its cost is bounded by the body's size."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values() if isinstance(child, (dict, list)))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False
