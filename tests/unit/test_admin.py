"""Unit tests for the admin guard (`proxy.auth`): token when configured, loopback peer and Host otherwise, and
admin POSTs no other site's page can send."""

from __future__ import annotations

import pytest

from proxy.auth import (
    AdminAccess, check_admin, check_admin_host, check_admin_post, is_loopback, is_loopback_host, is_same_origin,
)
from proxy.errors import AdminAuthError, AdminForbiddenError

TOKEN = AdminAccess.from_token("s3cret")
OPEN = AdminAccess.from_token("")


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
        ("10.0.0.5", False), ("192.0.2.1", False), ("::ffff:10.0.0.5", False), ("2001:db8::1", False),
        ("", False), (None, False), ("localhost", False),
    ],
)
def test_is_loopback(remote: str | None, loopback: bool) -> None:
    assert is_loopback(remote) is loopback


@pytest.mark.parametrize(
    ("access", "remote", "authorization", "error"),
    [
        (OPEN, "127.0.0.1", "", None),
        (OPEN, "::1", "Bearer anything", None),
        (OPEN, "10.0.0.5", "", AdminForbiddenError),
        (OPEN, "10.0.0.5", "Bearer s3cret", AdminForbiddenError),  # no token configured: nothing opens it
        (TOKEN, "10.0.0.5", "Bearer s3cret", None),
        (TOKEN, "127.0.0.1", "bearer  s3cret ", None),
        (TOKEN, "127.0.0.1", "", AdminAuthError),  # with a token, loopback alone is not enough
        (TOKEN, "10.0.0.5", "Bearer wrong", AdminAuthError),
        (TOKEN, "10.0.0.5", "Basic s3cret", AdminAuthError),
        (TOKEN, "10.0.0.5", "s3cret", AdminAuthError),
    ],
)
def test_check_admin(access: AdminAccess, remote: str | None, authorization: str,
                     error: type[Exception] | None) -> None:
    if error is None:
        check_admin(access, remote, authorization)
    else:
        with pytest.raises(error) as caught:
            check_admin(access, remote, authorization)
        assert type(caught.value) is error


def test_errors_as_clients_see_them() -> None:
    assert (AdminAuthError.status, AdminAuthError.code) == (401, "invalid_admin_token")
    assert (AdminForbiddenError.status, AdminForbiddenError.type) == (403, "permission_error")


def test_the_token_is_kept_hashed() -> None:
    assert TOKEN.token_sha256 is not None and "s3cret" not in TOKEN.token_sha256 and OPEN.token_sha256 is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True), ("LOCALHOST:8080", True), ("127.0.0.1", True), ("127.8.9.10:1", True),
        ("[::1]", True), ("[::1]:8080", True),
        ("evil.example", False), ("evil.example:8080", False), ("127.0.0.1.evil.example", False),
        ("localhost.evil.example", False), ("localhost:8080@evil.example", False), ("localhost:", False),
        ("localhost:８０", False), ("127.0.0.1:80:80", False), ("::1", False), ("[::1", False), ("", False),
        ("10.0.0.5", False), ("[2001:db8::1]:80", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_a_rebound_host_is_refused_in_loopback_mode_only() -> None:
    check_admin_host(OPEN, "localhost:8080")
    with pytest.raises(AdminForbiddenError, match="Host header"):
        check_admin_host(OPEN, "evil.example:8080")
    check_admin_host(TOKEN, "splitstream.example")  # a token holder may use any name


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True), ("HTTP://LOCALHOST:8080", "localhost:8080", True),
        ("http://localhost", "localhost:80", True), ("https://admin.example", "admin.example:443", True),
        ("https://admin.example:443", "admin.example", True), ("http://[::1]:8080", "[::1]:8080", True),
        ("http://evil.example", "127.0.0.1:8080", False), ("http://127.0.0.1:3000", "127.0.0.1:8080", False),
        ("https://localhost", "localhost:80", False), ("null", "localhost", False), ("", "localhost", False),
        ("ftp://localhost", "localhost", False), ("http://localhost/", "localhost", False),
        ("localhost", "localhost", False),
    ],
)
def test_is_same_origin(origin: str, host: str, same: bool) -> None:
    assert is_same_origin(origin, host) is same


HOST = "127.0.0.1:8080"


@pytest.mark.parametrize(
    ("origin", "fetch_site", "content_type", "marker", "allowed"),
    [
        (None, "", "", "1", True),  # the CLI, curl -H
        (None, "", "application/json", "", True),
        (None, "", "Application/JSON; charset=utf-8", "", True),
        (f"http://{HOST}", "same-origin", "", "1", True),
        (None, "same-site", "", "1", True), (None, "none", "", "1", True),
        (None, "", "", "", False),  # what a no-cors fetch sends
        (None, "", "application/x-www-form-urlencoded", "", False), (None, "", "text/plain", "", False),
        (None, "", "multipart/form-data; boundary=x", "", False), (None, "", "application/json-x", "", False),
        (None, "", "", "0", False), (None, "", "", "yes", False),
        ("http://evil.example", "", "application/json", "1", False),
        ("null", "", "", "1", False), ("http://127.0.0.1:3000", "same-site", "", "1", False),
        (None, "cross-site", "application/json", "1", False), (None, "Cross-Site", "", "1", False),
    ],
)
def test_check_admin_post(origin: str | None, fetch_site: str, content_type: str, marker: str,
                          allowed: bool) -> None:
    if allowed:
        check_admin_post(HOST, origin, fetch_site, content_type, marker)
    else:
        with pytest.raises(AdminForbiddenError):
            check_admin_post(HOST, origin, fetch_site, content_type, marker)
