"""Builds the aiohttp Application and wires the parts together; no request logic of its own.

Every part is built here, once, and given exactly the parts it uses (no shared hub); each is also stored
under its own typed `web.AppKey` (declared beside its class) for the admin pages, the CLI and tests.
Background parts (rules watcher, upstream client, health checks, store, pooled statistics, rollouts) start in
`cleanup_ctx` generators and are closed after `yield`, so tests and `serve` share one lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.admin import add_admin_routes
from proxy.admin.guard import ADMIN_ACCESS, admin_token_from_env
from proxy.auth import AdminAccess
from proxy.config.model import RULES, RulesHolder, Snapshot
from proxy.config.reloader import RELOADER, Reloader
from proxy.delivery.controller import ROLLOUTS, RolloutController, RolloutSettings, default_replica_id
from proxy.delivery.webhooks import WEBHOOKS, WebhookSender
from proxy.delivery.weights import WEIGHTS, RolloutWeights
from proxy.observe.feedback import FEEDBACK, FeedbackLedger
from proxy.observe.logs import AccessLog
from proxy.observe.metrics import METRICS, Metrics, build_version
from proxy.observe.pooled import POOLED, PooledStats
from proxy.observe.record import Recorder
from proxy.observe.stats import STATS, RequestStats
from proxy.observe.tracing import Tracing
from proxy.observe.tracing import from_env as tracing_from_env
from proxy.observe.usage import USAGE, TenantUsage
from proxy.pipeline.assignment import SPLITTER, Splitter
from proxy.pipeline.body import expect_handler
from proxy.pipeline.dispatch import DISPATCHER, Dispatcher
from proxy.pipeline.feedback import FeedbackEndpoint, JoinWriter
from proxy.pipeline.handler import ENDPOINTS, Endpoints, healthz
from proxy.pipeline.request import ENDPOINT_BY_PATH
from proxy.pipeline.limits import LIMITER, Limiter
from proxy.pipeline.middleware import RequestIds, error_middleware
from proxy.pipeline.affinity import OWNERS, ResponseOwners
from proxy.pipeline.result_cache import CACHE, ResultCache
from proxy.pipeline.shadow import SHADOWS, ShadowMirror
from proxy.store import MemoryStore, OwnedStore
from proxy.store.recent import RecentAssignments
from proxy.types import Clock
from proxy.ui.views import add_ui_routes
from proxy.upstream.client import UPSTREAM, UpstreamClient
from proxy.upstream.health import HEALTH, HealthChecker
from proxy.upstream.queue import WaitQueue
from proxy.upstream.state import BACKENDS, BackendStates

# Hard ceiling for aiohttp's own body reader; the configurable limit (`server.max_body_bytes`) is checked
# per request in `pipeline/body.py` so a reload can change it.
CLIENT_MAX_SIZE = 1024 * 1024 * 1024

# The embedded result cache's bounds (the process's memory is the limit; Redis has its own maxmemory).
CACHE_MAX_ENTRIES = 50_000
CACHE_MAX_BYTES = 256 * 1024 * 1024
# Embedded rollout state gets its own small store, which sticky subjects filling the shared LRU never evict.
ROLLOUT_MAX_ENTRIES = 1024
# Embedded pooled statistics too: ~700 hashes per route (`observe/stats.py` buckets and TTLs) plus the fleet's.
STATS_MAX_ENTRIES = 100_000
RESPONSES_MAX_ENTRIES = 100_000  # embedded: stored Responses answers whose backend is remembered
USAGE_MAX_ENTRIES = 1024  # embedded tenant usage: 2 h of minute buckets and 25 h of hour buckets


def loop_clock() -> float:
    """The event loop's clock: the default clock of backend state."""
    return asyncio.get_running_loop().time()


