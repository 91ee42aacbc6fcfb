"""The status pages' session cookie and form tokens, the login throttle (`proxy.auth`), and the admin guard
that accepts the session for /ui/ only."""

from __future__ import annotations

import pytest

from proxy.errors import AdminAuthError, AdminForbiddenError
from proxy.auth import (
    CSRF_SECONDS, SESSION_SECONDS, AdminAccess, LoginThrottle, check_admin, csrf_token, is_valid_csrf,
    is_valid_login_csrf, is_valid_session, issue_session, login_binding, throttle_key,
)

ACCESS = AdminAccess.from_token("s3cret")
KEY = ACCESS.token_sha256 or ""
NOW = 1_800_000_000.0


def test_a_session_is_signed_expiring_and_never_the_token() -> None:
    value = issue_session(KEY, NOW)
    assert "s3cret" not in value and KEY not in value
    assert value.split(".")[0] == str(int(NOW + SESSION_SECONDS))
    assert is_valid_session(KEY, value, NOW)
    assert is_valid_session(KEY, value, NOW + SESSION_SECONDS - 1)
    assert not is_valid_session(KEY, value, NOW + SESSION_SECONDS)
    other = AdminAccess.from_token("another").token_sha256 or ""
    assert not is_valid_session(other, value, NOW)  # a new token ends every session


@pytest.mark.parametrize("tamper", [
    lambda v: "", lambda v: "garbage", lambda v: v.split(".")[1], lambda v: "9" + v,
    lambda v: v[:-1] + ("0" if v[-1] != "0" else "1"), lambda v: "１" + v, lambda v: v + "é",
    lambda v: "99999999999999." + v.split(".")[1],
])
def test_tampered_sessions_are_refused(tamper: object) -> None:
    assert callable(tamper)
    assert not is_valid_session(KEY, tamper(issue_session(KEY, NOW)), NOW)


def test_the_guard_takes_a_valid_session() -> None:
    session = issue_session(KEY, NOW)
    check_admin(ACCESS, "10.0.0.5", "", session, NOW)
    with pytest.raises(AdminAuthError):
        check_admin(ACCESS, "10.0.0.5", "", session, NOW + SESSION_SECONDS + 1)
    with pytest.raises(AdminAuthError):
        check_admin(ACCESS, "127.0.0.1", "", "1.bad", NOW)
    open_access = AdminAccess.from_token("")
    with pytest.raises(AdminForbiddenError):  # without a token nothing but loopback opens it, cookies included
        check_admin(open_access, "10.0.0.5", "", session, NOW)


def test_a_login_form_token_is_bound_to_its_cookie_and_expires() -> None:
    binding = login_binding("nonce-1", NOW)
    token = csrf_token(KEY, binding)
    assert binding == f"{int(NOW + CSRF_SECONDS)}.nonce-1" and KEY not in token
    assert is_valid_login_csrf(KEY, binding, token, NOW)
    assert not is_valid_login_csrf(KEY, binding, token, NOW + CSRF_SECONDS)  # expired
    assert not is_valid_login_csrf(KEY, login_binding("nonce-2", NOW), token, NOW)  # another browser's cookie
    assert not is_valid_login_csrf(KEY, "9" + binding, token, NOW)  # a later expiry is another binding
    other = AdminAccess.from_token("another").token_sha256 or ""
    assert not is_valid_login_csrf(other, binding, token, NOW)
    assert token != csrf_token(KEY, issue_session(KEY, NOW))  # the session and form MACs never coincide


@pytest.mark.parametrize(("binding", "token"), [
    ("", ""), ("x.y", ""), ("", "0" * 64), ("nodot", "0" * 64), ("１.nonce", "0" * 64), ("1.é", "é"),
])
def test_malformed_form_tokens_are_refused(binding: str, token: str) -> None:
    assert not is_valid_login_csrf(KEY, binding, token, 0.0)
    assert not is_valid_csrf(KEY, binding, token)


def test_the_logout_token_is_bound_to_the_session() -> None:
    session = issue_session(KEY, NOW)
    assert is_valid_csrf(KEY, session, csrf_token(KEY, session))
    assert not is_valid_csrf(KEY, issue_session(KEY, NOW + 1), csrf_token(KEY, session))
    assert not is_valid_csrf(KEY, "", csrf_token(KEY, ""))  # no session: nothing binds the form


@pytest.mark.parametrize(("remote", "key"), [
    ("10.0.0.5", "10.0.0.5"), ("::ffff:10.0.0.5", "10.0.0.5"), ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"), (None, ""), ("", ""), ("not-an-ip", ""),
])
def test_throttle_key(remote: str | None, key: str) -> None:
    assert throttle_key(remote) == key


def test_the_login_throttle_refuses_past_its_limit_until_the_window_ends() -> None:
    throttle = LoginThrottle(limit=5, window=60.0)
    for i in range(5):
        assert throttle.retry_after("a", 100.0 + i) is None
        throttle.failed("a", 100.0 + i)
    assert throttle.retry_after("a", 110.0) == 50.0  # the window runs from the first failure
    assert throttle.retry_after("b", 110.0) is None  # per client
    assert throttle.retry_after("a", 160.0) is None and len(throttle) == 0  # an ended window is forgotten
    throttle.failed("a", 160.0)
    throttle.succeeded("a")
    assert len(throttle) == 0


def test_the_login_throttle_is_bounded() -> None:
    throttle = LoginThrottle(limit=1, window=60.0, capacity=3)
    for i, client in enumerate("abcde"):
        throttle.failed(client, 100.0 + i)
    assert len(throttle) == 3
    assert throttle.retry_after("a", 110.0) is None and throttle.retry_after("e", 110.0) is not None  # oldest out
