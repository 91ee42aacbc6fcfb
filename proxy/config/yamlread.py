"""Reading rule files with line numbers: YAML parsed into mappings and lists that remember where each key
and item stood, the error list every message is added to ('file:line: message'), and `Reader`, typed
access to one mapping that records a bad field and goes on. Used by the config builders; no rule
semantics live here.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from proxy.config.durations import parse_duration
from proxy.config.keys import TOP_KEYS

# --------------------------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class Loc:
    """A place in a rule file; line 0 means the file (or directory) as a whole."""

    file: str
    line: int = 0

    def at(self, line: int) -> Loc:
        return Loc(self.file, line)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


# Rule-file errors go to logs, /admin/rules and the status pages: whatever looks like a secret in a quoted
# value is masked on the way in. Credentials in a URL (`scheme://user:password@`), and tokens shaped like
# API keys (`sk-...`, `hf_...`, long base64/hex runs) — the usual way a key lands where a name belongs.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@")
_KEY_LIKE = re.compile(
    r"\b(?:sk|pk|rk|hf|gsk|xai|key|api|token)[-_][A-Za-z0-9_-]{8,}"  # prefixed keys
    r"|\b(?=(?:[A-Za-z_+-]*\d){4})[A-Za-z0-9+_-]{32,}={0,2}"  # long random-looking runs (4+ digits)
)


def redact(message: str) -> str:
    """`message` with URL credentials and key-shaped tokens replaced by `***`."""
    return _KEY_LIKE.sub("***", _URL_CREDENTIALS.sub(r"\1***@", message))


class Errors:
    """Every problem found so far; sorted by file, then line, when the load ends. Messages are redacted."""

    def __init__(self) -> None:
        self._items: list[tuple[Loc, str]] = []

    def add(self, loc: Loc, message: str) -> None:
        self._items.append((loc, redact(message)))

    def count(self) -> int:
        return len(self._items)

    def rendered(self) -> tuple[str, ...]:
        ordered = sorted(self._items, key=lambda item: (item[0].file, item[0].line))
        return tuple(f"{loc}: {message}" for loc, message in ordered)


# --------------------------------------------------------------------------------------- YAML layer


class Map(dict[Any, Any]):
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


class Seq(list[Any]):
    """A YAML sequence that remembers its line and each item's line."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences are `Map` / `Seq`, so validation can cite lines."""


def _node_line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Map:
    loader.flatten_mapping(node)
    result = Map(_node_line(node))
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found unhashable key", key_node.start_mark
            )
        result.add(key, loader.construct_object(value_node, deep=True), _node_line(key_node))
    return result


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> Seq:
    result = Seq(_node_line(node))
    for item_node in node.value:
        result.append(loader.construct_object(item_node, deep=True))
        result.item_lines.append(_node_line(item_node))
    return result


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def parse_yaml(path: str, data: bytes, errors: Errors) -> Map | None:
    """The file's top-level mapping (empty for an empty file), or None after recording why not."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        errors.add(Loc(path, data[: exc.start].count(b"\n") + 1), "file is not valid UTF-8")
        return None
    loader = _LineLoader(text)
    try:
        document = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        errors.add(_yaml_error_loc(path, exc), f"invalid YAML: {_yaml_problem(exc)}")
        return None
    except yaml.YAMLError as exc:
        errors.add(Loc(path, 1), f"invalid YAML: {exc}")
        return None
    finally:
        loader.dispose()
    if document is None:
        return Map(1)
    if not isinstance(document, Map):
        line = getattr(document, "line", 1)
        errors.add(Loc(path, line), f"top level must be a mapping of sections ({', '.join(TOP_KEYS)}), "
                                     f"got {show(document)}")
        return None
    return document


def _yaml_error_loc(path: str, exc: yaml.MarkedYAMLError) -> Loc:
    mark = exc.problem_mark or exc.context_mark
    return Loc(path, int(mark.line) + 1 if mark is not None else 1)


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    if exc.problem and exc.context:
        return f"{exc.problem} ({exc.context})"
    return str(exc.problem or exc.context or "unreadable document")


# ------------------------------------------------------------------------------------ value helpers


def show(value: object) -> str:
    """A value for an error message: strings quoted, containers named rather than dumped."""
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if value is None:
        return "nothing"
    return repr(value)


def is_number(value: object) -> bool:
    """A finite int or float (not a bool, which YAML makes of 'yes'/'on')."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def suggest(word: object, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Reader:
    """Typed access to one YAML mapping. A bad field records 'label: message' at its line and yields the
    default, so validation goes on; `failed` says whether anything under this mapping was wrong."""

    def __init__(self, data: Map, label: str, loc: Loc, errors: Errors, prefix: str = "") -> None:
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

    def at(self, key: str) -> Loc:
        return self.loc.at(self.data.line_of(key))

    def name(self, key: str) -> str:
        return self.prefix + key

    def fail(self, key: str, message: str) -> None:
        self.errors.add(self.at(key), f"{self.label}: {message}")

    def check_keys(self, allowed: Collection[str]) -> None:
        where = f"{self.prefix.rstrip('.')} of {self.label}" if self.prefix else self.label
        for key, _, line in self.data.pairs:
            if key not in allowed:
                self.errors.add(self.loc.at(line), f"unknown key {key!r} in {where}{suggest(key, allowed)}")
        for key, line in self.data.duplicates:
            if key in allowed:
                message = f"duplicate key {key!r} in {where} (first at line {self.data.key_lines[key]})"
                self.errors.add(self.loc.at(line), message)

    def mapping(self, key: str) -> Reader | None:
        """The nested mapping under `key`, or None if absent or (after recording it) not a mapping."""
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, Map):
            self.fail(key, f"{self.name(key)} must be a mapping, got {show(value)}")
            return None
        return Reader(value, self.label, self.loc, self.errors, f"{self.name(key)}.")

    def number(self, key: str, default: float, *, minimum: float, inclusive: bool) -> float:
        value = self.data.get(key, default)
        low_ok = is_number(value) and (value >= minimum if inclusive else value > minimum)
        if not low_ok:
            bound = f"{'>=' if inclusive else '>'} {minimum:g}"
            self.fail(key, f"{self.name(key)} must be a number {bound}, got {show(value)}")
            return default
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        value = self.data.get(key, default)
        if not is_int(value) or value < minimum:
            bound = "> 0" if minimum == 1 else f">= {minimum}"
            self.fail(key, f"{self.name(key)} must be an integer {bound}, got {show(value)}")
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
            self.fail(key, f"{self.name(key)} must be a duration > 0, got {show(self.data[key])}")
            return default
        return seconds

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"{self.name(key)} must be true or false, got {show(value)}")
            return default
        return value

    def choice(self, key: str, default: str, options: Sequence[str]) -> str:
        value = self.data.get(key, default)
        if value not in options:
            hint = suggest(value, options) if isinstance(value, str) else ""
            self.fail(key, f"{self.name(key)} must be one of {', '.join(options)}, got {show(value)}{hint}")
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
            self.fail(key, f"{self.name(key)} must be a non-empty string, got {show(value)}")
            return None
        return value


def read_mapping(value: object, label: str, loc: Loc, errors: Errors, expect: str) -> Reader | None:
    """A reader over `value`, or None after recording that it is not a mapping."""
    if not isinstance(value, Map):
        errors.add(loc, f"{label} must be a mapping{expect}, got {show(value)}")
        return None
    return Reader(value, label, loc, errors)


@dataclass(slots=True)
class Entry:
    """One definition as found in a file, before validation."""

    name: str
    value: Any
    loc: Loc
