"""Canary analysis: is the candidate worse than the baseline? Pure: windows of numbers and `now` in, a verdict out.

`step_spans` says which time a step's evidence covers; `judge` turns the pooled numbers of those spans
(`observe/stats.py` `Pooled`, summed over every replica) into `Window`s and runs `analyse`: errors
(two-proportion z, one-sided, beyond `max_error_rate_delta`), latency and TTFT (Mann–Whitney on the merged
histograms, buckets as ties, one-sided, failing only when the p95 ratio also exceeds its gate), and, when a
shadow mirrors the candidate's pool, the paired status comparison. Called by `delivery/controller.py`, which
reads the pooled numbers (and holds when the store cannot answer) and acts on the verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.config.model import Rollout
from proxy.delivery.significance import mann_whitney_counts, normal_sf, two_proportion_z
from proxy.observe.histogram import Counts, percentile, total
from proxy.observe.stats import Pooled, Span, VariantTotals

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
    """One variant's requests in an analysis window: counts, and the histograms (`observe/histogram.py`) of
    its successful requests' timings (a 500 is fast: errors would flatter latency)."""

    requests: int = 0
    errors: int = 0
    latency: Mapping[int, float] = field(default_factory=dict)
    ttft: Mapping[int, float] = field(default_factory=dict)

    @classmethod
    def of(cls, totals: VariantTotals) -> Window:
        return cls(round(totals.requests), round(totals.errors), totals.latency, totals.ttft)


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
        (LATENCY, "latency", candidate.latency, baseline.latency, rollout.max_p95_ratio),
        (TTFT, "ttft", candidate.ttft, baseline.ttft, rollout.max_ttft_p95_ratio),
    ):
        if _slower(name, ours, theirs, gate, alpha, numbers):
            failed.append(reason)
    if shadow is not None and shadow.pairs >= min(rollout.min_requests, SHADOW_MIN_PAIRS):
        if _shadow_worse(shadow, rollout.max_error_rate_delta, numbers) < alpha:
            failed.append(SHADOW_STATUS)
    if failed:
        return Analysis(FAIL, failed[0], numbers)
    return Analysis(PASS, OK, numbers)


def step_spans(since: float, started: float, percent: float, interval: float, now: float) -> tuple[Span, Span]:
    """The time one step's evidence covers, candidate's and baseline's: since the step began, until `now`. At
    100 % the baseline serves nothing, so its span is what it served during the whole rollout (`started`: when
    it began) and one interval before (a blue-green switch's baseline served only then)."""
    candidate = (since, now)
    return candidate, ((started - interval, now) if percent >= 100.0 else candidate)


def judge(rollout: Rollout, candidate: Pooled, baseline: Pooled, shadow: ShadowPairs | None = None, *,
          early: bool = False) -> Analysis:
    """`analyse` on the pooled numbers of `step_spans`; its numbers add how many replicas contributed."""
    result = analyse(rollout, Window.of(candidate.of(rollout.candidate)), Window.of(baseline.of(rollout.baseline)),
                     shadow, early=early)
    result.numbers["replicas"] = len(candidate.replicas | baseline.replicas)
    return result


def _rate(window: Window) -> float | None:
    return window.errors / window.requests if window.requests else None


def _slower(name: str, ours: Counts, theirs: Counts, gate: float, alpha: float,
            numbers: dict[str, float | int | None]) -> bool:
    """Candidate slower: its timings rank higher (Mann–Whitney, a histogram bucket's timings tied) and its
    p95 (read from its histogram) exceeds `gate` × the baseline's."""
    if min(total(ours), total(theirs)) < MIN_TIMING_SAMPLES:
        return False
    p95_ours = percentile(ours, 0.95)
    p95_theirs = percentile(theirs, 0.95)
    assert p95_ours is not None and p95_theirs is not None
    ratio = p95_ours / p95_theirs if p95_theirs > 0 else (math.inf if p95_ours > 0 else 1.0)
    test = mann_whitney_counts(ours, theirs)
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
