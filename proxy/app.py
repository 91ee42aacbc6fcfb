"""Builds the aiohttp Application and wires the parts together; no request logic of its own.

Background parts (rules watcher, upstream connection pool, health checks, store, rollouts) start in
`cleanup_ctx` generators and are closed after `yield`, so tests and `serve` share one lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

from aiohttp import web

from proxy.admin import ADMIN_ACCESS, RELOADER, AdminAccess, add_admin_routes, admin_token_from_env
from proxy.config.model import Snapshot
from proxy.config.reloader import Reloader
from proxy.context import CONTEXT, ProxyContext
from proxy.delivery.controller import RolloutController, RolloutSettings
from proxy.delivery.views import add_delivery_routes
from proxy.observe.logs import AccessLog
from proxy.observe.metrics import Metrics
from proxy.pipeline import handler
from proxy.store.recent import RecentAssignments
from proxy.pipeline.errors import error_middleware
from proxy.store import MemoryStore, OwnedStore
from proxy.ui.views import add_ui_routes
from proxy.upstream.health import HealthChecker
from proxy.upstream.pool import ConnectionPool

# Hard ceiling for aiohttp's own body reader; the configurable limit (`server.max_body_bytes`) is checked
# per request in `pipeline/handler.py` so a reload can change it.
CLIENT_MAX_SIZE = 1024 * 1024 * 1024


def client_keys_from_env() -> list[str]:
    """Client API keys accepted by the proxy: SPLITSTREAM_API_KEYS, comma-separated. Unset = open."""
    return [k.strip() for k in os.environ.get("SPLITSTREAM_API_KEYS", "").split(",") if k.strip()]


async def _health_checks(app: web.Application) -> AsyncIterator[None]:
    context = app[CONTEXT]
    context.health = HealthChecker(context.backends, lambda: context.rules.current)
    task = asyncio.create_task(context.health.run(), name="splitstream-health")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _rules_reloader(watch: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        reloader = app[RELOADER]
        if watch:
            reloader.start_watching()
        yield
        await reloader.close()  # the watcher and any reload still running (SIGHUP, admin)

    return lifecycle


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    context = app[CONTEXT]
    context.pool = ConnectionPool(asyncio.get_running_loop())
    yield
    await context.shadows.close()  # shadow copies use the pool: stop them first
    await context.cache.close()
    context.pool.close()
    context.access_log.flush()


def _store_lifecycle(store: OwnedStore) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await store.start()
        yield
        await store.close()

    return lifecycle


async def _rollouts(app: web.Application) -> AsyncIterator[None]:
    controller = app[CONTEXT].rollouts
    await controller.tick_logged()  # weights of every rollout are known before the first request
    task = asyncio.create_task(controller.run(), name="splitstream-rollouts") if controller.tick_seconds else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await controller.close()


def build_app(
    snapshot: Snapshot,
    metrics: Metrics | None = None,
    client_keys: list[str] | None = None,
    access_log: AccessLog | None = None,
    store: OwnedStore | None = None,
    rules_dir: str | Path | None = None,
    admin_token: str | None = None,
    rules_env: Mapping[str, str] | None = None,
    watch_rules: bool = True,
    rollout_settings: RolloutSettings | None = None,
) -> web.Application:
    """The proxy app. `store` (default: embedded) is opened and closed with the app, which owns it.

    `rules_dir` is where `snapshot` came from: given, the app reloads from it on POST /admin/reload and,
    with `watch_rules`, whenever a rule file in it changes; `rules_env` is where reloads read `api_key_env`
    values (default os.environ). `admin_token` defaults to SPLITSTREAM_ADMIN_TOKEN; '' = loopback-only.
    `rollout_settings`: the rollout controller's clock, tick, lease and replica id (tests drive ticks)."""
    context = ProxyContext(
        snapshot,
        metrics or Metrics(),
        access_log or AccessLog(),
        client_keys if client_keys is not None else client_keys_from_env(),
    )
    context.metrics.rules_generation.set(snapshot.generation)
    context.metrics.rules_reloads_total.labels("success").inc()
    app = web.Application(middlewares=[error_middleware], client_max_size=CLIENT_MAX_SIZE)
    app[CONTEXT] = context
    app[RELOADER] = Reloader(rules_dir, context.rules, context.backends, context.metrics, env=rules_env)
    app[ADMIN_ACCESS] = AdminAccess.from_token(admin_token if admin_token is not None else admin_token_from_env())
    app.cleanup_ctx.append(_rules_reloader(watch_rules))
    app.cleanup_ctx.append(_upstream_pool)
    app.cleanup_ctx.append(_health_checks)
    owned = store if store is not None else MemoryStore()
    context.store = owned
    if not isinstance(owned, MemoryStore):
        context.recent_assignments = RecentAssignments()
    app.cleanup_ctx.append(_store_lifecycle(owned))
    rollout_store = context.rollouts.store if isinstance(owned, MemoryStore) else owned
    context.rollouts = RolloutController(context, rollout_store, rollout_settings or RolloutSettings())
    app.cleanup_ctx.append(_rollouts)  # after the store: it starts once the store is open, stops before it closes
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, handler.inference)
    app.router.add_get("/v1/models", handler.list_models)
    app.router.add_get("/healthz", handler.healthz)
    app.router.add_get("/readyz", handler.readyz)
    app.router.add_get("/metrics", handler.metrics)
    add_admin_routes(app)
    add_delivery_routes(app)  # /admin/rollouts, /admin/experiments, POST /v1/feedback
    add_ui_routes(app)  # /ui/ status pages and their JSON twins under /admin/
    return app
