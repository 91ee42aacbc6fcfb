"""What each status page shows, as one plain dict per page: the template and the JSON twin render the same.

Builders read live state (rules, reloader, backend state, shadow comparisons, cache summary, metric counters)
at render time and never write to it; they do no I/O and take the clocks as arguments. The overview's
per-variant numbers are the fleet's pooled statistics, which `views.py` reads from the store beforehand
(`FleetNumbers`). Numbers stay raw (seconds, ratios); formatting belongs to the templates. Called by `views.py`.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from proxy.admin.rollouts import rollout_document
from proxy.admin.rules import rules_document
from proxy.config.model import RulesHolder
from proxy.config.reloader import Reloader
from proxy.delivery.weights import RolloutWeights
from proxy.observe.histogram import percentile
from proxy.observe.metrics import Metrics
from proxy.observe.stats import Pooled, VariantTotals
from proxy.observe.usage import Usage
from proxy.pipeline.result_cache import ResultCache
from proxy.pipeline.shadow import ShadowMirror
from proxy.upstream.state import BackendState, BackendStates

RECENT_COMPARISONS_SHOWN = 50
TOTALS_SECONDS = 3600.0  # the overview's totals and observed shares: the last hour, every replica
WINDOW_SECONDS = 60.0  # its rates, error rates and percentiles


@dataclass(frozen=True, slots=True)
class Clocks:
    """One render's 'now' on both clocks: loop time (backend state) and wall time (what people read)."""

    loop: float
    wall: float

    def to_wall(self, loop_time: float) -> float:
        return self.wall + (loop_time - self.loop)


@dataclass(frozen=True, slots=True)
class FleetNumbers:
    """The overview's pooled numbers, read by `views.py` before rendering: per route, the last TOTALS_SECONDS
    and the last WINDOW_SECONDS summed over every replica; routes the fleet served in the former that the
    rules no longer have; how many replicas contributed; `now`, the fleet clock when read."""

    totals: Mapping[str, Pooled]
    window: Mapping[str, Pooled]
    retired: tuple[str, ...]
    replicas: int
    now: float


@dataclass(frozen=True, slots=True)
class Sources:
    """The parts the pages read (never write), handed over by `views.py` from the app's keys. `fleet`: the
    overview's pooled numbers (None on other pages, or when the store did not answer)."""

    rules: RulesHolder
    reloader: Reloader
    weights: RolloutWeights
    fleet: FleetNumbers | None
    metrics: Metrics
    backends: BackendStates
    shadows: ShadowMirror
    cache: ResultCache
    tenants: TenantNumbers | None = None  # the tenants page's pooled usage (None elsewhere, or store down)


@dataclass(frozen=True, slots=True)
class TenantNumbers:
    """Every tenant's usage over the last minute and the last day, summed over the fleet (`observe/usage.py`)."""

    minute: Mapping[str, Usage]
    day: Mapping[str, Usage]
    use: Mapping[str, Mapping[str, float]]  # tenant -> rate limit -> share spent now (GCRA state)


PageBuilder = Callable[[Sources, Clocks], dict[str, Any]]


