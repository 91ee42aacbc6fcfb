"""POST /v1/feedback: a client's score for an answer, joined to the variant that served it, on any replica.

A client endpoint (client keys apply; bad input gets an OpenAI-shaped 400/404), not an admin one: the
scores feed the A/B report (`admin/rollouts.py`) through the ledger (`observe/feedback.py`). Built once
by `app.py` with the parts it needs.

The join. Every routed request is remembered under the id splitstream generated for it (128 random bits,
`x-splitstream-request-id`; never a client's X-Request-Id) with its route, variant and tenant (the hashed
Authorization header, `cache_policy.tenant_of`). With a shared store (Redis) `JoinWriter` also writes these
joins there in batches off the request path (`set_many`, every JOIN_FLUSH_SECONDS or JOIN_BATCH joins), for
the route's `feedback.ttl`, so feedback posted to any replica finds its request: this process's ledger
first, else one GET. A store that cannot answer costs the batch (logged once per outage), never a request.

Who may score. The caller that made the request (same Authorization, so same tenant), or the holder of
SPLITSTREAM_ADMIN_TOKEN. A request made without Authorization may be scored by anyone who presents its id:
ids are unguessable and only its caller saw it. Anyone else gets the same 404 `request_not_found` as an
unknown id, so a score for someone else's request tells nothing about whether it exists.

The score. A finite number, clamped to the route's `feedback: {min, max}`. A later score for the same
request replaces the earlier one wherever either was posted: the last score lives in the store under the
request (compare-and-set), so the replica booking a replacement knows what it replaces and adds count 0,
sum new - old to its totals; summed over replicas (`FeedbackLedger.drain_deltas`) every request counts once.
While the store is down a replica knows only its own scores (a score booked on two replicas then counts twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re

import orjson
from aiohttp import hdrs, web

from proxy.auth import AdminAccess, check_admin, identify
from proxy.config.model import FeedbackRule, RulesHolder
from proxy.errors import (
    InvalidFeedbackError,
    MalformedBodyError,
    SplitstreamError,
    StoreUnavailableError,
    UnknownRequestError,
)
from proxy.observe.feedback import LOCAL, FeedbackLedger, Previous, Served
from proxy.pipeline.body import read_body
from proxy.pipeline.cache_policy import owner_of, tenant_of
from proxy.pipeline.middleware import ID_BYTES, MAX_REQUEST_ID_LENGTH
from proxy.store import Store

log = logging.getLogger("splitstream.feedback")

MAX_FEEDBACK_BYTES = 4096  # {"request_id": ..., "score": ...} is a few dozen bytes
FEEDBACK_READ_TIMEOUT = 10.0  # a few dozen bytes take no longer than this from any client that means well
JOIN_PREFIX = "splitstream:feedback:join:"  # + id -> JSON [route, variant, tenant]
SCORE_PREFIX = "splitstream:feedback:score:"  # + id -> the request's last score, repr(float)
JOIN_FLUSH_SECONDS = 0.5  # joins wait at most this long (plus a write) before other replicas can find them
JOIN_BATCH = 1024  # ...or until this many wait; also the most keys in one pipelined write
JOIN_PENDING_LIMIT = 64 * JOIN_BATCH  # waiting beyond this (a slow store) new joins stay local
SCORE_ATTEMPTS = 5  # compare-and-set rounds for one score before booking it on local knowledge
ANONYMOUS = tenant_of(None, False)
_OWN_ID = re.compile(f"[0-9a-f]{{{2 * ID_BYTES}}}")  # what `RequestIds` hands out


class FeedbackEndpoint:
    __slots__ = ("ledger", "admin", "rules", "store")

    def __init__(self, ledger: FeedbackLedger, admin: AdminAccess, rules: RulesHolder, store: Store | None) -> None:
        """`store`: the store shared with the other replicas (None: this process alone, the ledger is all)."""
        self.ledger = ledger
        self.admin = admin
        self.rules = rules
        self.store = store

    async def post(self, request: web.Request) -> web.Response:
        """{"request_id": <x-splitstream-request-id of an answer>, "score": <number>}; a second score for
        the same request replaces the first."""
        authorization = request.headers.get(hdrs.AUTHORIZATION, "")
        admin = self._is_admin(authorization)
        tenant = None if admin else identify(self.rules.current.tenants, request.headers)
        body = await read_body(request, MAX_FEEDBACK_BYTES, FEEDBACK_READ_TIMEOUT)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise MalformedBodyError("We could not parse the JSON body of your request.") from None
        if not isinstance(data, dict):
            raise MalformedBodyError("The request body must be a JSON object.")
        request_id = data.get("request_id")
        if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidFeedbackError("`request_id` must be the x-splitstream-request-id of an answered request "
                                       f"(a non-empty string of at most {MAX_REQUEST_ID_LENGTH} characters).")
        score = data.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise InvalidFeedbackError("`score` must be a finite number.")
        joined = self.ledger.lookup(request_id)
        if joined is None:
            joined = await self._joined(request_id)
        owner = owner_of(tenant.name if tenant is not None else "", authorization)
        if joined is None or not (admin or joined[2] in (ANONYMOUS, owner)):
            raise UnknownRequestError("No such request_id among the requests answered recently "
                                      "(or it is not yours to score).")
        route, variant = joined[0], joined[1]
        rule = self._rule(route)
        value = rule.clamp(float(score))
        previous = await self._swap_score(request_id, value, rule.ttl)
        self.ledger.record(request_id, joined, value, previous)
        return web.json_response({"object": "feedback", "request_id": request_id, "route": route,
                                  "variant": variant, "score": value})

    def _is_admin(self, authorization: str) -> bool:
        """Whether the caller holds SPLITSTREAM_ADMIN_TOKEN (a loopback peer alone is no admin here)."""
        if self.admin.token_sha256 is None or not authorization:
            return False
        try:
            check_admin(self.admin, None, authorization)
        except SplitstreamError:
            return False
        return True

    def _rule(self, route: str) -> FeedbackRule:
        for candidate in self.rules.current.routes:
            if candidate.name == route:
                return candidate.feedback
        return FeedbackRule()  # a route removed by a reload since: its scores are still booked, unclamped

    async def _joined(self, request_id: str) -> Served | None:
        """The join another replica wrote, or None (unknown, not one of our ids, or the store is down)."""
        if self.store is None or not _OWN_ID.fullmatch(request_id):
            return None
        try:
            raw = await self.store.get(JOIN_PREFIX + request_id)
        except StoreUnavailableError:
            return None
        if raw is None:
            return None
        try:
            route, variant, tenant = orjson.loads(raw)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
        if not all(isinstance(part, str) for part in (route, variant, tenant)):
            return None
        return (route, variant, tenant, None)

    async def _swap_score(self, request_id: str, score: float, ttl: float) -> Previous:
        """Store `score` as the request's last one; the score it replaces (None: the first), or LOCAL when
        the store cannot say (none shared, down, or too contended)."""
        store = self.store
        if store is None:
            return LOCAL
        key, value = SCORE_PREFIX + request_id, repr(score).encode()
        try:
            for _ in range(SCORE_ATTEMPTS):
                current = await store.get(key)
                if await store.compare_and_set(key, current, value, ttl):
                    return LOCAL if current is None else _number(current)
        except StoreUnavailableError:
            pass
        return LOCAL


def _number(raw: bytes) -> Previous:
    try:
        number = float(raw)
    except ValueError:
        return LOCAL
    return number if math.isfinite(number) else LOCAL


class JoinWriter:
    """Writes the ledger's new request joins to the shared store in batches, off the request path.

    `run` flushes every `interval` seconds, sooner when `batch` joins wait; each flush is one pipelined
    `set_many` per `batch` joins and route TTL. A store that cannot answer loses that flush (counted in
    `lost`; a warning when an outage begins, a line when it ends): those requests can then be scored on
    the replica that served them only."""

    __slots__ = ("ledger", "store", "rules", "interval", "batch", "written", "lost", "_wake", "_failing")

    def __init__(self, ledger: FeedbackLedger, store: Store, rules: RulesHolder, interval: float = JOIN_FLUSH_SECONDS,
                 batch: int = JOIN_BATCH, limit: int = JOIN_PENDING_LIMIT) -> None:
        self.ledger = ledger
        self.store = store
        self.rules = rules
        self.interval = interval
        self.batch = batch
        self.written = 0
        self.lost = 0
        self._wake = asyncio.Event()
        self._failing = False
        ledger.share(batch, limit, self._wake.set)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # a bug here must not end the writer for the process's life
                log.exception("writing feedback joins failed")

    async def flush(self) -> None:
        pending = self.ledger.take_pending()
        if not pending:
            return
        ttls = {route.name: route.feedback.ttl for route in self.rules.current.routes}
        default_ttl = FeedbackRule().ttl
        groups: dict[float, dict[str, bytes]] = {}
        for request_id, (route, variant, tenant, _) in pending:
            values = groups.setdefault(ttls.get(route, default_ttl), {})
            values[JOIN_PREFIX + request_id] = orjson.dumps([route, variant, tenant])
        written = 0
        try:
            for ttl, values in groups.items():
                items = list(values.items())
                for start in range(0, len(items), self.batch):
                    chunk = dict(items[start:start + self.batch])
                    await self.store.set_many(chunk, ttl)
                    written += len(chunk)
        except StoreUnavailableError:
            self.written += written
            self.lost += len(pending) - written
            if not self._failing:
                self._failing = True
                log.warning("feedback joins not written: the store did not answer; until it does, requests can be "
                            "scored only on the replica that served them")
            return
        self.written += written
        if self._failing:
            self._failing = False
            log.info("feedback joins written to the store again")
