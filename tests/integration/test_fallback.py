"""Issue 18: a request its pool cannot answer goes to the route's fallback pools before the client sees an
error — never after the first byte — and experiments stay honest about the variant that failed.

Real sockets throughout: splitstream, simulated runtimes (one of them dead: a closed port), the `openai` SDK
as the client. A pool "cannot answer" when it has no healthy backend, its queue is full, every try failed
before the first byte (connect error, 5xx, 429, first-token timeout), or a runtime refused the prompt as
longer than its context.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections import Counter
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.delivery.controller import RolloutSettings
from tests.conftest import FakeClock, Gate, ProxyHandle, backend_url

MESSAGES = [{"role": "user", "content": "hi"}]


def closed_port_url() -> str:
    """A loopback URL nothing listens on (bound, then closed: connecting is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def rules(primary_url: str, fallback: TestServer, route_extra: str = "", primary_extra: str = "",
          server_block: str = "") -> str:
    """Route `chat` (model my-model) on pool `primary` (model sim-model), falling back to pool `hosted`
    (model hosted-model, another runtime)."""
    return f"""
{server_block}
backends:
  primary-1: {{url: "{primary_url}", kind: vllm{primary_extra}}}
  hosted-1: {{url: "{backend_url(fallback)}", kind: openai}}
pools:
  primary: {{backends: [primary-1], model: sim-model}}
  hosted: {{backends: [hosted-1], model: hosted-model}}
routes:
  - name: chat
    match: {{model: my-model}}
    pool: primary
    fallback: [primary, hosted]
{route_extra}
"""


async def models(request: web.Request) -> web.Response:
    """A hosted provider's health probe answer (`kind: openai` probes GET /v1/models)."""
    return web.json_response({"object": "list", "data": []})


def client(handle: ProxyHandle) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=handle.url("/v1"), api_key="unused", max_retries=0)


def samples(handle: ProxyHandle, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for family in handle.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found.append((sample.labels, sample.value))
    return found


def fallbacks(handle: ProxyHandle) -> Counter[tuple[str, str, str, str]]:
    return Counter({(labels["route"], labels["from_pool"], labels["to_pool"], labels["reason"]): int(value)
                    for labels, value in samples(handle, "splitstream_fallbacks_total")})


async def test_a_dead_pool_falls_back_with_zero_client_errors(sim: Any, proxy: Any) -> None:
    hosted, hosted_server = await sim(models=("hosted-model",))
    handle = await proxy(rules(closed_port_url(), hosted_server))
    api = client(handle)
    answered = 0
    for i in range(20):
        stream = i % 2 == 1
        if stream:
            response = await api.chat.completions.with_raw_response.create(
                model="my-model", messages=MESSAGES, max_tokens=3, stream=True)
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in response.parse()
                            if chunk.choices])
        else:
            response = await api.chat.completions.with_raw_response.create(
                model="my-model", messages=MESSAGES, max_tokens=3)
            text = response.parse().choices[0].message.content or ""
        assert response.headers["x-splitstream-fallback"] == "hosted"
        assert response.headers["x-splitstream-backend"] == "hosted-1"
        assert response.headers["x-splitstream-variant"] == "primary"
        assert text
        answered += 1
    assert answered == 20
    assert hosted.stats.requests == 20
    assert hosted.last_body is not None and hosted.last_body["model"] == "hosted-model"  # rewritten for its pool
    moved = fallbacks(handle)
    assert sum(moved.values()) == 20
    assert {key[:3] for key in moved} == {("chat", "primary", "hosted")}
    # First the connect errors; once the dead backend is ejected, its pool has no healthy backend left.
    assert set(key[3] for key in moved) <= {"backend_unreachable", "no_healthy_backend"}
    assert moved[("chat", "primary", "hosted", "backend_unreachable")] >= 1


async def test_no_fallback_configured_still_fails_clearly(sim: Any, proxy: Any) -> None:
    _, hosted_server = await sim(models=("hosted-model",))
    text = rules(closed_port_url(), hosted_server).replace("    fallback: [primary, hosted]\n", "")
    handle = await proxy(text)
    with pytest.raises(openai.APIStatusError) as caught:
        await client(handle).chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=3)
    assert caught.value.status_code == 502
    assert caught.value.response.json()["error"]["code"] == "backend_unreachable"
    assert "x-splitstream-fallback" not in caught.value.response.headers


async def test_first_token_timeout_falls_back_before_any_byte(sim: Any, proxy: Any) -> None:
    gate = Gate()  # the primary never reaches its first token until the test opens it
    primary, primary_server = await sim(pacer=gate)
    hosted, hosted_server = await sim(models=("hosted-model",))
    route_extra = "    timeouts: {first_token: 300ms}\n    retry: {attempts: 1}"
    handle = await proxy(rules(backend_url(primary_server), hosted_server, route_extra=route_extra))
    try:
        response = await client(handle).chat.completions.with_raw_response.create(
            model="my-model", messages=MESSAGES, max_tokens=3, stream=True)
        chunks = [chunk async for chunk in response.parse()]
    finally:
        gate.open_all()
    assert response.headers["x-splitstream-fallback"] == "hosted"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert primary.stats.requests == 1 and hosted.stats.requests == 1
    assert fallbacks(handle) == Counter({("chat", "primary", "hosted", "backend_timeout"): 1})


