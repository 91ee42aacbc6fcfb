"""The proxy core end to end: real splitstream, real simulated runtimes, the real openai SDK as client."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.pipeline.handler import READINESS_MAX_AGE
from tests.conftest import FakeClock, Gate, backend_url, simple_rules

MESSAGES = [{"role": "user", "content": "Tell me about canaries."}]


async def read_events(response: aiohttp.ClientResponse) -> list[bytes]:
    """All SSE events of a response, as raw `data:`/`event:` blocks."""
    raw = await response.read()
    return [e for e in raw.split(b"\n\n") if e]


async def test_chat_matches_the_runtime_exactly(sim: Any, proxy: Any) -> None:
    runtime, server = await sim(models=["sim-model"])
    handle = await proxy(simple_rules(server))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="client-secret")
    direct = openai.AsyncOpenAI(base_url=f"{backend_url(server)}/v1", api_key="x")
    via = await client.chat.completions.with_raw_response.create(
        model="my-model", messages=MESSAGES, temperature=0, max_tokens=12
    )
    completion = via.parse()
    # The model was renamed for the runtime; nothing else in the body changed; the client's key stayed home.
    assert runtime.last_body["model"] == "sim-model"
    assert runtime.last_body["messages"] == MESSAGES and runtime.last_body["max_tokens"] == 12
    assert "authorization" not in {k.lower() for k in runtime.last_headers}
    expected = await direct.chat.completions.create(model="sim-model", messages=MESSAGES, temperature=0, max_tokens=12)
    assert completion.choices[0].message.content == expected.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert via.headers["x-splitstream-route"] == "main"
    assert via.headers["x-splitstream-variant"] == "main-pool"
    assert via.headers["x-request-id"]


async def test_backend_key_replaces_client_key(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(simple_rules(server, backend_extra=", api_key_env: SIM_KEY"), env={"SIM_KEY": "backend-key"})
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="client-secret")
    await client.chat.completions.create(model="my-model", messages=MESSAGES)
    assert runtime.last_headers.get("Authorization") == "Bearer backend-key"


async def test_request_id_honoured_and_generated(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(simple_rules(server))
    body = {"model": "my-model", "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/chat/completions"), json=body, headers={"X-Request-Id": "abc-123"}) as r:
            assert r.status == 200 and r.headers["x-request-id"] == "abc-123"
        assert runtime.last_headers.get("X-Request-Id") == "abc-123"
        async with session.post(handle.url("/v1/chat/completions"), json=body) as r:
            generated = r.headers["x-request-id"]
        assert generated and generated != "abc-123"
        assert runtime.last_headers.get("X-Request-Id") == generated


@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_usage_injected_and_stripped(sim: Any, proxy: Any, include_usage: bool) -> None:
    runtime, server = await sim()
    handle = await proxy(simple_rules(server))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await client.chat.completions.create(
        model="my-model", messages=MESSAGES, stream=True, max_tokens=7, temperature=0, **kwargs
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert runtime.last_body["stream_options"] == {"include_usage": True}  # always asked upstream
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0].usage.completion_tokens == 7
    else:
        assert usage_chunks == []
    direct = openai.AsyncOpenAI(base_url=f"{backend_url(server)}/v1", api_key="x")
    expected = await direct.chat.completions.create(model="sim-model", messages=MESSAGES, max_tokens=7, temperature=0)
    assert text == expected.choices[0].message.content
    # Tokens were recorded either way.
    async with aiohttp.ClientSession() as session, session.get(handle.url("/metrics")) as metrics:
        exposition = await metrics.text()
    assert 'splitstream_tokens_total{backend="b0",kind="completion",route="main",variant="main-pool"} 7.0' in exposition


async def test_stream_is_relayed_unbuffered(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    handle = await proxy(simple_rules(server))
    body = {"model": "my-model", "messages": MESSAGES, "stream": True, "max_tokens": 3}
    gate.open(0)
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/chat/completions"), json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 30)
            # The runtime has not been allowed to produce token 1 yet, and the client already holds token 0.
            assert not gate._event(gate._events, 1).is_set()
            assert first.startswith(b"data: ") and b'"role":"assistant"' in first.replace(b" ", b"")
            gate.open(1)
            second = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 30)
            assert b'"content"' in second and b'"role"' not in second
            gate.open(2)
            rest = await response.read()
    assert rest.rstrip().endswith(b"data: [DONE]")


async def test_client_disconnect_cancels_upstream(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    handle = await proxy(simple_rules(server))
    body = {"model": "my-model", "messages": MESSAGES, "stream": True, "max_tokens": 50}
    gate.open(0)
    async with aiohttp.ClientSession() as session:
        response = await session.post(handle.url("/v1/chat/completions"), json=body)
        await response.content.readuntil(b"\n\n")
        await gate.wait_reached(1)  # the runtime is now holding token 1 for us
        response.close()  # client goes away mid-stream
        await asyncio.wait_for(runtime.cancelled_event.wait(), 30)
    assert runtime.stats.cancelled == 1
    assert runtime.stats.running == 0


async def test_sync_client_streaming_and_not(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(simple_rules(server))

    def use_sync_sdk() -> tuple[str, str]:
        client = openai.OpenAI(base_url=handle.base_url, api_key="k")
        whole = client.chat.completions.create(model="my-model", messages=MESSAGES, temperature=0, max_tokens=5)
        parts = client.chat.completions.create(
            model="my-model", messages=MESSAGES, temperature=0, max_tokens=5, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        return whole.choices[0].message.content or "", streamed

    whole, streamed = await asyncio.to_thread(use_sync_sdk)
    assert whole == streamed and len(whole.split()) == 5


async def test_completions_and_embeddings_and_models(sim: Any, proxy: Any) -> None:
    runtime, server = await sim(models=["sim-model", "sim-embed"], embedding_dim=8)
    rules = simple_rules(server) + """
  - name: embed
    match: {model: "text-embedding-*", endpoints: [embeddings]}
    pool: embed-pool
