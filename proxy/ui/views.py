"""HTTP side of the status pages: /ui/* (HTML, Jinja with autoescape) and their JSON twins /admin/*.

Every page is one builder from `pages.py` rendered two ways. Access goes through the admin guard
(`admin/guard.py`): the pages also take the login session cookie (`proxy/auth.py`, issued by POST /ui/login
when an admin token is set) and turn a refusal into a redirect to the login form; the JSON twins take the
bearer header only.
`add_ui_routes` is called once by `app.py`.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, quote

import aiohttp_jinja2
import jinja2
from aiohttp import web

from proxy.admin.guard import ADMIN_ACCESS, require_admin
from proxy.auth import SESSION_COOKIE, SESSION_SECONDS, hash_api_key, issue_session
from proxy.config.model import RULES
from proxy.config.reloader import RELOADER
from proxy.delivery.weights import WEIGHTS
from proxy.errors import AdminAuthError, AdminForbiddenError, BodyTooLargeError
from proxy.observe.metrics import METRICS
from proxy.observe.stats import STATS
from proxy.pipeline.result_cache import CACHE
from proxy.pipeline.shadow import SHADOWS
from proxy.ui.filters import FILTERS
from proxy.ui.pages import PAGES, Clocks, Sources
from proxy.upstream.state import BACKENDS

MAX_LOGIN_BYTES = 4096  # a login form is one short field; the app's own body limit is far larger
LOGIN_PATH = "/ui/login"
NAV = (("overview", "/ui/", "Overview"), ("backends", "/ui/backends", "Backends"),
       ("shadow", "/ui/shadow", "Shadow"), ("cache", "/ui/cache", "Cache"))
PAGE_PATHS = {name: path for name, path, _ in NAV}

# Inline styles are ours; the one inline script carries a per-response nonce; nothing loads from elsewhere.
CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


def _clocks() -> Clocks:
    return Clocks(asyncio.get_running_loop().time(), time.time())


def _sources(app: web.Application) -> Sources:
    return Sources(app[RULES], app[RELOADER], app[WEIGHTS], app[STATS], app[METRICS], app[BACKENDS], app[SHADOWS],
                   app[CACHE])


def _has_token(request: web.Request) -> bool:
    return request.app[ADMIN_ACCESS].token_sha256 is not None


def _render(request: web.Request, template: str, data: dict[str, Any], status: int = 200) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    context = {"page": data, "nonce": nonce, "nav": NAV, "has_token": _has_token(request)}
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers["Content-Security-Policy"] = CSP.format(nonce=nonce)
    response.headers["Cache-Control"] = "no-store"  # live numbers, and pages behind a login
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _redirect(location: str, status: int = 303) -> web.Response:
    """A plain redirect response: raising aiohttp's HTTPSeeOther would meet the error middleware, which
    turns every HTTPException into an OpenAI-shaped error body."""
    return web.Response(status=status, headers={"Location": location})


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: one of our pages only (never an open redirect)."""
    return target if target is not None and target in PAGE_PATHS.values() else PAGE_PATHS["overview"]


def _ui_page(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    build = PAGES[name]

    async def page(request: web.Request) -> web.Response:
        try:
            require_admin(request, allow_session=True)
        except AdminForbiddenError as exc:
            return _render(request, "refused.html", {"name": "refused", "message": exc.message}, status=403)
        except AdminAuthError:
            return _redirect(f"{LOGIN_PATH}?next={quote(request.path)}")
        data = build(_sources(request.app), _clocks())
        return _render(request, f"{name}.html", dict(data, name=name))

    return page


def _json_twin(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    build = PAGES[name]

    async def document(request: web.Request) -> web.Response:
        require_admin(request)
        return web.json_response(build(_sources(request.app), _clocks()))

    return document


async def login_form(request: web.Request) -> web.Response:
    if not _has_token(request):
        return _redirect(PAGE_PATHS["overview"])  # nothing to log in to: the loopback rule applies there
    data = {"name": "login", "next": _safe_next(request.query.get("next")), "error": None}
    return _render(request, "login.html", data)


async def login(request: web.Request) -> web.Response:
    """Check the token from the form; right: set the session cookie and go on, wrong: the form again (401)."""
    access = request.app[ADMIN_ACCESS]
    if access.token_sha256 is None:
        return _redirect(PAGE_PATHS["overview"])
    fields = parse_qs((await _read_form(request)).decode("utf-8", "replace"), max_num_fields=4)
    token = (fields.get("token") or [""])[0].strip()
    target = _safe_next(next(iter(fields.get("next", [])), None))
    if not token or not hmac.compare_digest(hash_api_key(token), access.token_sha256):
        data = {"name": "login", "next": target, "error": "That is not the admin token."}
        return _render(request, "login.html", data, status=401)
    response = _redirect(target)
    response.set_cookie(
        SESSION_COOKIE, issue_session(access.token_sha256, time.time()), max_age=SESSION_SECONDS, path="/ui",
        httponly=True, samesite="Strict", secure=request.secure,
    )
    return response


async def logout(request: web.Request) -> web.Response:
    response = _redirect(LOGIN_PATH)
    response.del_cookie(SESSION_COOKIE, path="/ui")
    return response


async def _read_form(request: web.Request) -> bytes:
    too_large = BodyTooLargeError(f"A login form is at most {MAX_LOGIN_BYTES} bytes.")
    if request.content_length is not None and request.content_length > MAX_LOGIN_BYTES:
        raise too_large
    body = bytearray()
    async for part in request.content.iter_any():
        body += part
        if len(body) > MAX_LOGIN_BYTES:
            raise too_large
    return bytes(body)


async def to_overview(request: web.Request) -> web.Response:
    return _redirect(PAGE_PATHS["overview"], status=308)


def add_ui_routes(app: web.Application) -> None:
    """The Jinja environment (autoescape on, undefined names are errors) and every /ui/ and twin route."""
    aiohttp_jinja2.setup(
        app, loader=jinja2.PackageLoader("proxy.ui", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, filters=FILTERS, default_helpers=False,
    )
    app.router.add_get("/ui", to_overview)
    for name, path, _ in NAV:
        app.router.add_get(path, _ui_page(name))
        app.router.add_get(f"/admin/{name}", _json_twin(name))
    app.router.add_get(LOGIN_PATH, login_form)
    app.router.add_post(LOGIN_PATH, login)
    app.router.add_post("/ui/logout", logout)