async def test_a_stream_cut_after_its_first_byte_never_falls_back(sim: Any, proxy: Any) -> None:
    """Once a token reached the client, the answer is the primary's: a cut ends it with the SSE error event,
    never a second answer spliced in."""
    primary, primary_server = await sim(stream_fail_rate=1.0, ttft_ms=0, tokens_per_second=0)
    hosted, hosted_server = await sim(models=("hosted-model",))
    handle = await proxy(rules(backend_url(primary_server), hosted_server))
    body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 8, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/chat/completions"), json=body) as response:
            assert response.status == 200
            assert "x-splitstream-fallback" not in response.headers
            text = (await response.read()).decode()
    assert primary.stats.cut == 1
    assert text.count("data: {") >= 2  # tokens, then the error event
    assert "event: error" in text and text.rstrip().endswith("}")
    assert "[DONE]" not in text
    assert hosted.stats.requests == 0
    assert fallbacks(handle) == Counter()


async def test_a_context_length_refusal_moves_to_the_next_pool(sim: Any, proxy: Any) -> None:
    primary, primary_server = await sim(max_context=64)  # a short-context model: long prompts do not fit
    hosted, hosted_server = await sim(models=("hosted-model",))
    handle = await proxy(rules(backend_url(primary_server), hosted_server))
    api = client(handle)
    short = await api.chat.completions.with_raw_response.create(model="my-model", messages=MESSAGES, max_tokens=4)
    assert "x-splitstream-fallback" not in short.headers and hosted.stats.requests == 0
    long_prompt = [{"role": "user", "content": "word " * 400}]
    long = await api.chat.completions.with_raw_response.create(model="my-model", messages=long_prompt, max_tokens=4)
    assert long.headers["x-splitstream-fallback"] == "hosted"
    assert long.parse().choices[0].message.content
    assert fallbacks(handle) == Counter({("chat", "primary", "hosted", "context_length_exceeded"): 1})
    # The refusal is the request's size, not the runtime's health: nothing counted against the backend.
    assert not [v for labels, v in samples(handle, "splitstream_upstream_errors_total")
                if labels["backend"] == "primary-1"]


async def test_without_a_fallback_the_runtimes_context_error_reaches_the_client(sim: Any, proxy: Any) -> None:
    _, primary_server = await sim(max_context=64)
    _, hosted_server = await sim(models=("hosted-model",))
    text = rules(backend_url(primary_server), hosted_server).replace("    fallback: [primary, hosted]\n", "")
    handle = await proxy(text)
    with pytest.raises(openai.BadRequestError) as caught:
        await client(handle).chat.completions.create(
            model="my-model", messages=[{"role": "user", "content": "word " * 400}], max_tokens=4)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 64 tokens" in caught.value.message


async def test_a_full_queue_falls_back(sim: Any, proxy: Any) -> None:
    gate = Gate()
    primary, primary_server = await sim(pacer=gate)
    hosted, hosted_server = await sim(models=("hosted-model",))
    handle = await proxy(rules(backend_url(primary_server), hosted_server, primary_extra=", max_inflight: 1",
                               server_block="server: {max_queue: 0}"))
    api = client(handle)
    first = asyncio.create_task(api.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2))
    await gate.wait_reached(0)  # the primary's only slot is taken
    second = await api.chat.completions.with_raw_response.create(model="my-model", messages=MESSAGES, max_tokens=2)
    gate.open_all()
    await first
    assert second.headers["x-splitstream-fallback"] == "hosted"
    assert fallbacks(handle) == Counter({("chat", "primary", "hosted", "overloaded"): 1})


