"""The overhead table: how a number, an added delta and a target verdict print, and the table itself.

Case modules build their rows with these helpers (a row is case, direct, proxy, added/ratio, target);
overhead.py prints them. Formatting only: no measurement, no target values (each case owns its own).
"""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, str, str]
HEADER: Row = ("case", "direct", "proxy", "added / ratio", "target")


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if v != v:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def added(v: float) -> str:
    return "n/a" if v != v else f"{v:+.3f}"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(ok: bool, text: str) -> str:
    return f"{text}  {'met' if ok else 'MISSED'}"


def print_table(rows: list[Row]) -> None:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(5)]

    def line(cells: Row) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) if i < 4 else c
                         for i, (c, w) in enumerate(zip(cells, widths)))

    head = line(HEADER)
    print(head)
    print("-" * len(head))
    for r in rows:
        print(line(r))
