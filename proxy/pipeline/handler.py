"""HTTP handlers: the inference endpoints walk the pipeline stages in order; the rest answer from state.

inference: read body → parse (once) → route → variant (split) → cache lookup → dispatch (backend lease,
forward, fail-over) → shadow copies → relay → settle. Each stage lives in its own module; this one only
sequences them and owns the lifetimes (`finally`): lease, connection, cache flight, shadow pairing, so
everything is given back however a request ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from proxy.config.model import Pool, Route, Snapshot, Variant
from proxy.context import CONTEXT, ProxyContext, hash_api_key
from proxy.errors import (
    BodyTooLargeError,
    ClientAuthError,
    ContentTypeError,
    OverloadedError,
    UnknownModelError,
)
from proxy.observe.record import CLIENT_CLOSED, RequestRecord
from proxy.pipeline import request as request_view
from proxy.pipeline.assignment import assign_variant, find_subject
from proxy.pipeline.cache import FORCE_HEADER, bypass_reason, cache_key, tenant_of
from proxy.pipeline.compare import MAX_CAPTURE_BYTES, Side
from proxy.pipeline.dispatch import Attempt, dispatch, settle
from proxy.pipeline.errors import RECORD
from proxy.pipeline.forward import Deadlines
from proxy.pipeline.relay import content_type_of, relay_body, relay_stream
from proxy.pipeline.request import RequestView
from proxy.pipeline.response_cache import Flight, Lookup, answer_from_entry, follow
from proxy.upstream.probe import is_reachable


def check_client_key(context: ProxyContext, request: web.Request) -> None:
    """When client keys are configured (SPLITSTREAM_API_KEYS), require one of them as a Bearer token."""
    if not context.client_key_hashes:
        return
    auth = request.headers.get("Authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or hash_api_key(key.strip()) not in context.client_key_hashes:
        raise ClientAuthError("Incorrect API key provided.")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing anything over `limit` before reading it when the length is announced."""
    content_type = request.headers.get("Content-Type")
    if content_type is not None and "json" not in content_type.lower():
        raise ContentTypeError(f"Unsupported Content-Type '{content_type[:64]}': send application/json.")
    length = request.content_length
    too_large = BodyTooLargeError(f"The request body is larger than the limit of {limit} bytes.")
    if length is not None:
        if length > limit:
            raise too_large
        return await request.read()
    parts = []
    size = 0
    async for part in request.content.iter_any():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


async def choose_variant(
    context: ProxyContext, route: Route, request: web.Request, view: request_view.RequestView
) -> Variant:
    """The variant serving this request (policy: `pipeline/split.py`; store I/O: `pipeline/assignment.py`),
    drawn with the weights in force: a running rollout's (`delivery/weights.py`), else the rules'."""
    if route.sticky is None and len(route.variants) == 1:
        return route.variants[0]  # a plain `pool:` route: nothing to decide, nothing to count
    subject = find_subject(route.sticky, request.headers, view)
    variants = context.weights.variants_for(route)
    variant, source = await assign_variant(
        route, subject, context.store, context.rng, variants, context.recent_assignments
    )
    context.metrics.count_assignment(route.name, variant.name, source)
    return variant


async def inference(request: web.Request) -> web.StreamResponse:
    context = request.app[CONTEXT]
    record = request[RECORD]
    snapshot = context.rules.current  # read once: this request finishes on these rules
    if context.inflight >= snapshot.server.max_inflight:
        raise OverloadedError("splitstream is at its limit of requests in flight; retry shortly.")
    check_client_key(context, request)
    context.inflight += 1
    try:
        return await _serve(request, context, snapshot, record)
    finally:
        context.inflight -= 1


async def _serve(
    request: web.Request, context: ProxyContext, snapshot: Snapshot, record: RequestRecord
) -> web.StreamResponse:
    body = await read_body(request, snapshot.server.max_body_bytes)
    record.bytes_in = len(body)
    view = request_view.parse(request_view.ENDPOINT_BY_PATH[request.path], body)
    route = snapshot.match(view.model, view.endpoint)
    if route is None:
        raise UnknownModelError(f"The model `{view.model[:256]}` does not exist or no route serves it.")
    variant = await choose_variant(context, route, request, view)
    pool = variant.pool
    record.route, record.variant, record.stream = route.name, variant.name, view.is_stream
    loop_time = asyncio.get_running_loop().time
    flight: Flight | None = None
    if route.cache is not None:
        lookup = await cache_lookup(context, route, pool.model or view.model, view, request, record)
        if lookup is not None and lookup.entry is not None:
            record.backend, record.ttft = "cache", loop_time() - record.started
            return answer_from_entry(lookup.entry, view, record, "hit")
        if lookup is not None and lookup.follow is not None:
            record.backend = "cache"
            response = await follow(request, lookup.follow, view, record, loop_time)
            if response is not None:
                return response
            record.cache = "miss"  # the request we followed failed before sharing anything: go ourselves
        elif lookup is not None:
            flight = lookup.lead
    ok = False
    try:
        response = await _forward(request, context, snapshot, route, pool, view, record, flight)
        ok = record.error is None and record.status != CLIENT_CLOSED
        return response
    finally:
        if flight is not None and lookup is not None:
            context.cache.end(lookup.key, flight, ok, route.cache)


