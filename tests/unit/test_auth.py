"""The status pages' session cookie (`proxy.auth`) and the admin guard that accepts it for /ui/ only."""

from __future__ import annotations

import pytest

from proxy.errors import AdminAuthError, AdminForbiddenError
from proxy.auth import SESSION_SECONDS, AdminAccess, check_admin, is_valid_session, issue_session

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
