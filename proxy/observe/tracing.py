"""Optional OpenTelemetry tracing: one span per client request, with the GenAI semantic-convention attributes.

Off unless the `otel` extra is installed (`pip install 'splitstream[otel]'`: opentelemetry-sdk and the
OTLP/HTTP exporter) and `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set; the standard
`OTEL_*` variables configure the rest (service name, batch delays, headers). When off, `from_env` returns None
and the request path pays one `is None` check; the SDK is never imported.

When on, the error middleware begins a span as a request arrives — a child of the client's `traceparent` if it
sent one — and the runtime gets *that* span as its parent (`RequestRecord.upstream_trace`, used by
`pipeline/forward.py` instead of the client's trace headers), so a runtime's own spans hang under the proxy's.
`Recorder.finish` sets the attributes (model, token usage, route, variant, backend, status) and ends it.
Spans are exported in batches by the SDK's own thread, never on the event loop. Never prompt or completion text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("splitstream.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# gen_ai.operation.name per client path: the convention's names where it has one, the endpoint's otherwise.
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/rerank": "rerank",
    "/v1/score": "score",
}


class Tracing:
    """The tracer and what it needs to begin and end request spans. Built by `from_env` only."""

    __slots__ = ("_tracer", "_provider", "_propagator", "_kind", "_status", "_status_error")

    def __init__(self, tracer: Any, provider: Any, propagator: Any, kind: Any, status: Any, status_error: Any) -> None:
        self._tracer = tracer
        self._provider = provider
        self._propagator = propagator
        self._kind = kind
        self._status = status
        self._status_error = status_error

    def begin(self, path: str, headers: Mapping[str, str]) -> tuple[Any, str]:
        """A started span for a request to `path` (the client's trace its parent, if it sent one), and the
        trace header lines a runtime should get for it."""
        parent = self._propagator.extract(carrier=headers)
        span = self._tracer.start_span(OPERATIONS.get(path, "request"), context=parent, kind=self._kind)
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=_context_of(span))
        return span, "".join(f"{name}: {value}\r\n" for name, value in carrier.items())

    def end(self, span: Any, attributes: dict[str, Any], model: str | None, failed: bool) -> None:
        operation = span.name
        if model:
            span.update_name(f"{operation} {model}")
        span.set_attributes({key: value for key, value in attributes.items() if value is not None})
        if failed:
            span.set_status(self._status(self._status_error))
        span.end()

    def shutdown(self) -> None:
        """Flush what is batched and stop the exporter (blocking: call it off the event loop)."""
        self._provider.shutdown()


def _context_of(span: Any) -> Any:
    from opentelemetry import trace

    return trace.set_span_in_context(span)


def from_env(env: Mapping[str, str], version: str) -> Tracing | None:
    """Tracing as the environment asks for it, or None (no endpoint set, OTEL_SDK_DISABLED, or the extra is
    not installed — then a warning says how to install it)."""
    if not any(env.get(name) for name in ENDPOINT_VARIABLES):
        return None
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: no spans are "
                    "exported (install the extra: pip install 'splitstream[otel]')")
        return None
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or "splitstream",
                                "service.version": version})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = provider.get_tracer("splitstream", version)
    log.info("tracing: one span per request, exported over OTLP/HTTP")
    return Tracing(tracer, provider, TraceContextTextMapPropagator(), SpanKind.SERVER, Status, StatusCode.ERROR)
