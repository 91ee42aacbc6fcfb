"""Significance tests and confidence intervals for rollout analysis and the A/B report, stdlib only.

Pure functions of counts and samples: the normal distribution (`statistics.NormalDist`), Student's t tail
(regularised incomplete beta, which the stdlib lacks), the two-proportion z-test, Mann–Whitney U (normal
approximation with tie correction, no continuity correction) of samples or of two histograms with the same
bounds (`observe/histogram.py`: a bucket's values are ties), Welch's t-test, and intervals (normal mean from
running totals, Wilson proportion, order-statistic quantile of samples or of a histogram). Callers:
`delivery/analysis.py`, `delivery/experiments.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

from proxy.observe.histogram import Counts, total, value_at_rank
from proxy.observe.stats import percentile

_STANDARD_NORMAL = NormalDist()  # immutable: mean 0, sigma 1
_TINY = 1e-300


@dataclass(frozen=True, slots=True)
class Significance:
    """One test's outcome. `p_greater`: one-sided, the first sample is greater (worse) than the second;
    `p_two_sided`: any difference. `statistic` is z (proportions), U of the first sample, or Welch's t."""

    statistic: float
    p_greater: float
    p_two_sided: float


NO_EVIDENCE = Significance(0.0, 1.0, 1.0)


def normal_cdf(x: float) -> float:
    return _STANDARD_NORMAL.cdf(x)


def normal_sf(x: float) -> float:
    """1 - CDF, as CDF(-x) by symmetry. NormalDist's CDF is erf-based, so tails below ~1e-16 read as 0: fine,
    since callers only compare p-values with an alpha (1 - confidence) many orders of magnitude larger."""
    return _STANDARD_NORMAL.cdf(-x)


def normal_quantile(p: float) -> float:
    """The z with normal_cdf(z) == p. The explicit check keeps NaN out (`inv_cdf` would return NaN)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    return _STANDARD_NORMAL.inv_cdf(p)


def _from_z(z: float) -> Significance:
    return Significance(z, normal_sf(z), min(1.0, 2.0 * normal_sf(abs(z))))


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom: I_{df/(df+t²)}(df/2, 1/2) / 2."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes, `betai`)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated with the modified Lentz method."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((a - 1.0 + m2) * (a + m2)),
                   -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1.0 + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


# ------------------------------------------------------------------------------------------------ tests


def two_proportion_z(x1: int, n1: int, x2: int, n2: int, margin: float = 0.0) -> Significance:
    """z-test of H0: p1 - p2 <= margin (one-sided `p_greater`: p1 exceeds p2 by more than `margin`).

    With margin 0 the standard error is the pooled one (the textbook test); with a margin the null is not
    p1 == p2, so each proportion keeps its own variance (Wald)."""
    if n1 <= 0 or n2 <= 0:
        return NO_EVIDENCE
    p1, p2 = x1 / n1, x2 / n2
    if margin == 0.0:
        pooled = (x1 + x2) / (n1 + n2)
        se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    else:
        se = math.sqrt(p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2)
    diff = p1 - p2 - margin
    if se == 0.0:  # both sides all-or-nothing: the sign of the difference is all there is
        return _from_z(math.copysign(math.inf, diff) if diff else 0.0)
    return _from_z(diff / se)


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> Significance:
    """Mann–Whitney U of `x` against `y`: `statistic` is U_x (pairs with x > y, ties counting 1/2), p-values
    from the normal approximation with the tie-corrected variance. `p_greater`: x tends to be larger."""
    n1, n2 = len(x), len(y)
    if not n1 or not n2:
        return NO_EVIDENCE
    pooled = sorted([(value, True) for value in x] + [(value, False) for value in y])
    n = n1 + n2
    rank_sum = 0.0
    ties = 0.0
    start = 0
    while start < n:
        end = start + 1
        while end < n and pooled[end][0] == pooled[start][0]:
            end += 1
        size = end - start
        rank = (start + 1 + end) / 2.0  # the average of ranks start+1 .. end
        rank_sum += rank * sum(1 for _, is_x in pooled[start:end] if is_x)
        ties += size ** 3 - size
        start = end
    u = rank_sum - n1 * (n1 + 1) / 2.0
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0.0:  # every value equal
        return Significance(u, 0.5, 1.0)
    z = (u - n1 * n2 / 2.0) / math.sqrt(variance)
    return Significance(u, normal_sf(z), min(1.0, 2.0 * normal_sf(abs(z))))


def mann_whitney_counts(x: Counts, y: Counts) -> Significance:
    """`mann_whitney` of two histograms with the same bucket bounds, every bucket one group of ties: what the
    sample version gives when each value is replaced by its bucket. U_x = Σ x_b · (y below b + y_b / 2), and
    the tie correction is Σ (t³ - t) over the buckets' pooled counts t."""
    n1, n2 = total(x), total(y)
    if not n1 or not n2:
        return NO_EVIDENCE
    n = n1 + n2
    u = 0.0
    ties = 0.0
    below = 0.0  # y's count in the buckets under the current one
    for index in sorted(set(x) | set(y)):
        ours, theirs = x.get(index, 0.0), y.get(index, 0.0)
        u += ours * (below + theirs / 2.0)
        below += theirs
        size = ours + theirs
        ties += size ** 3 - size
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0.0:  # every value in one bucket
        return Significance(u, 0.5, 1.0)
    z = (u - n1 * n2 / 2.0) / math.sqrt(variance)
    return Significance(u, normal_sf(z), min(1.0, 2.0 * normal_sf(abs(z))))


