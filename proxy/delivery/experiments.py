"""The A/B report of one route (GET /admin/experiments/{route}): per variant what it served and how well,
with confidence intervals and p-values against the baseline. Pure: statistics in, a JSON-ready dict out.

Counts (requests, errors, tokens) are since start; latency and TTFT cover each variant's recent successful
requests (the `observe/stats.py` sample ring); feedback covers every score this process joined
(`observe/feedback.py`). All per process, like the status pages. Called by `admin/rollouts.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxy.config.model import Variant
from proxy.delivery.significance import (
    Estimate,
    mann_whitney,
    mean_estimate,
    moments_estimate,
    quantile_estimate,
    two_proportion_z,
    welch_t,
    wilson_interval,
)
from proxy.observe.feedback import FeedbackTotals
from proxy.observe.stats import VariantStats


def experiment_report(route: str, variants: Sequence[Variant], stats: Mapping[str, VariantStats],
                      feedback: Mapping[str, FeedbackTotals], baseline: str, confidence: float) -> dict[str, Any]:
    """Every variant of `variants` (weights as in force), then any variant seen since start but no longer
    configured; p-values are two-sided against `baseline`."""
    names = [v.name for v in variants] + [name for name in stats if name not in {v.name for v in variants}]
    configured = {v.name: v for v in variants}
    base_stats, base_feedback = stats.get(baseline), feedback.get(baseline)
    rows = []
    for name in names:
        variant = configured.get(name)
        row = _variant(stats.get(name), feedback.get(name), confidence)
        row.update(name=name, pool=variant.pool.name if variant else None, weight=variant.weight if variant else None)
        row["vs_baseline"] = None if name == baseline else _versus(stats.get(name), feedback.get(name), base_stats,
                                                                   base_feedback)
        rows.append(row)
    return {"route": route, "baseline": baseline, "confidence": confidence, "variants": rows}


def _estimate(estimate: Estimate | None) -> dict[str, float | None] | None:
    return None if estimate is None else {"value": estimate.value, "low": estimate.low, "high": estimate.high}


def _timings(stats: VariantStats | None) -> tuple[list[float], list[float]]:
    """Latencies and TTFTs of the recent successful requests (errors are fast and would flatter them)."""
    if stats is None:
        return [], []
    ok = [sample for sample in stats.samples if not sample[3]]
    return [s[1] for s in ok], [s[2] for s in ok if s[2] is not None]


def _distribution(values: list[float], confidence: float) -> dict[str, Any]:
    ordered = sorted(values)
    return {"n": len(values), "mean": _estimate(mean_estimate(values, confidence)),
            "p50": _estimate(quantile_estimate(ordered, 0.5, confidence)),
            "p95": _estimate(quantile_estimate(ordered, 0.95, confidence))}


def _variant(stats: VariantStats | None, scores: FeedbackTotals | None, confidence: float) -> dict[str, Any]:
    requests = stats.requests if stats is not None else 0
    errors = stats.errors if stats is not None else 0
    interval = wilson_interval(errors, requests, confidence)
    latencies, ttfts = _timings(stats)
    mean = scores.mean if scores is not None else None
    return {
        "requests": requests,
        "errors": errors,
        "error_rate": None if interval is None else {
            "value": errors / requests, "low": interval[0], "high": interval[1]},
        "latency": _distribution(latencies, confidence),
        "ttft": _distribution(ttfts, confidence),
        "tokens_per_request": {
            "prompt": stats.prompt_tokens / requests if stats is not None and requests else None,
            "completion": stats.completion_tokens / requests if stats is not None and requests else None,
        },
        "feedback": {
            "count": scores.count if scores is not None else 0,
            "mean": None if scores is None or mean is None else _estimate(
                moments_estimate(mean, scores.variance, scores.count, confidence)),
        },
    }


def _versus(stats: VariantStats | None, scores: FeedbackTotals | None, base: VariantStats | None,
            base_scores: FeedbackTotals | None) -> dict[str, float | None]:
    """Two-sided p-values of the differences: error rate (pooled z), latency and TTFT (Mann–Whitney),
    feedback (Welch); None where either side has nothing to compare."""
    result: dict[str, float | None] = {"error_rate_p": None, "latency_p": None, "ttft_p": None, "feedback_p": None}
    if stats is not None and base is not None and stats.requests and base.requests:
        result["error_rate_p"] = two_proportion_z(stats.errors, stats.requests, base.errors, base.requests).p_two_sided
    (latencies, ttfts), (base_latencies, base_ttfts) = _timings(stats), _timings(base)
    if latencies and base_latencies:
        result["latency_p"] = mann_whitney(latencies, base_latencies).p_two_sided
    if ttfts and base_ttfts:
        result["ttft_p"] = mann_whitney(ttfts, base_ttfts).p_two_sided
    if scores is not None and base_scores is not None:
        ours, theirs = scores.variance, base_scores.variance
        if ours is not None and theirs is not None and scores.mean is not None and base_scores.mean is not None:
            result["feedback_p"] = welch_t(scores.mean, ours, scores.count, base_scores.mean, theirs,
                                           base_scores.count).p_two_sided
    return result
