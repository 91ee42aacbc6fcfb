"""The metric contract of shared/DESIGN.md (prefix `splitstream_`): names and labels here, nowhere else.

Each app gets its own `CollectorRegistry`, so several proxies can live in one test process. Label values
are closed sets taken from the rules (route, variant, backend names) or fixed vocabularies (status class,
error reason, token kind) — never a client-supplied string.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector, disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

import proxy
from proxy.errors import SplitstreamError

if TYPE_CHECKING:
    from proxy.config.model import Pool, Route, Snapshot, Variant
    from proxy.config.reloader import ReloadOutcome
    from proxy.observe.compare import Comparison

# LLM requests take from milliseconds (cache hits, embeddings) to minutes (long generations).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
# Time to first token: sub-millisecond (cached) to tens of seconds (long prompts, queued runtimes).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

# A health round: a few loopback milliseconds up to the probe timeout of a backend that hangs.
PROBE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Shadow / primary ratios: 1.0 means "as fast"; the interesting range is a few x either way.
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
SIMILARITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
DELTA_BUCKETS = (-512, -128, -32, -8, -1, 0, 1, 8, 32, 128, 512)

REQUEST_LABELS = ("route", "variant", "backend")
RELOAD_RESULTS = ("success", "error")  # splitstream_rules_reloads_total{result}: both exist from the start
FLUSH_RESULTS = ("ok", "dropped")  # splitstream_stats_flushes_total{result}: likewise
MAX_TENANT_CHILDREN = 4096  # cached (tenant, route, status) children of tenant_requests_total


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def build_version() -> str:
    """`proxy.__version__` when the package declares one, else what the installer recorded (metadata)."""
    version = getattr(proxy, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return metadata.version("splitstream")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """All metric objects of one app, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A `_created` series per label set would double the series of every counter and histogram, and no
        # dashboard reads them. The switch is prometheus_client's own, process-wide (we are its only user).
        disable_created_metrics()  # type: ignore[no-untyped-call]  # (unannotated upstream)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "splitstream_requests_total", "Client requests by outcome.", (*REQUEST_LABELS, "status"), registry=r
        )
        self.request_duration = Histogram(
            "splitstream_request_duration_seconds", "Client request duration, first byte in to last byte out.",
            REQUEST_LABELS, buckets=DURATION_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "splitstream_time_to_first_token_seconds", "Request received to first body byte from the backend.",
            REQUEST_LABELS, buckets=TTFT_BUCKETS, registry=r,
        )
        self.tokens_total = Counter(
            "splitstream_tokens_total", "Tokens reported by backends.", (*REQUEST_LABELS, "kind"), registry=r
        )
        shadow_labels = ("route", "pool")
        self.shadow_requests_total = Counter(
            "splitstream_shadow_requests_total", "Shadow copies by outcome (ok, error, timeout, dropped).",
            (*shadow_labels, "outcome"), registry=r,
        )
        self.shadow_duration = Histogram(
            "splitstream_shadow_duration_seconds", "Shadow copy duration.", shadow_labels,
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.shadow_comparisons_total = Counter(
            "splitstream_shadow_comparisons_total", "Compared primary/shadow pairs.",
            (*shadow_labels, "status_match", "exact_match"), registry=r,
        )
        self.shadow_latency_ratio = Histogram(
            "splitstream_shadow_latency_ratio", "Shadow duration / primary duration.", shadow_labels,
            buckets=RATIO_BUCKETS, registry=r,
        )
        self.shadow_ttft_ratio = Histogram(
            "splitstream_shadow_ttft_ratio", "Shadow TTFT / primary TTFT (streams).", shadow_labels,
            buckets=RATIO_BUCKETS, registry=r,
        )
        self.shadow_similarity = Histogram(
            "splitstream_shadow_similarity", "Similarity of shadow and primary outputs (0..1).", shadow_labels,
            buckets=SIMILARITY_BUCKETS, registry=r,
        )
        self.shadow_completion_tokens_delta = Histogram(
            "splitstream_shadow_completion_tokens_delta", "Shadow minus primary completion tokens.",
            shadow_labels, buckets=DELTA_BUCKETS, registry=r,
        )
        self.cache_requests_total = Counter(
            "splitstream_cache_requests_total", "Cacheable-route requests by result (hit, miss, bypass, coalesced).",
            ("route", "result"), registry=r,
        )
        self._cache_children: dict[tuple[str, str], Counter] = {}
        self._shadow_drop_children: dict[tuple[str, str], Counter] = {}
        self._request_children: dict[tuple[str, str, str], RequestMetrics] = {}
        self.upstream_errors_total = Counter(
            "splitstream_upstream_errors_total", "Backend failures by reason.", ("backend", "reason"), registry=r
        )
        self.fallbacks_total = Counter(
            "splitstream_fallbacks_total",
            "Requests a route's fallback pool served after the chosen pool could not (reason: its error code).",
            ("route", "from_pool", "to_pool", "reason"), registry=r,
        )
        self.prefix_predicted_tokens_total = Counter(
            "splitstream_prefix_predicted_tokens_total",
            "Prompt tokens least_cost's prefix index predicted a backend's cache held, over requests whose "
            "runtime reported its cached tokens.", ("backend",), registry=r,
        )
        self.prefix_reported_cached_tokens_total = Counter(
            "splitstream_prefix_reported_cached_tokens_total",
            "Prompt tokens the runtime reported its prefix cache held, over the same requests.", ("backend",),
            registry=r,
        )
        self._prefix_children: dict[str, tuple[Counter, Counter]] = {}
        self.rules_reloads_total = Counter(
            "splitstream_rules_reloads_total", "Rule loads by result.", ("result",), registry=r
        )
        self.rules_generation = Gauge(
            "splitstream_rules_generation", "Generation of the running rule snapshot.", registry=r
        )
        self.split_assignments_total = Counter(
            "splitstream_split_assignments_total",
            "Split decisions by source: sticky (found in the store), new (drawn), fallback (store unavailable).",
            ("route", "variant", "source"), registry=r,
        )
        self._assignment_children: dict[tuple[str, str, str], Counter] = {}
        self.health_round = Histogram(
            "splitstream_health_round_seconds", "Duration of one health-check round (due probes, runtime loads).",
            buckets=PROBE_BUCKETS, registry=r,
        )
        self.rollout_step = Gauge(
            "splitstream_rollout_step",
            "Deprecated (removed in the next release): splitstream_rollout_step_ratio, the same share as 0..1.",
            ("route",), registry=r,
        )
        self.rollout_transitions_total = Counter(
            "splitstream_rollout_transitions_total",
            "Rollout transitions: start, advance, hold, rollback, promote (analysis); pause, resume, abort (operator).",
            ("route", "action"), registry=r,
        )
        self.rollout_webhooks_total = Counter(
            "splitstream_rollout_webhooks_total",
            "Rollout webhook deliveries by event and result: delivered, failed (every attempt failed), dropped "
            "(queue full or shutting down).",
            ("route", "event", "result"), registry=r,
        )
        self.stats_flushes_total = Counter(
            "splitstream_stats_flushes_total",
            "Flushes of this replica's per-variant statistics into the shared store by result: ok, dropped "
            "(the store did not answer; that batch's numbers are lost).",
            ("result",), registry=r,
        )
        self._panics = PoolPanics()  # splitstream_upstream_panic_total{pool}
        r.register(self._panics)
        self._register_operator_metrics(r)
        # Tenants (`tenants:` in the rules): label values are tenant names from the rules, never a key.
        self.tenant_requests_total = Counter(
            "splitstream_tenant_requests_total", "Client requests per tenant by route and HTTP status code.",
            ("tenant", "route", "code"), registry=r,
        )
        self.tenant_tokens_total = Counter(
            "splitstream_tenant_tokens_total", "Tokens reported by backends per tenant (prompt, completion).",
            ("tenant", "kind"), registry=r,
        )
        self.ratelimited_total = Counter(
            "splitstream_ratelimited_total", "Requests refused (429) because a tenant was over a limit, by limit.",
            ("tenant", "limit"), registry=r,
        )
        self.tenant_limit_fallbacks_total = Counter(
            "splitstream_tenant_limit_fallbacks_total",
            "Tenant-limit admissions decided in-process because the shared store did not answer (limits then "
            "hold per replica).", registry=r,
        )
        self._tenant_children: dict[tuple[str, str, int], Counter] = {}
        self._tenant_token_children: dict[str, tuple[Counter, Counter]] = {}

    def _register_operator_metrics(self, r: CollectorRegistry) -> None:
        """What operators' standard tools expect: build_info; the process_* and python_info series, which
        prometheus_client puts on its global registry only (these collectors read /proc when scraped, so
        each app's registry has its own); both reload and flush results at 0 from the start, so `increase()`
        sees the first refusal and a store down since startup still has ok flushes to compare with;
        rollout_step's unit-named twin (predicted_load's is in `BackendGauges`); and healthy backends per
        pool (no backend series says which pools a backend serves)."""
        self.build_info = Gauge(
            "splitstream_build_info", "Always 1: the splitstream version and Python version this process runs.",
            ("version", "python"), registry=r,
        )
        self.build_info.labels(build_version(), platform.python_version()).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        for result in RELOAD_RESULTS:
            self.rules_reloads_total.labels(result)
        for result in FLUSH_RESULTS:
            self.stats_flushes_total.labels(result)
        r.register(RolloutStepRatio(self.rollout_step))  # splitstream_rollout_step_ratio{route}
        self._pool_health = PoolHealth()  # splitstream_pool_healthy_backends{pool}
        r.register(self._pool_health)

    def for_request(self, route: str, variant: str, backend: str) -> RequestMetrics:
        """The labelled children for one (route, variant, backend): looked up once, reused per request."""
        key = (route, variant, backend)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = RequestMetrics(self, key)
        return children

    def watch_backends(self, sample: Callable[[], Iterable[BackendSample]]) -> None:
        """Serve the upstream gauges from live backend state at scrape time: no per-request cost."""
        self.registry.register(BackendGauges(sample))
        self._pool_health.sample = sample

    def watch_rules(self, current: Callable[[], Snapshot], depths: Callable[[], Mapping[str, int]],
                    variants: Callable[[Route], Sequence[Variant]] | None = None) -> None:
        """Serve variant_weight and queue_waiting from the running rules and wait queue at scrape time;
        `variants` gives a route's variants with the weights in force (a rollout's), default the rules'."""
        self.registry.register(RuleGauges(current, depths, variants or _configured_variants))
        self._panics.pools = lambda: [pool.name for pool in current().pools]
        self._pool_health.pools = lambda: current().pools

    def count_tenant(self, tenant: str, route: str, status: int, prompt: int | None, completion: int | None) -> None:
        """One finished request of a tenant; children cached per label set (this runs per request)."""
        key = (tenant, route, status)
        child = self._tenant_children.get(key)
        if child is None:
            if len(self._tenant_children) >= MAX_TENANT_CHILDREN:  # statuses are few, but bound the map anyway
                self._tenant_children.clear()
            child = self._tenant_children[key] = self.tenant_requests_total.labels(tenant, route, str(status))
        child.inc()
        if prompt or completion:
            tokens = self._tenant_token_children.get(tenant)
            if tokens is None:
                if len(self._tenant_token_children) >= MAX_TENANT_CHILDREN:
                    self._tenant_token_children.clear()
                tokens = self._tenant_token_children[tenant] = (self.tenant_tokens_total.labels(tenant, "prompt"),
                                                                self.tenant_tokens_total.labels(tenant, "completion"))
            if prompt:
                tokens[0].inc(prompt)
            if completion:
                tokens[1].inc(completion)

    def count_ratelimited(self, tenant: str, limit: str) -> None:
        self.ratelimited_total.labels(tenant, limit).inc()

    def count_assignment(self, route: str, variant: str, source: str) -> None:
        """One split decision; children cached per label set (this runs on every split request)."""
        key = (route, variant, source)
        child = self._assignment_children.get(key)
        if child is None:
            child = self._assignment_children[key] = self.split_assignments_total.labels(*key)
        child.inc()

    def record_reload(self, outcome: ReloadOutcome) -> None:
        """One rules load that swapped (success) or was refused (error); `unchanged` loads are not reloads."""
        self.rules_reloads_total.labels(outcome.result).inc()
        self.rules_generation.set(outcome.generation)

    def record_comparison(self, result: Comparison) -> None:
        labels = (result.route, result.pool)
        self.shadow_comparisons_total.labels(
            *labels, str(result.status_match).lower(), str(result.exact_match).lower()
        ).inc()
        if result.latency_ratio is not None:
            self.shadow_latency_ratio.labels(*labels).observe(result.latency_ratio)
        if result.ttft_ratio is not None:
            self.shadow_ttft_ratio.labels(*labels).observe(result.ttft_ratio)
        if result.similarity is not None:
            self.shadow_similarity.labels(*labels).observe(result.similarity)
        if result.completion_tokens_delta is not None:
            self.shadow_completion_tokens_delta.labels(*labels).observe(result.completion_tokens_delta)

    def count_shadow_drop(self, route: str, pool: str) -> None:
        child = self._shadow_drop_children.get((route, pool))
        if child is None:
            child = self._shadow_drop_children[(route, pool)] = self.shadow_requests_total.labels(route, pool, "dropped")
        child.inc()

    def count_cache(self, route: str, result: str) -> None:
        child = self._cache_children.get((route, result))
        if child is None:
            child = self._cache_children[(route, result)] = self.cache_requests_total.labels(route, result)
        child.inc()

    def count_panic(self, pool: str) -> None:
        """A backend of `pool` was picked in panic (too few of the pool healthy, so health was disregarded);
        called by the dispatcher once per pick, so a retried request counts once per attempt."""
        self._panics.counts[pool] = self._panics.counts.get(pool, 0) + 1

    def count_fallback(self, route: str, from_pool: str, to_pool: str, exc: SplitstreamError) -> None:
        """A request moved from `from_pool` to `to_pool` after `exc` (rare: no child cache)."""
        self.fallbacks_total.labels(route, from_pool, to_pool, exc.code).inc()

    def count_prefix(self, backend: str, predicted: float, reported: int) -> None:
        """One request's predicted against reported cached prompt tokens (the prefix index's accuracy)."""
        children = self._prefix_children.get(backend)
        if children is None:  # backend names come from the rules: bounded
            children = self._prefix_children[backend] = (
                self.prefix_predicted_tokens_total.labels(backend),
                self.prefix_reported_cached_tokens_total.labels(backend),
            )
        children[0].inc(predicted)
        children[1].inc(reported)

    def count_upstream_error(self, backend: str, exc: SplitstreamError) -> None:
        if exc.reason is not None:
            self.upstream_errors_total.labels(backend, exc.reason).inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """Body and content type for GET /metrics (OpenMetrics when the scraper asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class RequestMetrics:
    """Cached metric children of one label set (`labels()` takes a lock and a dict lookup per call)."""

    __slots__ = ("_metrics", "_key", "_by_status", "duration", "ttft", "prompt_tokens", "completion_tokens")

    def __init__(self, metrics: Metrics, key: tuple[str, str, str]) -> None:
        self._metrics = metrics
        self._key = key
        self._by_status: dict[int, Counter] = {}
        self.duration = metrics.request_duration.labels(*key)
        self.ttft = metrics.ttft.labels(*key)
        self.prompt_tokens = metrics.tokens_total.labels(*key, "prompt")
        self.completion_tokens = metrics.tokens_total.labels(*key, "completion")

    def count(self, status: int) -> None:
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = self._metrics.requests_total.labels(*self._key, status_class(status))
        counter.inc()


def _configured_variants(route: Route) -> Sequence[Variant]:
    return route.variants


# (backend name, requests in flight, predicted load, healthy)
BackendSample = tuple[str, int, float, bool]


class BackendGauges:
    """A custom collector: upstream_inflight / _predicted_load_seconds / _healthy read from state when scraped.
    `_predicted_load` (no unit in its name) is served beside `_seconds` for one release, then removed."""

    def __init__(self, sample: Callable[[], Iterable[BackendSample]]) -> None:
        self._sample = sample

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        inflight, load, healthy, load_seconds = self._families()
        for name, n, predicted, is_healthy in self._sample():
            inflight.add_metric([name], n)
            load.add_metric([name], predicted)
            healthy.add_metric([name], 1.0 if is_healthy else 0.0)
            load_seconds.add_metric([name], predicted)
        yield from (inflight, load, healthy, load_seconds)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("splitstream_upstream_inflight", "Requests in flight per backend.", labels=["backend"]),
            GaugeMetricFamily(
                "splitstream_upstream_predicted_load",
                "Deprecated (removed in the next release): splitstream_upstream_predicted_load_seconds.",
                labels=["backend"],
            ),
            GaugeMetricFamily("splitstream_upstream_healthy", "1 when the backend takes traffic.", labels=["backend"]),
            GaugeMetricFamily(
                "splitstream_upstream_predicted_load_seconds",
                "Predicted seconds of in-flight work per backend (what least_cost balances on).", labels=["backend"],
            ),
        )


class RuleGauges:
    """A custom collector: variant_weight (split weights in force, so dashboards can set the traffic share
    beside them) and queue_waiting (requests waiting per pool, 0 when none), read when scraped."""

    def __init__(self, current: Callable[[], Snapshot], depths: Callable[[], Mapping[str, int]],
                 variants: Callable[[Route], Sequence[Variant]]) -> None:
        self._current = current
        self._depths = depths
        self._variants = variants

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        weight, waiting = self._families()
        snapshot = self._current()
        for route in snapshot.routes:
            for variant in self._variants(route):
                weight.add_metric([route.name, variant.name], variant.weight)
        depths = dict(self._depths())
        for pool in snapshot.pools:
            waiting.add_metric([pool.name], depths.pop(pool.name, 0))
        for name, n in depths.items():  # a pool that a reload removed while requests still wait in it
            waiting.add_metric([name], n)
        yield from (weight, waiting)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "splitstream_variant_weight",
                "Split weight of each route variant in force (relative): the rules', or a running rollout's.",
                labels=["route", "variant"],
            ),
            GaugeMetricFamily(
                "splitstream_queue_waiting", "Requests waiting for a backend slot per pool.", labels=["pool"]
            ),
        )


class PoolPanics:
    """A custom collector: upstream_panic_total, requests a pool routed disregarding health because fewer than
    `health.panic_threshold` % of its backends were healthy (Envoy's panic routing, `pipeline/balancer.py`),
    counted by `Metrics.count_panic`. Every pool of the running rules (once `watch_rules` named them) has a
    series from the start, 0 until it panics, so `increase()` sees the first panic; a pool a reload removed
    keeps what it counted."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}  # pool name (from the rules) -> panics
        self.pools: Callable[[], Iterable[str]] = lambda: ()

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        counts = dict(self.counts)
        for name in self.pools():
            family.add_metric([name], counts.pop(name, 0))
        for name, n in counts.items():
            family.add_metric([name], n)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "splitstream_upstream_panic",
            "Requests routed disregarding health, because too few of their pool's backends were healthy.",
            labels=["pool"],
        )


class RolloutStepRatio:
    """A custom collector: rollout_step_ratio, the candidate's share as a ratio (0..1, the base unit), read
    from the `rollout_step` gauge (percent) when scraped, so the controller keeps setting one gauge and the
    two can never disagree."""

    def __init__(self, percent: Gauge) -> None:
        self._percent = percent

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for source in self._percent.collect():
            for sample in source.samples:
                family.add_metric([sample.labels["route"]], sample.value / 100)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "splitstream_rollout_step_ratio",
            "Candidate's share of its route's traffic (0..1) as this replica applies it.", labels=["route"],
        )


class PoolHealth:
    """A custom collector: pool_healthy_backends, per pool of the running rules the backends that take
    traffic (healthy, not ejected), read from the rules and backend state when scraped. `pools` and `sample`
    are set by `Metrics.watch_rules` and `watch_backends` (`app.py` calls both); no pools named, no series."""

    def __init__(self) -> None:
        self.pools: Callable[[], Iterable[Pool]] = lambda: ()
        self.sample: Callable[[], Iterable[BackendSample]] = lambda: ()

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        healthy = {name for name, _, _, is_healthy in self.sample() if is_healthy}
        for pool in self.pools():
            family.add_metric([pool.name], sum(1 for backend in pool.backends if backend.name in healthy))
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "splitstream_pool_healthy_backends",
            "Backends of each pool that take traffic (healthy, not ejected), as this replica sees them.",
            labels=["pool"],
        )


METRICS = web.AppKey("METRICS", Metrics)
