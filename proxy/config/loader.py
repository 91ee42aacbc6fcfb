"""Rule files → `Snapshot`: reads every *.yaml / *.yml in the rules directory, merges, validates, resolves.

Owns the YAML rule format and every message an operator sees about it: each problem is reported as
'file:line: message', all of them at once, in one `RulesError`. Called at startup and on every reload;
the caller swaps the returned snapshot into `RulesHolder`. Pure: reads files, never touches live state.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import math
import os
import re
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import yaml

from proxy.config.durations import parse_duration, parse_size
from proxy.config.schema import allowed_keys
from proxy.config.model import (
    DEFAULT_STICKY_TTL,
    BACKEND_KINDS,
    BALANCE_POLICIES,
    ENDPOINTS,
    Backend,
    CacheRule,
    Pool,
    Rollout,
    Route,
    HealthSettings,
    ServerSettings,
    Shadow,
    Snapshot,
    Sticky,
    Timeouts,
    Variant,
)

RULE_SUFFIXES = (".yaml", ".yml")
# The keys each mapping allows come from the JSON Schema (proxy/config/rules.schema.json), the one list
# editors and this loader share: a new key goes there first (tests/unit/test_schema.py checks both agree).
TOP_KEYS = allowed_keys()
SERVER_KEYS = allowed_keys("server")
HEALTH_KEYS = allowed_keys("health")
RETRY_KEYS = allowed_keys("retry")
SHADOW_KEYS = allowed_keys("shadow")
CACHE_KEYS = allowed_keys("cache")
SHADOW_DEFAULTS = Shadow(pool=Pool(name="", backends=()))
DEFAULT_RETRY_ATTEMPTS = 3
DEFAULTS_KEYS = allowed_keys("defaults")
TIMEOUT_KEYS = allowed_keys("timeouts")
BACKEND_KEYS = allowed_keys("backend")
POOL_KEYS = allowed_keys("pool")
ROUTE_KEYS = allowed_keys("route")
MATCH_KEYS = allowed_keys("match")
SPLIT_KEYS = allowed_keys("split")
VARIANT_KEYS = allowed_keys("variant")
STICKY_KEYS = allowed_keys("sticky")
ROLLOUT_KEYS = allowed_keys("rollout")
ROLLOUT_DEFAULTS = Rollout(candidate="", baseline="")
STICKY_BY_FIXED = ("body:user", "api_key", "none")

_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class RulesError(Exception):
    """A rejected load. `errors` lists every problem as 'file:line: message' (all of them, not the first)."""

    errors: tuple[str, ...]

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = tuple(errors)
        count = len(self.errors)
        super().__init__(f"{count} error{'s' if count != 1 else ''} in rule files:\n  " + "\n  ".join(self.errors))


# --------------------------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class _Loc:
    """A place in a rule file; line 0 means the file (or directory) as a whole."""

    file: str
    line: int = 0

    def at(self, line: int) -> _Loc:
        return _Loc(self.file, line)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


class _Errors:
    """Every problem found so far; sorted by file, then line, when the load ends."""

    def __init__(self) -> None:
        self._items: list[tuple[_Loc, str]] = []

    def add(self, loc: _Loc, message: str) -> None:
        self._items.append((loc, message))

    def count(self) -> int:
        return len(self._items)

    def rendered(self) -> tuple[str, ...]:
        ordered = sorted(self._items, key=lambda item: (item[0].file, item[0].line))
        return tuple(f"{loc}: {message}" for loc, message in ordered)


# --------------------------------------------------------------------------------------- YAML layer


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers its line, each key's line, and every pair (duplicate keys included)."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}
        self.pairs: list[tuple[Any, Any, int]] = []
        self.duplicates: list[tuple[Any, int]] = []  # (key, line) of each repeat; the first one wins

    def add(self, key: Any, value: Any, line: int) -> None:
        self.pairs.append((key, value, line))
        if key in self.key_lines:
            self.duplicates.append((key, line))
        else:
            self[key] = value
            self.key_lines[key] = line

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class _Seq(list[Any]):
    """A YAML sequence that remembers its line and each item's line."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences are `_Map` / `_Seq`, so validation can cite lines."""


