"""Result-cache policy: which requests may be cached, their exact key, and entries in either shape.

Pure (h11 style): a request view and headers in, a decision or a key out; entry bytes in, response bytes
out. A request is cached only when its answer is deterministic — temperature 0 (or the client forces it
with `x-splitstream-cache: force`), one choice — and the client did not say `Cache-Control: no-cache`
/ `no-store`. The key covers every field that can change the output (key order aside), the upstream model
actually used, the route and the tenant, so an entry never answers a request it does not exactly match.
Entries keep the runtime's bytes; a streamed entry can answer a JSON client and the reverse.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from proxy.pipeline.request import SCORING_ENDPOINTS, USAGE_OPTION_ENDPOINTS, RequestView
from proxy.pipeline.sse import SseRelay, ended_normally

FORCE_HEADER = "x-splitstream-cache"
# Fields that change how an answer is delivered or attributed, never what it says.
DELIVERY_FIELDS = frozenset({"model", "stream", "stream_options", "user"})
TYPED_DELIVERY_FIELDS = frozenset({"model"})  # the rest is echoed in the answer (metadata, user)
ENTRY_VERSION = 1


def bypass_reason(view: RequestView, cache_control: str | None, force: str | None, identified: bool) -> str | None:
    """Why this request must not use the cache, or None when it may. `identified`: the client sent a key, or
    the route shares its cache between clients (`cache.shared`) — anonymous clients would otherwise all be one
    tenant, and one could read what another asked."""
    if not identified:
        return "anonymous"
    if cache_control is not None:
        directives = cache_control.lower()
        if "no-store" in directives or "no-cache" in directives:
            return "client_opt_out"
    data = view.data
    if data.get("n", 1) != 1:
        return "several_choices"
    if view.endpoint == "responses" and (data.get("store") is not False or "previous_response_id" in data):
        return "stateful"  # it continues, or is kept for, a conversation the runtime holds (store defaults on)
    if force is not None and force.lower() == "force":
        return None
    if view.endpoint in SCORING_ENDPOINTS:
        return None  # an embedding or a relevance score is a function of its input
    if data.get("temperature") != 0:
        return "not_deterministic"
    return None


def cache_key(view: RequestView, upstream_model: str, route: str, tenant: str) -> str:
    """Hex digest over the canonical body (sorted keys, delivery fields dropped) and what it ran on. Answers of
    the typed-event APIs (Responses, Messages) are replayed only in the shape they were stored in, so for them
    `stream` is part of the key."""
    delivery = DELIVERY_FIELDS if view.endpoint in USAGE_OPTION_ENDPOINTS else TYPED_DELIVERY_FIELDS
    canonical = {k: v for k, v in view.data.items() if k not in delivery}
    body = orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256()
    for part in (view.path or view.endpoint, route, upstream_model, tenant):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()


def owner_of(tenant: str, authorization: str | None) -> str:
    """Whose answers these are (a cache partition, who may score them): the tenant when the rules name
    tenants — so rotating a key keeps the cache —, else the hashed client key (`tenant_of`)."""
    return f"tenant:{tenant}" if tenant else tenant_of(authorization, False)


def tenant_of(authorization: str | None, shared: bool) -> str:
    """Hashed client key (never the key): two tenants never share entries unless the route says so."""
    if shared:
        return "shared"
    if not authorization:
        return "anonymous"
    return hashlib.sha256(authorization.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# -- entries -----------------------------------------------------------------------------------------


class Entry:
    """A cached answer: the runtime's body as it came (JSON, or SSE with the usage event) and its type."""

    __slots__ = ("is_stream", "content_type", "body")

    def __init__(self, is_stream: bool, content_type: str, body: bytes) -> None:
        self.is_stream = is_stream
        self.content_type = content_type
        self.body = body

    def encode(self) -> bytes:
        head = orjson.dumps({"v": ENTRY_VERSION, "stream": self.is_stream, "type": self.content_type})
        return head + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        """None for anything this version did not write (old format, corruption): treated as a miss."""
        head, sep, body = raw.partition(b"\n")
        if not sep:
            return None
        try:
            meta = orjson.loads(head)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(meta, dict) or meta.get("v") != ENTRY_VERSION:
            return None
        return cls(bool(meta.get("stream")), str(meta.get("type", "application/json")), body)


