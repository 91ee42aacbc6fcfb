"""Speed curves: seconds per token as a line in the sequences running, fitted from weighted samples."""

from __future__ import annotations

import pytest

from proxy.upstream.speed import HALF_LIFE, SpeedCurve


def test_a_gpu_like_curve_is_recovered() -> None:
    curve = SpeedCurve(30.0)
    for i in range(400):  # 0.01 s per token alone, +0.001 per extra stream
        r = 1 + i % 16
        curve.add(r, 100, 100 * (0.01 + 0.001 * (r - 1)), 0.0)
    assert curve.a == pytest.approx(0.01, rel=0.02)
    assert curve.b == pytest.approx(0.001, rel=0.05)
    assert curve.tokens_per_second(16) == pytest.approx(1 / 0.025, rel=0.03)


def test_without_varied_loads_the_slope_stays_at_the_prior_and_never_goes_negative() -> None:
    curve = SpeedCurve(30.0)
    for _ in range(50):
        curve.add(1, 100, 1.0, 0.0)
    assert curve.b == 0.0 and curve.tokens_per_second(8) == pytest.approx(100.0, rel=0.01)
    for r in range(1, 9):  # faster under load (noise): clamped, the runtime is not believed faster when busy
        curve.add(r, 100, 1.0 / r, 0.0)
    assert curve.b == 0.0


def test_recent_evidence_outweighs_a_long_history() -> None:
    curve = SpeedCurve(30.0)
    for _ in range(5000):
        curve.add(1, 100, 10.0, 0.0)  # 10 tok/s for a long time
    for _ in range(1000):
        curve.add(1, 100, 1.0, 0.0)  # then 100 tok/s, at once
    assert curve.tokens_per_second(1) > 80.0


def test_evidence_decays_so_a_changed_runtime_is_believed() -> None:
    curve = SpeedCurve(30.0)
    for _ in range(500):
        curve.add(1, 100, 10.0, 0.0)  # 10 tok/s
    for _ in range(3):
        curve.add(1, 100, 1.0, 10 * HALF_LIFE)  # 100 tok/s, ten half-lives later
    assert curve.tokens_per_second(1) > 50.0


def test_nonsense_samples_are_ignored() -> None:
    curve = SpeedCurve(30.0)
    curve.add(1, 0, 1.0, 0.0)
    curve.add(1, 10, 0.0, 0.0)
    curve.add(1, 10, -1.0, 0.0)
    assert curve.samples == 0 and curve.tokens_per_second(1) == pytest.approx(30.0)


def test_table_for_the_admin_api() -> None:
    curve = SpeedCurve(50.0)
    assert curve.table(3) == {"1": 50.0, "2": 50.0, "3": 50.0}


def test_samples_only_at_high_load_never_extrapolate_to_an_infinitely_fast_runtime() -> None:
    """A CPU runtime seen only at 3 and 4 streams (noisy): the line through them would hit zero time per token
    alone; the fit keeps aggregate throughput from falling with load instead (a ≥ b)."""
    curve = SpeedCurve(30.0)
    for i in range(100):
        r = 3 + i % 2
        curve.add(r, 100, 100 * (0.02 * r if r == 4 else 0.05), 0.0)  # 0.05 s/token at 3, 0.08 at 4
    assert curve.a >= curve.b > 0
    assert curve.tokens_per_second(1) < 100.0  # not 10 million
    assert curve.tokens_per_second(4) == pytest.approx(1 / 0.08, rel=0.25)