def _node_line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    result = _Map(_node_line(node))
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found unhashable key", key_node.start_mark
            )
        result.add(key, loader.construct_object(value_node, deep=True), _node_line(key_node))
    return result


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    result = _Seq(_node_line(node))
    for item_node in node.value:
        result.append(loader.construct_object(item_node, deep=True))
        result.item_lines.append(_node_line(item_node))
    return result


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _parse_yaml(path: str, data: bytes, errors: _Errors) -> _Map | None:
    """The file's top-level mapping (empty for an empty file), or None after recording why not."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        errors.add(_Loc(path, data[: exc.start].count(b"\n") + 1), "file is not valid UTF-8")
        return None
    loader = _LineLoader(text)
    try:
        document = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        errors.add(_yaml_error_loc(path, exc), f"invalid YAML: {_yaml_problem(exc)}")
        return None
    except yaml.YAMLError as exc:
        errors.add(_Loc(path, 1), f"invalid YAML: {exc}")
        return None
    finally:
        loader.dispose()
    if document is None:
        return _Map(1)
    if not isinstance(document, _Map):
        line = getattr(document, "line", 1)
        errors.add(_Loc(path, line), f"top level must be a mapping of sections ({', '.join(TOP_KEYS)}), "
                                     f"got {_show(document)}")
        return None
    return document


def _yaml_error_loc(path: str, exc: yaml.MarkedYAMLError) -> _Loc:
    mark = exc.problem_mark or exc.context_mark
    return _Loc(path, int(mark.line) + 1 if mark is not None else 1)


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    if exc.problem and exc.context:
        return f"{exc.problem} ({exc.context})"
    return str(exc.problem or exc.context or "unreadable document")


# ------------------------------------------------------------------------------------ value helpers


def _show(value: object) -> str:
    """A value for an error message: strings quoted, containers named rather than dumped."""
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if value is None:
        return "nothing"
    return repr(value)


def _is_number(value: object) -> bool:
    """A finite int or float (not a bool, which YAML makes of 'yes'/'on')."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _suggest(word: object, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reader:
    """Typed access to one YAML mapping. A bad field records 'label: message' at its line and yields the
    default, so validation goes on; `failed` says whether anything under this mapping was wrong."""

    def __init__(self, data: _Map, label: str, loc: _Loc, errors: _Errors, prefix: str = "") -> None:
        self.data = data
        self.label = label
        self.loc = loc
        self.errors = errors
        self.prefix = prefix  # 'timeouts.' for a nested mapping, so messages name the full field
        self._mark = errors.count()

    @property
    def failed(self) -> bool:
        return self.errors.count() > self._mark

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def at(self, key: str) -> _Loc:
        return self.loc.at(self.data.line_of(key))

    def name(self, key: str) -> str:
        return self.prefix + key

    def fail(self, key: str, message: str) -> None:
        self.errors.add(self.at(key), f"{self.label}: {message}")

    def check_keys(self, allowed: Collection[str]) -> None:
        where = f"{self.prefix.rstrip('.')} of {self.label}" if self.prefix else self.label
        for key, _, line in self.data.pairs:
            if key not in allowed:
                self.errors.add(self.loc.at(line), f"unknown key {key!r} in {where}{_suggest(key, allowed)}")
        for key, line in self.data.duplicates:
            if key in allowed:
                message = f"duplicate key {key!r} in {where} (first at line {self.data.key_lines[key]})"
                self.errors.add(self.loc.at(line), message)

    def mapping(self, key: str) -> _Reader | None:
        """The nested mapping under `key`, or None if absent or (after recording it) not a mapping."""
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, _Map):
            self.fail(key, f"{self.name(key)} must be a mapping, got {_show(value)}")
            return None
        return _Reader(value, self.label, self.loc, self.errors, f"{self.name(key)}.")

    def number(self, key: str, default: float, *, minimum: float, inclusive: bool) -> float:
        value = self.data.get(key, default)
        low_ok = _is_number(value) and (value >= minimum if inclusive else value > minimum)
        if not low_ok:
            bound = f"{'>=' if inclusive else '>'} {minimum:g}"
            self.fail(key, f"{self.name(key)} must be a number {bound}, got {_show(value)}")
            return default
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        value = self.data.get(key, default)
        if not _is_int(value) or value < minimum:
            bound = "> 0" if minimum == 1 else f">= {minimum}"
            self.fail(key, f"{self.name(key)} must be an integer {bound}, got {_show(value)}")
            return default
        return int(value)

    def duration(self, key: str, default: float, *, positive: bool) -> float:
        if key not in self.data:
            return default
        try:
            seconds = parse_duration(self.data[key])
        except ValueError as exc:
            self.fail(key, f"{self.name(key)}: {exc}")
            return default
        if positive and seconds <= 0:
            self.fail(key, f"{self.name(key)} must be a duration > 0, got {_show(self.data[key])}")
            return default
        return seconds

    def choice(self, key: str, default: str, options: Sequence[str]) -> str:
        value = self.data.get(key, default)
        if value not in options:
            hint = _suggest(value, options) if isinstance(value, str) else ""
            self.fail(key, f"{self.name(key)} must be one of {', '.join(options)}, got {_show(value)}{hint}")
            return default
        return str(value)

    def text(self, key: str, *, required: bool) -> str | None:
        """A non-empty string; None when absent (an error if `required`)."""
        if key not in self.data:
            if required:
                self.fail(key, f"{self.name(key)} is required")
            return None
        value = self.data[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"{self.name(key)} must be a non-empty string, got {_show(value)}")
            return None
        return value


def _reader(value: object, label: str, loc: _Loc, errors: _Errors, expect: str) -> _Reader | None:
    """A reader over `value`, or None after recording that it is not a mapping."""
    if not isinstance(value, _Map):
        errors.add(loc, f"{label} must be a mapping{expect}, got {_show(value)}")
        return None
    return _Reader(value, label, loc, errors)


# ------------------------------------------------------------------------------ collecting sections