def iso(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


# ------------------------------------------------------------------------------------------ overview


def overview(sources: Sources, clocks: Clocks) -> dict[str, Any]:
    """Rules (generation, load time, last rejected reload), then every route's variants: configured weight,
    and the fleet's numbers (every replica's, pooled): the last hour's requests, share, errors and tokens, the
    last minute's rate, error rate and latency percentiles (successful requests); then the rollouts and where
    they stand."""
    page = rules_document(sources.rules.current, sources.reloader)
    fleet = sources.fleet
    routes = page["routes"] + [  # routes a reload removed still served requests lately: keep them visible
        {"name": name, "models": [], "source": "", "variants": [], "retired": True}
        for name in (fleet.retired if fleet is not None else ())
    ]
    totals = {"requests": 0, "errors": 0, "window_requests": 0, "window_errors": 0, "rps": 0.0}
    window = WINDOW_SECONDS
    for route in routes:
        served = fleet.totals.get(route["name"]) if fleet is not None else None
        recent = fleet.window.get(route["name"]) if fleet is not None else None
        if fleet is not None and recent is not None:
            window = max(1.0, fleet.now - recent.start)  # the window's buckets, up to now
        seen = served.variants if served is not None else {}
        weights = sum(v["weight"] for v in route["variants"])
        variants = [dict(v, weight_share=_share(v["weight"], weights), retired=False) for v in route["variants"]]
        names = {v["name"] for v in variants}
        variants += [{"name": name, "pool": None, "weight": None, "weight_share": None, "retired": True}
                     for name in sorted(seen) if name not in names]
        route_requests = round(sum(numbers.requests for numbers in seen.values()))
        for variant in variants:
            numbers = _variant_numbers(seen.get(variant["name"]),
                                       recent.variants.get(variant["name"]) if recent is not None else None,
                                       route_requests, window)
            variant.update(numbers)
            for name in totals:
                totals[name] += numbers[name]
        route["variants"] = variants
        route.setdefault("retired", False)
    page["routes"] = routes
    page["totals"] = dict(totals, error_rate=_share(totals["window_errors"], totals["window_requests"]),
                          window_seconds=window, totals_seconds=TOTALS_SECONDS)
    page["stats"] = {"available": fleet is not None, "replicas": fleet.replicas if fleet is not None else None}
    page["rollouts"] = rollouts(sources)
    page["now"] = iso(clocks.wall)
    return page


def rollouts(sources: Sources) -> list[dict[str, Any]]:
    """Every rollout of the running rules as this replica last read it (no store I/O while rendering), with
    its latest decision."""
    rows = []
    for route in sources.rules.current.routes:
        if route.rollout is None:
            continue
        row = rollout_document(route, sources.weights.state_of(route.name))
        row["last"] = row["history"][-1] if row["history"] else None
        row["history"] = row["history"][-5:]
        rows.append(row)
    return rows


def _variant_numbers(served: VariantTotals | None, recent: VariantTotals | None, route_requests: int,
                     window: float) -> dict[str, Any]:
    served, recent = served or VariantTotals(), recent or VariantTotals()
    requests, window_requests, window_errors = round(served.requests), round(recent.requests), round(recent.errors)
    return {
        "requests": requests,
        "share": _share(requests, route_requests),
        "errors": round(served.errors),
        "rescued": round(served.rescued),  # of the errors: a fallback pool answered the client
        "prompt_tokens": round(served.prompt_tokens),
        "completion_tokens": round(served.completion_tokens),
        "rps": window_requests / window,
        "window_requests": window_requests,
        "window_errors": window_errors,
        "error_rate": _share(window_errors, window_requests),
        "latency_p50": percentile(recent.latency, 0.5),
        "latency_p95": percentile(recent.latency, 0.95),
        "ttft_p50": percentile(recent.ttft, 0.5),
        "ttft_p95": percentile(recent.ttft, 0.95),
    }


# ------------------------------------------------------------------------------------------ backends


def backend_status(state: BackendState, now: float) -> str:
    """One word for what the balancer currently makes of a backend (mirrors `BackendState.is_available`)."""
    if state.draining is not None:
        return "draining"  # a reload removed it; requests still in flight finish on it
    if not state.healthy:
        return "ejected" if now < state.ejected_until else "unhealthy"
    if now < state.throttled_until:
        return "throttled"
    return "available"


def counter_values(counter: Counter) -> Iterable[tuple[dict[str, str], float]]:
    """(labels, value) of every `_total` sample of a labelled counter, read from the registry's view."""
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                yield sample.labels, sample.value


def backends(sources: Sources, clocks: Clocks) -> dict[str, Any]:
    """Every backend with state: health, load in flight, learned speeds, ejections, failures by reason."""
    snapshot = sources.rules.current
    errors: dict[str, dict[str, int]] = {}
    for labels, value in counter_values(sources.metrics.upstream_errors_total):
        errors.setdefault(labels["backend"], {})[labels["reason"]] = int(value)
    pools: dict[str, list[str]] = {}
    for pool in snapshot.pools:
        for member in pool.backends:
            pools.setdefault(member.name, []).append(pool.name)
    now = clocks.loop
    rows = []
    for state in sources.backends:
        backend = state.backend
        status = backend_status(state, now)
        by_reason = errors.get(backend.name, {})
        sampled = state.runtime_sampled_at >= 0
        rows.append({
            "name": backend.name,
            "url": backend.url,
            "kind": backend.kind,
            "weight": backend.weight,
            "max_inflight": backend.max_inflight or None,
            "pools": pools.get(backend.name, []),
            "status": status,
            "ejected_until": iso(clocks.to_wall(state.ejected_until)) if status == "ejected" else None,
            "ejected_for": state.ejected_until - now if status == "ejected" else None,
            "throttled_for": state.throttled_until - now if status == "throttled" else None,
            "inflight": state.inflight,
            "predicted_load": state.predicted_load,
            "prefill_tps": state.prefill_tps,
            "decode_tps": state.decode_tps,
            # The learned curves at 1..concurrency sequences running (`upstream/speed.py`).
            "prefill_tps_by_inflight": state.prefill.table(backend.concurrency),
            "decode_tps_by_inflight": state.decode.table(backend.concurrency),
            "learned_from": state.completed,
            "prefix_cache": {
                "cache_tokens": state.cache_capacity, "configured": bool(backend.cache_tokens),
                "hit_ratio": state.prefix_hit_ratio, "blocks": len(state.prefix),
            },
            "consecutive_failures": state.consecutive_failures,
            "ejections_total": state.ejections_total,
            "errors": dict(sorted(by_reason.items())),
            "errors_total": sum(by_reason.values()),
            "runtime": {
                "waiting": state.runtime_waiting, "running": state.runtime_running,
                "kv_usage": state.runtime_kv_usage, "age": now - state.runtime_sampled_at,
            } if sampled else None,
        })
    totals: dict[str, int] = {}
    for by_reason in errors.values():  # every backend ever counted, including ones a reload removed
        for reason, count in by_reason.items():
            totals[reason] = totals.get(reason, 0) + count
    return {
        "generation": snapshot.generation,
        "now": iso(clocks.wall),
        "backends": rows,
        "errors_by_reason": dict(sorted(totals.items())),
        "available": sum(1 for row in rows if row["status"] == "available"),
    }


# ------------------------------------------------------------------------------------------ shadow


def shadow(sources: Sources, clocks: Clocks) -> dict[str, Any]:
    """The latest primary/shadow comparisons (ids and numbers, never text), newest first, with a summary
    per route and shadow pool over the comparisons kept, and the copies' outcomes since start. Every shadow
    of the running rules has a summary row from the start (`configured`), so a page read while the first
    copies are still in flight says that none has finished, not that none is configured."""
    recent = list(sources.shadows.recent)
    groups: dict[tuple[str, str], list[Any]] = {}
    for result in recent:
        groups.setdefault((result.route, result.pool), []).append(result)
    outcomes: dict[tuple[str, str], dict[str, int]] = {}
    for labels, value in counter_values(sources.metrics.shadow_requests_total):
        outcomes.setdefault((labels["route"], labels["pool"]), {})[labels["outcome"]] = int(value)
    configured = {(route.name, copy.pool.name) for route in sources.rules.current.routes for copy in route.shadows}
    summary = []
    for key in sorted(set(groups) | set(outcomes) | configured):
        results = groups.get(key, [])
        summary.append({
            "route": key[0],
            "pool": key[1],
            "compared": len(results),
            "status_match": _share(sum(r.status_match for r in results), len(results)),
            "exact_match": _share(sum(r.exact_match for r in results), len(results)),
            "latency_ratio_p50": _median(r.latency_ratio for r in results),
            "ttft_ratio_p50": _median(r.ttft_ratio for r in results),
            "similarity_mean": _mean(r.similarity for r in results),
            "outcomes": {name: outcomes.get(key, {}).get(name, 0) for name in ("ok", "error", "timeout", "dropped")},
            "configured": key in configured,
        })
    return {
        "generation": sources.rules.current.generation,
        "now": iso(clocks.wall),
        "kept": len(recent),
        "summary": summary,
        "comparisons": [result.as_dict() for result in reversed(recent[-RECENT_COMPARISONS_SHOWN:])],
    }


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


# ------------------------------------------------------------------------------------------ cache


def cache(sources: Sources, clocks: Clocks) -> dict[str, Any]:
    """Result-cache lookups per route since start and what the store holds (None: the store cannot tell,
    e.g. Redis). Hit ratio counts coalesced requests as hits (neither cost a backend call) and leaves
    bypassed ones (not cacheable) out."""
    summary = sources.cache.summary()
    routes = []
    for name, counts in sorted(summary.get("routes", {}).items()):
        hit, miss, coalesced = counts.get("hit", 0), counts.get("miss", 0), counts.get("coalesced", 0)
        routes.append({
            "route": name,
            "hit": hit,
            "miss": miss,
            "coalesced": coalesced,
            "bypass": counts.get("bypass", 0),
            "hit_ratio": _share(hit + coalesced, hit + miss + coalesced),
        })
    return {
        "generation": sources.rules.current.generation,
        "now": iso(clocks.wall),
        "routes": routes,
        "entries": summary.get("entries"),
        "bytes": summary.get("bytes"),
    }


# ------------------------------------------------------------------------------------------- tenants

LIMITS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent")


def tenants(sources: Sources, clocks: Clocks) -> dict[str, Any]:
    """Every tenant of the rules: priority, the routes it may use, its limits, the fleet's usage over the last
    minute and day (None when the store did not answer), and how much of each rate limit is spent right now."""
    snapshot = sources.rules.current
    numbers = sources.tenants
    rows = []
    for tenant in snapshot.tenants.all:
        limits = tenant.limits
        minute = numbers.minute.get(tenant.name, Usage()) if numbers is not None else None
        day = numbers.day.get(tenant.name, Usage()) if numbers is not None else None
        use = numbers.use.get(tenant.name, {}) if numbers is not None else None
        rows.append({
            "tenant": tenant.name,
            "priority": tenant.priority_name,
            "routes": [route.name for route in snapshot.routes if route.serves(tenant)],
            "limits": {name: getattr(limits, name) for name in LIMITS},
            "last_minute": None if minute is None else _usage(minute),
            "last_day": None if day is None else _usage(day),
            "limit_use": use,
        })
    return {"enabled": snapshot.tenants.enabled, "pooled": numbers is not None, "tenants": rows}


def _usage(usage: Usage) -> dict[str, float]:
    return {"requests": usage.requests, "tokens": usage.tokens, "limited": usage.limited}


PAGES: dict[str, PageBuilder] = {"overview": overview, "backends": backends, "shadow": shadow, "cache": cache,
                                 "tenants": tenants}
