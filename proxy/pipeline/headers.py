"""Response headers: the `x-splitstream-*` routing headers and which upstream headers are relayed.

The one place that decides what headers a client sees, whether the answer came from a backend (`relay.py`),
the result cache (`result_cache.py`) or an error (`middleware.py`): the same routing headers on all three.
Also reads the two upstream headers the path needs (content type, event stream). Pure functions.
"""

from __future__ import annotations

from proxy.observe.record import NONE, RequestRecord
from proxy.upstream.connection import Headers

# Upstream response headers that describe the hop, not the answer: never relayed.
HOP_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
    "proxy-connection", "te", "trailer", "upgrade", "content-encoding",
})
CACHE_HEADER = "x-splitstream-cache"


def routing_headers(record: RequestRecord, headers: dict[str, str]) -> dict[str, str]:
    """Add the request id and, once a route was chosen, where the request went; returns `headers`."""
    headers["x-request-id"] = record.request_id
    if record.route is not NONE:
        headers["x-splitstream-route"] = record.route
        headers["x-splitstream-variant"] = record.variant
        headers["x-splitstream-backend"] = record.backend
    if record.cache is not None:  # a coalesced answer is a hit to the client: it did not wait for its own
        headers[CACHE_HEADER] = "hit" if record.cache == "coalesced" else record.cache
    return headers


def response_headers(upstream: Headers, record: RequestRecord) -> dict[str, str]:
    """A backend's answer headers as relayed: its own minus hop-by-hop ones and any that claim to be ours."""
    headers: dict[str, str] = {}
    for name, value in upstream:
        key = name.decode("latin-1").lower()
        if key not in HOP_HEADERS and not key.startswith("x-splitstream-") and key != "x-request-id":
            headers[key] = value.decode("latin-1")
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
