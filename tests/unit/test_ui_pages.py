"""Pure parts of the status pages: the backend status word and the template filters."""

from __future__ import annotations

import pytest

from proxy.config.model import Backend
from proxy.ui import filters
from proxy.ui.pages import Clocks, backend_status, iso
from proxy.upstream.state import BackendState, BackendStates

NOW = 500.0


def state(**fields: object) -> BackendState:
    s = BackendState(Backend("b", "http://127.0.0.1:1", "127.0.0.1", 1, ""))
    for name, value in fields.items():
        setattr(s, name, value)
    return s


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({}, "available"),
        ({"healthy": False, "ejected_until": NOW + 5}, "ejected"),
        ({"healthy": False, "ejected_until": NOW - 5}, "unhealthy"),  # time served, waiting for a probe
        ({"throttled_until": NOW + 1}, "throttled"),
        ({"throttled_until": NOW - 1}, "available"),
        ({"draining": BackendStates(), "healthy": False}, "draining"),
    ],
)
def test_backend_status(fields: dict[str, object], status: str) -> None:
    assert backend_status(state(**fields), NOW) == status


def test_clocks_convert_loop_time_to_wall_time() -> None:
    clocks = Clocks(loop=100.0, wall=1_800_000_000.0)
    assert iso(clocks.to_wall(160.0)) == "2027-01-15T08:01:00Z"


@pytest.mark.parametrize(
    ("name", "value", "text"),
    [
        ("seconds", None, "–"), ("seconds", 0.0, "0 s"), ("seconds", 0.0004, "400 µs"), ("seconds", 0.0123, "12.3 ms"),
        ("seconds", 1.234, "1.23 s"), ("seconds", 185.0, "3m 05s"),
        ("percent", None, "–"), ("percent", 0.0, "0.0 %"), ("percent", 0.0004, "0.04 %"),
        ("percent", 0.25, "25.0 %"), ("percent", 0.9996, "99.96 %"), ("percent", 1.0, "100.0 %"),
        ("number", 1234567, "1\u2009234\u2009567"), ("rate", 12.34, "12.3/s"), ("rate", 1234.5, "1\u2009234/s"),
        ("ratio", 1.5, "1.50×"), ("size", 512, "512 B"), ("size", 1536, "1.5 KiB"), ("size", None, "–"),
        ("signed", 3, "+3"), ("signed", -2, "-2"), ("signed", 0, "+0"), ("compact", 90.0, "90"),
        ("compact", 0.5, "0.5"),
        # latencies: under a second always in ms, three significant digits; never "0 s" nor µs
        ("latency", None, "–"), ("latency", 0.0, "0 ms"), ("latency", 0.000004, "< 0.01 ms"),
        ("latency", 0.00042, "0.42 ms"), ("latency", 0.0005, "0.50 ms"), ("latency", 0.00425, "4.25 ms"),
        ("latency", 0.0123, "12.3 ms"), ("latency", 0.25, "250 ms"), ("latency", 0.9994, "999 ms"),
        ("latency", 0.99996, "1.00 s"), ("latency", 1.234, "1.23 s"), ("latency", 185.0, "3m 05s"),
    ],
)
def test_filters(name: str, value: object, text: str) -> None:
    assert filters.FILTERS[name](value) == text
