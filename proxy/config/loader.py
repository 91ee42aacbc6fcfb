"""Rule files → `Snapshot`: reads every *.yaml / *.yml in the rules directory, merges, validates, resolves.

Owns the YAML rule format and every message an operator sees about it: each problem is reported as
'file:line: message', all of them at once, in one `RulesError`. Called at startup and on every reload;
the caller swaps the returned snapshot into `RulesHolder`. Pure: reads files, never touches live state.
Reading with line numbers is `yamlread.py`; the builders are `sections.py` and `routes.py`; allowed keys
come from the JSON Schema via `keys.py`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from proxy.config.globs import check_shadowing
from proxy.config.keys import RULE_SUFFIXES, TOP_KEYS
from proxy.config.model import Snapshot
from proxy.config.routes import RouteContext, build_route
from proxy.config.sections import build_backend, build_defaults, build_health, build_pool, build_server
from proxy.config.tenants import build_tenants, check_tenant_routes, default_limits
from proxy.config.yamlread import Entry, Errors, Loc, Map, Seq, parse_yaml, show, suggest

__all__ = ["RULE_SUFFIXES", "RulesError", "load_rules"]

class RulesError(Exception):
    """A rejected load. `errors` lists every problem as 'file:line: message' (all of them, not the first)."""

    errors: tuple[str, ...]

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = tuple(errors)
        count = len(self.errors)
        super().__init__(f"{count} error{'s' if count != 1 else ''} in rule files:\n  " + "\n  ".join(self.errors))


# ------------------------------------------------------------------------------ collecting sections


@dataclass(slots=True)
class _Sections:
    """All files' sections merged; names are unique across files (duplicates were reported)."""

    singles: dict[str, Entry] = field(default_factory=dict)  # 'server', 'defaults'
    backends: dict[str, Entry] = field(default_factory=dict)
    pools: dict[str, Entry] = field(default_factory=dict)
    tenants: dict[str, Entry] = field(default_factory=dict)
    routes: list[Entry] = field(default_factory=list)
    shadowed: list[tuple[str, Entry]] = field(default_factory=list)  # duplicates: validated, then dropped
    unreadable: bool = False  # some file could not be parsed, so "no routes" would be a guess


def _collect(sections: _Sections, document: Map, path: str, errors: Errors) -> None:
    for key, _, line in document.pairs:
        if key not in TOP_KEYS:
            errors.add(Loc(path, line), f"unknown top-level key {key!r}{suggest(key, TOP_KEYS)}")
    for key, line in document.duplicates:
        if key in TOP_KEYS:
            first = document.key_lines[key]
            errors.add(Loc(path, line), f"duplicate top-level key {key!r} (first at line {first})")
    for key in TOP_KEYS:
        if key in document:
            loc = Loc(path, document.line_of(key))
            _collect_section(sections, key, document[key], loc, errors)


def _collect_section(sections: _Sections, key: str, value: Any, loc: Loc, errors: Errors) -> None:
    if key == "backends":
        _collect_named(sections, sections.backends, "backend", value, loc, errors)
    elif key == "pools":
        _collect_named(sections, sections.pools, "pool", value, loc, errors)
    elif key == "tenants":
        _collect_named(sections, sections.tenants, "tenant", value, loc, errors)
    elif key == "routes":
        _collect_routes(sections.routes, value, loc, errors)
    elif key in sections.singles:
        errors.add(loc, f"duplicate '{key}' section (first defined at {sections.singles[key].loc})")
    else:
        sections.singles[key] = Entry(key, Map(loc.line) if value is None else value, loc)


def _collect_named(
    sections: _Sections, registry: dict[str, Entry], kind: str, value: Any, loc: Loc, errors: Errors
) -> None:
    if value is None:
        return
    if not isinstance(value, Map):
        errors.add(loc, f"{kind}s must be a mapping of {kind} names to settings, got {show(value)}")
        return
    for name, body, line in value.pairs:
        here = loc.at(line)
        if not isinstance(name, str) or not name.strip():
            errors.add(here, f"{kind} name must be a non-empty string, got {show(name)}")
        elif name in registry:
            errors.add(here, f"duplicate {kind} {name!r} (first defined at {registry[name].loc})")
            sections.shadowed.append((kind, Entry(name, body, here)))
        else:
            registry[name] = Entry(name, body, here)


