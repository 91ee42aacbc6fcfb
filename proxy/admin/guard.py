"""The admin guard: `require_admin` is the one check every admin handler (JSON and UI pages) calls first.

With SPLITSTREAM_ADMIN_TOKEN set a request needs `Authorization: Bearer <token>` (the /ui/ pages also take
their login cookie); without it, only loopback clients are answered. The decision itself is pure and lives
in `proxy/auth.py`; this module reads it off the request.
"""

from __future__ import annotations

import os
import time

from aiohttp import web

from proxy.auth import SESSION_COOKIE, AdminAccess, check_admin

ADMIN_TOKEN_ENV = "SPLITSTREAM_ADMIN_TOKEN"
ADMIN_ACCESS = web.AppKey("ADMIN_ACCESS", AdminAccess)


def admin_token_from_env() -> str:
    """SPLITSTREAM_ADMIN_TOKEN, or '' when unset (then /admin/* answers loopback clients only)."""
    return os.environ.get(ADMIN_TOKEN_ENV, "")


def require_admin(request: web.Request, *, allow_session: bool = False) -> None:
    """Raise the error the middleware renders unless the caller may use the admin surface.

    `allow_session`: the /ui/ pages also accept their login cookie; JSON /admin/* takes the header only."""
    session = request.cookies.get(SESSION_COOKIE, "") if allow_session else ""
    check_admin(request.app[ADMIN_ACCESS], request.remote, request.headers.get("Authorization", ""), session,
                time.time())
