"""Fixed, mergeable timing histograms: the bucket bounds every replica shares, and what counts per bucket tell.

A histogram is a sparse mapping bucket index -> count. Every replica files a timing under the same index, so
histograms from any number of replicas and time buckets merge by adding counts, and percentiles and rank
tests (`delivery/significance.py`) read the merged counts. Pure: no clock, no I/O. Written by
`observe/stats.py`, read by `delivery/analysis.py` and `delivery/experiments.py`.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping

# 20 buckets a decade from 1 ms to 1000 s: each bucket is 12 % wide (10 ** (1/20) = 1.122), fine enough for
# the rollout's p95 gates (1.2 by default; coarser buckets, e.g. 48 over the same range at 33 % each, could
# not tell 1.1x from 1.3x), and 121 bounds, of which a variant's timings touch a handful.
PER_DECADE = 20
LOWEST = 0.001
BOUNDS: tuple[float, ...] = tuple(10.0 ** (-3 + i / PER_DECADE) for i in range(6 * PER_DECADE + 1))
GROWTH = 10.0 ** (1 / PER_DECADE)
OVERFLOW = len(BOUNDS)  # the bucket of timings above BOUNDS[-1] (no LLM answer takes 17 minutes)

Counts = Mapping[int, float]


def bucket_of(seconds: float) -> int:
    """The index of the bucket holding `seconds`: bucket i holds (BOUNDS[i-1], BOUNDS[i]], bucket 0 [0, 1 ms]."""
    return bisect_left(BOUNDS, seconds)


def lower(index: int) -> float:
    return 0.0 if index <= 0 else BOUNDS[index - 1]


def upper(index: int) -> float:
    return BOUNDS[index] if index < OVERFLOW else BOUNDS[-1] * GROWTH


def counts_of(values: Iterable[float]) -> dict[int, float]:
    """The histogram of raw timings (tests, and anything that starts from samples)."""
    counts: dict[int, float] = {}
    for value in values:
        index = bucket_of(value)
        counts[index] = counts.get(index, 0.0) + 1.0
    return counts


def merge(into: dict[int, float], counts: Counts) -> None:
    for index, count in counts.items():
        into[index] = into.get(index, 0.0) + count


def total(counts: Counts) -> int:
    return round(sum(counts.values()))


def value_at_rank(counts: Counts, rank: int) -> float | None:
    """The `rank`-th smallest timing (1-based), interpolated linearly inside its bucket: the j-th of c values in
    (lo, hi] reads lo + (hi - lo)·j/c, so the largest in a bucket reads as its upper bound (as Prometheus's
    `histogram_quantile` does). None for an empty histogram; ranks are clamped to 1..n."""
    n = total(counts)
    if n <= 0:
        return None
    rank = min(n, max(1, rank))
    seen = 0.0
    for index in sorted(counts):
        count = counts[index]
        if count <= 0:
            continue
        if seen + count >= rank:
            low, high = lower(index), upper(index)
            return low + (high - low) * (rank - seen) / count
        seen += count
    return upper(max(counts))  # rounding left the rank beyond the last count


def percentile(counts: Counts, q: float) -> float | None:
    """Nearest-rank percentile (0 < q <= 1), as `observe/stats.py` `percentile` reads sorted samples."""
    return value_at_rank(counts, math.ceil(q * total(counts)))
