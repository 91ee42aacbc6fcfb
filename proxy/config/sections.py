"""Building the snapshot's settings, backends and pools from their rule-file entries.

Each builder validates one entry through a `Reader` (every problem recorded as file:line, defaults used so
validation goes on) and returns the frozen model object, or None when the entry was invalid.
Called by `config/loader.py`; routes are `config/routes.py`.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

from proxy.config.durations import parse_size
from proxy.config.keys import (
    BACKEND_KEYS,
    BALANCE_KEYS,
    DEFAULTS_KEYS,
    HEALTH_KEYS,
    POOL_KEYS,
    SERVER_KEYS,
    TIMEOUT_KEYS,
    TLS_KEYS,
)
from proxy.config.model import (
    BACKEND_KINDS,
    BALANCE_POLICIES,
    Backend,
    Balance,
    HealthSettings,
    Pool,
    ServerSettings,
    Subject,
    Timeouts,
    Tls,
)
from proxy.config.yamlread import Entry, Errors, Map, Reader, Seq, read_mapping, show, suggest

T = TypeVar("T")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: what a header name may be
SUBJECT_BY_FIXED = ("body:user", "api_key")

# Backend names the proxy uses itself: `cache` is the backend of answers from the result cache
# (`pipeline/handler.py`), so a real backend of that name would merge with them in every metric.
RESERVED_BACKEND_NAMES = frozenset({"cache"})

# ----------------------------------------------------------------------------- server and defaults


def build_server(entry: Entry | None, errors: Errors) -> ServerSettings:
    base = ServerSettings()
    if entry is None:
        return base
    reader = read_mapping(entry.value, "server", entry.loc, errors, "")
    if reader is None:
        return base
    reader.check_keys(SERVER_KEYS)
    return ServerSettings(
        max_body_bytes=_size(reader, "max_body_bytes", base.max_body_bytes),
        max_inflight=reader.integer("max_inflight", base.max_inflight, minimum=1),
        drain_timeout=reader.duration("drain_timeout", base.drain_timeout, positive=False),
        max_queue=reader.integer("max_queue", base.max_queue, minimum=0),
        read_timeout=reader.duration("read_timeout", base.read_timeout, positive=True),
        max_event_bytes=_size(reader, "max_event_bytes", base.max_event_bytes),
        max_upstream_body_bytes=_size(reader, "max_upstream_body_bytes", base.max_upstream_body_bytes),
        secure_cookies=reader.boolean("secure_cookies"),
    )


def build_health(entry: Entry | None, errors: Errors) -> HealthSettings:
    base = HealthSettings()
    if entry is None:
        return base
    reader = read_mapping(entry.value, "health", entry.loc, errors, "")
    if reader is None:
        return base
    reader.check_keys(HEALTH_KEYS)
    return HealthSettings(
        interval=reader.duration("interval", base.interval, positive=True),
        unhealthy_interval=reader.duration("unhealthy_interval", base.unhealthy_interval, positive=True),
        timeout=reader.duration("timeout", base.timeout, positive=True),
        failures=reader.integer("failures", base.failures, minimum=1),
        ejection=reader.duration("ejection", base.ejection, positive=True),
        max_ejection=reader.duration("max_ejection", base.max_ejection, positive=True),
        panic_threshold=_percent(reader, "panic_threshold", base.panic_threshold),
    )


def _percent(reader: Reader, key: str, default: float) -> float:
    """A number from 0 to 100 under `key`, or the default when absent or invalid (recorded)."""
    value = reader.number(key, default, minimum=0, inclusive=True)
    if value > 100:
        reader.fail(key, f"{reader.name(key)} must be a percentage from 0 to 100, got {show(reader.get(key))}")
        return default
    return value


def _size(reader: Reader, key: str, default: int) -> int:
    """A positive size (`16MiB`, `1024`) under `key`, or the default when absent or invalid (recorded)."""
    if not reader.has(key):
        return default
    raw = reader.get(key)
    try:
        size = parse_size(raw)
    except ValueError as exc:
        reader.fail(key, f"{key}: {exc}")
        return default
    if size <= 0:
        reader.fail(key, f"{key} must be > 0, got {show(raw)}")
        return default
    return size


def build_defaults(entry: Entry | None, errors: Errors) -> tuple[Timeouts, Balance]:
    if entry is None:
        return Timeouts(), Balance()
    reader = read_mapping(entry.value, "defaults", entry.loc, errors, "")
    if reader is None:
        return Timeouts(), Balance()
    reader.check_keys(DEFAULTS_KEYS)
    timeouts = timeouts_from(reader.mapping("timeouts"), Timeouts())
    return timeouts, balance_from(reader, Balance())


def balance_from(reader: Reader, default: Balance) -> Balance:
    """`balance:` as a policy name, or `{policy, prefix, by}`; absent: `default` (the defaults' balance)."""
    if not isinstance(reader.get("balance"), Map):
        if not reader.has("balance"):
            return default
        return Balance(policy=reader.choice("balance", default.policy, BALANCE_POLICIES))
    nested = reader.mapping("balance")
    assert nested is not None
    nested.check_keys(BALANCE_KEYS)
    policy = nested.choice("policy", default.policy, BALANCE_POLICIES)
    if not nested.has("policy"):
        nested.fail("policy", "balance.policy is required")
    prefix = nested.boolean("prefix", True)
    by = subject_from(nested, "by", SUBJECT_BY_FIXED, required=policy == "consistent_hash")
    if by is not None and policy != "consistent_hash":
        nested.fail("by", f"balance.by is for consistent_hash, not {policy}")
    if nested.has("prefix") and policy != "least_cost":
        nested.fail("prefix", f"balance.prefix is for least_cost, not {policy}")
    return Balance(policy=policy, prefix=prefix, by=by)


def subject_from(reader: Reader, key: str, fixed: tuple[str, ...], *, required: bool) -> Subject | None:
    """Whose key a request carries, in split.sticky.by's syntax: 'header:NAME' or one of `fixed`
    ('body:user', 'api_key'; sticky adds 'none'). None when absent, invalid (recorded) or 'none'."""
    by = reader.text(key, required=required)
    if by is None or by == "none" and "none" in fixed:
        return None
    if by in fixed:
        return Subject(by="user" if by == "body:user" else "api_key")
    header = by[len("header:"):] if by.startswith("header:") else None
    if header is None or not HEADER_TOKEN.fullmatch(header):
        choices = "'header:NAME', " + ", ".join(repr(c) for c in fixed)
        reader.fail(key, f"{reader.name(key)} must be one of {choices}, got {by!r}")
        return None
    return Subject(by="header", header=header.lower())


def timeouts_from(reader: Reader | None, base: Timeouts) -> Timeouts:
    """`base` with the phases `reader` names replaced (partial override)."""
    if reader is None:
        return base
    reader.check_keys(TIMEOUT_KEYS)
    overrides = {
        key: reader.duration(key, getattr(base, key), positive=key != "heartbeat")
        for key in TIMEOUT_KEYS if reader.has(key)
    }
    return replace(base, **overrides)


# ------------------------------------------------------------------------------------------ backends


DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class _Url:
    url: str
    host: str
    port: int
    base_path: str
    authority: str
    secure: bool


def _parse_url(raw: object) -> _Url:
    """The parts of an http:// or https:// backend URL; ValueError says what is wrong with it."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"must be a string like 'http://127.0.0.1:8000', got {show(raw)}")
    text = raw.strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not text.lower().startswith(f"{scheme}://"):
        raise ValueError(f"{text!r} must start with http:// or https://")
    if any(c.isspace() for c in text):
        raise ValueError(f"{text!r} must not contain spaces")
    if "?" in text or "#" in text:
        raise ValueError(f"{text!r} must not have a query or fragment")
    if "@" in parts.netloc:
        raise ValueError(f"{text!r} must not contain credentials (use api_key_env)")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    host = parts.hostname
    port = _url_port(parts, text, DEFAULT_PORTS[scheme])
    name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets in Host
    authority = name if port == DEFAULT_PORTS[scheme] else f"{name}:{port}"
    return _Url(url=text.rstrip("/"), host=host, port=port, base_path=parts.path.rstrip("/"),
                authority=authority, secure=scheme == "https")


def _url_port(parts: SplitResult, text: str, default: int) -> int:
    try:
        port = parts.port  # a property that raises on a non-numeric or out-of-range port
    except ValueError:
        port = 0
    if port is None:
        return default
    if not 0 < port < 65536:
        raise ValueError(f"{text!r} has an invalid port")
    return port


def _backend_url(reader: Reader) -> _Url | None:
    if not reader.has("url"):
        reader.fail("url", "url is required")
        return None
    try:
        return _parse_url(reader.get("url"))
    except ValueError as exc:
        reader.fail("url", f"url {exc}")
        return None


def _api_key(reader: Reader, env: Mapping[str, str]) -> str | None:
    if not reader.has("api_key_env"):
        return None
    name = reader.get("api_key_env")
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        reader.fail("api_key_env", f"api_key_env must be the name of an environment variable, got {show(name)}")
        return None
    if name not in env:
        reader.fail("api_key_env", f"api_key_env {name!r} is not set")
        return None
    if not env[name].strip():
        reader.fail("api_key_env", f"api_key_env {name!r} is set but empty")
        return None
    return env[name].strip()


def _tls(reader: Reader, url: _Url | None) -> Tls | None:
    """`tls:` of an https:// backend (its defaults when absent); refused on an http:// one, where it would
    silently do nothing. A `ca_file` must be a readable PEM file of certificates now: a rule file naming a
    missing or broken one never replaces a good snapshot."""
    block = reader.mapping("tls")
    if url is None:
        return None
    if not url.secure:
        if block is not None:
            reader.fail("tls", "tls needs an https:// url")
        return None
    if block is None:
        return Tls()
    block.check_keys(TLS_KEYS)
    ca_file = block.text("ca_file", required=False)
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            block.fail("ca_file", f"tls.ca_file {ca_file!r} cannot be used: {exc}")
    verify = block.boolean("verify", default=True)
    server_name = block.text("server_name", required=False)
    return Tls(ca_file=ca_file, verify=verify, server_name=server_name)


def build_backend(entry: Entry, env: Mapping[str, str], errors: Errors) -> Backend | None:
    label = f"backend {entry.name!r}"
    is_reserved = entry.name in RESERVED_BACKEND_NAMES
    if is_reserved:
        errors.add(entry.loc, f"{label}: the name is reserved (it labels answers from the result cache in "
                              "x-splitstream-backend and the metrics); rename the backend")
    reader = read_mapping(entry.value, label, entry.loc, errors, " with at least 'url'")
    if reader is None:
        return None
    reader.check_keys(BACKEND_KEYS)
    url = _backend_url(reader)
    kind = reader.choice("kind", "openai", BACKEND_KINDS)
    weight = reader.number("weight", 1.0, minimum=0, inclusive=False)
    max_inflight = reader.integer("max_inflight", 0, minimum=0)
    concurrency = reader.integer("concurrency", 1, minimum=1)
    cache_tokens = reader.integer("cache_tokens", 0, minimum=0)
    api_key = _api_key(reader, env)
    tls = _tls(reader, url)
    if url is None or reader.failed or is_reserved:
        return None
    return Backend(name=entry.name, url=url.url, host=url.host, port=url.port, base_path=url.base_path,
                   authority=url.authority, tls=tls, kind=kind, weight=weight, max_inflight=max_inflight,
                   concurrency=concurrency, cache_tokens=cache_tokens, api_key=api_key)


# --------------------------------------------------------------------------------------------- pools


def reference(reader: Reader, key: str, kind: str, name: str, known: Mapping[str, object]) -> bool:
    """Whether `name` is defined (a defined-but-invalid one counts: its own error already explains)."""
    if name in known:
        return True
    reader.fail(key, f"{kind} {name!r} is not defined{suggest(name, known)}")
    return False


def references(reader: Reader, key: str, kind: str, known: Mapping[str, T | None]) -> list[T | None]:
    """`key`: a non-empty list of names of defined `kind`s (a pool's backends, a route's fallback pools), each
    once; the objects named, None for one defined but invalid (its own error already explains)."""
    raw = reader.get(key)
    if not isinstance(raw, Seq) or not raw or not all(isinstance(n, str) and n for n in raw):
        got = "nothing" if key not in reader.data else show(raw)
        reader.fail(key, f"{key} must be a non-empty list of {kind} names, got {got}")
        return []
    found: list[T | None] = []
    for position, name in enumerate(raw):
        if name in raw[:position]:
            reader.fail(key, f"{kind} {name!r} is listed twice")
        elif reference(reader, key, kind, name, known):
            found.append(known[name])
    return found


def build_pool(entry: Entry, backends: Mapping[str, Backend | None], errors: Errors) -> Pool | None:
    reader = read_mapping(entry.value, f"pool {entry.name!r}", entry.loc, errors, " with 'backends'")
    if reader is None:
        return None
    reader.check_keys(POOL_KEYS)
    members = references(reader, "backends", "backend", backends)
    model = reader.text("model", required=False) if reader.get("model") is not None else None
    if reader.failed or not members or any(m is None for m in members):
        return None
    return Pool(name=entry.name, backends=tuple(m for m in members if m is not None), model=model)
