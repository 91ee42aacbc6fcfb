"""Mergeable timing histograms (`proxy.observe.histogram`) and the tests read from them
(`significance.mann_whitney_counts`, `quantile_estimate_counts`), checked against the sample-based versions on
the same data. Seeded samples, no clocks."""

from __future__ import annotations

import math
import random

import pytest

from proxy.delivery import significance as sig
from proxy.observe import histogram as h
from proxy.observe.stats import percentile as sample_percentile


def lognormal(rng: random.Random, median: float, n: int, sigma: float = 0.5) -> list[float]:
    return [median * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def test_the_bounds_are_fixed_and_log_spaced() -> None:
    assert len(h.BOUNDS) == 121 and h.BOUNDS[0] == 0.001 and h.BOUNDS[-1] == pytest.approx(1000.0)
    assert h.BOUNDS[40] == 0.1 and h.BOUNDS[60] == 1.0  # decades fall on bounds
    assert all(b / a == pytest.approx(h.GROWTH) for a, b in zip(h.BOUNDS, h.BOUNDS[1:]))


@pytest.mark.parametrize(("seconds", "index"), [
    (0.0, 0), (0.0005, 0), (0.001, 0), (0.00100001, 1), (0.1, 40), (0.1000001, 41), (1.0, 60), (999.0, 120),
    (5000.0, h.OVERFLOW),
])
def test_a_bucket_holds_values_above_its_lower_bound_up_to_its_upper(seconds: float, index: int) -> None:
    assert h.bucket_of(seconds) == index
    if index < h.OVERFLOW:  # the overflow bucket reads as one bucket past the last bound, whatever it holds
        assert h.lower(index) < seconds <= h.upper(index) or seconds == 0.0


def test_merged_histograms_are_the_histogram_of_all_values() -> None:
    rng = random.Random(1)
    a, b = lognormal(rng, 0.2, 300), lognormal(rng, 0.5, 200)
    merged = h.counts_of(a)
    h.merge(merged, h.counts_of(b))
    assert merged == h.counts_of(a + b) and h.total(merged) == 500


@pytest.mark.parametrize("q", [0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0])
def test_percentiles_fall_in_the_bucket_of_the_sample_percentile(q: float) -> None:
    values = sorted(lognormal(random.Random(2), 0.3, 1000, sigma=1.0))
    exact = sample_percentile(values, q)
    estimate = h.percentile(h.counts_of(values), q)
    assert exact is not None and estimate is not None
    index = h.bucket_of(exact)
    assert h.lower(index) <= estimate <= h.upper(index)  # within one bucket: 12 % at most
    assert abs(estimate / exact - 1) < h.GROWTH - 1


def test_value_at_rank_interpolates_inside_a_bucket() -> None:
    counts = {40: 4.0}  # four values in (BOUNDS[39], 0.1]
    low, high = h.BOUNDS[39], h.BOUNDS[40]
    assert [h.value_at_rank(counts, r) for r in (1, 2, 4)] == [low + (high - low) / 4, low + (high - low) / 2, high]
    assert h.value_at_rank(counts, 0) == h.value_at_rank(counts, 1) and h.value_at_rank(counts, 9) == high
    assert h.value_at_rank({}, 1) is None and h.percentile({}, 0.5) is None


def test_mann_whitney_of_histograms_is_the_sample_test_with_each_value_replaced_by_its_bucket() -> None:
    rng = random.Random(3)
    x, y = lognormal(rng, 0.22, 250), lognormal(rng, 0.2, 400)
    ours = sig.mann_whitney_counts(h.counts_of(x), h.counts_of(y))
    quantised = sig.mann_whitney([h.bucket_of(v) for v in x], [h.bucket_of(v) for v in y])
    assert ours.statistic == pytest.approx(quantised.statistic, abs=1e-9)
    assert ours.p_greater == pytest.approx(quantised.p_greater, abs=1e-12)
    assert ours.p_two_sided == pytest.approx(quantised.p_two_sided, abs=1e-12)
    raw = sig.mann_whitney(x, y)  # and close to the test on the raw timings: buckets only add ties
    assert abs(ours.p_greater - raw.p_greater) < 0.02 and abs(ours.statistic / raw.statistic - 1) < 0.02


def test_mann_whitney_of_histograms_by_hand() -> None:
    # The tied example of test_significance: x = 1 2 2 3, y = 2 3 3 4, as bucket indexes: U_x = 3 and the same
    # tie-corrected p-values.
    ours = sig.mann_whitney_counts({1: 1.0, 2: 2.0, 3: 1.0}, {2: 1.0, 3: 2.0, 4: 1.0})
    assert ours == sig.mann_whitney([1, 2, 2, 3], [2, 3, 3, 4])
    assert sig.mann_whitney_counts({}, {1: 1.0}) == sig.NO_EVIDENCE
    assert sig.mann_whitney_counts({5: 2.0}, {5: 1.0}).p_two_sided == 1.0  # all in one bucket


@pytest.mark.parametrize("q", [0.5, 0.95])
def test_quantile_intervals_of_a_histogram_hold_the_sample_ones_within_a_bucket(q: float) -> None:
    values = sorted(lognormal(random.Random(4), 0.3, 500))
    exact = sig.quantile_estimate(values, q, 0.95)
    ours = sig.quantile_estimate_counts(h.counts_of(values), q, 0.95)
    assert exact is not None and ours is not None
    for mine, theirs in ((ours.value, exact.value), (ours.low, exact.low), (ours.high, exact.high)):
        assert mine is not None and theirs is not None
        assert abs(mine / theirs - 1) < h.GROWTH - 1
    assert ours.low is not None and ours.high is not None and ours.low <= ours.value <= ours.high
    assert sig.quantile_estimate_counts({}, q, 0.95) is None
