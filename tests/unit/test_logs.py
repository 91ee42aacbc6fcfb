"""observe/logs.py and the access line `Recorder.finish` writes: timestamps, null for absent values, probes."""

from __future__ import annotations

import io
import json
import logging
import random
from datetime import datetime, timezone

import pytest

from proxy.observe.feedback import FeedbackLedger
from proxy.observe.logs import PROBE_PATHS, AccessLog, JsonFormatter, Timestamps
from proxy.observe.metrics import Metrics
from proxy.observe.record import Recorder, RequestRecord
from proxy.observe.stats import RequestStats


def rfc3339(seconds: float) -> str:
    """The reference: datetime's own formatting, truncated to the millisecond."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (1796216645.123, "2026-12-02T13:04:05.123Z"),
    (1796216645.9999, "2026-12-02T13:04:05.999Z"),  # truncated, never rounded up into the next second
    (951782400.5, "2000-02-29T00:00:00.500Z"),
])
def test_timestamps(seconds: float, text: str) -> None:
    assert Timestamps().format(seconds) == text


def test_the_cached_second_follows_the_clock_both_ways() -> None:
    stamps = Timestamps()
    rng = random.Random(22)
    moments = sorted(1796216640 + rng.random() * 10 for _ in range(200))
    moments += [1796216000.25, 1796216650.75, 1796216000.5]  # and back, and forth again
    for seconds in moments:
        assert stamps.format(seconds) == rfc3339(seconds), seconds


def test_operational_lines_carry_the_same_timestamp() -> None:
    record = logging.LogRecord("splitstream", logging.WARNING, __file__, 1, "backend %s ejected", ("a",), None)
    record.created = 1796216645.123
    assert json.loads(JsonFormatter().format(record)) == {
        "ts": "2026-12-02T13:04:05.123Z", "level": "warning", "logger": "splitstream", "msg": "backend a ejected",
    }


def recorder(log_probes: bool = False) -> tuple[Recorder, io.BytesIO]:
    sink = io.BytesIO()
    log = AccessLog(sink, log_probes=log_probes)
    log.enabled = True
    return Recorder(Metrics(), log, RequestStats(lambda: 1000.0), FeedbackLedger()), sink


def lines(sink: io.BytesIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in sink.getvalue().splitlines()]


def test_an_unrouted_request_logs_null_not_none() -> None:
    recorder_, sink = recorder()
    record = RequestRecord("id-1", "POST", "/v1/chat/completions", 10.0)
    record.status, record.error = 404, "model_not_found"
    recorder_.finish(record, 10.25)
    [entry] = lines(sink)
    assert (entry["level"], entry["msg"], entry["request_id"]) == ("info", "request", "id-1")
    assert entry["route"] is entry["variant"] is entry["backend"] is entry["client"] is entry["tenant"] is None
    assert entry["duration_ms"] == 250.0


def test_a_routed_request_logs_its_names_client_and_tenant() -> None:
    recorder_, sink = recorder()
    record = RequestRecord("id-2", "POST", "/v1/chat/completions", 10.0)
    record.route, record.variant, record.backend, record.status = "chat", "stable", "sim-a", 200
    record.client, record.tenant = "10.0.0.7", "team-a"
    recorder_.finish(record, 10.5)
    [entry] = lines(sink)
    assert (entry["route"], entry["variant"], entry["backend"]) == ("chat", "stable", "sim-a")
    assert (entry["client"], entry["tenant"]) == ("10.0.0.7", "team-a")


@pytest.mark.parametrize("log_probes", [False, True])
def test_probes_and_scrapes_only_when_asked(log_probes: bool) -> None:
    recorder_, sink = recorder(log_probes)
    for path in (*sorted(PROBE_PATHS), "/admin/rules"):
        record = RequestRecord(path, "GET", path, 10.0)
        record.status = 200
        recorder_.finish(record, 10.001)
    expected = [*sorted(PROBE_PATHS), "/admin/rules"] if log_probes else ["/admin/rules"]
    assert [entry["path"] for entry in lines(sink)] == expected
