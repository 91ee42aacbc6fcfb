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

# Client path → endpoint name used in rules (`match.endpoints`) and logs. The path goes upstream as it came.
ENDPOINT_BY_PATH = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",  # OpenAI Responses API
    "/v1/messages": "messages",  # Anthropic Messages API
    "/v1/messages/count_tokens": "messages",
    "/v1/rerank": "rerank",
    "/v1/score": "score",
}
# Per endpoint, the body fields that bound the answer's length (a route's `max_tokens` cap lowers them; the
# first one is set when none is given). Endpoints not listed generate nothing.
TOKEN_LIMIT_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("max_tokens", "max_completion_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "messages": ("max_tokens",),
}
# Endpoints whose streams carry usage only when asked (`stream_options.include_usage`): splitstream asks,
# and strips it again for a client that did not. The typed-event APIs always report usage.
USAGE_OPTION_ENDPOINTS = frozenset({"chat", "completions"})
# Endpoints that answer without generating: their cost is the input alone.
SCORING_ENDPOINTS = frozenset({"embeddings", "rerank", "score"})


class RequestView:
    """What the pipeline needs to know about one client request; `body` is kept for untouched forwarding."""

    __slots__ = ("endpoint", "body", "data", "model", "is_stream", "wants_usage", "max_tokens", "cap", "path",
                 "passed")

    def __init__(self, endpoint: str, body: bytes, data: dict[str, Any], model: str, path: str = "") -> None:
        self.endpoint = endpoint
        self.body = body
        self.data = data
        self.model = model
        self.path = path  # the client's: several map to one endpoint
        self.passed = ""  # the client's header lines the runtime gets (`forward.passed_headers`, once routed)
        self.is_stream = data.get("stream") is True
        if endpoint in USAGE_OPTION_ENDPOINTS:
            options = data.get("stream_options")
            self.wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        else:
            self.wants_usage = True  # usage events are part of the stream: never added, never stripped
        self.max_tokens = _limit_of(data, TOKEN_LIMIT_KEYS.get(endpoint, ()))
        self.cap: int | None = None  # a route's max_tokens cap the upstream body must apply

    def apply_cap(self, cap: int | None) -> None:
        """A route's `max_tokens` cap: a larger max_tokens / max_completion_tokens is lowered to it, and one is
        set when the client gave neither (the runtime's own default may be its whole context). A value that is
        not a positive integer is left for the runtime to refuse. `max_tokens` (the cost model's) is capped."""
        keys = TOKEN_LIMIT_KEYS.get(self.endpoint)
        if cap is None or keys is None or self.path == "/v1/messages/count_tokens":
            return
        data = self.data
        if any(_exceeds(data.get(key), cap) for key in keys) or not any(key in data for key in keys):
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
            keys = TOKEN_LIMIT_KEYS[self.endpoint]
            present = [key for key in keys if key in data]
            for key in present:
                if _exceeds(data[key], cap):
                    data[key] = cap
            if not present:
                data[keys[0]] = cap
        if add_usage:
            options = self.data.get("stream_options")
            data["stream_options"] = {**options, "include_usage": True} if isinstance(options, dict) else {
                "include_usage": True
            }
        return orjson.dumps(data)


def _limit_of(data: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """The answer's length bound the client gave (the first of `keys` present), if a positive integer."""
    for key in reversed(keys):  # max_completion_tokens wins over the older max_tokens
        if key in data:
            value = data[key]
            return value if type(value) is int and value > 0 else None
    return None


def _exceeds(value: Any, cap: int) -> bool:
    return type(value) is int and value > cap


def parse(endpoint: str, body: bytes, path: str = "") -> RequestView:
    """Validate the parts splitstream relies on; everything else is the runtime's business. `path`: the
    client's (several map to one endpoint)."""
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
    return RequestView(endpoint, body, data, model, path)


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
