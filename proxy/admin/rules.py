"""GET /admin/rules (what is running, the last rejected reload) and POST /admin/reload.

Handlers read the snapshot and the `Reloader`; secrets (backend keys) never appear. `rules_document` is
also the status page's view of the rules (`ui/pages.py`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from aiohttp import web

from proxy.admin.guard import admin_json, require_admin
from proxy.config.model import RULES, Backend, Pool, Route, Snapshot
from proxy.config.reloader import RELOADER, ReloadOutcome, Reloader
from proxy.errors import ReloadUnavailableError


def timestamp(at: float) -> str:
    """Wall-clock seconds as ISO 8601 UTC with milliseconds: how every admin document writes a time."""
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def rules_status(request: web.Request) -> web.Response:
    require_admin(request)
    return admin_json(rules_document(request.app[RULES].current, request.app[RELOADER]))


async def reload_rules(request: web.Request) -> web.Response:
    """Reload now; answers the outcome (a rejected reload is a 200 with result 'error' and its errors)."""
    require_admin(request)
    reloader = request.app[RELOADER]
    if reloader.rules_dir is None:
        raise ReloadUnavailableError("This proxy was started from a snapshot, without a rules directory.")
    return admin_json(outcome_document(await reloader.reload("admin")))


def outcome_document(outcome: ReloadOutcome) -> dict[str, Any]:
    return {
        "result": outcome.result,
        "trigger": outcome.trigger,
        "generation": outcome.generation,
        "at": timestamp(outcome.at),
        "duration_ms": round(outcome.duration * 1000, 3),
        "errors": list(outcome.errors),
    }


def rules_document(snapshot: Snapshot, reloader: Reloader) -> dict[str, Any]:
    """GET /admin/rules: the running snapshot summarised, where it came from, and the last rejection."""
    last_error = reloader.last_error
    return {
        "generation": snapshot.generation,
        "loaded_at": timestamp(reloader.loaded_at),
        "rules_dir": reloader.rules_dir,
        "watching": reloader.watching.is_set(),
        "files": [{"path": path, "sha256": digest} for path, digest in snapshot.files],
        "routes": [_route(route) for route in snapshot.routes],
        "pools": [_pool(pool) for pool in snapshot.pools],
        "backends": [_backend(backend) for backend in snapshot.backends],
        "last_error": None if last_error is None else {
            "at": timestamp(last_error.at), "trigger": last_error.trigger, "errors": list(last_error.errors),
        },
    }


def _route(route: Route) -> dict[str, Any]:
    return {
        "name": route.name,
        "models": list(route.models),
        "endpoints": list(route.endpoints),
        "variants": [{"name": v.name, "pool": v.pool.name, "weight": v.weight} for v in route.variants],
        "balance": asdict(route.balance),
        "timeouts": asdict(route.timeouts),
        "source": route.source,
    }


def _pool(pool: Pool) -> dict[str, Any]:
    return {"name": pool.name, "model": pool.model, "backends": [b.name for b in pool.backends]}


def _backend(backend: Backend) -> dict[str, Any]:
    return {
        "name": backend.name,
        "url": backend.url,
        "kind": backend.kind,
        "weight": backend.weight,
        "max_inflight": backend.max_inflight,
        "has_api_key": backend.api_key is not None,  # whether one is sent, never which
    }


def add_rules_routes(app: web.Application) -> None:
    app.router.add_get("/admin/rules", rules_status)
    app.router.add_post("/admin/reload", reload_rules)