def render(entry: Entry, view: RequestView) -> tuple[bytes, str]:
    """(body, content type) answering `view` from `entry`, in the shape the client asked for."""
    if view.endpoint not in USAGE_OPTION_ENDPOINTS:  # stored in the shape asked for (`stream` is in the key)
        return entry.body, entry.content_type
    if view.is_stream:
        sse = entry.body if entry.is_stream else json_to_sse(entry.body, view.endpoint)
        return strip_usage(sse) if not view.wants_usage else sse, "text/event-stream"
    if entry.is_stream:
        return sse_to_json(entry.body, view.endpoint), "application/json"
    return entry.body, entry.content_type


def strip_usage(sse: bytes) -> bytes:
    relay = SseRelay(strip_usage=True)
    return relay.feed(sse) + relay.finish()


def sse_to_json(sse: bytes, endpoint: str) -> bytes:
    """Assemble a streamed completion into the non-stream object a JSON client expects."""
    base: dict[str, Any] = {}
    texts: dict[int, list[str]] = {}
    finish: dict[int, Any] = {}
    roles: dict[int, str] = {}
    usage: Any = None
    for chunk in _events(sse):
        if not base:
            base = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            piece = delta.get("content") if endpoint == "chat" else choice.get("text")
            if isinstance(piece, str):
                texts.setdefault(index, []).append(piece)
            if isinstance(delta.get("role"), str):
                roles[index] = delta["role"]
            if choice.get("finish_reason") is not None:
                finish[index] = choice["finish_reason"]
    indexes = sorted(set(texts) | set(finish)) or [0]
    if endpoint == "chat":
        choices = [{"index": i, "message": {"role": roles.get(i, "assistant"), "content": "".join(texts.get(i, []))},
                    "logprobs": None, "finish_reason": finish.get(i)} for i in indexes]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": "".join(texts.get(i, [])), "logprobs": None,
                    "finish_reason": finish.get(i)} for i in indexes]
        obj = "text_completion"
    result = {**base, "object": obj, "choices": choices}
    if usage is not None:
        result["usage"] = usage
    return orjson.dumps(result)


def json_to_sse(body: bytes, endpoint: str) -> bytes:
    """Replay a JSON completion as a stream: one content chunk per choice, finish, usage, [DONE]."""
    data = orjson.loads(body)
    base = {k: data[k] for k in ("id", "created", "model", "system_fingerprint") if k in data}
    chunk_object = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    events = []
    for choice in data.get("choices") or []:
        index = choice.get("index", 0)
        if endpoint == "chat":
            message = choice.get("message") or {}
            delta = {"role": message.get("role", "assistant"), "content": message.get("content") or ""}
            parts = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None},
                     {"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}]
        else:
            parts = [{"index": index, "text": choice.get("text") or "", "logprobs": None, "finish_reason": None},
                     {"index": index, "text": "", "logprobs": None, "finish_reason": choice.get("finish_reason")}]
        for part in parts:
            events.append({**base, "object": chunk_object, "choices": [part], "usage": None})
    if "usage" in data:
        events.append({**base, "object": chunk_object, "choices": [], "usage": data["usage"]})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _events(sse: bytes) -> list[dict[str, Any]]:
    out = []
    for block in sse.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload and payload != b"[DONE]":
                    try:
                        parsed = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(parsed, dict):
                        out.append(parsed)
    return out


def is_complete_stream(sse: bytes, endpoint: str) -> bool:
    """A stream is worth keeping only if it ended normally: its endpoint's last event and no error event."""
    return ended_normally(sse, endpoint) and b"event: error" not in sse