@dataclass(slots=True)
class _Entry:
    """One definition as found in a file, before validation."""

    name: str
    value: Any
    loc: _Loc


@dataclass(slots=True)
class _Sections:
    """All files' sections merged; names are unique across files (duplicates were reported)."""

    singles: dict[str, _Entry] = field(default_factory=dict)  # 'server', 'defaults'
    backends: dict[str, _Entry] = field(default_factory=dict)
    pools: dict[str, _Entry] = field(default_factory=dict)
    routes: list[_Entry] = field(default_factory=list)
    shadowed: list[tuple[str, _Entry]] = field(default_factory=list)  # duplicates: validated, then dropped
    unreadable: bool = False  # some file could not be parsed, so "no routes" would be a guess


def _collect(sections: _Sections, document: _Map, path: str, errors: _Errors) -> None:
    for key, _, line in document.pairs:
        if key not in TOP_KEYS:
            errors.add(_Loc(path, line), f"unknown top-level key {key!r}{_suggest(key, TOP_KEYS)}")
    for key, line in document.duplicates:
        if key in TOP_KEYS:
            first = document.key_lines[key]
            errors.add(_Loc(path, line), f"duplicate top-level key {key!r} (first at line {first})")
    for key in TOP_KEYS:
        if key in document:
            loc = _Loc(path, document.line_of(key))
            _collect_section(sections, key, document[key], loc, errors)


def _collect_section(sections: _Sections, key: str, value: Any, loc: _Loc, errors: _Errors) -> None:
    if key == "backends":
        _collect_named(sections, sections.backends, "backend", value, loc, errors)
    elif key == "pools":
        _collect_named(sections, sections.pools, "pool", value, loc, errors)
    elif key == "routes":
        _collect_routes(sections.routes, value, loc, errors)
    elif key in sections.singles:
        errors.add(loc, f"duplicate '{key}' section (first defined at {sections.singles[key].loc})")
    else:
        sections.singles[key] = _Entry(key, _Map(loc.line) if value is None else value, loc)


def _collect_named(
    sections: _Sections, registry: dict[str, _Entry], kind: str, value: Any, loc: _Loc, errors: _Errors
) -> None:
    if value is None:
        return
    if not isinstance(value, _Map):
        errors.add(loc, f"{kind}s must be a mapping of {kind} names to settings, got {_show(value)}")
        return
    for name, body, line in value.pairs:
        here = loc.at(line)
        if not isinstance(name, str) or not name.strip():
            errors.add(here, f"{kind} name must be a non-empty string, got {_show(name)}")
        elif name in registry:
            errors.add(here, f"duplicate {kind} {name!r} (first defined at {registry[name].loc})")
            sections.shadowed.append((kind, _Entry(name, body, here)))
        else:
            registry[name] = _Entry(name, body, here)


def _collect_routes(routes: list[_Entry], value: Any, loc: _Loc, errors: _Errors) -> None:
    if value is None:
        return
    if not isinstance(value, _Seq):
        errors.add(loc, f"routes must be a list of routes, got {_show(value)}")
        return
    for item, line in zip(value, value.item_lines):
        routes.append(_Entry("", item, loc.at(line)))


# ----------------------------------------------------------------------------- server and defaults


def _build_server(entry: _Entry | None, errors: _Errors) -> ServerSettings:
    base = ServerSettings()
    if entry is None:
        return base
    reader = _reader(entry.value, "server", entry.loc, errors, "")
    if reader is None:
        return base
    reader.check_keys(SERVER_KEYS)
    return ServerSettings(
        max_body_bytes=_body_limit(reader, base.max_body_bytes),
        max_inflight=reader.integer("max_inflight", base.max_inflight, minimum=1),
        drain_timeout=reader.duration("drain_timeout", base.drain_timeout, positive=False),
        max_queue=reader.integer("max_queue", base.max_queue, minimum=0),
    )


def _build_health(entry: _Entry | None, errors: _Errors) -> HealthSettings:
    base = HealthSettings()
    if entry is None:
        return base
    reader = _reader(entry.value, "health", entry.loc, errors, "")
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
    )


def _body_limit(reader: _Reader, default: int) -> int:
    if not reader.has("max_body_bytes"):
        return default
    raw = reader.get("max_body_bytes")
    try:
        size = parse_size(raw)
    except ValueError as exc:
        reader.fail("max_body_bytes", f"max_body_bytes: {exc}")
        return default
    if size <= 0:
        reader.fail("max_body_bytes", f"max_body_bytes must be > 0, got {_show(raw)}")
        return default
    return size


def _build_defaults(entry: _Entry | None, errors: _Errors) -> tuple[Timeouts, str]:
    if entry is None:
        return Timeouts(), BALANCE_POLICIES[0]
    reader = _reader(entry.value, "defaults", entry.loc, errors, "")
    if reader is None:
        return Timeouts(), BALANCE_POLICIES[0]
    reader.check_keys(DEFAULTS_KEYS)
    timeouts = _timeouts(reader.mapping("timeouts"), Timeouts())
    return timeouts, reader.choice("balance", BALANCE_POLICIES[0], BALANCE_POLICIES)


