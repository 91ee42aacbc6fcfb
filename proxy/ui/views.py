"""HTTP side of the status pages: /ui/* (HTML, Jinja with autoescape) and their JSON twins /admin/*.

Every page is one builder from `pages.py` rendered two ways. Access goes through the admin guard
(`admin/guard.py`): the pages also take the login session cookie (`proxy/auth.py`, issued by POST /ui/login
when an admin token is set) and turn a refusal into a redirect to the login form; the JSON twins take the
bearer header only. Both forms (log in, log out) carry a token bound to a cookie of the browser that loaded
them, and failed logins are counted per client (`LoginThrottle`, 429 past its limit).
`add_ui_routes` is called once by `app.py`.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, quote

import aiohttp_jinja2
import jinja2
from aiohttp import web

from proxy.admin.guard import ADMIN_ACCESS, admin_json, require_admin
from proxy.auth import (
    CSRF_COOKIE, CSRF_SECONDS, SESSION_COOKIE, SESSION_SECONDS, LoginThrottle, csrf_token, hash_api_key,
    is_valid_csrf, is_valid_login_csrf, is_valid_session, issue_session, login_binding, throttle_key,
)
from proxy.config.model import RULES
from proxy.config.reloader import RELOADER
from proxy.delivery.weights import WEIGHTS
from proxy.errors import AdminAuthError, AdminForbiddenError, BodyTooLargeError, StoreUnavailableError
from proxy.observe.metrics import METRICS
from proxy.observe.pooled import POOLED
from proxy.pipeline.limits import LIMITER
from proxy.pipeline.result_cache import CACHE
from proxy.pipeline.shadow import SHADOWS
from proxy.ui.filters import FILTERS
from proxy.observe.usage import USAGE
from proxy.ui.pages import PAGES, TOTALS_SECONDS, WINDOW_SECONDS, Clocks, FleetNumbers, Sources, TenantNumbers
from proxy.upstream.state import BACKENDS

MAX_LOGIN_BYTES = 4096  # a login form is one short field; the app's own body limit is far larger
LOGIN_PATH = "/ui/login"
LOGIN_THROTTLE = web.AppKey("LOGIN_THROTTLE", LoginThrottle)
NAV = (("overview", "/ui/", "Overview"), ("backends", "/ui/backends", "Backends"),
       ("shadow", "/ui/shadow", "Shadow"), ("cache", "/ui/cache", "Cache"), ("tenants", "/ui/tenants", "Tenants"))
PAGE_PATHS = {name: path for name, path, _ in NAV}

# Inline styles are ours; the one inline script carries a per-response nonce; nothing loads from elsewhere.
CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


def _clocks() -> Clocks:
    return Clocks(asyncio.get_running_loop().time(), time.time())


async def _sources(app: web.Application, name: str) -> Sources:
    fleet = await _fleet(app) if name == "overview" else None
    usage = await _tenant_usage(app) if name == "tenants" else None
    return Sources(app[RULES], app[RELOADER], app[WEIGHTS], fleet, app[METRICS], app[BACKENDS], app[SHADOWS],
                   app[CACHE], usage)


async def _tenant_usage(app: web.Application) -> TenantNumbers | None:
    """Every tenant's pooled usage (last minute, last day); None when the store does not answer."""
    tenants = app[RULES].current.tenants.all
    try:
        minute, day = await app[USAGE].read([tenant.name for tenant in tenants])
    except StoreUnavailableError:
        return None
    return TenantNumbers(minute, day, await app[LIMITER].use(tenants))


async def _fleet(app: web.Application) -> FleetNumbers | None:
    """The overview's pooled numbers for every route of the rules, and of routes a reload removed that the
    fleet still served lately (a second read); None when the store does not answer."""
    pooled = app[POOLED]
    names = [route.name for route in app[RULES].current.routes]
    now = pooled.now()
    spans = [(now - TOTALS_SECONDS, now), (now - WINDOW_SECONDS, now)]
    try:
        reading = await pooled.read(names, spans)
        retired = sorted(reading.fleet[0].routes - set(names))
        numbers = dict(reading.routes)
        if retired:
            numbers.update((await pooled.read(retired, spans)).routes)
    except StoreUnavailableError:
        return None
    return FleetNumbers(totals={name: spans_[0] for name, spans_ in numbers.items()},
                        window={name: spans_[1] for name, spans_ in numbers.items()},
                        retired=tuple(retired), replicas=len(reading.fleet[0].replicas), now=now)


def _has_token(request: web.Request) -> bool:
    return request.app[ADMIN_ACCESS].token_sha256 is not None


def _logout_token(request: web.Request) -> str:
    """The logout button's form token, bound to this browser's session ('' without a valid one: nothing to
    end, and a cookie that is not ours may hold anything, even text that cannot be encoded)."""
    key, session = request.app[ADMIN_ACCESS].token_sha256, request.cookies.get(SESSION_COOKIE, "")
    if key is None or not session or not is_valid_session(key, session, time.time()):
        return ""
    return csrf_token(key, session)


def _render(request: web.Request, template: str, data: dict[str, Any], status: int = 200) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    context = {"page": data, "nonce": nonce, "nav": NAV, "has_token": _has_token(request),
               "logout_token": _logout_token(request)}
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
        data = build(await _sources(request.app, name), _clocks())
        return _render(request, f"{name}.html", dict(data, name=name))

    return page


