"""Who may call what: client keys, the admin token, the status pages' login session and its forms.

Everything here is a decision over values passed in (a header, the TCP peer, a cookie, the clock); nothing
reads a request or the environment. The one piece of state is `LoginThrottle`'s bounded failure counts.
Keys are held and compared as their SHA-256, so they never sit in memory dumps or logs. Callers: the client
endpoints (`pipeline/`), the admin guard (`admin/guard.py`) and the login page (`ui/views.py`).

The session cookie value is `<expiry>.<HMAC-SHA256(key, expiry)>` keyed by the admin token's SHA-256, so
the cookie never carries the token, cannot be forged without it, expires on its own, and every replica
sharing the token accepts it. Changing the token ends every session.

Browsers are the hostile clients of the admin surface: a page on the operator's machine can send requests
to loopback, and a rebound DNS name makes the proxy look same-origin to it. So loopback mode also wants a
loopback Host, admin POSTs must be ones a plain form cannot send (`check_admin_post`), and the /ui/ forms
carry a token bound to a cookie of the browser that loaded them (`csrf_token`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config.model import Tenant, Tenants
from proxy.config.tenants import hash_key
from proxy.errors import AdminAuthError, AdminCrossSiteError, AdminForbiddenError, AdminHostError, ClientAuthError

SESSION_COOKIE = "splitstream_ui"
SESSION_SECONDS = 12 * 3600
_SESSION_CONTEXT = b"splitstream-ui-session:"  # domain separation: this MAC signs nothing else
_CSRF_CONTEXT = b"splitstream-ui-form:"  # ...and this one signs form tokens only
CSRF_COOKIE = "splitstream_form"  # the login form's binding: `<expiry>.<random>`, HttpOnly, SameSite=Strict
CSRF_SECONDS = 3600  # an open login form works for an hour; then it is shown again with a new token
ADMIN_MARKER = "X-Splitstream-Admin"  # `X-Splitstream-Admin: 1`: a custom header no plain form can send
# What a cross-site form or no-cors fetch can send without a CORS preflight (the Fetch standard's
# "CORS-safelisted" types); an absent Content-Type is just as simple. Only JSON or the marker opens a POST.
_SCRIPTED_TYPE = "application/json"
_LOOPBACK_NAMES = frozenset({"localhost"})


hash_api_key = hash_key  # a key as stored and compared: its SHA-256 hex digest (raw header bytes arrive as surrogates)


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None for any other scheme."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def identify(tenants: Tenants, headers: Mapping[str, str]) -> Tenant | None:
    """The tenant whose key the request carries (`Authorization: Bearer`, else Anthropic-style `x-api-key`);
    None when the proxy has no tenants (the /v1 API is open). Raises `ClientAuthError` for a missing or
    unknown key.

    The lookup is by the key's SHA-256, so what a timing difference could tell about the table is which
    digests are near the attacker's own — digests of keys it does not have, which lead nowhere."""
    if not tenants.enabled:
        return None  # (before any header lookup: this runs on every request)
    key = bearer_token(headers.get("Authorization", "")) or headers.get("x-api-key", "").strip()
    tenant = tenants.by_key.get(hash_api_key(key)) if key else None
    if tenant is None:
        raise ClientAuthError("Incorrect API key provided.")
    return tenant


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


def host_name(authority: str) -> str:
    """The host of a Host header or URL authority (`name`, `name:port`, `[v6]:port`), lowercased; '' if
    malformed (the header comes from the client)."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        name, bracket, rest = authority[1:].partition("]")
        return name if bracket and _is_port_suffix(rest) else ""
    name, colon, port = authority.partition(":")
    return name if _is_port_suffix(colon + port) else ""


def _is_port_suffix(rest: str) -> bool:
    """What may follow a host: nothing, or `:` and one to five ASCII digits."""
    digits = rest[1:]
    return not rest or (rest[0] == ":" and digits.isascii() and digits.isdigit() and len(digits) <= 5)


def is_loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback: `localhost`, 127.0.0.0/8 or [::1], any port.

    A rebound DNS name (evil.example resolving to 127.0.0.1) arrives with its own name here, whatever
    address it reached; an address literal cannot be rebound."""
    name = host_name(host)
    return name in _LOOPBACK_NAMES or is_loopback(name)


def check_admin_host(access: AdminAccess, host: str) -> None:
    """Raise unless a loopback-mode request was addressed to a loopback name (no check with a token, whose
    holder may use any name). Called after `check_admin`, for every admin request."""
    if access.token_sha256 is None and not is_loopback_host(host):
        raise AdminHostError(
            "Without SPLITSTREAM_ADMIN_TOKEN the admin surface answers requests addressed to localhost, "
            "127.0.0.1 or [::1] only (the Host header); set the token to use another name."
        )


