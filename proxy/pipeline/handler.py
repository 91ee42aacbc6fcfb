"""The client endpoints: inference walks the pipeline stages in order; the rest answer from state.

inference: tenant (key) → read body → parse (once) → route (its max_tokens cap, the headers passed on) →
variant (split; a Responses follow-up pinned to the backend holding its state) → tenant limits → cache
lookup → dispatch (backend lease, forward, fail-over, then the route's fallback pools; a stream's heartbeats
meanwhile) → shadow copies → relay → settle. Each stage lives in its own module; this one only sequences them
and owns the lifetimes (`finally`): limit reservation, heartbeat, lease, connection, cache flight, shadow
pairing, so everything is given back however a request ends. `Endpoints`
is built once by `app.py` with exactly the parts the request path uses; its methods are the route handlers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.auth import identify
from proxy.config.model import Pool, Route, RulesHolder, Snapshot, Tenant, Variant
from proxy.errors import (
    BackendThrottledError,
    OverloadedError,
    PreviousResponseGoneError,
    PreviousResponseUnavailableError,
    SplitstreamError,
    UnknownModelError,
    UpstreamError,
)
from proxy.observe.metrics import Metrics
from proxy.observe.record import CLIENT_CLOSED, RequestRecord
from proxy.pipeline import request as request_view
from proxy.pipeline.affinity import ResponseOwners, continued, is_stored, response_id_of
from proxy.pipeline.assignment import Splitter, find_subject
from proxy.pipeline.body import read_body
from proxy.pipeline.deadlines import Deadlines
from proxy.pipeline.cost import Estimate
from proxy.pipeline.dispatch import Dispatcher
from proxy.pipeline.forward import passed_headers
from proxy.pipeline.limits import Limiter
from proxy.pipeline.middleware import RECORD
from proxy.pipeline.relay import Heartbeat, end_stream, relay_body, relay_stream, runtime_error
from proxy.pipeline.request import RequestView
from proxy.pipeline.result_cache import Flight, ResultCache, answer_from_entry, follow
from proxy.pipeline.shadow import Mirror, ShadowMirror
from proxy.types import Clock
from proxy.upstream.probe import is_reachable
from proxy.upstream.queue import NORMAL

Sink = Callable[[bytes], None]
READINESS_MAX_AGE = 1.0  # seconds a /readyz answer is reused


class Endpoints:
    """The client-facing handlers and the parts they share. `inflight`: client requests being served."""

    __slots__ = ("rules", "limiter", "splitter", "cache", "dispatcher", "shadows", "owners", "metrics", "clock",
                 "inflight", "_readiness", "_readiness_probe")

    def __init__(
        self, rules: RulesHolder, limiter: Limiter, splitter: Splitter, cache: ResultCache,
        dispatcher: Dispatcher, shadows: ShadowMirror, owners: ResponseOwners, metrics: Metrics, clock: Clock,
    ) -> None:
        self.rules = rules
        self.limiter = limiter
        self.splitter = splitter
        self.cache = cache
        self.dispatcher = dispatcher
        self.shadows = shadows
        self.owners = owners  # which backend holds each stored Responses answer
        self.metrics = metrics
        self.clock = clock  # the age of a /readyz answer (tests pass a fake one)
        self.inflight = 0
        self._readiness: tuple[int, float, dict[str, Any]] | None = None  # (generation, clock time, body)
        self._readiness_probe: asyncio.Task[tuple[int, float, dict[str, Any]]] | None = None

    async def inference(self, request: web.Request) -> web.StreamResponse:
        record = request[RECORD]
        snapshot = self.rules.current  # read once: this request finishes on these rules
        tenant = identify(snapshot.tenants, request.headers)  # 401 before the body is read
        if tenant is not None:
            record.tenant = tenant.name
        server = snapshot.server
        # In flight only once its body is here: a slow client holds its own socket, never a slot for work.
        body = await read_body(request, server.max_body_bytes, server.read_timeout)
        if self.inflight >= server.max_inflight:
            raise OverloadedError("splitstream is at its limit of requests in flight; retry shortly.")
        self.inflight += 1
        try:
            return await self._serve(request, snapshot, tenant, record, body)
        finally:
            self.inflight -= 1

    async def _serve(
        self, request: web.Request, snapshot: Snapshot, tenant: Tenant | None, record: RequestRecord, body: bytes
    ) -> web.StreamResponse:
        record.bytes_in = len(body)
        view = request_view.parse(request_view.ENDPOINT_BY_PATH[request.path], body, request.path)
        route = snapshot.match(view.model, view.endpoint, tenant)
        if route is None:
            raise UnknownModelError(
                f"The model `{view.model[:256]}` does not exist or you do not have access to it.")
        view.apply_cap(route.max_tokens)  # before anything prices or forwards the request
        view.passed = passed_headers(request.headers, route.forward_headers, view.endpoint, record.upstream_trace)
        record.model = view.model
        variant = await self.splitter.choose(route, request.headers, view)
        pool, pinned = variant.pool, None
        previous = continued(view)
        if previous is not None:  # a Responses follow-up: only the backend holding its state can answer
            pinned = await self.owners.owner(previous)
            if pinned is not None:
                variant, pool = _holder(route, variant, pinned, previous)
        record.route, record.variant, record.stream = route.name, variant.name, view.is_stream
        if tenant is None or not tenant.limits.any:
            return await self._answer(request, snapshot, route, pool, view, record, None, tenant, pinned)
        est = self.dispatcher.estimate(pool, view, route)  # priced once: the reservation and the balancer share it
        ticket = await self.limiter.admit(tenant, est, view.max_tokens, record)
        try:
            return await self._answer(request, snapshot, route, pool, view, record, est, tenant, pinned)
        finally:
            self.limiter.settle(ticket, record)

    async def _answer(
        self, request: web.Request, snapshot: Snapshot, route: Route, pool: Pool, view: RequestView,
        record: RequestRecord, est: Estimate | None, tenant: Tenant | None, pinned: str | None,
    ) -> web.StreamResponse:
        """From the cache (hit, or following an identical request in flight) or from a backend. `est`: the
        request's size when the limits already priced it (else dispatch does, and a cache hit never).
        `pinned`: the one backend that may answer (a stateful request: never cached)."""
        priority = tenant.priority if tenant is not None else NORMAL
        if route.cache is None or pinned is not None:
            return await self._forward(request, snapshot, route, pool, view, record, None, est, priority, pinned)
        loop_time = asyncio.get_running_loop().time
        lookup = await self.cache.lookup(route, pool.model or view.model, view, request.headers, record)
        if lookup is None:
            return await self._forward(request, snapshot, route, pool, view, record, None, est, priority, None)
        if lookup.entry is not None:
            record.backend, record.ttft = "cache", loop_time() - record.started
            return answer_from_entry(lookup.entry, view, record)
        if lookup.follow is not None:
            record.backend = "cache"
            response = await follow(request, lookup.follow, view, record, loop_time)
            if response is not None:
                return response
            record.cache = "miss"  # the request we followed failed before sharing anything: go ourselves
            return await self._forward(request, snapshot, route, pool, view, record, None, est, priority, None)
        flight = lookup.lead
        assert flight is not None
        ok = False
        try:
            response = await self._forward(request, snapshot, route, pool, view, record, flight, est, priority, None)
            ok = record.error is None and record.status != CLIENT_CLOSED
            return response
        finally:
            # A fallback pool's answer serves the requests that followed this one, but is not kept as the
            # variant's (its model answered).
            self.cache.end(lookup.key, flight, ok, route.cache if record.fallback is None else None, view.endpoint)

    async def _forward(
        self, request: web.Request, snapshot: Snapshot, route: Route, pool: Pool, view: RequestView,
        record: RequestRecord, flight: Flight | None, est: Estimate | None, priority: int, pinned: str | None,
    ) -> web.StreamResponse:
        """Upstream: dispatch (with fail-over), mirror to shadows, relay; the answer also fills `flight` if given."""
        deadlines = Deadlines(route.timeouts, record.started)
        heartbeat = None
        if view.is_stream and route.timeouts.heartbeat > 0:
            heartbeat = Heartbeat(request, record, route.timeouts.heartbeat)
        try:
            key = find_subject(route.balance.by, request.headers, view) if route.balance.by is not None else None
            attempt = await self.dispatcher.call(snapshot, route, pool, view, request.path, record, deadlines,
                                                 attempts=route.retry_attempts, queue_timeout=route.timeouts.queue,
                                                 priority=priority, est=est, fallback=route.fallback, pinned=pinned,
                                                 key=key)
        except SplitstreamError as failure:
            exc = failure if pinned is None else _unavailable(failure, view, pinned)
            started = await heartbeat.stop() if heartbeat is not None else None
            if started is None:
                if exc is failure:
                    raise
                raise exc from failure
            return await end_stream(started, exc, view, record, route.timeouts.idle)
        except BaseException:
            if heartbeat is not None:
                heartbeat.cancel()
            raise
        started = await heartbeat.stop() if heartbeat is not None else None
        if is_stored(view) and attempt.conn.status == 200:
            response_id = response_id_of(attempt.first_chunk if attempt.body is None else attempt.body)
            if response_id is not None:
                self.owners.remember(response_id, attempt.state.backend.name)
        mirror: Mirror | None = None
        if route.shadows:
            mirror = self.shadows.mirror(snapshot, route, view, request.path, record.request_id, attempt)
        if flight is not None:
            flight.begin(attempt.conn.status, attempt.conn.headers, attempt.body)
        try:
            if attempt.body is not None:
                if started is not None:  # the client's stream began with heartbeats: a JSON answer ends it
                    return await end_stream(started, runtime_error(attempt.conn, attempt.body), view, record,
                                            route.timeouts.idle)
                return relay_body(attempt.conn, attempt.body, record)
            return await relay_stream(request, attempt.conn, attempt.first_chunk, view, deadlines, record,
                                      self.metrics, asyncio.get_running_loop().time,
                                      _tee(mirror.tee if mirror is not None else None,
                                           flight.append if flight is not None else None),
                                      snapshot.server.max_event_bytes, started)
        except asyncio.CancelledError:
            record.status = CLIENT_CLOSED
            raise
        finally:
            self.dispatcher.settle(attempt, record, len(view.body))
            if mirror is not None:
                mirror.primary_done(record)

    async def list_models(self, request: web.Request) -> web.Response:
        """The models the caller may ask for: plain (non-glob) names from the match patterns of the routes
        its tenant may use."""
        snapshot = self.rules.current
        tenant = identify(snapshot.tenants, request.headers)
        created = int(time.time())
        data = [_model_object(name, created) for name in snapshot.advertised_models(tenant)]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        """One model the caller may ask for (`GET /v1/models/{id}`): any name a route it may use matches, glob
        or not (the SDKs' `models.retrieve`); a name none matches is the same 404 as an unknown model."""
        snapshot = self.rules.current
        tenant = identify(snapshot.tenants, request.headers)
        name = request.match_info["model"]
        if len(name) > request_view.MAX_MODEL_LENGTH or not any(
            route.model_pattern.fullmatch(name) is not None and route.serves(tenant) for route in snapshot.routes
        ):
            raise UnknownModelError(f"The model `{name[:256]}` does not exist or you do not have access to it.")
        return web.json_response(_model_object(name, int(time.time())))

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: rules are loaded and every route has at least one backend that answers its probe.

        Unauthenticated, so anyone may call it as often as they like: the answer is at most
        READINESS_MAX_AGE old and concurrent callers share one round of probes."""
        snapshot = self.rules.current
        loop = asyncio.get_running_loop()
        cached = self._readiness
        if cached is None or cached[0] != snapshot.generation or self.clock() - cached[1] >= READINESS_MAX_AGE:
            probing = self._readiness_probe
            if probing is None or probing.done():
                probing = self._readiness_probe = loop.create_task(self._probe_readiness(snapshot))
            cached = await asyncio.shield(probing)  # a caller that leaves does not cancel the others' probe
        body = cached[2]
        return web.json_response(body, status=200 if body["status"] == "ready" else 503)

    async def _probe_readiness(self, snapshot: Snapshot) -> tuple[int, float, dict[str, Any]]:
        backends = {b.identity: b for route in snapshot.routes for v in route.variants for b in v.pool.backends}
        answers = await asyncio.gather(*(is_reachable(b) for b in backends.values()))
        results = dict(zip(backends, answers, strict=True))
        unready = [
            route.name
            for route in snapshot.routes
            if not any(results[b.identity] for v in route.variants for b in v.pool.backends)
        ]
        body = {"status": "ready" if not unready else "unready", "generation": snapshot.generation,
                "routes_without_backend": unready}
        self._readiness = (snapshot.generation, self.clock(), body)
        return self._readiness

    async def metrics_page(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition(request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type  # carries a `;` that content_type= would reject
        return response


def _holder(route: Route, chosen: Variant, backend: str, response_id: str) -> tuple[Variant, Pool]:
    """The variant and pool whose backend `backend` holds a stored response: the chosen variant's pool, else
    another variant's (the request is that variant's), else one of the route's fallback pools."""
    for variant in (chosen, *route.variants):
        if any(b.name == backend for b in variant.pool.backends):
            return variant, variant.pool
    for pool in route.fallback:
        if any(b.name == backend for b in pool.backends):
            return chosen, pool
    raise PreviousResponseGoneError(
        f"The response `{response_id}` is held by backend '{backend}', which no longer serves this route.")


def _unavailable(error: SplitstreamError, view: RequestView, backend: str) -> SplitstreamError:
    """A pinned (stateful) request's failure, worded for the client: only that backend holds the state it
    continues, so a backend failure means the state is unavailable. Busy or throttled stays what it is."""
    if not isinstance(error, UpstreamError) or isinstance(error, BackendThrottledError):
        return error
    return PreviousResponseUnavailableError(
        f"The response `{continued(view)}` is held by backend '{backend}', which could not answer: {error.message}")


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "splitstream"}


def _tee(first: Sink | None, second: Sink | None) -> Sink | None:
    """Where a stream's upstream bytes are copied (the shadow comparison, the cache flight): one call each."""
    if first is None or second is None:
        return second if first is None else first

    def both(chunk: bytes) -> None:
        first(chunk)
        second(chunk)

    return both


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Says nothing about backends (that is /readyz)."""
    return web.json_response({"status": "ok"})


ENDPOINTS = web.AppKey("ENDPOINTS", Endpoints)
