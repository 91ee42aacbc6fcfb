"""Unit tests for the admin guard (`proxy.admin.check_admin`): token when configured, loopback otherwise."""

from __future__ import annotations

import pytest

from proxy.auth import AdminAccess, check_admin, is_loopback
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
