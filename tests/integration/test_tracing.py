"""Issue 19 item 6: with OpenTelemetry configured, one span per request with the GenAI attributes, exported over
OTLP/HTTP to a collector (here a small real HTTP server decoding what the SDK's exporter sends), a child of the
client's trace, and the parent of what the runtime does; without it, nothing is exported and the client's own
trace context is what the runtime gets.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import simple_rules

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


class Collector:
    """An OTLP/HTTP trace receiver: every exported span, decoded."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.arrived = asyncio.Event()

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        self.arrived.set()
        return web.Response(body=b"", content_type="application/x-protobuf")


def attributes(span: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in span.attributes:
        value = item.value
        found[item.key] = value.string_value if value.HasField("string_value") else value.int_value
    return found


async def test_one_span_per_request_with_genai_attributes(
    sim: Any, proxy: Any, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.traces)
    server = await aiohttp_server(app)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # milliseconds between batches (the default is 5 s)
    runtime, runtime_server = await sim()
    handle = await proxy(simple_rules(runtime_server))
    api = openai.AsyncOpenAI(base_url=handle.url("/v1"), api_key="x", max_retries=0,
                             default_headers={"traceparent": TRACEPARENT})
    answer = await api.chat.completions.create(model="my-model", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
    await asyncio.wait_for(collector.arrived.wait(), 30)
    [span] = collector.spans
    assert span.name == "chat my-model"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == CLIENT_SPAN  # the client's child
    seen = attributes(span)
    assert answer.usage is not None
    assert seen["gen_ai.operation.name"] == "chat" and seen["gen_ai.request.model"] == "my-model"
    assert seen["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert seen["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert (seen["splitstream.route"], seen["splitstream.variant"], seen["splitstream.backend"]) == (
        "main", "main-pool", "b0")
    assert seen["http.response.status_code"] == 200
    assert not any("content" in key or "prompt" in key for key in seen)  # numbers and names, never text
    # The runtime's parent is the proxy's span, in the client's trace.
    assert runtime.last_headers is not None
    assert runtime.last_headers["traceparent"] == f"00-{TRACE_ID}-{span.span_id.hex()}-01"


async def test_off_without_an_endpoint(sim: Any, proxy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    runtime, runtime_server = await sim()
    handle = await proxy(simple_rules(runtime_server))
    api = openai.AsyncOpenAI(base_url=handle.url("/v1"), api_key="x", max_retries=0,
                             default_headers={"traceparent": TRACEPARENT})
    await api.chat.completions.create(model="my-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert runtime.last_headers is not None
    assert runtime.last_headers["traceparent"] == TRACEPARENT  # passed on as the client sent it
