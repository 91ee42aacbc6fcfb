"""The per-request record: filled in along the path, written once at the end as one log line and metrics.

Holds ids, names, sizes, timings and token counts — never prompt or completion text. Created and
finished by the error middleware (`pipeline/middleware.py`) through one `Recorder`, so every request is
recorded exactly once, whichever way it ended (answer, error, client gone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.errors import TenantLimitError
from proxy.observe.feedback import FeedbackLedger
from proxy.observe.logs import AccessLog
from proxy.observe.metrics import Metrics, status_class
from proxy.observe.stats import RequestStats, is_variant_error
from proxy.observe.tracing import OPERATIONS, Tracing
from proxy.observe.usage import TenantUsage

TRACED_PATHS = frozenset(OPERATIONS)  # the inference paths: one span each when tracing is on
NONE = "none"  # label value when a request ended before a route/variant/backend was chosen

# Status logged for a client that went away before the answer was complete (nginx's convention).
CLIENT_CLOSED = 499


class RequestRecord:
    """Mutable facts about one request; label fields default to NONE until the pipeline knows them."""

    __slots__ = (
        "request_id", "method", "path", "started", "route", "variant", "backend", "status",
        "bytes_in", "bytes_out", "prompt_tokens", "completion_tokens", "ttft", "stream", "error", "attempts",
        "cache", "splitstream_id", "owner", "tenant", "client",
        "limit_headers", "fallback", "model", "span", "upstream_trace", "cached_tokens", "runtime_prefill_ms",
        "runtime_decode_ms",
    )

    def __init__(self, request_id: str, method: str, path: str, started: float) -> None:
        self.request_id = request_id  # X-Request-Id: the client's when it sent a sane one (tracing), else ours
        self.splitstream_id = request_id  # the id splitstream generated (feedback joins are keyed by it)
        # Whose answer it is (feedback ownership, cache partition): `cache_policy.owner_of`, once routed.
        self.owner = ""
        self.tenant = ""  # the tenant's name from the rules (`tenants:`), '' when the proxy has no tenants
        self.client = ""  # the TCP peer's address (never X-Forwarded-For: a client can write that)
        self.limit_headers: tuple[tuple[str, str], ...] = ()  # a limited tenant's x-ratelimit-* answer headers
        self.method = method
        self.path = path
        self.started = started
        self.route = NONE
        self.variant = NONE
        self.backend = NONE
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens: int | None = None  # prompt tokens the runtime's prefix cache held, when it says
        self.runtime_prefill_ms: float | None = None  # the runtime's own timings, when it reports them
        self.runtime_decode_ms: float | None = None
        self.ttft: float | None = None
        self.stream = False
        self.error: str | None = None  # error code, never a message that could echo client text
        self.attempts = 0
        self.cache: str | None = None  # hit | miss | bypass | coalesced, on routes with a cache
        # The route's fallback pool that took the request when its variant's pool could not answer: the
        # client was rescued, the variant still failed (`stats.record(rescued=)`).
        self.fallback: str | None = None
        self.model: str | None = None  # the model the client asked for, once parsed (tracing)
        self.span: Any = None  # the OpenTelemetry span when tracing is on (`observe/tracing.py`)
        self.upstream_trace: str | None = None  # that span's trace header lines, for the runtime


def is_evidence(record: RequestRecord) -> bool:
    """Whether a request says something about its variant (the A/B statistics and rollouts count only
    these): it was answered, or failed in a way its upstream is answerable for. A refusal by the proxy
    (429, 413, ...) or a client that left would otherwise let any client dilute a variant's error rate
    and feed it fast latency samples; the Prometheus series still count every request."""
    return record.status != CLIENT_CLOSED and (record.error is None or is_variant_error(record.error))


class Recorder:
    """Where finished requests go: metrics, per-variant statistics, the feedback ledger, the access log."""

    __slots__ = ("metrics", "access_log", "stats", "feedback", "usage", "tracing")

    def __init__(
        self, metrics: Metrics, access_log: AccessLog, stats: RequestStats, feedback: FeedbackLedger,
        usage: TenantUsage | None = None, tracing: Tracing | None = None,
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.stats = stats
        self.feedback = feedback
        self.usage = usage  # per-tenant numbers for /admin/tenants (None: nobody reads them)
        self.tracing = tracing  # OpenTelemetry spans, when configured (None: off)

    def begin(self, record: RequestRecord, headers: Mapping[str, str]) -> None:
        """A request arrived: its span, when tracing is on."""
        if self.tracing is not None and record.path in TRACED_PATHS:
            record.span, record.upstream_trace = self.tracing.begin(record.path, headers)

    def finish(self, record: RequestRecord, now: float) -> None:
        """Write the request metrics, the per-variant statistics (status pages, rollouts), the request's
        variant for later feedback, and the access-log line."""
        duration = now - record.started
        if record.route is not NONE:
            if is_evidence(record):
                rescued = record.fallback is not None
                self.stats.record(record.route, record.variant, duration, record.ttft,
                                  rescued or is_variant_error(record.error), record.prompt_tokens,
                                  record.completion_tokens, rescued)
            self.feedback.remember(record.splitstream_id, record.route, record.variant, record.owner)
            children = self.metrics.for_request(record.route, record.variant, record.backend)
            children.count(record.status)
            children.duration.observe(duration)
            if record.ttft is not None:
                children.ttft.observe(record.ttft)
            if record.prompt_tokens:
                children.prompt_tokens.inc(record.prompt_tokens)
            if record.completion_tokens:
                children.completion_tokens.inc(record.completion_tokens)
        elif record.path.startswith("/v1/"):
            self.metrics.requests_total.labels(NONE, NONE, NONE, status_class(record.status)).inc()
        if record.tenant:
            self.metrics.count_tenant(record.tenant, record.route, record.status, record.prompt_tokens,
                                      record.completion_tokens)
            if self.usage is not None:
                self.usage.record(record.tenant, (record.prompt_tokens or 0) + (record.completion_tokens or 0),
                                  record.error == TenantLimitError.code)
        if record.span is not None:
            self._end_span(record)
        access_log = self.access_log
        if access_log.enabled and record.path not in access_log.skipped_paths:
            # The README's "Logs" table is this line's schema: keep them together. Absent values are null
            # (metrics keep NONE: a label needs a string). `request_id` stays first: bench/ picks access lines
            # out of a mixed stderr by that prefix.
            access_log.write({
                "request_id": record.request_id,
                "ts": access_log.timestamp(),
                "level": "info",
                "msg": "request",
                "splitstream_id": record.splitstream_id,
                "client": record.client or None,
                "tenant": record.tenant or None,
                "method": record.method,
                "path": record.path,
                "route": None if record.route is NONE else record.route,
                "variant": None if record.variant is NONE else record.variant,
                "backend": None if record.backend is NONE else record.backend,
                "status": record.status,
                "stream": record.stream,
                "bytes_in": record.bytes_in,
                "bytes_out": record.bytes_out,
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "cached_tokens": record.cached_tokens,
                "ttft_ms": None if record.ttft is None else round(record.ttft * 1000, 3),
                "duration_ms": round(duration * 1000, 3),
                "attempts": record.attempts,
                "cache": record.cache,
                "fallback": record.fallback,
                "error": record.error,
            })

    def _end_span(self, record: RequestRecord) -> None:
        assert self.tracing is not None
        self.tracing.end(record.span, {
            "gen_ai.operation.name": record.span.name,
            "gen_ai.request.model": record.model,
            "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens,
            "http.response.status_code": record.status,
            "error.type": record.error,
            "splitstream.request_id": record.splitstream_id,
            "splitstream.route": None if record.route is NONE else record.route,
            "splitstream.variant": None if record.variant is NONE else record.variant,
            "splitstream.backend": None if record.backend is NONE else record.backend,
            "splitstream.tenant": record.tenant or None,
            "splitstream.fallback": record.fallback,
            "splitstream.cache": record.cache,
        }, record.model, record.status >= 500 or record.error is not None)
