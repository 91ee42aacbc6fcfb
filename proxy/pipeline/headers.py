"""Response headers: the `x-splitstream-*` routing headers and which upstream headers are relayed.

The one place that decides what headers a client sees, whether the answer came from a backend (`relay.py`),
the result cache (`result_cache.py`) or an error (`middleware.py`): the same routing headers on all three.
Also reads the two upstream headers the path needs (content type, event stream). Pure functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import MutableMapping
from email.utils import parsedate_to_datetime
from typing import TypeVar

from multidict import CIMultiDict

from proxy.observe.record import NONE, RequestRecord
from proxy.upstream.connection import Headers

# Upstream response headers that describe the hop, not the answer: never relayed.
HOP_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
    "proxy-connection", "te", "trailer", "upgrade", "content-encoding",
})
CACHE_HEADER = "x-splitstream-cache"
FALLBACK_HEADER = "x-splitstream-fallback"
REQUEST_ID_HEADER = "x-splitstream-request-id"

H = TypeVar("H", bound=MutableMapping[str, str])


def routing_headers(record: RequestRecord, headers: H) -> H:
    """Add the request ids, where the request went once a route was chosen, and a limited tenant's
    x-ratelimit-* headers; returns `headers`.
    `x-request-id` is the client's own when it sent one; `x-splitstream-request-id` is always ours (the id
    POST /v1/feedback takes)."""
    headers["x-request-id"] = record.request_id
    headers[REQUEST_ID_HEADER] = record.splitstream_id
    if record.route is not NONE:
        headers["x-splitstream-route"] = record.route
        headers["x-splitstream-variant"] = record.variant
        headers["x-splitstream-backend"] = record.backend
        if record.fallback is not None:
            headers[FALLBACK_HEADER] = record.fallback
    if record.cache is not None:  # a coalesced answer is a hit to the client: it did not wait for its own
        headers[CACHE_HEADER] = "hit" if record.cache == "coalesced" else record.cache
    for name, value in record.limit_headers:  # a limited tenant's x-ratelimit-* (`pipeline/limits.py`)
        headers[name] = value
    return headers


def response_headers(upstream: Headers, record: RequestRecord) -> CIMultiDict[str]:
    """A backend's answer headers as relayed: its own, repeats kept (two `Set-Cookie`s stay two), minus
    hop-by-hop ones — the fixed list and any the runtime named in its `Connection` header — and any that
    claim to be ours."""
    hop = HOP_HEADERS
    for name, value in upstream:
        if name.lower() == b"connection":
            named = {token.strip().lower() for token in value.decode("latin-1").split(",")}
            hop = hop | named
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream:
        key = name.decode("latin-1").lower()
        if key not in hop and not key.startswith("x-splitstream-") and key != "x-request-id":
            headers.add(key, value.decode("latin-1"))
    return routing_headers(record, headers)


def content_type_of(upstream: Headers) -> str:
    for name, value in upstream:
        if name.lower() == b"content-type":
            return value.decode("latin-1")
    return "application/json"


def is_event_stream(upstream: Headers) -> bool:
    for name, value in upstream:
        if name.lower() == b"content-type":
            return value.startswith(b"text/event-stream")
    return False


def retry_after_of(upstream: Headers, cap: float, default: float = 1.0) -> float:
    """A runtime's `Retry-After` in seconds: finite delay-seconds or an HTTP date, at most `cap` (the
    pool's `health.max_ejection`). `inf`, `nan`, `1e12` or a date in 2999 must not bench a backend until
    restart; anything unreadable is `default`."""
    for name, value in upstream:
        if name.lower() == b"retry-after":
            return min(cap, max(0.0, _seconds_of(value.decode("latin-1").strip(), default)))
    return default


def _seconds_of(text: str, default: float) -> float:
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return default
    return seconds if math.isfinite(seconds) else default if math.isnan(seconds) else math.inf
