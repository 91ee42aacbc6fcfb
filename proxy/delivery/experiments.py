"""The A/B report of one route (GET /admin/experiments/{route}): per variant what it served and how well,
with confidence intervals and p-values against the baseline. Pure: pooled numbers in, a JSON-ready dict out.

Everything covers the report's span (the last REPORT_SECONDS, `observe/stats.py` HORIZON) summed over every
replica that flushed into it (`Pooled`), so any replica answers the same numbers: counts and tokens, latency
and TTFT of successful requests (mean from sums, percentiles from the merged histograms), and the client
feedback scores booked in the span. Called by `admin/rollouts.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from proxy.config.model import Variant
from proxy.delivery.significance import (
    Estimate,
    mann_whitney_counts,
    moments,
    moments_estimate,
    quantile_estimate_counts,
    two_proportion_z,
    welch_t,
    wilson_interval,
)
from proxy.observe.histogram import Counts, total
from proxy.observe.stats import HORIZON, Pooled, VariantTotals

REPORT_SECONDS = HORIZON


def experiment_report(route: str, variants: Sequence[Variant], pooled: Pooled, baseline: str,
                      confidence: float) -> dict[str, Any]:
    """Every variant of `variants` (weights as in force), then any variant seen in the span but no longer
    configured; p-values are two-sided against `baseline`."""
    configured = {v.name: v for v in variants}
    names = [v.name for v in variants] + sorted(name for name in pooled.variants if name not in configured)
    base = pooled.variants.get(baseline)
    rows = []
    for name in names:
        variant = configured.get(name)
        numbers = pooled.variants.get(name)
        row = _variant(numbers, confidence)
        row.update(name=name, pool=variant.pool.name if variant else None, weight=variant.weight if variant else None)
        row["vs_baseline"] = None if name == baseline else _versus(numbers, base)
        rows.append(row)
    return {"route": route, "baseline": baseline, "confidence": confidence, "replicas": len(pooled.replicas),
            "span": {"start": pooled.start, "end": pooled.end}, "variants": rows}


def _estimate(estimate: Estimate | None) -> dict[str, float | None] | None:
    return None if estimate is None else {"value": estimate.value, "low": estimate.low, "high": estimate.high}


def _distribution(counts: Counts, sum_: float, squares: float, confidence: float) -> dict[str, Any]:
    n = total(counts)
    mean, variance = moments(n, sum_, squares)
    return {"n": n, "mean": None if mean is None else _estimate(moments_estimate(mean, variance, n, confidence)),
            "p50": _estimate(quantile_estimate_counts(counts, 0.5, confidence)),
            "p95": _estimate(quantile_estimate_counts(counts, 0.95, confidence))}


def _variant(numbers: VariantTotals | None, confidence: float) -> dict[str, Any]:
    numbers = numbers or VariantTotals()
    requests, errors = round(numbers.requests), round(numbers.errors)
    interval = wilson_interval(errors, requests, confidence)
    count = round(numbers.feedback_count)
    mean, variance = moments(count, numbers.feedback_sum, numbers.feedback_squares)
    return {
        "requests": requests,
        "errors": errors,
        "rescued": round(numbers.rescued),  # of the errors: answered by the route's fallback pool
        "error_rate": None if interval is None else {
            "value": errors / requests, "low": interval[0], "high": interval[1]},
        "latency": _distribution(numbers.latency, numbers.latency_sum, numbers.latency_squares, confidence),
        "ttft": _distribution(numbers.ttft, numbers.ttft_sum, numbers.ttft_squares, confidence),
        "tokens_per_request": {
            "prompt": numbers.prompt_tokens / requests if requests else None,
            "completion": numbers.completion_tokens / requests if requests else None,
        },
        "feedback": {
            "count": count,
            "mean": None if mean is None else _estimate(moments_estimate(mean, variance, count, confidence)),
        },
    }


def _versus(ours: VariantTotals | None, base: VariantTotals | None) -> dict[str, float | None]:
    """Two-sided p-values of the differences: error rate (pooled z), latency and TTFT (Mann–Whitney on the
    histograms), feedback (Welch); None where either side has nothing to compare."""
    result: dict[str, float | None] = {"error_rate_p": None, "latency_p": None, "ttft_p": None, "feedback_p": None}
    if ours is None or base is None:
        return result
    if round(ours.requests) and round(base.requests):
        result["error_rate_p"] = two_proportion_z(round(ours.errors), round(ours.requests), round(base.errors),
                                                  round(base.requests)).p_two_sided
    if total(ours.latency) and total(base.latency):
        result["latency_p"] = mann_whitney_counts(ours.latency, base.latency).p_two_sided
    if total(ours.ttft) and total(base.ttft):
        result["ttft_p"] = mann_whitney_counts(ours.ttft, base.ttft).p_two_sided
    n1, n2 = round(ours.feedback_count), round(base.feedback_count)
    mean1, var1 = moments(n1, ours.feedback_sum, ours.feedback_squares)
    mean2, var2 = moments(n2, base.feedback_sum, base.feedback_squares)
    if mean1 is not None and var1 is not None and mean2 is not None and var2 is not None:
        p = welch_t(mean1, var1, n1, mean2, var2, n2).p_two_sided
        result["feedback_p"] = p if math.isfinite(p) else None
    return result