"""
    rules = rules.replace("pools:\n", 'pools:\n  embed-pool: {backends: [b0], model: "sim-embed"}\n')
    handle = await proxy(rules)
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    completion = await client.completions.create(model="my-model", prompt="Once upon", max_tokens=4)
    assert completion.usage.completion_tokens == 4 and completion.choices[0].text
    embedding = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 8
    assert runtime.last_body["model"] == "sim-embed"
    models = await client.models.list()
    assert [m.id for m in models.data] == ["my-model"]


async def test_health_and_readiness(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    clock = FakeClock()
    handle = await proxy(simple_rules(server), backend_clock=clock)
    async with aiohttp.ClientSession() as session:
        async with session.get(handle.url("/healthz")) as r:
            assert r.status == 200
        async with session.get(handle.url("/readyz")) as r:
            assert r.status == 200 and (await r.json())["status"] == "ready"
        await server.close()
        clock.advance(READINESS_MAX_AGE)  # the previous answer is too old to reuse
        async with session.get(handle.url("/readyz")) as r:
            assert r.status == 503 and (await r.json())["routes_without_backend"] == ["main"]


async def test_access_log_has_numbers_not_text(sim: Any, aiohttp_server: Any, tmp_path: Any) -> None:
    import io

    from proxy.app import build_app
    from proxy.config.loader import load_rules
    from proxy.observe.logs import AccessLog

    runtime, server = await sim()
    (tmp_path / "r.yaml").write_text(simple_rules(server))
    sink = io.BytesIO()
    log = AccessLog(sink)
    log.enabled = True
    app = build_app(load_rules(tmp_path), access_log=log)
    proxy_server = await aiohttp_server(app)
    secret = "my very private prompt"
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{proxy_server.port}/v1", api_key="sk-client-key")
    answer = await client.chat.completions.create(
        model="my-model", messages=[{"role": "user", "content": secret}], max_tokens=6
    )
    stream = await client.chat.completions.create(
        model="my-model", messages=[{"role": "user", "content": secret}], max_tokens=4, stream=True
    )
    [c async for c in stream]
    await proxy_server.close()  # flushes the access log
    lines = [orjson.loads(line) for line in sink.getvalue().splitlines()]
    assert [line["stream"] for line in lines] == [False, True]
    first, second = lines
    assert first["status"] == 200 and first["route"] == "main" and first["backend"] == "b0"
    assert first["completion_tokens"] == 6 and first["prompt_tokens"] > 0 and first["bytes_in"] > 0
    assert second["completion_tokens"] == 4 and second["ttft_ms"] is not None
    raw = sink.getvalue().decode()
    assert secret not in raw and "sk-client-key" not in raw
    assert (answer.choices[0].message.content or "x") not in raw


async def test_metric_contract_names(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(simple_rules(server))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=3)
    stream = await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=3, stream=True)
    [c async for c in stream]
    async with aiohttp.ClientSession() as session, session.get(handle.url("/metrics")) as r:
        text = await r.text()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    labels = (("backend", "b0"), ("route", "main"), ("variant", "main-pool"))

    def value(name: str, *extra: tuple[str, str]) -> float:
        return samples[(name, tuple(sorted(labels + extra)))]

    assert value("splitstream_requests_total", ("status", "2xx")) == 2
    assert value("splitstream_request_duration_seconds_count") == 2
    assert value("splitstream_time_to_first_token_seconds_count") == 1
    assert value("splitstream_tokens_total", ("kind", "completion")) == 6
    assert value("splitstream_tokens_total", ("kind", "prompt")) > 0
    for gauge, expected in [("inflight", 0), ("predicted_load", 0), ("healthy", 1)]:
        assert samples[(f"splitstream_upstream_{gauge}", (("backend", "b0"),))] == expected
    assert samples[("splitstream_rules_generation", ())] == 1
    assert "# TYPE splitstream_upstream_errors_total counter" in text