def _timeouts(reader: _Reader | None, base: Timeouts) -> Timeouts:
    """`base` with the phases `reader` names replaced (partial override)."""
    if reader is None:
        return base
    reader.check_keys(TIMEOUT_KEYS)
    overrides = {
        key: reader.duration(key, getattr(base, key), positive=True) for key in TIMEOUT_KEYS if reader.has(key)
    }
    return replace(base, **overrides)


# ------------------------------------------------------------------------------------------ backends


@dataclass(frozen=True, slots=True)
class _Url:
    url: str
    host: str
    port: int
    base_path: str


def _parse_url(raw: object) -> _Url:
    """The parts of an http:// backend URL; ValueError says what is wrong with it."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"must be a string like 'http://127.0.0.1:8000', got {_show(raw)}")
    text = raw.strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ValueError(f"{text!r} uses https, which is not supported yet (use http://)")
    if scheme != "http" or not text.lower().startswith("http://"):
        raise ValueError(f"{text!r} must start with http://")
    if any(c.isspace() for c in text):
        raise ValueError(f"{text!r} must not contain spaces")
    if "?" in text or "#" in text:
        raise ValueError(f"{text!r} must not have a query or fragment")
    if "@" in parts.netloc:
        raise ValueError(f"{text!r} must not contain credentials (use api_key_env)")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    return _Url(url=text.rstrip("/"), host=parts.hostname, port=_url_port(parts, text),
                base_path=parts.path.rstrip("/"))


def _url_port(parts: SplitResult, text: str) -> int:
    try:
        port = parts.port  # a property that raises on a non-numeric or out-of-range port
    except ValueError:
        port = 0
    if port is None:
        return 80
    if not 0 < port < 65536:
        raise ValueError(f"{text!r} has an invalid port")
    return port


def _backend_url(reader: _Reader) -> _Url | None:
    if not reader.has("url"):
        reader.fail("url", "url is required")
        return None
    try:
        return _parse_url(reader.get("url"))
    except ValueError as exc:
        reader.fail("url", f"url {exc}")
        return None


def _api_key(reader: _Reader, env: Mapping[str, str]) -> str | None:
    if not reader.has("api_key_env"):
        return None
    name = reader.get("api_key_env")
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        reader.fail("api_key_env", f"api_key_env must be the name of an environment variable, got {_show(name)}")
        return None
    if name not in env:
        reader.fail("api_key_env", f"api_key_env {name!r} is not set")
        return None
    if not env[name].strip():
        reader.fail("api_key_env", f"api_key_env {name!r} is set but empty")
        return None
    return env[name].strip()


def _build_backend(entry: _Entry, env: Mapping[str, str], errors: _Errors) -> Backend | None:
    label = f"backend {entry.name!r}"
    reader = _reader(entry.value, label, entry.loc, errors, " with at least 'url'")
    if reader is None:
        return None
    reader.check_keys(BACKEND_KEYS)
    url = _backend_url(reader)
    kind = reader.choice("kind", "openai", BACKEND_KINDS)
    weight = reader.number("weight", 1.0, minimum=0, inclusive=False)
    max_inflight = reader.integer("max_inflight", 0, minimum=0)
    api_key = _api_key(reader, env)
    if url is None or reader.failed:
        return None
    return Backend(name=entry.name, url=url.url, host=url.host, port=url.port, base_path=url.base_path,
                   kind=kind, weight=weight, max_inflight=max_inflight, api_key=api_key)


# --------------------------------------------------------------------------------------------- pools


def _reference(reader: _Reader, key: str, kind: str, name: str, known: Mapping[str, object]) -> bool:
    """Whether `name` is defined (a defined-but-invalid one counts: its own error already explains)."""
    if name in known:
        return True
    reader.fail(key, f"{kind} {name!r} is not defined{_suggest(name, known)}")
    return False


def _pool_members(reader: _Reader, backends: Mapping[str, Backend | None]) -> list[Backend | None]:
    raw = reader.get("backends")
    if not isinstance(raw, _Seq) or not raw or not all(isinstance(n, str) and n for n in raw):
        got = "nothing" if "backends" not in reader.data else _show(raw)
        reader.fail("backends", f"backends must be a non-empty list of backend names, got {got}")
        return []
    members: list[Backend | None] = []
    for position, name in enumerate(raw):
        if name in raw[:position]:
            reader.fail("backends", f"backend {name!r} is listed twice")
        elif _reference(reader, "backends", "backend", name, backends):
            members.append(backends[name])
    return members


def _build_pool(entry: _Entry, backends: Mapping[str, Backend | None], errors: _Errors) -> Pool | None:
    reader = _reader(entry.value, f"pool {entry.name!r}", entry.loc, errors, " with 'backends'")
    if reader is None:
        return None
    reader.check_keys(POOL_KEYS)
    members = _pool_members(reader, backends)
    model = reader.text("model", required=False) if reader.get("model") is not None else None
    if reader.failed or not members or any(m is None for m in members):
        return None
    return Pool(name=entry.name, backends=tuple(m for m in members if m is not None), model=model)


# -------------------------------------------------------------------------------------------- routes


@dataclass(slots=True)
class _RouteContext:
    """What every route is resolved against."""

    pools: Mapping[str, Pool | None]
    timeouts: Timeouts
    balance: str
    errors: _Errors
    seen: dict[str, _Loc] = field(default_factory=dict)


def _route_label(value: object) -> str:
    name = value.get("name") if isinstance(value, _Map) else None
    return f"route {name!r}" if isinstance(name, str) and name.strip() else "route"


def _route_name(reader: _Reader, entry: _Entry, seen: dict[str, _Loc]) -> str | None:
    name = reader.text("name", required=True)
    if name is None:
        return None
    if name in seen:
        reader.errors.add(reader.at("name"), f"duplicate route {name!r} (first defined at {seen[name]})")
        return None
    seen[name] = entry.loc
    return name


def _match_models(reader: _Reader) -> tuple[str, ...]:
    if not reader.has("model"):
        reader.fail("model", "match.model is required")
        return ()
    raw = reader.get("model")
    models = (raw,) if isinstance(raw, str) else tuple(raw) if isinstance(raw, _Seq) else ()
    if not models or not all(isinstance(m, str) and m.strip() for m in models):
        reader.fail("model", f"match.model must be a model name or glob, or a non-empty list of them, "
                             f"got {_show(raw)}")
        return ()
    return models


def _match_endpoints(reader: _Reader) -> tuple[str, ...]:
    if not reader.has("endpoints"):
        return ()
    raw = reader.get("endpoints")
    if not isinstance(raw, _Seq) or not raw:
        reader.fail("endpoints", f"match.endpoints must be a non-empty list of {', '.join(ENDPOINTS)} "
                                 f"(omit it to match every endpoint), got {_show(raw)}")
        return ()
    for endpoint in raw:
        if endpoint not in ENDPOINTS:
            hint = _suggest(endpoint, ENDPOINTS) if isinstance(endpoint, str) else ""
            reader.fail("endpoints", f"match.endpoints: unknown endpoint {_show(endpoint)}{hint}, "
                                     f"expected one of {', '.join(ENDPOINTS)}")
    return tuple(dict.fromkeys(e for e in raw if e in ENDPOINTS))


def _match(reader: _Reader) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not reader.has("match"):
        reader.fail("match", "match is required (at least match.model)")
        return (), ()
    match = reader.mapping("match")
    if match is None:
        return (), ()
    match.check_keys(MATCH_KEYS)
    return _match_models(match), _match_endpoints(match)


def _pool_ref(reader: _Reader, key: str, ctx: _RouteContext) -> Pool | None:
    name = reader.text(key, required=True)
    if name is None or not _reference(reader, key, "pool", name, ctx.pools):
        return None
    return ctx.pools[name]


def _variant(item: object, line: int, reader: _Reader, ctx: _RouteContext, names: set[str]) -> Variant | None:
    loc = reader.loc.at(line)
    variant = _reader(item, f"{reader.label} split variant", loc, ctx.errors, " with name, pool, weight")
    if variant is None:
        return None
    name = variant.text("name", required=True)
    if name is not None:
        variant.label = f"{reader.label} variant {name!r}"
        if name in names:
            variant.fail("name", "name is used twice in this split")
        names.add(name)
    variant.check_keys(VARIANT_KEYS)
    pool = _pool_ref(variant, "pool", ctx)
    weight = variant.number("weight", 1.0, minimum=0, inclusive=True)
    if variant.failed or pool is None or name is None:
        return None
    return Variant(name=name, pool=pool, weight=weight)


def _sticky(reader: _Reader | None) -> Sticky | None:
    """`split.sticky` as the snapshot holds it; None for `by: none`, an absent block, or an invalid one."""
    if reader is None:
        return None
    reader.check_keys(STICKY_KEYS)
    by = reader.text("by", required=True)
    header = None
    if by is not None and by not in STICKY_BY_FIXED:
        header = by[len("header:"):] if by.startswith("header:") else None
        if header is None or not _HEADER_TOKEN.fullmatch(header):
            choices = "'header:NAME', " + ", ".join(repr(c) for c in STICKY_BY_FIXED)
            reader.fail("by", f"split.sticky.by must be one of {choices}, got {by!r}")
    ttl = reader.duration("ttl", DEFAULT_STICKY_TTL, positive=True)
    if reader.failed or by is None or by == "none":
        return None
    if header is not None:
        return Sticky(by="header", header=header.lower(), ttl=ttl)
    return Sticky(by="user" if by == "body:user" else "api_key", ttl=ttl)


def _route_sticky(reader: _Reader) -> Sticky | None:
    """The route's `split.sticky`; a `split` that is not a mapping was already reported by `_split`."""
    split = reader.get("split")
    if not isinstance(split, _Map):
        return None
    return _sticky(_Reader(split, reader.label, reader.loc, reader.errors, "split.").mapping("sticky"))


