"""The status pages' login session: a signed, expiring cookie value derived from the admin token.

Pure (wall-clock `now` is passed in). The value is `<expiry>.<HMAC-SHA256(key, expiry)>` keyed by the
token's SHA-256 (what `AdminAccess` keeps), so the cookie never carries the token, cannot be forged
without it, expires on its own, and every replica sharing the token accepts it. Changing the token ends
every session. Callers: `proxy/admin.py` (verify) and `proxy/ui/views.py` (issue at login).
"""

from __future__ import annotations

import hashlib
import hmac

SESSION_COOKIE = "splitstream_ui"
SESSION_SECONDS = 12 * 3600
_CONTEXT = b"splitstream-ui-session:"  # domain separation: this MAC signs nothing else


def _mac(key_hex: str, expires: int) -> str:
    return hmac.new(key_hex.encode(), _CONTEXT + str(expires).encode(), hashlib.sha256).hexdigest()


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
