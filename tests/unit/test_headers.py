"""Reading the runtime's headers: Retry-After may not bench a backend forever, repeats are kept."""

from __future__ import annotations

from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import pytest

from proxy.observe.record import RequestRecord
from proxy.pipeline.headers import response_headers, retry_after_of


def retry(value: str, cap: float = 300.0) -> float:
    return retry_after_of([(b"Retry-After", value.encode())], cap)


@pytest.mark.parametrize("value", ["inf", "Infinity", "1e12", "99999999999999999999"])
def test_endless_retry_after_is_capped(value: str) -> None:
    assert retry(value) == 300.0


@pytest.mark.parametrize("value", ["nan", "soon", "", "-5"])
def test_unreadable_or_negative_retry_after_is_not_a_ban(value: str) -> None:
    assert 0.0 <= retry(value) <= 1.0


def test_an_http_date_is_seconds_from_now() -> None:
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=120), usegmt=True)
    assert 100 <= retry(when) <= 121
    assert retry("Fri, 31 Dec 2999 23:59:59 GMT") == 300.0
    assert retry("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0


def test_no_retry_after_is_the_default() -> None:
    assert retry_after_of([(b"Content-Type", b"application/json")], 300.0) == 1.0


def test_repeats_are_kept_and_connection_named_headers_dropped() -> None:
    record = RequestRecord("rid", "POST", "/v1/chat/completions", 0.0)
    headers = response_headers([(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Connection", b"X-Hop"),
                                (b"X-Hop", b"secret"), (b"X-Request-Id", b"forged")], record)
    assert headers.getall("set-cookie") == ["a=1", "b=2"]
    assert "x-hop" not in headers and headers["x-request-id"] == "rid"