def _split(reader: _Reader, ctx: _RouteContext) -> tuple[Variant, ...]:
    split = reader.mapping("split")
    if split is None:
        return ()
    split.check_keys(SPLIT_KEYS)
    raw = split.get("variants")
    if not isinstance(raw, _Seq) or not raw:
        got = "nothing" if not split.has("variants") else _show(raw)
        split.fail("variants", f"split.variants must be a non-empty list, got {got}")
        return ()
    names: set[str] = set()
    built = [_variant(item, line, reader, ctx, names) for item, line in zip(raw, raw.item_lines)]
    variants = tuple(v for v in built if v is not None)
    if len(variants) < len(built):  # a broken variant (or its pool) was reported; never a partial split
        return ()
    if all(v.weight == 0 for v in variants):
        split.fail("variants", "split weights are all 0 (at least one variant needs a weight > 0)")
    return variants


def _variants(reader: _Reader, ctx: _RouteContext) -> tuple[Variant, ...]:
    has_pool, has_split = reader.has("pool"), reader.has("split")
    if has_pool == has_split:
        got = "both" if has_pool else "neither"
        reader.fail("pool" if has_pool else "name", f"needs exactly one of 'pool' or 'split', got {got}")
        return ()
    if has_split:
        return _split(reader, ctx)
    pool = _pool_ref(reader, "pool", ctx)
    return (Variant(name=pool.name, pool=pool, weight=1.0),) if pool is not None else ()