def build_app(
    snapshot: Snapshot,
    metrics: Metrics | None = None,
    access_log: AccessLog | None = None,
    store: OwnedStore | None = None,
    rules_dir: str | Path | None = None,
    admin_token: str | None = None,
    rules_env: Mapping[str, str] | None = None,
    watch_rules: bool = True,
    rollout_settings: RolloutSettings | None = None,
    backend_clock: Clock | None = None,
) -> web.Application:
    """The proxy app. `store` (default: embedded) is opened and closed with the app, which owns it.

    `rules_dir` is where `snapshot` came from: given, the app reloads from it on POST /admin/reload and,
    with `watch_rules`, whenever a rule file in it changes; `rules_env` is where reloads read `api_key_env`
    values (default os.environ). `admin_token` defaults to SPLITSTREAM_ADMIN_TOKEN; '' = loopback-only.
    `rollout_settings`: the rollout controller's clock (the fleet's wall clock, which also buckets the pooled
    statistics), tick, lease and replica id (tests drive ticks and move the clock).
    `backend_clock`: the clock of ejection, throttling and probing (default the loop's; tests pass a fake)."""
    metrics = metrics or Metrics()
    access_log = access_log or AccessLog()
    owned = store if store is not None else MemoryStore()
    shared = not isinstance(owned, MemoryStore)  # a shared store (Redis) also holds the cache and rollouts

    rules = RulesHolder(snapshot)
    backends = BackendStates()
    backends.sync(snapshot.backends)
    queue = WaitQueue()
    weights = RolloutWeights()  # effective split weights of routes with a rollout (hot path)
    feedback = FeedbackLedger()  # request id -> variant, and client feedback scores per variant
    client = UpstreamClient()
    dispatcher = Dispatcher(backends, client, queue, metrics, backend_clock)
    shadows = ShadowMirror(dispatcher, metrics)
    cache = ResultCache(owned if shared else MemoryStore(max_entries=CACHE_MAX_ENTRIES, max_bytes=CACHE_MAX_BYTES),
                        metrics)
    splitter = Splitter(owned, RecentAssignments() if shared else None, weights, metrics)
    rollout_settings = rollout_settings or RolloutSettings()
    replica = rollout_settings.replica_id or default_replica_id()  # the rollout lease's and the stats' heartbeat
    rollout_settings = replace(rollout_settings, replica_id=replica)
    stats = RequestStats(rollout_settings.clock)  # this replica's per-variant numbers until the next flush
    pooled = PooledStats(owned if shared else MemoryStore(max_entries=STATS_MAX_ENTRIES), stats, replica, metrics,
                         rollout_settings.clock, feedback.drain_deltas)
    webhooks = WebhookSender(metrics, rollout_settings.webhooks)  # rollout transitions POSTed, off the tick
    rollouts = RolloutController(
        owned if shared else MemoryStore(max_entries=ROLLOUT_MAX_ENTRIES), rules, weights, pooled,
        lambda: shadows.recent, backends, metrics, rollout_settings, backend_clock, webhooks,
    )
    clock = backend_clock or loop_clock
    health = HealthChecker(backends, lambda: rules.current, clock, metrics.health_round)
    reloader = Reloader(rules_dir, rules, on_swap=lambda new: backends.sync(new.backends),
                        on_outcome=metrics.record_reload, env=rules_env)
    metrics.rules_generation.set(snapshot.generation)
    metrics.rules_reloads_total.labels("success").inc()
    metrics.watch_backends(lambda: backends.samples(clock()))
    metrics.watch_rules(lambda: rules.current, queue.depths, weights.variants_for)
    limiter = Limiter(owned if shared else None, metrics)  # tenant limits: fleet-wide through a shared store
    # Which backend holds each stored Responses answer: shared by replicas through a shared store.
    owners = ResponseOwners(owned if shared else MemoryStore(max_entries=RESPONSES_MAX_ENTRIES))
    endpoints = Endpoints(rules, limiter, splitter, cache, dispatcher, shadows, owners, metrics, clock)

    usage = TenantUsage(owned if shared else MemoryStore(max_entries=USAGE_MAX_ENTRIES), rollout_settings.clock)
    tracing = tracing_from_env(os.environ, build_version())  # None unless OTEL_EXPORTER_OTLP_ENDPOINT (and the extra)
    recorder = Recorder(metrics, access_log, stats, feedback, usage, tracing)
    app = web.Application(middlewares=[error_middleware(recorder, RequestIds())], client_max_size=CLIENT_MAX_SIZE)
    app[RULES], app[RELOADER], app[METRICS], app[BACKENDS], app[UPSTREAM] = rules, reloader, metrics, backends, client
    app[DISPATCHER], app[SHADOWS], app[CACHE], app[SPLITTER], app[ENDPOINTS] = (
        dispatcher, shadows, cache, splitter, endpoints)
    app[WEIGHTS], app[STATS], app[FEEDBACK], app[ROLLOUTS], app[HEALTH] = weights, stats, feedback, rollouts, health
    admin_access = AdminAccess.from_token(admin_token if admin_token is not None else admin_token_from_env())
    app[ADMIN_ACCESS] = admin_access
    app[WEBHOOKS] = webhooks
    app[POOLED] = pooled
    app[LIMITER] = limiter
    app[USAGE] = usage
    app[OWNERS] = owners

    app.cleanup_ctx.append(_rules_reloader(reloader, watch_rules))
    if tracing is not None:
        app.cleanup_ctx.append(_tracing(tracing))
    app.cleanup_ctx.append(_upstream(client, shadows, cache, owners, access_log))
    app.cleanup_ctx.append(_background("splitstream-health", health.run))
    app.cleanup_ctx.append(_store_lifecycle(owned))
    app.cleanup_ctx.append(_limits(limiter, shared))  # while the store is open; the last settlements before it closes
    app.cleanup_ctx.append(_pooled_stats(pooled))  # flushes while the store is open, once more at the end
    app.cleanup_ctx.append(_background("splitstream-tenant-usage", usage.run))
    app.cleanup_ctx.append(_rollouts(rollouts, webhooks))  # after the store: runs while it is open
    if shared:  # feedback joins for the other replicas; the last ones are written before the store closes
        app.cleanup_ctx.append(_feedback_joins(JoinWriter(feedback, owned, rules)))

    for path in ENDPOINT_BY_PATH:
        app.router.add_post(path, endpoints.inference, expect_handler=expect_handler)
    app.router.add_get("/v1/models", endpoints.list_models)
    app.router.add_get("/v1/models/{model:.+}", endpoints.get_model)
    scores = FeedbackEndpoint(feedback, admin_access, rules, owned if shared else None)
    app.router.add_post("/v1/feedback", scores.post, expect_handler=expect_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", endpoints.readyz)
    app.router.add_get("/metrics", endpoints.metrics_page)
    add_admin_routes(app)  # /admin/rules, /admin/reload, /admin/rollouts, /admin/experiments
    add_ui_routes(app)  # /ui/ status pages and their JSON twins under /admin/
    return app


Lifecycle = Callable[[web.Application], AsyncIterator[None]]


def _rules_reloader(reloader: Reloader, watch: bool) -> Lifecycle:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if watch:
            reloader.start_watching()
        yield
        await reloader.close()  # the watcher and any reload still running (SIGHUP, admin)

    return lifecycle


def _tracing(tracing: Tracing) -> Lifecycle:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(tracing.shutdown)  # the last spans are exported (the SDK blocks: off the loop)

    return lifecycle


def _upstream(client: UpstreamClient, shadows: ShadowMirror, cache: ResultCache, owners: ResponseOwners,
              access_log: AccessLog) -> Lifecycle:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        client.open()
        yield
        await shadows.close()  # shadow copies use the client: stop them first
        await cache.close()
        await owners.close()
        client.close()
        access_log.flush()

    return lifecycle


def _background(name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> Lifecycle:
    """A task that runs for the app's life and is cancelled (and awaited) when it stops."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(run(), name=name)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return lifecycle


def _store_lifecycle(store: OwnedStore) -> Lifecycle:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await store.start()
        yield
        await store.close()

    return lifecycle


def _feedback_joins(writer: JoinWriter) -> Lifecycle:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(writer.run(), name="splitstream-feedback-joins")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await writer.flush()

    return lifecycle


def _limits(limiter: Limiter, shared: bool) -> Lifecycle:
    """Lease renewals always (an embedded lease runs out too); batches to the store only when there is one."""
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(limiter.renew(), name="splitstream-lease-renewals")]
        if shared:
            tasks.append(asyncio.create_task(limiter.run(), name="splitstream-limits"))
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if shared:
            await limiter.drain()

    return lifecycle


def _pooled_stats(pooled: PooledStats) -> Lifecycle:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(pooled.run(), name="splitstream-stats")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pooled.flush()  # the last requests' numbers (a store that is down drops them, logged once)

    return lifecycle


def _rollouts(controller: RolloutController, webhooks: WebhookSender) -> Lifecycle:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await webhooks.start()  # before the first tick: its transitions are announced too
        await controller.tick_logged()  # weights of every rollout are known before the first request
        task = asyncio.create_task(controller.run(), name="splitstream-rollouts") if controller.tick_seconds else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await controller.close()
        await webhooks.close()  # what is queued goes out (a short drain), after the last transition

    return lifecycle