async def test_a_throttling_runtime_falls_back_and_its_retry_after_is_honoured(
    sim: Any, proxy: Any, aiohttp_server: Any
) -> None:
    """A hosted OpenAI-compatible provider (`kind: openai`) as the primary: it gets the backend's own key as
    Bearer (never the client's), and its 429 + Retry-After benches it while the fallback serves."""
    throttled = 0
    keys: list[str | None] = []

    async def throttle(request: web.Request) -> web.Response:
        nonlocal throttled
        throttled += 1
        keys.append(request.headers.get("Authorization"))
        body = {"error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}
        return web.json_response(body, status=429, headers={"Retry-After": "120"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", throttle)
    app.router.add_get("/v1/models", models)
    provider = await aiohttp_server(app)
    hosted, hosted_server = await sim(models=("hosted-model",))
    text = rules(backend_url(provider), hosted_server, route_extra="    retry: {attempts: 1}",
                 primary_extra=", api_key_env: PROVIDER_KEY").replace("kind: vllm", "kind: openai")
    handle = await proxy(text, env={"PROVIDER_KEY": "sk-provider"})
    api = openai.AsyncOpenAI(base_url=handle.url("/v1"), api_key="client-key", max_retries=0)
    for _ in range(3):
        response = await api.chat.completions.with_raw_response.create(model="my-model", messages=MESSAGES,
                                                                       max_tokens=2)
        assert response.headers["x-splitstream-fallback"] == "hosted"
    assert throttled == 1  # benched for its Retry-After: the next requests never knocked
    assert keys == ["Bearer sk-provider"]
    assert fallbacks(handle) == Counter({("chat", "primary", "hosted", "backend_rate_limited"): 1,
                                         ("chat", "primary", "hosted", "no_healthy_backend"): 2})


async def test_max_tokens_is_capped_before_the_runtime_sees_it(sim: Any, proxy: Any) -> None:
    primary, primary_server = await sim()
    _, hosted_server = await sim(models=("hosted-model",))
    handle = await proxy(rules(backend_url(primary_server), hosted_server, route_extra="    max_tokens: 8"))
    api = client(handle)
    seen = []
    for extra in ({"max_tokens": 100}, {"max_completion_tokens": 100}, {}, {"max_tokens": 4}):
        result = await api.chat.completions.create(model="my-model", messages=MESSAGES, **extra)  # type: ignore[call-overload]
        assert primary.last_body is not None
        seen.append({key: primary.last_body.get(key) for key in ("max_tokens", "max_completion_tokens")})
        assert result.usage is not None and result.usage.completion_tokens <= 8
    assert seen == [
        {"max_tokens": 8, "max_completion_tokens": None},
        {"max_tokens": None, "max_completion_tokens": 8},
        {"max_tokens": 8, "max_completion_tokens": None},  # none given: the cap is set
        {"max_tokens": 4, "max_completion_tokens": None},  # under the cap: untouched
    ]


# ------------------------------------------------------------------------------------ honest experiments


def split_rules(stable: TestServer, canary_url: str, rollout: str) -> str:
    return f"""
backends:
  stable-1: {{url: "{backend_url(stable)}", kind: vllm}}
  canary-1: {{url: "{canary_url}", kind: vllm}}
pools:
  llama-stable: {{backends: [stable-1], model: sim-model}}
  llama-next: {{backends: [canary-1], model: sim-model}}
routes:
  - name: chat
    match: {{model: my-model}}
    split:
      variants:
        - {{name: stable, pool: llama-stable, weight: 50}}
        - {{name: canary, pool: llama-next, weight: 50}}
    fallback: [llama-stable]
    retry: {{attempts: 1}}
    {rollout}
"""


async def test_a_rescued_canary_request_still_counts_as_the_canarys_failure(sim: Any, proxy: Any) -> None:
    """The canary's only backend dies mid-rollout: its clients are answered by the stable pool, and the
    rollout still sees every one of those requests as the canary's failure and rolls it back."""
    _, stable_server = await sim(max_batch=64)
    _, canary_server = await sim(max_batch=64)
    clock = FakeClock(1_000_000.0)
    rollout = ("rollout: {candidate: canary, baseline: stable, steps: [50, 100], interval: 60s, "
               "min_requests: 30}")
    handle = await proxy(split_rules(stable_server, backend_url(canary_server), rollout),
                         rollout_settings=RolloutSettings(clock=clock, tick=None))
    handle.splitter.rng = random.Random(5)
    state = handle.weights.state_of("chat")
    assert state is not None and state.status == "running"  # the canary answered its probe: step 0 began
    await canary_server.close()  # ... and then died
    served: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    rescued_headers = 0
    body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 2}
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            nonlocal rescued_headers
            async with session.post(handle.url("/v1/chat/completions"), json=body) as response:
                await response.read()
                statuses[response.status] += 1
                served[response.headers["x-splitstream-variant"]] += 1
                rescued_headers += response.headers.get("x-splitstream-fallback") == "llama-stable"

        while served["canary"] < 40 or served["stable"] < 40:
            await asyncio.gather(*(one() for _ in range(20)))
        assert statuses == Counter({200: sum(served.values())})  # every client was answered
        assert rescued_headers == served["canary"]

        async with session.get(handle.url("/admin/experiments/chat")) as response:
            report = {row["name"]: row for row in (await response.json())["variants"]}
        assert report["canary"]["requests"] == served["canary"]
        assert report["canary"]["errors"] == served["canary"] == report["canary"]["rescued"]
        assert report["stable"]["errors"] == 0 and report["stable"]["rescued"] == 0

        await handle.rollouts.tick()
        state = handle.weights.state_of("chat")
        assert state is not None and state.status == "rolled_back", state
        assert state.history[-1]["reason"] == "error_rate"
        assert handle.weights.percent_of("chat") == 0.0

        async with session.get(handle.url("/ui/")) as response:
            page = await response.text()
        assert 'data-field="rescued"' in page