def welch_t(mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int) -> Significance:
    """Welch's t-test on two samples' means and (n-1) variances; degrees of freedom by Welch–Satterthwaite."""
    if n1 < 2 or n2 < 2:
        return NO_EVIDENCE
    s1, s2 = var1 / n1, var2 / n2
    diff = mean1 - mean2
    if s1 + s2 == 0.0:
        return _from_z(math.copysign(math.inf, diff) if diff else 0.0)
    t = diff / math.sqrt(s1 + s2)
    df = (s1 + s2) ** 2 / (s1 * s1 / (n1 - 1) + s2 * s2 / (n2 - 1))
    return Significance(t, student_t_sf(t, df), min(1.0, 2.0 * student_t_sf(abs(t), df)))


# -------------------------------------------------------------------------------------------- intervals


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate with its confidence interval (None bounds: too few values to say)."""

    value: float
    low: float | None
    high: float | None


def moments(n: int, total: float, squares: float) -> tuple[float | None, float | None]:
    """Mean and sample (n-1) variance from a count, a sum and a sum of squares (what pooled statistics keep);
    None where undefined (no values; a single one has no variance)."""
    if n <= 0:
        return None, None
    mean = total / n
    return mean, (max(0.0, (squares - n * mean * mean) / (n - 1)) if n > 1 else None)


def moments_estimate(mean: float, variance: float | None, n: int, confidence: float) -> Estimate:
    """Mean ± z·√(variance/n) from running totals; no interval without a variance (n < 2)."""
    if variance is None or n < 2:
        return Estimate(mean, None, None)
    half = normal_quantile(0.5 + confidence / 2) * math.sqrt(variance / n)
    return Estimate(mean, mean - half, mean + half)


def wilson_interval(x: int, n: int, confidence: float) -> tuple[float, float] | None:
    """Wilson score interval of the proportion x/n (sound near 0 and 1, unlike p ± z·se)."""
    if n <= 0:
        return None
    z = normal_quantile(0.5 + confidence / 2)
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At x = 0 (x = n) centre and half are equal on paper, so the bound is exactly 0 (1); rounding would
    # otherwise leave a sliver like 3e-17 that depends on the last bit of z.
    low = 0.0 if x <= 0 else max(0.0, centre - half)
    high = 1.0 if x >= n else min(1.0, centre + half)
    return low, high


def order_statistic_ranks(n: int, q: float, confidence: float) -> tuple[int, int]:
    """1-based ranks (r, s) of the order statistics bounding the q-quantile: r = nq - z√(nq(1-q)) and
    s = 1 + nq + z√(nq(1-q)), rounded, clamped to 1..n (Campbell & Gardner, BMJ 1988, for the median)."""
    z = normal_quantile(0.5 + confidence / 2)
    spread = z * math.sqrt(n * q * (1 - q))
    low = int(math.floor(n * q - spread + 0.5))
    high = int(math.floor(1 + n * q + spread + 0.5))
    return max(1, low), min(n, high)


def quantile_estimate(ordered: Sequence[float], q: float, confidence: float) -> Estimate | None:
    """The nearest-rank q-quantile of sorted values with its distribution-free interval (order statistics)."""
    point = percentile(ordered, q)
    if point is None:
        return None
    low, high = order_statistic_ranks(len(ordered), q, confidence)
    return Estimate(point, ordered[low - 1], ordered[high - 1])


def quantile_estimate_counts(counts: Counts, q: float, confidence: float) -> Estimate | None:
    """`quantile_estimate` of a histogram: the same ranks, each read with `histogram.value_at_rank`."""
    n = total(counts)
    point = value_at_rank(counts, math.ceil(q * n))
    if point is None:
        return None
    low, high = order_statistic_ranks(n, q, confidence)
    return Estimate(point, value_at_rank(counts, low), value_at_rank(counts, high))
