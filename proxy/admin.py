"""The admin surface: GET /admin/rules (what is running, the last rejected reload) and POST /admin/reload.

`require_admin` is the one guard every admin page calls first (the status UI reuses it): with
SPLITSTREAM_ADMIN_TOKEN set a request needs `Authorization: Bearer <token>` (the /ui/ pages also take their
login cookie, `proxy/ui/session.py`); without it, only loopback clients are answered. Handlers read the
snapshot and the `Reloader`; secrets (backend keys) never appear.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from proxy.config.model import Backend, Pool, Route, Snapshot
from proxy.config.reloader import ReloadOutcome, Reloader
from proxy.context import CONTEXT, hash_api_key
from proxy.errors import AdminAuthError, AdminForbiddenError, ReloadUnavailableError
from proxy.ui.session import SESSION_COOKIE, is_valid_session

ADMIN_TOKEN_ENV = "SPLITSTREAM_ADMIN_TOKEN"


@dataclass(frozen=True, slots=True)
class AdminAccess:
    """Who may use /admin/*: holders of the token (kept as its SHA-256), or loopback clients when None."""

    token_sha256: str | None = None

    @classmethod
    def from_token(cls, token: str) -> AdminAccess:
        token = token.strip()
        return cls(hash_api_key(token) if token else None)


ADMIN_ACCESS = web.AppKey("ADMIN_ACCESS", AdminAccess)
RELOADER = web.AppKey("RELOADER", Reloader)


def admin_token_from_env() -> str:
    """SPLITSTREAM_ADMIN_TOKEN, or '' when unset (then /admin/* answers loopback clients only)."""
    return os.environ.get(ADMIN_TOKEN_ENV, "")


def is_loopback(remote: str | None) -> bool:
    """Whether a peer address is this host's loopback (127.0.0.0/8, ::1, or ::ffff:127.x.y.z)."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_admin(
    access: AdminAccess, remote: str | None, authorization: str, session: str = "", now: float = 0.0
) -> None:
    """Raise unless the caller may use /admin/*. Pure: the peer address, header, session cookie and wall
    clock are passed in; a `session` is only ever passed for the /ui/ pages.

    `remote` is the TCP peer, never X-Forwarded-For: behind a reverse proxy on this host every client looks
    local, which is why such setups should set the token."""
    if access.token_sha256 is not None:
        if session and is_valid_session(access.token_sha256, session, now):
            return
        scheme, _, token = authorization.partition(" ")
        given = hash_api_key(token.strip())
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, access.token_sha256):
            raise AdminAuthError("The admin API needs `Authorization: Bearer <SPLITSTREAM_ADMIN_TOKEN>`.")
        return
    if not is_loopback(remote):
        raise AdminForbiddenError(
            "The admin API answers loopback clients only; set SPLITSTREAM_ADMIN_TOKEN to allow others."
        )


def require_admin(request: web.Request, *, allow_session: bool = False) -> None:
    """The guard for every admin handler (JSON and UI alike): raises the error the middleware renders.

    `allow_session`: the /ui/ pages also accept their login cookie; JSON /admin/* takes the header only."""
    session = request.cookies.get(SESSION_COOKIE, "") if allow_session else ""
    check_admin(request.app[ADMIN_ACCESS], request.remote, request.headers.get("Authorization", ""), session,
                time.time())


# ------------------------------------------------------------------------------------------ handlers


async def rules_status(request: web.Request) -> web.Response:
    require_admin(request)
    snapshot = request.app[CONTEXT].rules.current
    return web.json_response(rules_document(snapshot, request.app[RELOADER]))


async def reload_rules(request: web.Request) -> web.Response:
    """Reload now; answers the outcome (a rejected reload is a 200 with result 'error' and its errors)."""
    require_admin(request)
    reloader = request.app[RELOADER]
    if reloader.rules_dir is None:
        raise ReloadUnavailableError("This proxy was started from a snapshot, without a rules directory.")
    return web.json_response(outcome_document(await reloader.reload("admin")))


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/admin/rules", rules_status)
    app.router.add_post("/admin/reload", reload_rules)


# ------------------------------------------------------------------------------------------ documents


def timestamp(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        "balance": route.balance,
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