def _compile_models(models: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in models))


def _build_route(entry: _Entry, ctx: _RouteContext) -> Route | None:
    label = _route_label(entry.value)
    reader = _reader(entry.value, label, entry.loc, ctx.errors, " with name, match, and pool or split")
    if reader is None:
        return None
    reader.check_keys(ROUTE_KEYS)
    name = _route_name(reader, entry, ctx.seen)
    models, endpoints = _match(reader)
    variants = _variants(reader, ctx)
    sticky = _route_sticky(reader)
    balance = reader.choice("balance", ctx.balance, BALANCE_POLICIES)
    timeouts = _timeouts(reader.mapping("timeouts"), ctx.timeouts)
    attempts = _retry_attempts(reader.mapping("retry"))
    runtime_load = _flag(reader, "runtime_load")
    shadows = _shadows(reader, ctx)
    cache_rule = _cache_rule(reader.mapping("cache"))
    rollout = _rollout(reader, variants)
    if reader.failed or name is None or not models or not variants:
        return None
    return Route(name=name, models=models, model_pattern=_compile_models(models), endpoints=endpoints,
                 variants=variants, timeouts=timeouts, balance=balance, source=str(entry.loc),
                 retry_attempts=attempts, runtime_load=runtime_load, sticky=sticky, shadows=shadows,
                 cache=cache_rule, rollout=rollout)


def _rollout(reader: _Reader, variants: tuple[Variant, ...]) -> Rollout | None:
    """`rollout: {candidate, baseline, steps, interval, ...}`: both names must be variants of the route's split."""
    block = reader.mapping("rollout")
    if block is None:
        return None
    block.check_keys(ROLLOUT_KEYS)
    if reader.has("pool"):
        reader.fail("rollout", "rollout needs a split (candidate and baseline variants), not a single pool")
        return None
    names = [variant.name for variant in variants]
    candidate = _rollout_variant(block, "candidate", names)
    baseline = _rollout_variant(block, "baseline", names)
    if candidate is not None and candidate == baseline:
        block.fail("baseline", "rollout.baseline must be another variant than rollout.candidate")
    base = ROLLOUT_DEFAULTS
    steps = _rollout_steps(block, base.steps)
    interval = block.duration("interval", base.interval, positive=True)
    min_requests = block.integer("min_requests", base.min_requests, minimum=1)
    delta = block.number("max_error_rate_delta", base.max_error_rate_delta, minimum=0, inclusive=True)
    if delta >= 1:
        block.fail("max_error_rate_delta", f"rollout.max_error_rate_delta must be < 1, got {delta:g}")
    p95 = block.number("max_p95_ratio", base.max_p95_ratio, minimum=1, inclusive=True)
    ttft_p95 = block.number("max_ttft_p95_ratio", base.max_ttft_p95_ratio, minimum=1, inclusive=True)
    confidence = block.number("confidence", base.confidence, minimum=0.5, inclusive=False)
    if confidence >= 1:
        block.fail("confidence", f"rollout.confidence must be < 1, got {confidence:g}")
    if block.failed or candidate is None or baseline is None:
        return None
    fields = (candidate, baseline, steps, interval, min_requests, delta, p95, ttft_p95, confidence)
    digest = hashlib.sha256(repr(fields).encode()).hexdigest()[:16]
    return Rollout(candidate=candidate, baseline=baseline, steps=steps, interval=interval, min_requests=min_requests,
                   max_error_rate_delta=delta, max_p95_ratio=p95, max_ttft_p95_ratio=ttft_p95, confidence=confidence,
                   digest=digest)


def _rollout_variant(block: _Reader, key: str, names: Sequence[str]) -> str | None:
    name = block.text(key, required=True)
    if name is not None and names and name not in names:
        block.fail(key, f"rollout.{key} {name!r} is not a variant of this route's split "
                        f"(variants: {', '.join(names)}){_suggest(name, names)}")
        return None
    return name