def _json_twin(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    build = PAGES[name]

    async def document(request: web.Request) -> web.Response:
        require_admin(request)
        return admin_json(build(await _sources(request.app, name), _clocks()))

    return document


def _set_cookie(request: web.Request, response: web.Response, name: str, value: str, max_age: int,
                path: str) -> None:
    """Our cookies: script-proof, never sent cross-site, Secure over TLS: aiohttp's own, or a TLS-terminating
    proxy's in front of it (`server.secure_cookies`), since `request.secure` cannot see that one."""
    secure = request.secure or request.app[RULES].current.server.secure_cookies
    response.set_cookie(name, value, max_age=max_age, path=path, httponly=True, samesite="Strict", secure=secure)


def _login_page(request: web.Request, key_hex: str, target: str, error: str | None,
                status: int = 200) -> web.Response:
    """The login form with a fresh form token, and the cookie it is bound to (a new one each time it is
    shown: a form shown again after a refusal never carries a spent or expired token)."""
    binding = login_binding(secrets.token_urlsafe(18), time.time())
    data = {"name": "login", "next": target, "error": error, "csrf": csrf_token(key_hex, binding)}
    response = _render(request, "login.html", data, status=status)
    _set_cookie(request, response, CSRF_COOKIE, binding, CSRF_SECONDS, LOGIN_PATH)
    return response


async def login_form(request: web.Request) -> web.Response:
    key = request.app[ADMIN_ACCESS].token_sha256
    if key is None:
        return _redirect(PAGE_PATHS["overview"])  # nothing to log in to: the loopback rule applies there
    return _login_page(request, key, _safe_next(request.query.get("next")), None)


async def login(request: web.Request) -> web.Response:
    """Check the form, then the token: right, set the session cookie and go on; wrong, the form again (401).

    Refused before the token is looked at: a form without its token (403: another site's page, or a form
    left open past CSRF_SECONDS) and a client past its failures (429 with Retry-After, right token or not)."""
    key = request.app[ADMIN_ACCESS].token_sha256
    if key is None:
        return _redirect(PAGE_PATHS["overview"])
    fields = parse_qs((await _read_form(request)).decode("utf-8", "replace"), max_num_fields=4)
    token, target = _field(fields, "token").strip(), _safe_next(_field(fields, "next") or None)
    if not is_valid_login_csrf(key, request.cookies.get(CSRF_COOKIE, ""), _field(fields, "csrf"), time.time()):
        return _login_page(request, key, target, "This form expired or came from elsewhere: log in again.", 403)
    throttle, client, now = request.app[LOGIN_THROTTLE], throttle_key(request.remote), _monotonic()
    wait = throttle.retry_after(client, now)
    if wait is not None:
        return _too_many(request, key, target, wait)
    if not token or not hmac.compare_digest(hash_api_key(token), key):
        throttle.failed(client, now)
        return _login_page(request, key, target, "That is not the admin token.", 401)
    throttle.succeeded(client)
    response = _redirect(target)
    _set_cookie(request, response, SESSION_COOKIE, issue_session(key, time.time()), SESSION_SECONDS, "/ui")
    response.del_cookie(CSRF_COOKIE, path=LOGIN_PATH)  # spent
    return response


def _too_many(request: web.Request, key_hex: str, target: str, wait: float) -> web.Response:
    seconds = max(1, math.ceil(wait))
    response = _login_page(request, key_hex, target, f"Too many failed logins: try again in {seconds} s.", 429)
    response.headers["Retry-After"] = str(seconds)
    return response


async def logout(request: web.Request) -> web.Response:
    """End the session; a live one only from a page that holds it (the button's token, else 403)."""
    key, session = request.app[ADMIN_ACCESS].token_sha256, request.cookies.get(SESSION_COOKIE, "")
    if key is not None and session and is_valid_session(key, session, time.time()):
        fields = parse_qs((await _read_form(request)).decode("utf-8", "replace"), max_num_fields=4)
        if not is_valid_csrf(key, session, _field(fields, "csrf")):
            message = "This logout did not come from a status page: use the Log out button."
            return _render(request, "refused.html", {"name": "refused", "message": message}, status=403)
    response = _redirect(LOGIN_PATH)
    response.del_cookie(SESSION_COOKIE, path="/ui")
    return response


def _field(fields: dict[str, list[str]], name: str) -> str:
    return next(iter(fields.get(name, [])), "")


def _monotonic() -> float:
    return asyncio.get_running_loop().time()


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


async def root(request: web.Request) -> web.Response:
    """`/` is where a newcomer's browser lands first: send it to the status pages. 302, not permanent: the
    root may serve something else one day, and browsers cache a 308 for good."""
    return _redirect(PAGE_PATHS["overview"], status=302)


def add_ui_routes(app: web.Application) -> None:
    """The Jinja environment (autoescape on, undefined names are errors), the login throttle, and every /ui/
    and twin route."""
    aiohttp_jinja2.setup(
        app, loader=jinja2.PackageLoader("proxy.ui", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, filters=FILTERS, default_helpers=False,
    )
    app[LOGIN_THROTTLE] = LoginThrottle()
    app.router.add_get("/", root)
    app.router.add_get("/ui", to_overview)
    for name, path, _ in NAV:
        app.router.add_get(path, _ui_page(name))
        app.router.add_get(f"/admin/{name}", _json_twin(name))
    app.router.add_get(LOGIN_PATH, login_form)
    app.router.add_post(LOGIN_PATH, login)
    app.router.add_post("/ui/logout", logout)