def is_same_origin(origin: str, host: str) -> bool:
    """Whether an `Origin` header (`scheme://authority`) names the authority in the Host header; a default
    port may be written or left out on either side. `null` and anything malformed are never the same."""
    scheme, sep, authority = origin.strip().lower().partition("://")
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if not sep or default is None or not host_name(authority) or "/" in authority:
        return False
    host = host.strip().lower()
    return authority.removesuffix(default) == host.removesuffix(default)


def is_scripted(content_type: str, marker: str) -> bool:
    """Whether a POST is one no plain form or no-cors fetch can send: JSON, or the admin marker header.
    Browsers preflight both cross-origin, and the proxy answers no preflight, so only scripts and same-origin
    pages can send them."""
    media_type = content_type.partition(";")[0].strip().lower()
    return marker.strip() == "1" or media_type == _SCRIPTED_TYPE


def check_admin_post(host: str, origin: str | None, fetch_site: str, content_type: str, marker: str) -> None:
    """Raise unless an admin POST may be a deliberate operator action (in either mode, after `check_admin`).

    Refused: a browser saying the request comes from another site (`Sec-Fetch-Site: cross-site`, or an
    `Origin` other than the Host), and any POST a plain cross-site form could have sent (`is_scripted`)."""
    if fetch_site.strip().lower() == "cross-site" or (origin is not None and not is_same_origin(origin, host)):
        raise AdminCrossSiteError("Admin POSTs from another site's pages are refused (Origin / Sec-Fetch-Site).")
    if not is_scripted(content_type, marker):
        raise AdminCrossSiteError(
            f"Admin POSTs need `{ADMIN_MARKER}: 1` or `Content-Type: {_SCRIPTED_TYPE}` (a plain form sends neither)."
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


def login_binding(nonce: str, now: float, lifetime: float = CSRF_SECONDS) -> str:
    """The login form's cookie value, `<expiry>.<nonce>` (`nonce`: fresh randomness from the caller)."""
    return f"{int(now + lifetime)}.{nonce}"


def csrf_token(key_hex: str, binding: str) -> str:
    """The hidden field of a /ui/ form: a MAC of a cookie only this browser holds (the login form's
    binding, or the session for the logout button). A page elsewhere can read neither the cookie nor the
    field, and cannot compute the MAC without the admin token."""
    return hmac.new(key_hex.encode(), _CSRF_CONTEXT + binding.encode(), hashlib.sha256).hexdigest()


def is_valid_csrf(key_hex: str, binding: str, token: str) -> bool:
    """Whether a form's token matches the cookie it was bound to (both come from the client)."""
    if not binding or not token or not binding.isascii() or not token.isascii():
        return False
    return hmac.compare_digest(token, csrf_token(key_hex, binding))


def is_valid_login_csrf(key_hex: str, binding: str, token: str, now: float) -> bool:
    """`is_valid_csrf` for the login form, whose binding also carries its expiry."""
    expires_text, dot, _ = binding.partition(".")
    if not dot or not expires_text.isascii() or not expires_text.isdigit() or len(expires_text) > 12:
        return False
    return now < int(expires_text) and is_valid_csrf(key_hex, binding, token)


def throttle_key(remote: str | None) -> str:
    """Whose failures a login counts against: the TCP peer, an IPv6 client by its /64 (one host usually
    holds a whole /64, and would otherwise get a fresh budget per address)."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return ""  # no usable peer (a Unix socket): all such clients share one budget
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class LoginThrottle:
    """Failed logins per client (`throttle_key`): after `limit` failures within `window` seconds of the
    first one, that client's logins are refused until the window ends, right token or not.

    Keyed by client input, so bounded: at `capacity` clients the oldest window is forgotten (its client
    gets a fresh budget; an attacker needs `capacity` addresses to buy one). Counts are per process: N
    replicas allow N × `limit`. `now` is a monotonic clock, passed in."""

    __slots__ = ("limit", "window", "capacity", "_failures")

    def __init__(self, limit: int = 5, window: float = 60.0, capacity: int = 4096) -> None:
        self.limit = limit
        self.window = window
        self.capacity = capacity
        # client -> (first failure of its window, failures since); insertion order = window start order
        self._failures: dict[str, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, client: str, now: float) -> float | None:
        """Seconds until `client` may try again, or None if it may try now."""
        entry = self._current(client, now)
        if entry is None or entry[1] < self.limit:
            return None
        return entry[0] + self.window - now

    def failed(self, client: str, now: float) -> None:
        entry = self._current(client, now)
        if entry is not None:
            self._failures[client] = (entry[0], entry[1] + 1)  # an existing key keeps its place
            return
        while len(self._failures) >= self.capacity:
            del self._failures[next(iter(self._failures))]
        self._failures[client] = (now, 1)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _current(self, client: str, now: float) -> tuple[float, int] | None:
        """The client's open window; an ended one is dropped (so the map also shrinks as windows end)."""
        entry = self._failures.get(client)
        if entry is not None and now - entry[0] >= self.window:
            del self._failures[client]
            return None
        return entry