def _rollout_steps(block: _Reader, default: tuple[float, ...]) -> tuple[float, ...]:
    """Candidate percentages: numbers in (0, 100], strictly increasing, the last one 100."""
    if not block.has("steps"):
        return default
    raw = block.get("steps")
    if not isinstance(raw, _Seq) or not raw:
        block.fail("steps", f"rollout.steps must be a non-empty list of percentages, got {_show(raw)}")
        return default
    steps: list[float] = []
    for index, (item, line) in enumerate(zip(raw, raw.item_lines)):
        if not _is_number(item) or not 0 < item <= 100:
            block.errors.add(block.loc.at(line), f"{block.label}: rollout.steps[{index}] must be a percentage "
                                                 f"in (0, 100], got {_show(item)}")
        elif steps and item <= steps[-1]:
            block.errors.add(block.loc.at(line), f"{block.label}: rollout.steps must increase, got {item:g} "
                                                 f"after {steps[-1]:g}")
        else:
            steps.append(float(item))
    if len(steps) == len(raw) and steps[-1] != 100:
        block.fail("steps", f"rollout.steps must end at 100 (the candidate takes all traffic), got {steps[-1]:g}")
    return tuple(steps)


def _cache_rule(reader: _Reader | None) -> CacheRule | None:
    """`cache: {ttl, max_entry_bytes, shared}`; ttl is required (an entry must expire)."""
    if reader is None:
        return None
    reader.check_keys(CACHE_KEYS)
    if not reader.has("ttl"):
        reader.fail("ttl", "cache.ttl is required")
    default = CacheRule(ttl=1.0)
    ttl = reader.duration("ttl", default.ttl, positive=True)
    max_bytes = default.max_entry_bytes
    if reader.has("max_entry_bytes"):
        try:
            max_bytes = parse_size(reader.get("max_entry_bytes"))
        except ValueError as exc:
            reader.fail("max_entry_bytes", f"cache.max_entry_bytes: {exc}")
    shared = _flag(reader, "shared")
    return CacheRule(ttl=ttl, max_entry_bytes=max_bytes, shared=shared)


def _shadows(reader: _Reader, ctx: _RouteContext) -> tuple[Shadow, ...]:
    """`shadow: [{pool, sample, max_concurrency, max_queue}, ...]`: each pool mirrored at most once."""
    if not reader.has("shadow"):
        return ()
    items = reader.get("shadow")
    if not isinstance(items, _Seq):
        reader.fail("shadow", f"shadow must be a list of {{pool, sample}} entries, got {_show(items)}")
        return ()
    shadows: list[Shadow] = []
    for item, line in zip(items, items.item_lines):
        entry = _reader(item, f"{reader.label} shadow", reader.loc.at(line), ctx.errors, " with pool and sample")
        if entry is None:
            continue
        entry.check_keys(SHADOW_KEYS)
        pool = _pool_ref(entry, "pool", ctx)
        sample = entry.number("sample", 1.0, minimum=0, inclusive=True)
        if sample > 1:
            entry.fail("sample", f"sample must be between 0 and 1, got {_show(entry.get('sample'))}")
        concurrency = entry.integer("max_concurrency", SHADOW_DEFAULTS.max_concurrency, minimum=1)
        queue = entry.integer("max_queue", SHADOW_DEFAULTS.max_queue, minimum=0)
        if pool is not None and any(s.pool.name == pool.name for s in shadows):
            entry.fail("pool", f"pool {pool.name!r} is mirrored twice")
        elif pool is not None and not entry.failed:
            shadows.append(Shadow(pool=pool, sample=sample, max_concurrency=concurrency, max_queue=queue))
    return tuple(shadows)


def _retry_attempts(reader: _Reader | None) -> int:
    if reader is None:
        return DEFAULT_RETRY_ATTEMPTS
    reader.check_keys(RETRY_KEYS)
    return reader.integer("attempts", DEFAULT_RETRY_ATTEMPTS, minimum=1)


def _flag(reader: _Reader, key: str) -> bool:
    value = reader.get(key, False)
    if not isinstance(value, bool):
        reader.fail(key, f"{reader.name(key)} must be true or false, got {_show(value)}")
        return False
    return value


# ------------------------------------------------------------------------------------ glob shadowing


def _glob_tokens(pattern: str) -> tuple[str, ...]:
    """fnmatch tokens: '*', '?', a whole '[...]' class, or one literal character (an unclosed '[' is one).

    Mirrors `fnmatch.translate`, which has no escape character, so '*' and '?' are never literal."""
    tokens: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        end = _class_end(pattern, i) if pattern[i] == "[" else -1
        if end == -1:
            tokens.append(pattern[i])
            i += 1
        else:
            tokens.append(pattern[i:end + 1])
            i = end + 1
    return tuple(tokens)


def _class_end(pattern: str, start: int) -> int:
    j = start + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    return pattern.find("]", j)


def _token_covers(outer: str, inner: str) -> bool:
    """Whether every character `inner` (not '*') can stand for is matched by the single-char token `outer`."""
    if inner == "*":
        return False
    if outer == "?":
        return True
    if len(outer) > 1:  # a class: covers a literal it matches, or the identical class
        return inner == outer or (len(inner) == 1 and inner != "?" and fnmatch.fnmatchcase(inner, outer))
    return inner == outer and inner != "?"


