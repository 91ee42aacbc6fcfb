"""Responses API state: which backend holds a stored response, so a request continuing it goes back there.

A runtime serving the Responses API keeps what it stores (`store` is on unless the request says `false`) in
its own memory: `previous_response_id` only means something to the backend that answered that response. So
splitstream remembers, for every stored response, the backend that served it — in the `Store`, so every
replica agrees — for `TTL`, and a request naming a `previous_response_id` it knows is sent to that backend
and no other (no balancing, no fallback pool). One it does not know goes where the route sends it (the
runtime answers for itself). Writes are off the request path (a task per response, like cache writes); the
one read happens only for requests that continue a response. Numbers only: ids and backend names, never text.
"""

from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import web

from proxy.errors import StoreUnavailableError
from proxy.pipeline.request import RequestView
from proxy.store.base import Store

log = logging.getLogger("splitstream.affinity")

KEY_PREFIX = "splitstream:response:"
TTL = 86400.0  # a day: runtimes keep stored responses in memory, rarely longer than their uptime
# A response id as runtimes write it first in the answer (`{"id": "resp_...`) or in `response.created`.
RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_.-]{1,128})"')
SCAN_BYTES = 4096  # the id comes first: in the body's head, in the stream's first event
MAX_ID_LENGTH = 256
MAX_PENDING_WRITES = 1024  # beyond this, a store that cannot keep up loses ids rather than growing memory


def is_stored(view: RequestView) -> bool:
    """Whether the runtime keeps this request's response (the Responses API stores unless told not to)."""
    return view.endpoint == "responses" and view.data.get("store") is not False


def continued(view: RequestView) -> str | None:
    """The response a Responses request continues (`previous_response_id`), if it names a sane one."""
    if view.endpoint != "responses":
        return None
    previous = view.data.get("previous_response_id")
    if isinstance(previous, str) and 0 < len(previous) <= MAX_ID_LENGTH and previous.isprintable():
        return previous
    return None


def response_id_of(head: bytes | None) -> str | None:
    """The response id in the first bytes of an answer (JSON body or the first stream event)."""
    if not head:
        return None
    match = RESPONSE_ID.search(head, 0, SCAN_BYTES)
    return match.group(1).decode("ascii") if match is not None else None


class ResponseOwners:
    """response id → the backend name that holds it, in the shared store."""

    __slots__ = ("store", "_writes", "_down")

    def __init__(self, store: Store) -> None:
        self.store = store
        self._writes: set[asyncio.Task[None]] = set()
        self._down = False

    async def owner(self, response_id: str) -> str | None:
        """The backend holding `response_id`, or None when unknown (or the store cannot say: the request is
        then routed as any other, and the runtime answers for the id)."""
        try:
            value = await self.store.get(KEY_PREFIX + response_id)
        except StoreUnavailableError:
            self._note_down()
            return None
        self._down = False
        return value.decode("utf-8", "replace") if value is not None else None

    def remember(self, response_id: str, backend: str) -> None:
        if len(self._writes) >= MAX_PENDING_WRITES:
            return
        task = asyncio.get_running_loop().create_task(self._write(response_id, backend))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, response_id: str, backend: str) -> None:
        try:
            await self.store.set(KEY_PREFIX + response_id, backend.encode(), TTL)
        except StoreUnavailableError:
            self._note_down()
            return
        self._down = False

    def _note_down(self) -> None:
        if not self._down:
            log.warning("responses: the store cannot answer; follow-ups of stored responses are routed as new")
            self._down = True

    async def writes_done(self) -> None:
        """Wait for pending writes (tests; shutdown cancels them instead)."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._writes):
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)


OWNERS = web.AppKey("OWNERS", ResponseOwners)
