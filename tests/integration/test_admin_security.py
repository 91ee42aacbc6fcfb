"""Hostile browsers against the admin surface (issue 15, items 4 and 17). A web page on the operator's
machine can send requests to loopback, read through a DNS name it rebinds to 127.0.0.1, and submit forms
to the status pages; none of that may move a rollout, read /admin/*, or log anyone in. And the login cookie
is Secure behind a TLS-terminating proxy when `server.secure_cookies` says so.

Cookies are carried by hand (`DummyCookieJar`): aiohttp's jar keeps no cookies of an IP-address host, and the
tests want to see each `Set-Cookie` as the proxy wrote it.
"""

from __future__ import annotations

import asyncio
import re
from http.cookies import Morsel
from typing import Any

import aiohttp
import pytest

from proxy.auth import CSRF_COOKIE, SESSION_COOKIE
from tests.conftest import FakeClock, ProxyHandle, simple_rules
from tests.integration.conftest import ServedFactory
from tests.integration.test_rollout import percent_of, rollout_block, rules, start, state_of

TOKEN = "admin-security-token"
MARKER = {"X-Splitstream-Admin": "1"}
EVIL = "http://evil.example"


async def request(method: str, url: str, headers: dict[str, str] | None = None, data: bytes | None = None,
                  cookies: dict[str, str] | None = None) -> tuple[int, Any, aiohttp.ClientResponse]:
    """(status, JSON or text body, response) without following redirects; cookies only as given."""
    sent = dict(headers or {})
    if cookies:
        sent["Cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.request(method, url, headers=sent, data=data, allow_redirects=False) as response:
            body = await response.json() if response.content_type == "application/json" else await response.text()
            return response.status, body, response


async def rollout_proxy(sim: Any, proxy: Any, **options: Any) -> ProxyHandle:
    """Route `chat` with a rollout running at its first step (10 %), the controller's clock held still."""
    _, stable = await sim()
    _, canary = await sim()
    handle = await start(proxy, rules(stable, canary, rollout_block()), FakeClock(1_000_000.0), **options)
    assert (state_of(handle).status, percent_of(handle)) == ("running", 10.0)
    return handle


# ------------------------------------------------------------------------------ forged admin POSTs

FORGERIES = {
    "cross-site origin": {**MARKER, "Origin": EVIL},
    "sec-fetch-site cross-site": {**MARKER, "Sec-Fetch-Site": "cross-site"},
    "opaque origin": {**MARKER, "Origin": "null"},  # a sandboxed iframe or a data: page
    "other port, same host": {**MARKER, "Origin": "http://127.0.0.1:1"},  # another local web app
    "form-encoded": {"Content-Type": "application/x-www-form-urlencoded"},
    "text/plain": {"Content-Type": "text/plain"},
    "multipart": {"Content-Type": "multipart/form-data; boundary=x"},
    "no content type": {},  # fetch(url, {method: "POST", mode: "no-cors"})
}


@pytest.mark.parametrize("headers", FORGERIES.values(), ids=FORGERIES.keys())
async def test_a_forged_promote_is_refused_and_the_rollout_stays(sim: Any, proxy: Any,
                                                                 headers: dict[str, str]) -> None:
    handle = await rollout_proxy(sim, proxy)
    status, body, _ = await request("POST", handle.url("/admin/rollouts/chat/promote"), headers, b"x=1")
    assert status == 403 and body["error"]["type"] == "permission_error", body
    assert (state_of(handle).status, percent_of(handle)) == ("running", 10.0)  # it did not move

    # What an operator's script sends still works: JSON, or the marker from a page of the proxy itself.
    status, body, _ = await request("POST", handle.url("/admin/rollouts/chat/pause"),
                                    {"Content-Type": "application/json"}, b"{}")
    assert status == 200 and body["status"] == "paused"
    same_origin = {**MARKER, "Origin": handle.url(""), "Sec-Fetch-Site": "same-origin"}
    status, body, _ = await request("POST", handle.url("/admin/rollouts/chat/promote"), same_origin)
    assert status == 200 and (body["status"], body["percent"]) == ("promoted", 100.0)


async def test_with_a_token_a_cross_site_post_is_refused_too(sim: Any, proxy: Any) -> None:
    handle = await rollout_proxy(sim, proxy, admin_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = handle.url("/admin/rollouts/chat/promote")
    assert (await request("POST", url, MARKER))[0] == 401  # who asks comes first
    for headers in ({**auth, **MARKER, "Origin": EVIL}, {**auth, "Content-Type": "text/plain"}, auth):
        status, body, _ = await request("POST", url, headers)
        assert status == 403 and body["error"]["type"] == "permission_error", (headers, body)
    assert percent_of(handle) == 10.0
    status, body, _ = await request("POST", url, {**auth, **MARKER})
    assert status == 200 and body["percent"] == 100.0


# ------------------------------------------------------------------------------ DNS rebinding

async def test_a_rebound_dns_name_reads_nothing_in_loopback_mode(sim: Any, served: ServedFactory) -> None:
    _, server = await sim()
    s = await served(simple_rules(server))
    for host in ("evil.example", f"evil.example:{s.port}", "127.0.0.1.evil.example", "localhost.evil.example",
                 f"localhost:{s.port}@evil.example", "127.0.0.1:80:80"):
        status, body, _ = await request("GET", s.url("/admin/rules"), {"Host": host})
        assert status == 403, (host, body)
        assert body["error"]["type"] == "permission_error" and "Host" in body["error"]["message"]
        assert "generation" not in body
    status, page, _ = await request("GET", s.url("/ui/"), {"Host": "evil.example"})  # the pages too
    assert status == 403 and "Host header" in page and "rules generation" not in page
    status, _, _ = await request("POST", s.url("/admin/reload"), {**MARKER, "Host": f"evil.example:{s.port}"})
    assert status == 403

    for host in (f"127.0.0.1:{s.port}", f"localhost:{s.port}", "LOCALHOST", f"[::1]:{s.port}", "127.8.9.10"):
        status, body, _ = await request("GET", s.url("/admin/rules"), {"Host": host})
        assert status == 200 and body["generation"] == 1, host


async def test_with_a_token_any_host_name_may_be_used(sim: Any, proxy: Any) -> None:
    _, server = await sim()
    handle = await proxy(simple_rules(server), admin_token=TOKEN, watch_rules=False)
    headers = {"Host": "splitstream.internal.example", "Authorization": f"Bearer {TOKEN}"}
    assert (await request("GET", handle.url("/admin/rules"), headers))[0] == 200


# ------------------------------------------------------------------------------ the login form

async def open_form(handle: ProxyHandle) -> tuple[str, str]:
    """What a browser gets from GET /ui/login: the form's cookie and its hidden token."""
    status, html, response = await request("GET", handle.url("/ui/login"))
    assert status == 200
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match is not None, html
    return response.cookies[CSRF_COOKIE].value, match.group(1)


async def log_in(handle: ProxyHandle, token: str, cookie: str | None,
                 csrf: str | None) -> tuple[int, str, aiohttp.ClientResponse]:
    """POST the login form as a browser would, with the form's cookie and hidden token where given."""
    fields = f"token={token}&next=/ui/backends" + (f"&csrf={csrf}" if csrf is not None else "")
    cookies = {CSRF_COOKIE: cookie} if cookie is not None else None
    return await request("POST", handle.url("/ui/login"), {"Content-Type": "application/x-www-form-urlencoded"},
                         fields.encode(), cookies)


async def test_a_login_without_its_form_token_is_refused(sim: Any, proxy: Any) -> None:
    _, server = await sim()
    handle = await proxy(simple_rules(server), admin_token=TOKEN, watch_rules=False)
    form, other_browser = await open_form(handle), await open_form(handle)
    for attempt in (log_in(handle, TOKEN, None, None),  # another site's form: no cookie, no token
                    log_in(handle, TOKEN, None, form[1]),  # a token without the cookie it is bound to
                    log_in(handle, TOKEN, form[0], other_browser[1]),  # a token bound to another cookie
                    log_in(handle, TOKEN, form[0], "0" * 64),
                    log_in(handle, TOKEN, f"9999999999.{form[0]}", form[1])):  # a cookie with a new expiry
        status, page, response = await attempt
        assert status == 403 and "log in again" in page
        assert SESSION_COOKIE not in response.cookies
        assert CSRF_COOKIE in response.cookies  # a fresh form to try again with

    status, _, response = await log_in(handle, TOKEN, *form)
    assert status == 303 and response.headers["Location"] == "/ui/backends"
    session = response.cookies[SESSION_COOKIE].value
    assert (await request("GET", handle.url("/ui/backends"), cookies={SESSION_COOKIE: session}))[0] == 200


async def test_the_sixth_wrong_login_in_a_row_is_429(sim: Any, proxy: Any) -> None:
    _, server = await sim()
    handle = await proxy(simple_rules(server), admin_token=TOKEN, watch_rules=False)
    form = await open_form(handle)
    for _ in range(5):
        status, page, _ = await log_in(handle, "guess", *form)
        assert status == 401 and "That is not the admin token." in page
    status, page, response = await log_in(handle, "guess", *form)
    assert status == 429 and "Too many failed logins" in page
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    status, _, response = await log_in(handle, TOKEN, *form)  # not even the right token gets tried now
    assert status == 429 and SESSION_COOKIE not in response.cookies


async def test_a_forged_logout_is_refused(sim: Any, proxy: Any) -> None:
    _, server = await sim()
    handle = await proxy(simple_rules(server), admin_token=TOKEN, watch_rules=False)
    _, _, response = await log_in(handle, TOKEN, *await open_form(handle))
    session = {SESSION_COOKIE: response.cookies[SESSION_COOKIE].value}
    status, _, response = await request("POST", handle.url("/ui/logout"), cookies=session)
    assert status == 403 and SESSION_COOKIE not in response.cookies  # the session was not ended
    _, page, _ = await request("GET", handle.url("/ui/"), cookies=session)
    match = re.search(r'action="/ui/logout"><input type="hidden" name="csrf" value="([^"]+)"', page)
    assert match is not None, page
    status, _, response = await request("POST", handle.url("/ui/logout"), data=f"csrf={match.group(1)}".encode(),
                                        headers={"Content-Type": "application/x-www-form-urlencoded"},
                                        cookies=session)
    assert status == 303 and response.cookies[SESSION_COOKIE].value == ""  # deleted


# ------------------------------------------------------------------------------ Secure cookies

@pytest.mark.parametrize("secure_cookies", [True, False])
async def test_the_login_cookie_is_secure_behind_a_tls_proxy(sim: Any, proxy: Any, secure_cookies: bool) -> None:
    """Plain HTTP here, as between a TLS-terminating proxy and splitstream: only the setting can tell."""
    _, server = await sim()
    block = f"server: {{secure_cookies: {str(secure_cookies).lower()}}}"
    handle = await proxy(simple_rules(server, server_block=block), admin_token=TOKEN, watch_rules=False)
    _, _, form_response = await request("GET", handle.url("/ui/login"))
    status, _, response = await log_in(handle, TOKEN, *await open_form(handle))
    assert status == 303
    cookies: list[Morsel[str]] = [response.cookies[SESSION_COOKIE], form_response.cookies[CSRF_COOKIE]]
    for cookie in cookies:
        assert bool(cookie["secure"]) is secure_cookies, cookie.OutputString()
        assert cookie["httponly"] and cookie["samesite"] == "Strict"


async def test_a_cookie_that_is_not_ours_never_breaks_a_page(sim: Any, proxy: Any) -> None:
    """A session cookie of undecodable bytes (aiohttp hands them on as surrogates) beside a valid bearer
    header: the page renders without a logout token, and logging out just clears it."""
    _, server = await sim()
    handle = await proxy(simple_rules(server), admin_token=TOKEN, watch_rules=False)
    for method, path in (("GET", "/ui/"), ("POST", "/ui/logout")):
        reader, writer = await asyncio.open_connection("127.0.0.1", handle.server.port)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: 0\r\nConnection: close\r\n".encode()
                     + f"Cookie: {SESSION_COOKIE}=\x80\xff\r\n\r\n".encode("latin-1"))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200" if method == "GET" else b"HTTP/1.1 303"), answer[:200]