def _glob_covers(outer: str, inner: str) -> bool:
    """True only when every name `inner` matches is also matched by `outer` (sound, not complete).

    Exact for a plain `inner` name; for an `inner` glob, each of its tokens must line up with a token of
    `outer` that covers it, and `outer`'s '*' may absorb any run of them (so 'llama*' covers 'llama-3*',
    but 'llama?' does not cover 'llama*')."""
    outer_tokens, inner_tokens = _glob_tokens(outer), _glob_tokens(inner)

    @cache
    def covers(i: int, j: int) -> bool:
        if i == len(outer_tokens):
            return j == len(inner_tokens)
        if outer_tokens[i] == "*":
            return covers(i + 1, j) or (j < len(inner_tokens) and covers(i, j + 1))
        if j == len(inner_tokens) or not _token_covers(outer_tokens[i], inner_tokens[j]):
            return False
        return covers(i + 1, j + 1)

    return covers(0, 0)


def _route_covers(earlier: Route, later: Route) -> bool:
    if earlier.endpoints and not (later.endpoints and set(later.endpoints) <= set(earlier.endpoints)):
        return False
    return all(any(_glob_covers(glob, model) for glob in earlier.models) for model in later.models)


def _check_shadowing(routes: Sequence[tuple[Route, _Loc]], errors: _Errors) -> None:
    for position, (later, loc) in enumerate(routes):
        for earlier, _ in routes[:position]:
            if _route_covers(earlier, later):
                errors.add(loc, f"route {later.name!r} can never match: route {earlier.name!r} "
                                f"({earlier.source}) matches every model it matches")
                break


# ---------------------------------------------------------------------------------------- assembling


def _rule_files(directory: str | Path, errors: _Errors) -> list[str]:
    """Paths of the rule files directly in `directory`, sorted by name (hidden files skipped)."""
    root = str(directory)
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        errors.add(_Loc(root), f"cannot read rules directory: {exc.strerror or exc}")
        return []
    paths = [os.path.join(root, name) for name in names if _is_rule_file(root, name)]
    if not paths:
        errors.add(_Loc(root), "no rule files (*.yaml) found")
    return paths


def _is_rule_file(root: str, name: str) -> bool:
    return name.endswith(RULE_SUFFIXES) and not name.startswith(".") and os.path.isfile(os.path.join(root, name))


def _read_files(paths: Sequence[str], sections: _Sections, errors: _Errors) -> tuple[tuple[str, str], ...]:
    hashes: list[tuple[str, str]] = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            errors.add(_Loc(path), f"cannot read: {exc.strerror or exc}")
            sections.unreadable = True
            continue
        hashes.append((path, hashlib.sha256(data).hexdigest()))
        document = _parse_yaml(path, data, errors)
        if document is None:
            sections.unreadable = True
        else:
            _collect(sections, document, path, errors)
    return tuple(hashes)


def _resolve(sections: _Sections, env: Mapping[str, str], errors: _Errors, root: str) -> Snapshot:
    server = _build_server(sections.singles.get("server"), errors)
    health = _build_health(sections.singles.get("health"), errors)
    timeouts, balance = _build_defaults(sections.singles.get("defaults"), errors)
    backends = {name: _build_backend(entry, env, errors) for name, entry in sections.backends.items()}
    pools = {name: _build_pool(entry, backends, errors) for name, entry in sections.pools.items()}
    for kind, entry in sections.shadowed:  # report what else is wrong with a duplicate, then drop it
        if kind == "backend":
            _build_backend(entry, env, errors)
        else:
            _build_pool(entry, backends, errors)
    ctx = _RouteContext(pools=pools, timeouts=timeouts, balance=balance, errors=errors)
    built = [(_build_route(entry, ctx), entry.loc) for entry in sections.routes]
    routes = [(route, loc) for route, loc in built if route is not None]
    _check_shadowing(routes, errors)
    if not sections.routes and not sections.unreadable:
        errors.add(_Loc(root), "no routes defined in any rule file")
    return Snapshot(
        backends=tuple(b for b in backends.values() if b is not None),
        pools=tuple(p for p in pools.values() if p is not None),
        routes=tuple(route for route, _ in routes),
        server=server,
        health=health,
    )


def load_rules(directory: str | Path, env: Mapping[str, str] | None = None, generation: int = 0) -> Snapshot:
    """Read, merge, validate and resolve every rule file in `directory` into one immutable snapshot.

    `env` (default `os.environ`) supplies `api_key_env` values. Raises `RulesError` listing every problem."""
    errors = _Errors()
    paths = _rule_files(directory, errors)
    if not paths:
        raise RulesError(errors.rendered())
    sections = _Sections()
    files = _read_files(paths, sections, errors)
    snapshot = _resolve(sections, os.environ if env is None else env, errors, str(directory))
    if errors.count():
        raise RulesError(errors.rendered())
    return replace(snapshot, files=files, generation=generation)
