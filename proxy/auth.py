"""Who may call what: client keys, the admin token and the status pages' login session. Pure checks.

Everything here is a decision over values passed in (a header, the TCP peer, a cookie, the wall clock);
nothing reads a request or the environment. Keys are held and compared as their SHA-256, so they never sit
in memory dumps or logs. Callers: the client endpoints (`pipeline/`), the admin guard (`admin/guard.py`)
and the login page (`ui/views.py`).

The session cookie value is `<expiry>.<HMAC-SHA256(key, expiry)>` keyed by the admin token's SHA-256, so
the cookie never carries the token, cannot be forged without it, expires on its own, and every replica
sharing the token accepts it. Changing the token ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.errors import AdminAuthError, AdminForbiddenError, ClientAuthError

SESSION_COOKIE = "splitstream_ui"
SESSION_SECONDS = 12 * 3600
_SESSION_CONTEXT = b"splitstream-ui-session:"  # domain separation: this MAC signs nothing else


def hash_api_key(key: str) -> str:
    """A key as stored and compared: its SHA-256 hex digest."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None for any other scheme."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """The client keys the proxy accepts (SPLITSTREAM_API_KEYS), as hashes; empty = open to everyone."""

    hashes: frozenset[str] = frozenset()

    @classmethod
    def of(cls, keys: Iterable[str]) -> ClientKeys:
        return cls(frozenset(hash_api_key(k) for k in keys if k))

    def check(self, headers: Mapping[str, str]) -> None:
        """Raise `ClientAuthError` unless keys are off or `Authorization` carries one of them as a Bearer token."""
        if not self.hashes:
            return  # (before any header lookup: this runs on every request)
        token = bearer_token(headers.get("Authorization", ""))
        if token is None or hash_api_key(token) not in self.hashes:
            raise ClientAuthError("Incorrect API key provided.")


@dataclass(frozen=True, slots=True)
class AdminAccess:
    """Who may use /admin/*: holders of the token (kept as its SHA-256), or loopback clients when None."""

    token_sha256: str | None = None

    @classmethod
    def from_token(cls, token: str) -> AdminAccess:
        token = token.strip()
        return cls(hash_api_key(token) if token else None)


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
    """Raise unless the caller may use /admin/*. A `session` is only ever passed for the /ui/ pages.

    `remote` is the TCP peer, never X-Forwarded-For: behind a reverse proxy on this host every client looks
    local, which is why such setups should set the token."""
    if access.token_sha256 is not None:
        if session and is_valid_session(access.token_sha256, session, now):
            return
        token = bearer_token(authorization)
        if token is None or not hmac.compare_digest(hash_api_key(token), access.token_sha256):
            raise AdminAuthError("The admin API needs `Authorization: Bearer <SPLITSTREAM_ADMIN_TOKEN>`.")
        return
    if not is_loopback(remote):
        raise AdminForbiddenError(
            "The admin API answers loopback clients only; set SPLITSTREAM_ADMIN_TOKEN to allow others."
        )


def _mac(key_hex: str, expires: int) -> str:
    return hmac.new(key_hex.encode(), _SESSION_CONTEXT + str(expires).encode(), hashlib.sha256).hexdigest()


def issue_session(key_hex: str, now: float, lifetime: float = SESSION_SECONDS) -> str:
    """A session value valid until `now + lifetime` for holders of the token whose SHA-256 is `key_hex`."""
    expires = int(now + lifetime)
    return f"{expires}.{_mac(key_hex, expires)}"


def is_valid_session(key_hex: str, value: str, now: float) -> bool:
    expires_text, dot, mac = value.partition(".")
    # compare_digest refuses non-ASCII str, and int() accepts other scripts' digits: both come from a client.
    if not dot or not value.isascii() or not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    return now < expires and hmac.compare_digest(mac, _mac(key_hex, expires))