async def cache_lookup(
    context: ProxyContext, route: Route, upstream_model: str, view: RequestView, request: web.Request,
    record: RequestRecord,
) -> Lookup | None:
    """Hit, follow or lead for a cacheable request; None (counted as bypass) for one that must not be cached."""
    assert route.cache is not None
    headers = request.headers
    if bypass_reason(view, headers.get("Cache-Control"), headers.get(FORCE_HEADER)) is not None:
        context.cache.bypass(route.name)
        record.cache = "bypass"
        return None
    tenant = tenant_of(headers.get("Authorization"), route.cache.shared)
    lookup = await context.cache.begin(cache_key(view, upstream_model, route.name, tenant), route.name)
    record.cache = lookup.result
    return lookup


async def _forward(
    request: web.Request, context: ProxyContext, snapshot: Snapshot, route: Route, pool: Pool, view: RequestView,
    record: RequestRecord, flight: Flight | None,
) -> web.StreamResponse:
    """Upstream: dispatch (with fail-over), mirror to shadows, relay; the answer also fills `flight` if given."""
    loop_time = asyncio.get_running_loop().time
    payload = view.upstream_body(pool.model)
    deadlines = Deadlines(route.timeouts, record.started)
    attempt = await dispatch(context, snapshot, route, pool, view, payload, request.path, record, deadlines)
    status = attempt.conn.status
    pairs = context.shadows.mirror(route, view, request.path, record.request_id) if route.shadows else None
    capture = bytearray() if pairs and attempt.body is None else None
    if flight is not None:
        flight.status, flight.is_stream = status, attempt.body is None
        flight.content_type = content_type_of(attempt.conn.headers)
        if attempt.body is not None:
            flight.append(attempt.body)
    try:
        if attempt.body is not None:
            return relay_body(attempt.conn, attempt.body, record)
        return await relay_stream(request, attempt.conn, attempt.first_chunk, view, deadlines, record,
                                  context.metrics, loop_time, _tee(capture, flight))
    except asyncio.CancelledError:
        record.status = CLIENT_CLOSED
        raise
    finally:
        settle(context, attempt, record, len(view.body))
        if pairs:
            output = attempt.body if attempt.body is not None else bytes(capture or b"")
            context.shadows.primary_done(pairs, primary_side(record, status, output, view.is_stream, attempt, loop_time()))


def _tee(capture: bytearray | None, flight: Flight | None) -> Callable[[bytes], None] | None:
    """Where a stream's upstream bytes are copied: the shadow comparison (bounded) and/or the cache flight."""
    if capture is None:
        return flight.append if flight is not None else None

    def copy(chunk: bytes) -> None:
        if len(capture) < MAX_CAPTURE_BYTES:
            capture.extend(chunk)
        if flight is not None:
            flight.append(chunk)

    return copy


def primary_side(
    record: RequestRecord, status: int, output: bytes, is_stream: bool, attempt: Attempt, now: float
) -> Side:
    """The primary's answer as the shadow comparison sees it, timed from its own send like the shadow's."""
    ttft = None if record.ttft is None else record.ttft - (attempt.started - record.started)
    return Side(record.status or status, now - attempt.started, ttft if is_stream else None,
                record.prompt_tokens, record.completion_tokens, output, is_stream)


async def list_models(request: web.Request) -> web.Response:
    """The models clients may ask for: plain (non-glob) names from the routes' match patterns."""
    context = request.app[CONTEXT]
    check_client_key(context, request)
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "splitstream"}
        for name in context.rules.current.advertised_models
    ]
    return web.json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Says nothing about backends (that is /readyz)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: rules are loaded and every route has at least one backend that answers its probe."""
    context = request.app[CONTEXT]
    snapshot = context.rules.current
    assert context.pool is not None
    backends = {b.identity: b for route in snapshot.routes for v in route.variants for b in v.pool.backends}
    results = dict(zip(backends, await asyncio.gather(*(is_reachable(b) for b in backends.values())), strict=True))
    unready = [
        route.name
        for route in snapshot.routes
        if not any(results[b.identity] for v in route.variants for b in v.pool.backends)
    ]
    body = {"status": "ready" if not unready else "unready", "generation": snapshot.generation,
            "routes_without_backend": unready}
    return web.json_response(body, status=200 if not unready else 503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[CONTEXT].metrics.exposition(request.headers.get("Accept"))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type  # carries a `;` that content_type= would reject
    return response
