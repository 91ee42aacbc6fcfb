"""The admin guard: `require_admin` is the one check every admin handler (JSON and UI pages) calls first.

With SPLITSTREAM_ADMIN_TOKEN set a request needs `Authorization: Bearer <token>` (the /ui/ pages also take
their login cookie); without it, only loopback clients addressing a loopback name (the Host header: no DNS
rebinding) are answered. In both modes a POST must be one no other site's page can send (`X-Splitstream-
Admin: 1` or JSON, not cross-site). The decisions are pure and live in `proxy/auth.py`; this module reads
them off the request.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson
from aiohttp import hdrs, web

from proxy.auth import ADMIN_MARKER, SESSION_COOKIE, AdminAccess, check_admin, check_admin_host, check_admin_post

ADMIN_TOKEN_ENV = "SPLITSTREAM_ADMIN_TOKEN"
ADMIN_ACCESS = web.AppKey("ADMIN_ACCESS", AdminAccess)
SAFE_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})  # read only: anything else gets the POST checks


def admin_token_from_env() -> str:
    """SPLITSTREAM_ADMIN_TOKEN, or '' when unset (then /admin/* answers loopback clients only)."""
    return os.environ.get(ADMIN_TOKEN_ENV, "")


def require_admin(request: web.Request, *, allow_session: bool = False) -> None:
    """Raise the error the middleware renders unless the caller may use the admin surface.

    `allow_session`: the /ui/ pages also accept their login cookie; JSON /admin/* takes the header only.
    Who is asking comes first (401 before 403), then whether the request could be a browser's forgery."""
    access = request.app[ADMIN_ACCESS]
    headers = request.headers
    session = request.cookies.get(SESSION_COOKIE, "") if allow_session else ""
    check_admin(access, request.remote, headers.get(hdrs.AUTHORIZATION, ""), session, time.time())
    host = headers.get(hdrs.HOST, "")  # the raw header: aiohttp's `request.host` falls back to the socket
    check_admin_host(access, host)
    if request.method not in SAFE_METHODS:
        # The raw Content-Type: aiohttp's `content_type` says application/octet-stream when there is none.
        check_admin_post(host, headers.get(hdrs.ORIGIN), headers.get("Sec-Fetch-Site", ""),
                         headers.get(hdrs.CONTENT_TYPE, ""), headers.get(ADMIN_MARKER, ""))


def admin_json(document: Any) -> web.Response:
    """An admin JSON answer. orjson writes NaN and ±Infinity as null (json.dumps would write `Infinity`, which
    is not JSON and breaks every client), so a runtime's odd number can never break the admin API."""
    return web.Response(body=orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS), content_type="application/json")
