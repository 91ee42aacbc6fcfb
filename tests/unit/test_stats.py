"""Per-variant statistics (`proxy.observe.stats`): counters, the per-second window, percentiles. Fixed clocks."""

from __future__ import annotations

import pytest

from proxy.observe.stats import (
    RECENT_SAMPLES,
    WINDOW_SECONDS,
    RequestStats,
    VariantStats,
    is_variant_error,
    percentile,
)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 0.5, None), ([3.0], 0.5, 3.0), ([3.0], 0.95, 3.0), ([1.0, 2.0], 0.5, 1.0), ([1.0, 2.0], 0.95, 2.0),
     ([float(i) for i in range(1, 101)], 0.5, 50.0), ([float(i) for i in range(1, 101)], 0.95, 95.0)],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


@pytest.mark.parametrize(("code", "error"), [
    (None, False), ("invalid_request", False), ("invalid_json", False), ("model_not_found", False),
    ("body_too_large", False), ("invalid_api_key", False), ("overloaded", False), ("backend_rate_limited", False),
    ("internal_error", False),
    ("backend_unreachable", True), ("backend_error", True), ("backend_reset", True), ("backend_timeout", True),
    ("backend_protocol_error", True), ("backend_body_too_large", True), ("no_healthy_backend", True),
    ("upstream_error", True),
])
def test_only_upstream_failures_count_against_a_variant(code: str | None, error: bool) -> None:
    assert is_variant_error(code) is error


def test_counters_since_start_and_tokens() -> None:
    stats = RequestStats()
    stats.record("chat", "stable", 100.5, 0.2, 0.05, False, 10, 20)
    stats.record("chat", "stable", 101.5, 0.4, None, True, None, None)
    stats.record("chat", "canary", 101.6, 0.3, None, False, 5, 0)
    stable = stats.get("chat", "stable")
    assert stable is not None
    assert (stable.requests, stable.errors, stable.prompt_tokens, stable.completion_tokens) == (2, 1, 10, 20)
    assert list(stats.routes()) == ["chat"] and stats.get("chat", "other") is None
    assert stats.started == pytest.approx(100.3)  # when the first request began


def test_window_rates_and_percentiles() -> None:
    stats = RequestStats()
    for i in range(100):  # 10 requests per second from t=1000 to 1010, every 10th an error
        stats.record("chat", "stable", 1000.0 + i / 10, 0.01 * (i % 10 + 1), 0.001 * (i % 10 + 1), i % 10 == 9,
                     None, None)
    snap = stats.snapshot("chat", 1010.0)["stable"]
    # A young process: rates over the time it had, from when its first request began (t=999.99).
    assert snap.window_seconds == pytest.approx(10.01)
    assert (snap.window_requests, snap.window_errors) == (100, 10)
    assert snap.rps == pytest.approx(100 / 10.01) and snap.error_rate == pytest.approx(0.1)
    assert snap.latency_p50 == pytest.approx(0.05) and snap.latency_p95 == pytest.approx(0.1)
    assert snap.ttft_p50 == pytest.approx(0.005) and snap.ttft_p95 == pytest.approx(0.01)
    assert len(snap.samples) == 100 and snap.covered == pytest.approx(10.0)


def test_the_window_forgets_old_seconds() -> None:
    stats = RequestStats()
    stats.record("chat", "stable", 1000.2, 5.0, None, True, None, None)  # slow and failed, long ago
    for second in range(1100, 1110):
        stats.record("chat", "stable", second + 0.5, 0.1, None, False, None, None)
    snap = stats.snapshot("chat", 1110.0)["stable"]
    assert (snap.requests, snap.errors) == (11, 1)  # since start
    assert (snap.window_requests, snap.window_errors) == (10, 0)  # the recent window
    assert snap.window_seconds == pytest.approx(WINDOW_SECONDS - 1)
    assert snap.error_rate == 0.0 and snap.latency_p95 == pytest.approx(0.1)
    assert snap.rps == pytest.approx(10 / (WINDOW_SECONDS - 1))


def test_a_bucket_is_reset_when_its_second_comes_round_again() -> None:
    variant = VariantStats()
    variant.record(1000.5, 0.1, None, True, None, None)
    variant.record(1000.5 + WINDOW_SECONDS, 0.1, None, False, None, None)  # same bucket, a minute later
    assert variant.window_counts(1000.5 + WINDOW_SECONDS) == (1, 0)
    assert variant.window_counts(1000.5 + 3 * WINDOW_SECONDS) == (0, 0)  # all stale


def test_an_idle_variant_has_no_percentiles() -> None:
    stats = RequestStats()
    stats.record("chat", "stable", 1000.0, 0.1, None, False, None, None)
    snap = stats.snapshot("chat", 2000.0)["stable"]
    assert (snap.window_requests, snap.rps, snap.error_rate, snap.latency_p50) == (0, 0.0, None, None)
    assert snap.samples == () and snap.requests == 1
    assert stats.snapshot("other", 2000.0) == {}


def test_the_sample_ring_is_bounded() -> None:
    variant = VariantStats()
    for i in range(RECENT_SAMPLES + 500):
        variant.record(1000.0 + i / 1000, 0.01, None, False, None, None)
    assert len(variant.samples) == RECENT_SAMPLES
    assert variant.requests == RECENT_SAMPLES + 500
    assert variant.recent(0.0)[0][0] == pytest.approx(1000.5)  # the oldest kept, in time order
    assert variant.recent(1002.0) == [s for s in variant.samples if s[0] >= 1002.0]
