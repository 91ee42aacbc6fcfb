"""Duration and byte-size strings from rule files ('500ms', '10m', '7d'; '16MiB', '10MB') as plain numbers.

Owns the accepted spellings and their error messages. `config/loader.py` calls these while validating;
a `ValueError` raised here becomes one 'file:line: ...' entry of the load's error list.
"""

from __future__ import annotations

import math
import re
from typing import TypeGuard

DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(_NUMBER + r"\s*(ms|s|m|h|d)?")
_SIZE = re.compile(_NUMBER + r"\s*([a-z]*)", re.IGNORECASE)
_LARGEST = 1e15  # ~31 million years or a petabyte: anything above is a typo
_DURATION_HINT = "expected seconds or a number with a unit ms, s, m, h, d, e.g. 500ms, 2s, 10m, 1h, 7d"
_SIZE_HINT = "expected bytes or a number with a unit B, KB, MB, GB, KiB, MiB, GiB, e.g. 16MiB"


def parse_duration(value: object) -> float:
    """Seconds from '500ms', '2s', '1.5s', '10m', '1h', '7d', a bare number string, or an int/float.

    Raises ValueError for anything else, for negatives and for non-finite numbers.
    """
    if _is_number(value):
        return _checked(_as_float(value), value, "duration")
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match:
            return _checked(float(match[1]) * DURATION_UNITS[match[2] or "s"], value, "duration")
    raise ValueError(f"invalid duration {value!r} ({_DURATION_HINT})")


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like '512KiB', '16MiB', '10MB', '1024'. Raises ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int(_checked(_as_float(value), value, "size"))
    size = _size_from_text(value) if isinstance(value, str) else None
    if size is None or not size.is_integer():
        raise ValueError(f"invalid size {value!r} ({_SIZE_HINT})")
    return int(_checked(size, value, "size"))


def _size_from_text(text: str) -> float | None:
    match = _SIZE.fullmatch(text.strip())
    if not match or match[2].lower() not in SIZE_UNITS:
        return None
    return float(match[1]) * SIZE_UNITS[match[2].lower()]


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(number: int | float) -> float:
    try:
        return float(number)
    except OverflowError:  # an int too large for a float: let _checked reject it as infinite
        return math.inf


def _checked(number: float, original: object, what: str) -> float:
    if not math.isfinite(number) or number < 0 or number > _LARGEST:
        raise ValueError(f"invalid {what} {original!r} (must be a number from 0 to {_LARGEST:g})")
    return number
