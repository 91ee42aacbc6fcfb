"""`proxy.delivery.significance` against known values: printed tables, a textbook example, and small cases
computed by hand (each derivation is in the comment next to it)."""

from __future__ import annotations

import math

import pytest

from proxy.delivery import significance as sig


def close(value: float, expected: float, tolerance: float) -> bool:
    return abs(value - expected) <= tolerance


@pytest.mark.parametrize(
    ("x", "cdf"),
    # standard normal table: Φ(0) = .5, Φ(1) = .841345, Φ(1.645) = .950015, Φ(1.96) = .975002, Φ(-2.576) = .0049975
    [(0.0, 0.5), (1.0, 0.8413447), (1.645, 0.9500151), (1.96, 0.9750021), (-2.576, 0.0049975)],
)
def test_normal_cdf_matches_the_table(x: float, cdf: float) -> None:
    assert close(sig.normal_cdf(x), cdf, 1e-7)
    assert close(sig.normal_sf(x), 1 - cdf, 1e-7)


@pytest.mark.parametrize(("p", "z"), [(0.5, 0.0), (0.95, 1.6448536), (0.975, 1.9599640), (0.995, 2.5758293),
                                      (0.025, -1.9599640)])
def test_normal_quantile_inverts_the_cdf(p: float, z: float) -> None:
    assert close(sig.normal_quantile(p), z, 1e-6)


@pytest.mark.parametrize(
    ("t", "df", "two_sided"),
    # Student's t critical values (any printed t table): P(|T| > t) for the degrees of freedom given.
    [(12.706, 1, 0.05), (2.228, 10, 0.05), (3.169, 10, 0.01), (2.042, 30, 0.05), (1.984, 100, 0.05)],
)
def test_student_t_tail_matches_the_t_table(t: float, df: int, two_sided: float) -> None:
    assert close(2 * sig.student_t_sf(t, df), two_sided, 2e-4)  # the table rounds t to 3 decimals
    assert close(sig.student_t_sf(-t, df), 1 - two_sided / 2, 2e-4)


def test_two_proportion_z_by_hand() -> None:
    # 30/200 vs 15/200. Pooled p = 45/400 = 0.1125; SE = sqrt(0.1125 · 0.8875 · (1/200 + 1/200))
    # = sqrt(0.00099844) = 0.0315981; z = (0.15 - 0.075) / 0.0315981 = 2.37356; one-sided p = 1 - Φ(z) = 0.00881.
    result = sig.two_proportion_z(30, 200, 15, 200)
    assert close(result.statistic, 2.37356, 1e-5)
    assert close(result.p_greater, 0.00881, 1e-5)
    assert close(result.p_two_sided, 0.01762, 1e-5)
    # With a margin of 0.01 each side keeps its own variance: SE = sqrt(.15·.85/200 + .075·.925/200)
    # = sqrt(0.000984375) = 0.0313748; z = (0.075 - 0.01) / 0.0313748 = 2.07173; p = 0.01915.
    margin = sig.two_proportion_z(30, 200, 15, 200, margin=0.01)
    assert close(margin.statistic, 2.07173, 1e-5)
    assert close(margin.p_greater, 0.01915, 1e-5)


def test_two_proportion_z_edges() -> None:
    assert sig.two_proportion_z(0, 0, 1, 10) == sig.NO_EVIDENCE  # nothing on one side: no evidence
    assert sig.two_proportion_z(0, 100, 0, 100).p_greater == 0.5  # no failures anywhere: z = 0
    assert sig.two_proportion_z(0, 100, 0, 100, margin=0.01).p_greater == 1.0  # -0.01 with no variance
    assert sig.two_proportion_z(100, 100, 0, 100, margin=0.01).p_greater == 0.0  # all vs none


def test_mann_whitney_textbook_example() -> None:
    # Hollander & Wolfe (1973), p. 69f, the example of R's `wilcox.test`: permeability constants of the human
    # chorioamnion at term (x) and at 12-26 weeks (y); R reports W = 35 (= U of x), exact one-sided p = 0.1272.
    # Normal approximation (ours, no continuity correction): mean 10·5/2 = 25, variance 10·5·16/12 = 66.667,
    # z = 10 / 8.16497 = 1.22474, one-sided p = 0.11034.
    x = [0.80, 0.83, 1.89, 1.04, 1.45, 1.38, 1.91, 1.64, 0.73, 1.46]
    y = [1.15, 0.88, 0.90, 0.74, 1.21]
    result = sig.mann_whitney(x, y)
    assert result.statistic == 35.0
    assert sum(1 for a in x for b in y if a > b) == 35  # U counted pair by pair
    assert close(result.p_greater, 0.11034, 1e-5)
    assert close(result.p_two_sided, 0.22068, 1e-5)
    assert abs(result.p_greater - 0.1272) < 0.02  # the approximation is near the exact value


def test_mann_whitney_with_ties_by_hand() -> None:
    # x = 1 2 2 3, y = 2 3 3 4. Ranks: 1 → 1; the three 2s → 3; the three 3s → 6; 4 → 8. R_x = 1+3+3+6 = 13,
    # U_x = 13 - 4·5/2 = 3 (pairs: 0 + .5 + .5 + 2). Tie-corrected variance: 4·4/12 · (9 - (24+24)/(8·7))
    # = 10.857143; z = (3 - 8) / 3.295018 = -1.517442; P(Z > z) = 0.935422, two-sided 0.129155.
    result = sig.mann_whitney([1, 2, 2, 3], [2, 3, 3, 4])
    assert result.statistic == 3.0
    assert close(result.p_greater, 0.935422, 1e-6)
    assert close(result.p_two_sided, 0.129155, 1e-6)
    assert sig.mann_whitney([], [1.0]) == sig.NO_EVIDENCE
    assert sig.mann_whitney([1.0, 1.0], [1.0]).p_two_sided == 1.0  # all equal


