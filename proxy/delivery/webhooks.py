"""Rollout webhooks: one JSON POST per transition to each of the rollout's `webhooks` that asks for its event.

`delivery/controller.py` calls `announce` on the replica whose compare-and-set stored the transition, so each
transition is announced once, by the replica that made it. `announce` never awaits and never raises: a bounded
queue takes the deliveries and one background task (`app.py` cleanup_ctx, beside the controller) sends them in
order, one at a time, each attempt under a timeout, a failed attempt retried with exponential back-off (only
network errors, timeouts, 5xx and 408/425/429 are retried: another answer would not change; redirects are not
followed). What the queue cannot take, what exhausts its attempts and what is still queued at shutdown (after
a short drain) is dropped; every delivery ends counted in
splitstream_rollout_webhooks_total{route,event,result}. The body's `id` (route:digest:version) is the same on
every attempt, so a receiver can ignore a repeat. URLs are never logged whole (they often carry a token).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web

from proxy.config.model import Route, Webhook
from proxy.delivery.state import (
    ABORT,
    ADVANCE,
    HOLD,
    PAUSE,
    PROMOTE,
    RESUME,
    ROLLBACK,
    START,
    RolloutState,
    candidate_percent,
)
from proxy.observe.metrics import Metrics

log = logging.getLogger("splitstream.rollout")

# state.py's action -> the event a webhook subscribes to (config/model.py WEBHOOK_EVENTS, the same closed set)
EVENTS: dict[str, str] = {START: "started", ADVANCE: "advanced", HOLD: "held", PROMOTE: "promoted",
                          ROLLBACK: "rolled_back", PAUSE: "paused", RESUME: "resumed", ABORT: "aborted"}

# splitstream_rollout_webhooks_total{result}
DELIVERED = "delivered"
FAILED = "failed"
DROPPED = "dropped"

_RETRIED = (408, 425, 429)  # answers below 500 worth another attempt
USER_AGENT = "splitstream-rollout-webhook"


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """`queue`: deliveries waiting at most; `attempts` per delivery (the first included), each under `timeout`
    seconds, the n-th retry after `backoff` × 2^(n-1) seconds; `drain`: how long deliveries already queued may
    still take when the app stops."""

    queue: int = 256
    attempts: int = 4
    timeout: float = 5.0
    backoff: float = 0.5
    drain: float = 2.0


class _Delivery:
    __slots__ = ("route", "event", "url", "body")

    def __init__(self, route: str, event: str, url: str, body: bytes) -> None:
        self.route = route
        self.event = event
        self.url = url
        self.body = body


def transition_document(route: Route, before: RolloutState | None, after: RolloutState, action: str,
                        replica: str) -> dict[str, Any]:
    """What a webhook receives for one transition: where the rollout went from and to, the decision with its
    reason, and the numbers the decision was made on (those of the analysis; none for operator actions)."""
    rollout = route.rollout
    assert rollout is not None
    entry = after.history[-1] if after.history else {}
    return {
        "id": f"{route.name}:{rollout.digest}:{after.version}",
        "route": route.name,
        "event": EVENTS[action],
        "action": action,
        "status": after.status,
        "candidate": rollout.candidate,
        "baseline": rollout.baseline,
        "steps": list(rollout.steps),
        "from_step": before.step if before is not None else None,  # indexes into steps; None: it started
        "to_step": after.step,
        "from_percent": candidate_percent(before, rollout),
        "percent": candidate_percent(after, rollout),
        "reason": entry.get("reason"),
        "by": entry.get("by"),
        "evidence": entry.get("numbers") or {},
        "version": after.version,
        "at": _timestamp(float(entry.get("at", after.since))),
        "replica": replica,
    }


class WebhookSender:
    """The queue and its one sending task. `start`/`close` follow the app (`app.py`)."""

    def __init__(self, metrics: Metrics, settings: WebhookSettings = WebhookSettings()) -> None:
        self.settings = settings
        self._metrics = metrics
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize=settings.queue)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def announce(self, route: Route, before: RolloutState | None, after: RolloutState, action: str,
                 replica: str) -> None:
        """Queue the transition for every webhook of the route's rollout that wants its event; never waits."""
        assert route.rollout is not None
        event = EVENTS.get(action, action)
        hooks = [hook for hook in route.rollout.webhooks if event in hook.events]
        if not hooks:
            return
        try:
            body = orjson.dumps(transition_document(route, before, after, action, replica))
        except Exception:  # a bug: the transition is stored already, and must not look failed
            log.exception("rollout %s: webhook document for %s", route.name, event)
            return
        self.enqueue(route.name, event, hooks, body)

    def enqueue(self, route: str, event: str, hooks: Sequence[Webhook], body: bytes) -> None:
        for hook in hooks:
            if self._closing:
                self._count(route, event, DROPPED)
                continue
            try:
                self._queue.put_nowait(_Delivery(route, event, hook.url, body))
            except asyncio.QueueFull:
                self._count(route, event, DROPPED)
                log.warning("rollout %s: webhook queue full (%d): %s to %s dropped", route, self.settings.queue,
                            event, _where(hook.url))

    @property
    def pending(self) -> int:
        """Deliveries queued (the one being sent not included)."""
        return self._queue.qsize()

    async def flushed(self) -> None:
        """Until every delivery queued so far has ended (delivered, failed or dropped) and been counted."""
        await self._queue.join()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
        )
        self._task = asyncio.create_task(self._run(), name="splitstream-webhooks")

    async def close(self) -> None:
        """Let what is queued go out for up to `drain` seconds, then drop (and count) the rest."""
        self._closing = True
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), self.settings.drain)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            delivery = self._queue.get_nowait()
            self._queue.task_done()
            self._count(delivery.route, delivery.event, DROPPED)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._deliver(delivery)
            except asyncio.CancelledError:
                self._count(delivery.route, delivery.event, DROPPED)
                raise
            except Exception:  # a bug: the next delivery must still go out
                log.exception("rollout %s: webhook delivery failed", delivery.route)
                self._count(delivery.route, delivery.event, FAILED)
            finally:
                self._queue.task_done()

    async def _deliver(self, delivery: _Delivery) -> None:
        assert self._session is not None
        problem = ""
        for attempt in range(self.settings.attempts):
            if attempt:
                await asyncio.sleep(self.settings.backoff * 2 ** (attempt - 1))
            try:
                async with self._session.post(delivery.url, data=delivery.body, allow_redirects=False) as response:
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = (str(exc) or type(exc).__name__).replace(delivery.url, _where(delivery.url))
                continue
            if 200 <= status < 300:
                self._count(delivery.route, delivery.event, DELIVERED)
                return
            problem = f"HTTP {status}"
            if status < 500 and status not in _RETRIED:
                break
        self._count(delivery.route, delivery.event, FAILED)
        log.warning("rollout %s: webhook %s to %s failed (%s); dropped", delivery.route, delivery.event,
                    _where(delivery.url), problem[:200])

    def _count(self, route: str, event: str, result: str) -> None:
        self._metrics.rollout_webhooks_total.labels(route, event, result).inc()


def _where(url: str) -> str:
    """scheme://host[:port] of a webhook URL: its path and query may hold a token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _timestamp(at: float) -> str:
    """ISO 8601 UTC with milliseconds, as the admin documents write times."""
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


WEBHOOKS = web.AppKey("WEBHOOKS", WebhookSender)
