"""Canary analysis: is the candidate worse than the baseline? Pure: windows of numbers in, a verdict out.

`analyse` runs the tests of `significance.py` on one step's windows: errors (two-proportion z, one-sided,
beyond `max_error_rate_delta`), latency and TTFT (Mann–Whitney, one-sided, failing only when the p95 ratio
also exceeds its gate), and, when a shadow mirrors the candidate's pool, the paired status comparison.
Called by `delivery/controller.py`, which builds the windows from `observe/stats.py` and acts on the verdict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from proxy.config.model import Rollout
from proxy.delivery.significance import mann_whitney, normal_sf, two_proportion_z
from proxy.observe.stats import Sample, percentile

PASS = "pass"
FAIL = "fail"
INCONCLUSIVE = "inconclusive"

# reasons (closed set, for history and logs)
OK = "ok"
TOO_FEW_REQUESTS = "too_few_requests"
ERROR_RATE = "error_rate"
LATENCY = "latency_p95"
TTFT = "ttft_p95"
SHADOW_STATUS = "shadow_status"

# Checks between the ends of intervals look again and again at growing data; each look at the configured
# level would inflate false alarms, so an early failure must be this many times more significant.
EARLY_LOOK_FACTOR = 10.0
MIN_TIMING_SAMPLES = 10  # fewer successful requests with a timing: that timing is not compared
SHADOW_MIN_PAIRS = 100  # the mirror keeps its last 200 comparisons: asking for more would never happen


@dataclass(frozen=True, slots=True)
class Window:
    """One variant's requests in an analysis window: counts, and the timings of its successful requests."""

    requests: int = 0
    errors: int = 0
    latencies: tuple[float, ...] = ()
    ttfts: tuple[float, ...] = ()

    @classmethod
    def of(cls, requests: int, errors: int, samples: Iterable[Sample]) -> Window:
        ok = [sample for sample in samples if not sample[3]]  # a 500 is fast: errors would flatter latency
        return cls(requests, errors, tuple(s[1] for s in ok), tuple(s[2] for s in ok if s[2] is not None))


@dataclass(frozen=True, slots=True)
class ShadowPairs:
    """Recent shadow comparisons of the route against the candidate's pool: same requests, both answers."""

    pairs: int
    shadow_failed: int  # the candidate's pool answered 5xx where the primary did not
    primary_failed: int  # the other way round


@dataclass(frozen=True, slots=True)
class Analysis:
    verdict: str  # PASS | FAIL | INCONCLUSIVE
    reason: str
    numbers: dict[str, float | int | None] = field(default_factory=dict)  # JSON-ready, for history and logs


def analyse(rollout: Rollout, candidate: Window, baseline: Window, shadow: ShadowPairs | None = None, *,
            early: bool = False) -> Analysis:
    """The verdict on one step. Below `min_requests` on either side nothing is decided (inconclusive);
    `early` (mid-interval) uses a level EARLY_LOOK_FACTOR times stricter, and callers act on FAIL only."""
    alpha = (1.0 - rollout.confidence) / (EARLY_LOOK_FACTOR if early else 1.0)
    numbers: dict[str, float | int | None] = {
        "alpha": alpha,
        "candidate_requests": candidate.requests, "candidate_errors": candidate.errors,
        "candidate_error_rate": _rate(candidate), "baseline_requests": baseline.requests,
        "baseline_errors": baseline.errors, "baseline_error_rate": _rate(baseline),
    }
    if min(candidate.requests, baseline.requests) < rollout.min_requests:
        return Analysis(INCONCLUSIVE, TOO_FEW_REQUESTS, numbers)
    errors = two_proportion_z(candidate.errors, candidate.requests, baseline.errors, baseline.requests,
                              rollout.max_error_rate_delta)
    numbers["error_p"] = errors.p_greater
    failed = [ERROR_RATE] if errors.p_greater < alpha else []
    for reason, name, ours, theirs, gate in (
        (LATENCY, "latency", candidate.latencies, baseline.latencies, rollout.max_p95_ratio),
        (TTFT, "ttft", candidate.ttfts, baseline.ttfts, rollout.max_ttft_p95_ratio),
    ):
        if _slower(name, ours, theirs, gate, alpha, numbers):
            failed.append(reason)
    if shadow is not None and shadow.pairs >= min(rollout.min_requests, SHADOW_MIN_PAIRS):
        if _shadow_worse(shadow, rollout.max_error_rate_delta, numbers) < alpha:
            failed.append(SHADOW_STATUS)
    if failed:
        return Analysis(FAIL, failed[0], numbers)
    return Analysis(PASS, OK, numbers)


def _rate(window: Window) -> float | None:
    return window.errors / window.requests if window.requests else None


def _slower(name: str, ours: Sequence[float], theirs: Sequence[float], gate: float, alpha: float,
            numbers: dict[str, float | int | None]) -> bool:
    """Candidate slower: its timings rank higher (Mann–Whitney) and its p95 exceeds `gate` × the baseline's."""
    if min(len(ours), len(theirs)) < MIN_TIMING_SAMPLES:
        return False
    p95_ours = percentile(sorted(ours), 0.95)
    p95_theirs = percentile(sorted(theirs), 0.95)
    assert p95_ours is not None and p95_theirs is not None
    ratio = p95_ours / p95_theirs if p95_theirs > 0 else (math.inf if p95_ours > 0 else 1.0)
    test = mann_whitney(ours, theirs)
    numbers.update({f"candidate_{name}_p95": p95_ours, f"baseline_{name}_p95": p95_theirs,
                    f"{name}_p95_ratio": ratio if math.isfinite(ratio) else None, f"{name}_p": test.p_greater})
    return test.p_greater < alpha and ratio > gate


def _shadow_worse(shadow: ShadowPairs, margin: float, numbers: dict[str, float | int | None]) -> float:
    """One-sided p that the candidate pool fails more often than the primary on the same requests, by more
    than `margin`: the paired (McNemar-type) difference of discordant pairs, Wald standard error."""
    n = shadow.pairs
    excess = (shadow.shadow_failed - shadow.primary_failed) / n
    se = math.sqrt(max(0.0, (shadow.shadow_failed + shadow.primary_failed) / n ** 2 - excess ** 2 / n))
    diff = excess - margin
    p = (0.0 if diff > 0 else 1.0) if se == 0.0 else normal_sf(diff / se)
    numbers.update({"shadow_pairs": n, "shadow_excess_failure_rate": excess, "shadow_p": p})
    return p