def test_welch_t_by_hand() -> None:
    # Means 10 and 8, variances 4 and 4, n 6 and 6: SE = sqrt(4/6 + 4/6) = 1.154701, t = 1.732051 (√3),
    # df = (4/3)² / ((2/3)²/5 · 2) = 10. With the same SE, a difference of 2.228 · SE is the t table's
    # 0.05 two-sided critical value at 10 degrees of freedom.
    result = sig.welch_t(10.0, 4.0, 6, 8.0, 4.0, 6)
    assert close(result.statistic, math.sqrt(3), 1e-9)
    assert close(result.p_greater, sig.student_t_sf(math.sqrt(3), 10), 1e-12)
    critical = sig.welch_t(8.0 + 2.228 * math.sqrt(4 / 3), 4.0, 6, 8.0, 4.0, 6)
    assert close(critical.p_two_sided, 0.05, 2e-4)
    assert sig.welch_t(1.0, 1.0, 1, 0.0, 1.0, 5) == sig.NO_EVIDENCE


def test_intervals() -> None:
    # Wilson with no successes: upper bound z²/(n + z²) = 3.841459 / 13.841459 = 0.277533.
    low, high = sig.wilson_interval(0, 10, 0.95) or (None, None)
    assert low == 0.0 and high is not None and close(high, 0.277533, 1e-6)
    # Mean of 1..5 (sum 15, squares 55) is 3, s² = (55 - 5·9) / 4 = 2.5: 3 ± 1.959964 · sqrt(2.5/5) = 3 ± 1.385904.
    mean, variance = sig.moments(5, 15.0, 55.0)
    assert (mean, variance) == (3.0, 2.5)
    estimate = sig.moments_estimate(mean, variance, 5, 0.95)
    assert estimate.value == 3.0 and estimate.low is not None and close(estimate.low, 1.614096, 1e-6)
    assert sig.moments(0, 0.0, 0.0) == (None, None)
    assert sig.moments(1, 2.0, 4.0) == (2.0, None)
    assert sig.moments_estimate(2.0, None, 1, 0.95) == sig.Estimate(2.0, None, None)


def test_order_statistic_interval_for_the_median() -> None:
    # Campbell & Gardner (BMJ 1988) ranks for the median: r = n/2 - 1.96·√n/2, s = 1 + n/2 + 1.96·√n/2,
    # rounded. n = 100: r = 50 - 9.8 = 40.2 → 40, s = 60.8 → 61 (the 40th and 61st smallest values).
    assert sig.order_statistic_ranks(100, 0.5, 0.95) == (40, 61)
    values = [float(v) for v in range(1, 101)]
    assert sig.quantile_estimate(values, 0.5, 0.95) == sig.Estimate(50.0, 40.0, 61.0)
    # p95 of 100 values: n·q = 95, spread 1.96·sqrt(4.75) = 4.27 → ranks 91 and 100 (99.27 → 99+1 clamped).
    assert sig.order_statistic_ranks(100, 0.95, 0.95) == (91, 100)
    assert sig.quantile_estimate([], 0.5, 0.95) is None


@pytest.mark.parametrize("x", [-40.0, -8.5, -3.0, -1e-9, 0.0, 0.5, 2.0, 6.0, 8.5, 40.0, math.inf, -math.inf])
def test_normal_sf_is_one_minus_cdf_within_float_error(x: float) -> None:
    # The erfc forms the module used before `statistics.NormalDist`: equal within absolute float error.
    assert close(sig.normal_cdf(x), 0.5 * math.erfc(-x / math.sqrt(2.0)), 2e-16)
    assert close(sig.normal_sf(x), 0.5 * math.erfc(x / math.sqrt(2.0)), 2e-16)
    assert close(sig.normal_cdf(x) + sig.normal_sf(x), 1.0, 2e-16)


@pytest.mark.parametrize("p", [1e-12, 0.001, 0.2, 0.5, 0.8, 0.999])
def test_normal_quantile_round_trips(p: float) -> None:
    assert close(sig.normal_cdf(sig.normal_quantile(p)), p, 1e-12)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.5, 1.5, math.nan])
def test_normal_quantile_rejects_p_outside_the_open_unit_interval(p: float) -> None:
    with pytest.raises(ValueError):
        sig.normal_quantile(p)


@pytest.mark.parametrize("n", [1, 3, 10, 57, 1000])
@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.999])
def test_wilson_bounds_are_exact_at_none_and_all(n: int, confidence: float) -> None:
    # On paper centre == half at x = 0 and x = n, so the bounds must be exactly 0 and 1, not 1e-17 off.
    none = sig.wilson_interval(0, n, confidence)
    every = sig.wilson_interval(n, n, confidence)
    assert none is not None and none[0] == 0.0 and 0.0 < none[1] < 1.0
    assert every is not None and every[1] == 1.0 and 0.0 < every[0] < 1.0
    # Symmetry: n - x successes give the mirrored interval.
    assert close(none[1], 1.0 - every[0], 1e-12)
