"""The metric contract of shared/DESIGN.md (prefix `splitstream_`): names and labels here, nowhere else.

Each app gets its own `CollectorRegistry`, so several proxies can live in one test process. Label values
are closed sets taken from the rules (route, variant, backend names) or fixed vocabularies (status class,
error reason, token kind) — never a client-supplied string.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from proxy.errors import SplitstreamError

# LLM requests take from milliseconds (cache hits, embeddings) to minutes (long generations).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
# Time to first token: sub-millisecond (cached) to tens of seconds (long prompts, queued runtimes).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

REQUEST_LABELS = ("route", "variant", "backend")


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    """All metric objects of one app, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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
        self.upstream_inflight = Gauge(
            "splitstream_upstream_inflight", "Requests in flight per backend.", ("backend",), registry=r
        )
        self.upstream_predicted_load = Gauge(
            "splitstream_upstream_predicted_load", "Predicted cost of in-flight work per backend.", ("backend",),
            registry=r,
        )
        self.upstream_healthy = Gauge(
            "splitstream_upstream_healthy", "1 when the backend takes traffic.", ("backend",), registry=r
        )
        self.upstream_errors_total = Counter(
            "splitstream_upstream_errors_total", "Backend failures by reason.", ("backend", "reason"), registry=r
        )
        self.rules_reloads_total = Counter(
            "splitstream_rules_reloads_total", "Rule loads by result.", ("result",), registry=r
        )
        self.rules_generation = Gauge(
            "splitstream_rules_generation", "Generation of the running rule snapshot.", registry=r
        )

    def count_upstream_error(self, backend: str, exc: SplitstreamError) -> None:
        if exc.reason is not None:
            self.upstream_errors_total.labels(backend, exc.reason).inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """Body and content type for GET /metrics (OpenMetrics when the scraper asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