def _collect_routes(routes: list[Entry], value: Any, loc: Loc, errors: Errors) -> None:
    if value is None:
        return
    if not isinstance(value, Seq):
        errors.add(loc, f"routes must be a list of routes, got {show(value)}")
        return
    for item, line in zip(value, value.item_lines):
        routes.append(Entry("", item, loc.at(line)))


# ---------------------------------------------------------------------------------------- assembling


def _rule_files(directory: str | Path, errors: Errors) -> list[str]:
    """Paths of the rule files directly in `directory`, sorted by name (hidden files skipped)."""
    root = str(directory)
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        errors.add(Loc(root), f"cannot read rules directory: {exc.strerror or exc}")
        return []
    paths = [os.path.join(root, name) for name in names if _is_rule_file(root, name)]
    if not paths:
        errors.add(Loc(root), "no rule files (*.yaml) found")
    return paths


def _is_rule_file(root: str, name: str) -> bool:
    return name.endswith(RULE_SUFFIXES) and not name.startswith(".") and os.path.isfile(os.path.join(root, name))


def _read_files(paths: Sequence[str], sections: _Sections, errors: Errors) -> tuple[tuple[str, str], ...]:
    hashes: list[tuple[str, str]] = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            errors.add(Loc(path), f"cannot read: {exc.strerror or exc}")
            sections.unreadable = True
            continue
        hashes.append((path, hashlib.sha256(data).hexdigest()))
        document = parse_yaml(path, data, errors)
        if document is None:
            sections.unreadable = True
        else:
            _collect(sections, document, path, errors)
    return tuple(hashes)


def _resolve(sections: _Sections, env: Mapping[str, str], errors: Errors, root: str) -> Snapshot:
    server = build_server(sections.singles.get("server"), errors)
    health = build_health(sections.singles.get("health"), errors)
    timeouts, balance = build_defaults(sections.singles.get("defaults"), errors)
    backends = {name: build_backend(entry, env, errors) for name, entry in sections.backends.items()}
    pools = {name: build_pool(entry, backends, errors) for name, entry in sections.pools.items()}
    limits = default_limits(sections.singles.get("defaults"), errors)
    tenants, tenant_names = build_tenants(sections.tenants, env, limits, errors, root)
    for kind, entry in sections.shadowed:  # report what else is wrong with a duplicate, then drop it
        if kind == "backend":
            build_backend(entry, env, errors)
        elif kind == "pool":
            build_pool(entry, backends, errors)
    ctx = RouteContext(pools=pools, timeouts=timeouts, balance=balance, errors=errors, tenants=tenant_names)
    built = [(build_route(entry, ctx), entry.loc) for entry in sections.routes]
    routes = [(route, loc) for route, loc in built if route is not None]
    check_shadowing(routes, errors, tenants.all)
    check_tenant_routes(sections.tenants, tenants, [route for route, _ in routes], errors)
    if not sections.routes and not sections.unreadable:
        errors.add(Loc(root), "no routes defined in any rule file")
    return Snapshot(
        backends=tuple(b for b in backends.values() if b is not None),
        pools=tuple(p for p in pools.values() if p is not None),
        routes=tuple(route for route, _ in routes),
        server=server,
        health=health,
        tenants=tenants,
    )


def load_rules(directory: str | Path, env: Mapping[str, str] | None = None, generation: int = 0) -> Snapshot:
    """Read, merge, validate and resolve every rule file in `directory` into one immutable snapshot.

    `env` (default `os.environ`) supplies `api_key_env` and `keys_env` values and SPLITSTREAM_API_KEYS. Raises `RulesError` listing every problem."""
    errors = Errors()
    paths = _rule_files(directory, errors)
    if not paths:
        raise RulesError(errors.rendered())
    sections = _Sections()
    files = _read_files(paths, sections, errors)
    snapshot = _resolve(sections, os.environ if env is None else env, errors, str(directory))
    if errors.count():
        raise RulesError(errors.rendered())
    return replace(snapshot, files=files, generation=generation)
