"""Jinja filters that turn the page dicts' raw numbers into what people read; None always shows as "–".

Pure functions of one value each. Their output is plain text that autoescaping still escapes, so a filter
can never inject markup. Registered on the environment by `views.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DASH = "–"


def seconds(value: float | None) -> str:
    """A duration at a readable scale: 850 µs, 12.3 ms, 1.24 s, 3m 05s."""
    if value is None:
        return DASH
    if value == 0:
        return "0 s"  # idle: nothing in flight
    if value < 0.001:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    if value < 120:
        return f"{value:.2f} s"
    minutes, rest = divmod(int(value), 60)
    return f"{minutes}m {rest:02d}s"


def latency(value: float | None) -> str:
    """A request latency: under a second in milliseconds with three significant digits (0.42 ms, 4.25 ms,
    12.3 ms, 250 ms), since a proxy's answers from cache or a local runtime take well under a millisecond and
    "0 s" or "420 µs" reads as nothing or as a different unit; a second and up as `seconds` does."""
    if value is None:
        return DASH
    if value >= 1:
        return seconds(value)
    ms = value * 1000
    if ms < 0.01:
        return "0 ms" if ms <= 0 else "< 0.01 ms"
    digits = 2 if ms < 10 else 1 if ms < 100 else 0
    text = f"{ms:.{digits}f}"
    if float(text) >= 1000:  # 999.96 ms rounds up to a second
        return seconds(1.0)
    return f"{text} ms"


def percent(value: float | None) -> str:
    if value is None:
        return DASH
    pct = value * 100
    # Near 0 and 100 is where one decimal would round a real difference away (an error rate of 0.04 %).
    return f"{pct:.2f} %" if 0 < pct < 1 or 99 < pct < 100 else f"{pct:.1f} %"


def number(value: float | None, digits: int = 0) -> str:
    """Thousands separated with thin spaces (locale-neutral); `digits` decimals."""
    if value is None:
        return DASH
    return f"{value:,.{digits}f}".replace(",", "\u2009")


def rate(value: float | None) -> str:
    if value is None:
        return DASH
    return number(value, 1 if value < 100 else 0) + "/s"


def ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


def size(value: int | None) -> str:
    if value is None:
        return DASH
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def compact(value: float | None) -> str:
    """A configured number as written: 90, 0.5, 2.25 (weights)."""
    return DASH if value is None else f"{value:g}"


def signed(value: int | None) -> str:
    return DASH if value is None else f"{value:+d}"


FILTERS: dict[str, Callable[..., Any]] = {
    "seconds": seconds, "latency": latency, "percent": percent, "number": number, "rate": rate, "ratio": ratio,
    "size": size, "signed": signed, "compact": compact,
}
