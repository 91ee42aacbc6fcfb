"""Building the snapshot's tenants from the `tenants:` section, `defaults.tenant_limits` and SPLITSTREAM_API_KEYS.

A tenant's keys come from an environment variable (`keys_env`, comma-separated) and/or as SHA-256 hashes
(`key_hashes`), so a rule file never needs to hold a secret; both end up as hashes in `Tenants.by_key`,
and no message here ever shows a key. SPLITSTREAM_API_KEYS is the shorthand for one tenant named `default`
(its keys join a `default` tenant the rules define). Called by `config/loader.py`; the route-name globs are
checked against the routes once those are built (`check_tenant_routes`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Mapping, Sequence

from proxy.config.keys import TENANT_KEYS, TENANT_LIMIT_KEYS
from proxy.config.model import DEFAULT_TENANT, NORMAL_PRIORITY, PRIORITIES, Route, Tenant, TenantLimits, Tenants
from proxy.config.yamlread import Entry, Errors, Loc, Map, Reader, Seq, read_mapping, show

API_KEYS_ENV = "SPLITSTREAM_API_KEYS"  # comma-separated keys of the `default` tenant
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")


def hash_key(key: str) -> str:
    """A client key as the snapshot holds and compares it: its SHA-256 hex digest."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def split_keys(raw: str) -> list[str]:
    """Keys of a comma-separated environment value, blanks dropped."""
    return [key.strip() for key in raw.split(",") if key.strip()]


def build_limits(reader: Reader | None, default: TenantLimits) -> TenantLimits:
    """`limits:` (or `defaults.tenant_limits`); `default` when the block is absent or invalid (recorded)."""
    if reader is None:
        return default
    reader.check_keys(TENANT_LIMIT_KEYS)
    values = {key: reader.integer(key, 0, minimum=1) if reader.has(key) else None for key in TENANT_LIMIT_KEYS}
    return TenantLimits(**values)


def default_limits(defaults: Entry | None, errors: Errors) -> TenantLimits:
    """`defaults.tenant_limits`: the limits of tenants that set none (the rest of `defaults` is `sections.py`'s)."""
    if defaults is None or not isinstance(defaults.value, Map):  # (a broken `defaults` is build_defaults' to report)
        return TenantLimits()
    reader = Reader(defaults.value, "defaults", defaults.loc, errors)
    return build_limits(reader.mapping("tenant_limits"), TenantLimits())


def _env_keys(reader: Reader, env: Mapping[str, str]) -> list[str]:
    if not reader.has("keys_env"):
        return []
    name = reader.get("keys_env")
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        reader.fail("keys_env", f"keys_env must be the name of an environment variable, got {show(name)}")
        return []
    if name not in env:
        reader.fail("keys_env", f"keys_env {name!r} is not set")
        return []
    keys = split_keys(env[name])
    if not keys:
        reader.fail("keys_env", f"keys_env {name!r} is set but holds no key")
    return keys


def _hashed_keys(reader: Reader) -> list[str]:
    if not reader.has("key_hashes"):
        return []
    raw = reader.get("key_hashes")
    if not isinstance(raw, Seq) or not raw:
        reader.fail("key_hashes", f"key_hashes must be a non-empty list of 'sha256:<64 hex digits>', got {show(raw)}")
        return []
    hashes: list[str] = []
    for position, item in enumerate(raw, 1):
        found = _KEY_HASH.fullmatch(item) if isinstance(item, str) else None
        if found is None:
            reader.fail("key_hashes", f"key_hashes item {position} must be 'sha256:' and 64 hex digits")
        else:
            hashes.append(found.group(1).lower())
    return hashes


def _route_globs(reader: Reader) -> tuple[str, ...]:
    if not reader.has("routes"):
        return ()
    raw = reader.get("routes")
    if not isinstance(raw, Seq) or not raw or not all(isinstance(glob, str) and glob.strip() for glob in raw):
        reader.fail("routes", f"routes must be a non-empty list of route names or globs, got {show(raw)}")
        return ()
    return tuple(raw)


def build_tenant(entry: Entry, env: Mapping[str, str], defaults: TenantLimits,
                 errors: Errors) -> tuple[Tenant, list[str]] | None:
    """The tenant and its key hashes, or None when the entry is invalid (every problem recorded)."""
    reader = read_mapping(entry.value, f"tenant {entry.name!r}", entry.loc, errors, " with keys_env or key_hashes")
    if reader is None:
        return None
    reader.check_keys(TENANT_KEYS)
    hashes = [hash_key(key) for key in _env_keys(reader, env)] + _hashed_keys(reader)
    if not reader.has("keys_env") and not reader.has("key_hashes"):
        errors.add(entry.loc, f"tenant {entry.name!r} has no keys: set keys_env and/or key_hashes")
    routes = _route_globs(reader)
    priority = PRIORITIES.index(reader.choice("priority", PRIORITIES[NORMAL_PRIORITY], PRIORITIES))
    limits = build_limits(reader.mapping("limits"), defaults)
    if reader.failed or not hashes:
        return None
    pattern = re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in routes)) if routes else None
    return Tenant(name=entry.name, routes=routes, route_pattern=pattern, priority=priority, limits=limits), hashes


def build_tenants(entries: Mapping[str, Entry], env: Mapping[str, str], defaults: TenantLimits, errors: Errors,
                  root: str) -> tuple[Tenants, dict[str, Tenant | None]]:
    """(the snapshot's tenants, every defined name → its tenant or None if invalid, for `match.tenants`)."""
    built: dict[str, Tenant | None] = {}
    owners: dict[str, str] = {}  # key hash -> tenant name
    by_key: dict[str, Tenant] = {}
    for name, entry in entries.items():
        result = build_tenant(entry, env, defaults, errors)
        if result is None:
            built[name] = None
            continue
        tenant, hashes = result
        built[name] = tenant
        for digest in hashes:
            _claim(digest, tenant, owners, by_key, errors, entry.loc)
    shorthand = split_keys(env.get(API_KEYS_ENV, ""))
    if shorthand:
        tenant = built.get(DEFAULT_TENANT) or Tenant(DEFAULT_TENANT, limits=defaults)
        if DEFAULT_TENANT not in built:
            built[DEFAULT_TENANT] = tenant
        where = entries[DEFAULT_TENANT].loc if DEFAULT_TENANT in entries else Loc(root)
        for key in shorthand:
            _claim(hash_key(key), tenant, owners, by_key, errors, where, API_KEYS_ENV)
    return Tenants(by_key=by_key, all=tuple(t for t in built.values() if t is not None)), built


def _claim(digest: str, tenant: Tenant, owners: dict[str, str], by_key: dict[str, Tenant], errors: Errors,
           loc: Loc, source: str = "") -> None:
    """Give a key to a tenant; a key of two tenants is an error (which one would the request be?)."""
    owner = owners.get(digest)
    if owner is not None and owner != tenant.name:
        via = f" (from {source})" if source else ""
        errors.add(loc, f"tenant {tenant.name!r}: a key{via} is also a key of tenant {owner!r}")
        return
    owners[digest] = tenant.name
    by_key[digest] = tenant


def check_tenant_routes(entries: Mapping[str, Entry], tenants: Tenants, routes: Sequence[Route],
                        errors: Errors) -> None:
    """A `routes:` glob that names no route is a typo that would lock the tenant out: report it."""
    names = [route.name for route in routes]
    for tenant in tenants.all:
        entry = entries.get(tenant.name)
        for glob in tenant.routes:
            if entry is not None and not fnmatch.filter(names, glob):
                errors.add(entry.loc, f"tenant {tenant.name!r}: routes {glob!r} matches no route")
