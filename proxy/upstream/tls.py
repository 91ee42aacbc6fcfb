"""Client TLS contexts for https:// backends: one `ssl.SSLContext` per distinct trust setting of the rules.

Building a context loads a trust store (the system's takes milliseconds), too slow for every new connection,
so contexts are memoised — a memo of a pure function, like `re`'s pattern cache, not state anyone reads. The
key holds the ca_file's modification time, so a rotated CA file is read again by the next new connection
(kept-alive ones stay as verified). Keys come from rules, never from clients: a small LRU bounds them. A
returned context is shared: never change it. Called by `upstream/connection.py`.
"""

from __future__ import annotations

import functools
import os
import ssl

from proxy.config.model import Tls

MAX_CONTEXTS = 64  # distinct (ca_file version, verify) pairs kept; a rules file names a handful


def context_for(tls: Tls) -> ssl.SSLContext:
    """The context verifying a backend as `tls` says (`server_name` is the caller's: it is per connection);
    OSError (ssl.SSLError included) when ca_file cannot be read or holds no certificate."""
    ca_mtime_ns = os.stat(tls.ca_file).st_mtime_ns if tls.ca_file is not None else 0
    return _build(tls.ca_file, tls.verify, ca_mtime_ns)


@functools.lru_cache(maxsize=MAX_CONTEXTS)
def _build(ca_file: str | None, verify: bool, ca_mtime_ns: int) -> ssl.SSLContext:
    """`ca_mtime_ns` is only part of the cache key: a new version of the CA file is a new context."""
    context = ssl.create_default_context(cafile=ca_file)  # no ca_file: the system trust store
    if not verify:
        context.check_hostname = False  # must go first: CERT_NONE is refused while hostnames are checked
        context.verify_mode = ssl.CERT_NONE
    return context
