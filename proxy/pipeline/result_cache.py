"""The result cache at run time: store lookups, single-flight of identical misses, writes off the path.

For one request on a route with a cache the handler calls `lookup()`: it bypasses what must not be cached,
answers a hit from the store, lets the request follow an identical one already going upstream (receiving
its stream as it arrives), or makes it the leader whose upstream bytes are teed into a `Flight` (`begin`,
`append`) and stored once complete (`end`). A store that fails means bypass, never an error. Policy (what
is cacheable, keys, entry shapes) is `pipeline/cache_policy.py`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy.config.model import CacheRule, Route
from proxy.errors import StoreUnavailableError, UpstreamError, sse_error_event
from proxy.observe.metrics import Metrics
from proxy.observe.record import RequestRecord
from proxy.pipeline.cache_policy import (
    FORCE_HEADER,
    Entry,
    bypass_reason,
    cache_key,
    is_complete_stream,
    owner_of,
    render,
    tenant_of,
)
from proxy.pipeline.headers import content_type_of, routing_headers
from proxy.pipeline.request import RequestView
from proxy.pipeline.sse import SseRelay, find_usage_object
from proxy.store.base import Store
from proxy.store.memory import MemoryStore
from proxy.upstream.connection import Headers

log = logging.getLogger("splitstream.cache")

KEY_PREFIX = "splitstream:cache:"


class Flight:
    """An upstream exchange identical requests wait for: raw upstream bytes as they arrive, then the end."""

    __slots__ = ("chunks", "size", "is_stream", "content_type", "status", "done", "ok", "_changed")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.is_stream = False
        self.content_type = "application/json"
        self.status = 0
        self.done = False
        self.ok = False
        self._changed = asyncio.Event()

    def begin(self, status: int, headers: Headers, body: bytes | None) -> None:
        """The leader's answer has begun: its status and shape, and the whole body when it is not a stream."""
        self.status, self.is_stream, self.content_type = status, body is None, content_type_of(headers)
        if body is not None:
            self.append(body)

    def append(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        self._notify()

    def finish(self, ok: bool) -> None:
        if not self.done:
            self.done, self.ok = True, ok
            self._notify()

    def entry(self) -> Entry:
        return Entry(self.is_stream, self.content_type, b"".join(self.chunks))

    async def changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # the next waiters wait for the next change


class Lookup:
    """What `begin` decided: `entry` (hit), `follow` (coalesced), or `lead` (miss: go upstream and fill it)."""

    __slots__ = ("key", "entry", "follow", "lead", "result")

    def __init__(self, key: str, result: str) -> None:
        self.key = key
        self.result = result  # hit | miss | bypass | coalesced
        self.entry: Entry | None = None
        self.follow: Flight | None = None
        self.lead: Flight | None = None


class ResultCache:
    """Flights in progress, the store, owned write tasks, and per-route counts for the status page."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self._metrics = metrics
        self._flights: dict[str, Flight] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self.counts: dict[str, dict[str, int]] = {}

    async def lookup(
        self, route: Route, upstream_model: str, view: RequestView, headers: Mapping[str, str], record: RequestRecord
    ) -> Lookup | None:
        """Hit, follow or lead for a cacheable request; None (counted as bypass) for one that must not be cached."""
        assert route.cache is not None
        authorization = headers.get("Authorization")
        identified = route.cache.shared or bool(record.tenant) or bool(authorization)
        if bypass_reason(view, headers.get("Cache-Control"), headers.get(FORCE_HEADER), identified) is not None:
            self.bypass(route.name)
            record.cache = "bypass"
            return None
        if route.cache.shared:
            tenant = tenant_of(authorization, True)
        else:
            tenant = record.owner = record.owner or owner_of(record.tenant, authorization)  # the feedback join's too
        lookup = await self.begin(cache_key(view, upstream_model, route.name, tenant), route.name)
        record.cache = lookup.result
        return lookup

    async def begin(self, key: str, route: str) -> Lookup:
        flight = self._flights.get(key)
        if flight is not None:
            lookup = Lookup(key, "coalesced")
            lookup.follow = flight
            return self._count(route, lookup)
        flight = self._flights[key] = Flight()  # registered before any await: later twins follow it
        lookup = Lookup(key, "miss")
        done = False
        try:
            raw = await self.store.get(KEY_PREFIX + key)
            done = True
        except StoreUnavailableError:
            lookup.result = "bypass"
            raw = None
            done = True
        finally:
            if not done:  # cancelled (client gone) mid-lookup: release the twins waiting on this flight
                self.end(key, flight, ok=False, rule=None)
        entry = Entry.decode(raw) if raw is not None else None
        if entry is not None:
            lookup.result, lookup.entry = "hit", entry
            flight.is_stream, flight.content_type, flight.status = entry.is_stream, entry.content_type, 200
            flight.append(entry.body)
            self.end(key, flight, ok=True, rule=None)
        else:
            lookup.lead = flight
        return self._count(route, lookup)

    def bypass(self, route: str) -> None:
        self._count(route, Lookup("", "bypass"))

    def end(self, key: str, flight: Flight, ok: bool, rule: CacheRule | None, endpoint: str = "chat") -> None:
        """The leader is done: wake followers, forget the flight, keep the answer if it is whole and small."""
        flight.finish(ok)
        if self._flights.get(key) is flight:
            del self._flights[key]
        if rule is None or not ok or flight.status != 200 or flight.size > rule.max_entry_bytes:
            return
        entry = flight.entry()
        if entry.is_stream and not is_complete_stream(entry.body, endpoint):
            return
        task = asyncio.create_task(self._write(key, entry.encode(), rule.ttl))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, value: bytes, ttl: float) -> None:
        try:
            await self.store.set(KEY_PREFIX + key, value, ttl)
        except StoreUnavailableError:
            pass  # counted by the store's breaker; the next identical request is simply a miss

    async def close(self) -> None:
        for task in list(self._writes):
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)

    async def writes_done(self) -> None:
        """Wait for pending store writes (tests; shutdown cancels them instead)."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def summary(self) -> dict[str, Any]:
        store = self.store
        entries = len(store) if isinstance(store, MemoryStore) else None
        size = store.size_bytes if isinstance(store, MemoryStore) else None
        return {"routes": {r: dict(c) for r, c in self.counts.items()}, "entries": entries, "bytes": size}

    def _count(self, route: str, lookup: Lookup) -> Lookup:
        counts = self.counts.setdefault(route, {"hit": 0, "miss": 0, "bypass": 0, "coalesced": 0})
        counts[lookup.result] += 1
        self._metrics.count_cache(route, lookup.result)
        return lookup


def answer_from_entry(entry: Entry, view: RequestView, record: RequestRecord) -> web.Response:
    """A hit, rendered in the shape the client asked for, with the usual headers."""
    body, content_type = render(entry, view)
    usage = find_usage_object(body[-4096:] if view.is_stream else body)
    if usage is None and view.is_stream:
        usage = find_usage_object(entry.body[-4096:])
    if usage is not None:
        usage.apply_to(record)
    record.bytes_out = len(body)
    return web.Response(body=body, headers=routing_headers(record, {"Content-Type": content_type}))


async def follow(
    request: web.Request, flight: Flight, view: RequestView, record: RequestRecord, clock: Callable[[], float]
) -> web.StreamResponse | None:
    """Serve a twin of a request in flight; None when the leader failed before anything could be shared."""
    while not flight.chunks and not flight.done:
        await flight.changed()
    if flight.done and not flight.ok and not flight.chunks:
        return None
    if not (view.is_stream and flight.is_stream):
        while not flight.done:  # shapes differ (or JSON): needs the whole answer
            await flight.changed()
        if not flight.ok or flight.status != 200:
            return None
        record.ttft = clock() - record.started
        return answer_from_entry(flight.entry(), view, record)
    return await _follow_stream(request, flight, view, record, clock)


async def _follow_stream(
    request: web.Request, flight: Flight, view: RequestView, record: RequestRecord, clock: Callable[[], float]
) -> web.StreamResponse:
    response = web.StreamResponse(headers=routing_headers(record, {"Content-Type": "text/event-stream"}))
    await response.prepare(request)
    record.ttft = clock() - record.started
    sse = SseRelay(strip_usage=not view.wants_usage, endpoint=view.endpoint)
    sent = 0
    while True:
        while sent < len(flight.chunks):
            out = sse.feed(flight.chunks[sent])
            sent += 1
            if out:
                await response.write(out)
                record.bytes_out += len(out)
        if flight.done:
            break
        await flight.changed()
    tail = sse.finish()
    if tail:
        await response.write(tail)
    if not flight.ok:  # the leader's stream broke: so does this one, visibly
        record.status, record.error = 502, "backend_reset"
        broke = UpstreamError("The upstream stream this answer was shared from broke.")
        await response.write(sse_error_event(broke, view.endpoint))
    if sse.usage is not None:
        sse.usage.apply_to(record)
    await response.write_eof()
    return response


CACHE = web.AppKey("CACHE", ResultCache)
