"""Shadow mirroring: the client never waits for or sees a shadow; copies are bounded, sampled, compared."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiohttp
import openai
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gate, backend_url
from tests.integration.conftest import ThrottlerFactory

MESSAGES = [{"role": "user", "content": "compare me"}]


def shadow_rules(primary: TestServer, shadow: TestServer, shadow_model: str = "sim-model",
                 shadow_opts: str = "sample: 1.0") -> str:
    return f"""
backends:
  main: {{url: "{backend_url(primary)}", kind: vllm}}
  cand: {{url: "{backend_url(shadow)}", kind: vllm}}
pools:
  stable: {{backends: [main], model: "sim-model"}}
  next: {{backends: [cand], model: "{shadow_model}"}}
routes:
  - name: chat
    match: {{model: "my-model"}}
    pool: stable
    shadow: [{{pool: next, {shadow_opts}}}]
"""


async def scrape(handle: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(handle.url("/metrics")) as r:
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


async def next_comparison(handle: Any) -> Any:
    mirror = handle.shadows
    if not mirror.recent:
        await asyncio.wait_for(mirror.compared.wait(), 30)
    return mirror.recent[-1]


async def test_hanging_shadow_never_delays_the_client(sim: Any, proxy: Any) -> None:
    gate = Gate()  # the shadow runtime produces nothing until we say so
    primary, p = await sim(models=["sim-model"])
    shadow, s = await sim(models=["sim-model"], pacer=gate)
    handle = await proxy(shadow_rules(p, s))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    answer = await client.chat.completions.create(model="my-model", messages=MESSAGES, temperature=0, max_tokens=5)
    await gate.wait_reached(0)  # the shadow copy did arrive, and is being held...
    assert answer.choices[0].message.content  # ...while the client already has its complete answer
    assert shadow.stats.completed == 0 and primary.stats.completed == 1
    gate.open_all()
    result = await next_comparison(handle)
    assert result.status_match and result.exact_match and result.similarity == 1.0  # same model, temperature 0
    assert result.latency_ratio is not None and result.latency_ratio > 0


async def test_failing_shadow_is_invisible_and_counted(sim: Any, proxy: Any) -> None:
    primary, p = await sim()
    shadow, s = await sim(fail_rate=1.0)
    handle = await proxy(shadow_rules(p, s))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    answer = await client.chat.completions.with_raw_response.create(model="my-model", messages=MESSAGES)
    assert answer.http_response.status_code == 200 and answer.headers["x-splitstream-backend"] == "main"
    result = await next_comparison(handle)
    assert not result.status_match and result.shadow_status == 502 and result.similarity is None
    samples = await scrape(handle)
    assert samples[("splitstream_shadow_requests_total", (("outcome", "error"), ("pool", "next"), ("route", "chat")))] == 1
    # the shadow is nowhere in the primary's metrics
    primary_series = [k for k in samples if k[0] == "splitstream_requests_total"]
    assert primary_series and all(("backend", "cand") not in labels for _, labels in primary_series)
    assert samples[("splitstream_requests_total",
                    (("backend", "main"), ("route", "chat"), ("status", "2xx"), ("variant", "stable")))] == 1


async def test_streams_are_mirrored_as_streams_and_compared(sim: Any, proxy: Any) -> None:
    primary, p = await sim(models=["sim-model"])
    shadow, s = await sim(models=["other-model"])
    handle = await proxy(shadow_rules(p, s, shadow_model="other-model"))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    stream = await client.chat.completions.create(model="my-model", messages=MESSAGES, stream=True,
                                                  temperature=0, max_tokens=12)
    text = "".join(c.choices[0].delta.content or "" for c in [c async for c in stream] if c.choices)
    assert text
    result = await next_comparison(handle)
    assert shadow.last_body["stream"] is True and shadow.last_body["model"] == "other-model"
    assert result.status_match and result.ttft_ratio is not None
    assert not result.exact_match and 0.0 <= result.similarity < 1.0  # another model answers differently
    assert result.completion_tokens_delta == 0


async def test_client_leaving_does_not_cancel_the_shadow(sim: Any, proxy: Any) -> None:
    primary_gate, shadow_gate = Gate(), Gate()
    primary, p = await sim(pacer=primary_gate)
    shadow, s = await sim(pacer=shadow_gate)
    handle = await proxy(shadow_rules(p, s))
    primary_gate.open(0)
    body = {"model": "my-model", "messages": MESSAGES, "stream": True, "max_tokens": 4}
    async with aiohttp.ClientSession() as session:
        response = await session.post(handle.url("/v1/chat/completions"), json=body)
        await response.content.readuntil(b"\n\n")
        await shadow_gate.wait_reached(0)
        response.close()
        await asyncio.wait_for(primary.cancelled_event.wait(), 30)
    shadow_gate.open_all()
    result = await next_comparison(handle)
    assert shadow.stats.completed == 1 and shadow.stats.cancelled == 0
    assert result.shadow_status == 200


async def test_full_shadow_queue_drops_and_counts(sim: Any, proxy: Any) -> None:
    gate = Gate()
    primary, p = await sim()
    shadow, s = await sim(pacer=gate)
    handle = await proxy(shadow_rules(p, s, shadow_opts="sample: 1.0, max_concurrency: 1, max_queue: 1"))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    for _ in range(4):
        await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2)
    assert handle.shadows.queued() == {"chat/next": 1}
    samples = await scrape(handle)
    assert samples[("splitstream_shadow_requests_total", (("outcome", "dropped"), ("pool", "next"), ("route", "chat")))] == 2
    gate.open_all()
    await asyncio.wait_for(handle.shadows.idle(), 30)
    assert len(handle.shadows.recent) == 2
    assert shadow.stats.requests == 2  # one ran, one waited its turn, two never left the proxy


async def test_sampling_ratio_within_binomial_bound(sim: Any, proxy: Any) -> None:
    primary, p = await sim()
    shadow, s = await sim()
    handle = await proxy(shadow_rules(p, s, shadow_opts="sample: 0.25"))
    n, share = 400, 0.25
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.post(handle.url("/v1/chat/completions"),
                                    json={"model": "my-model", "messages": MESSAGES, "max_tokens": 1}) as r:
                assert r.status == 200
    await asyncio.wait_for(handle.shadows.idle(), 30)
    sigma = math.sqrt(n * share * (1 - share))
    assert abs(shadow.stats.requests - n * share) <= 5 * sigma
    assert primary.stats.requests == n


def two_shadow_backends_rules(primary: TestServer, first: TestServer, second: TestServer, balance: str) -> str:
    return f"""
backends:
  main: {{url: "{backend_url(primary)}", kind: vllm}}
  s1: {{url: "{backend_url(first)}", kind: vllm}}
  s2: {{url: "{backend_url(second)}", kind: vllm}}
pools:
  stable: {{backends: [main], model: "sim-model"}}
  next: {{backends: [s1, s2], model: "sim-model"}}
routes:
  - name: chat
    match: {{model: "my-model"}}
    pool: stable
    balance: {balance}
    shadow: [{{pool: next, sample: 1.0, max_concurrency: 1}}]
"""


async def test_round_robin_shadow_pool_spreads_copies_over_its_backends(sim: Any, proxy: Any) -> None:
    primary, p = await sim()
    first, s1 = await sim()
    second, s2 = await sim()
    handle = await proxy(two_shadow_backends_rules(p, s1, s2, "round_robin"))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    for _ in range(4):
        await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2)
    await handle.shadows.idle()
    assert primary.stats.completed == 4
    assert (first.stats.completed, second.stats.completed) == (2, 2)  # turns advance, as for any pool


async def test_shadow_backend_answering_429_is_throttled_like_a_primary(
    sim: Any, proxy: Any, throttler: ThrottlerFactory
) -> None:
    busy, hits = await throttler(retry_after="60")
    primary, p = await sim()
    other, s2 = await sim()
    handle = await proxy(two_shadow_backends_rules(p, busy, s2, "round_robin"))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    for _ in range(4):
        await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2)
        await handle.shadows.idle()
    assert hits == ["/v1/chat/completions"]  # asked once, then left alone for its Retry-After
    assert other.stats.completed == 3  # every later copy went to the backend that has room
    busy_state = next(s for s in handle.backends if s.backend.name == "s1")
    assert busy_state.throttled_until > asyncio.get_running_loop().time() + 30
    samples = await scrape(handle)
    assert samples[("splitstream_shadow_requests_total", (("outcome", "error"), ("pool", "next"), ("route", "chat")))] == 1
    assert samples[("splitstream_shadow_requests_total", (("outcome", "ok"), ("pool", "next"), ("route", "chat")))] == 3


async def test_shadow_copies_teach_the_balancer_their_backends_speed(sim: Any, proxy: Any) -> None:
    primary, p = await sim()
    shadow, s = await sim(tokens_per_second=2000.0)
    handle = await proxy(shadow_rules(p, s))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")
    for _ in range(3):
        stream = await client.chat.completions.create(model="my-model", messages=MESSAGES, stream=True, max_tokens=20)
        [c async for c in stream]
        await handle.shadows.idle()
    state = next(s for s in handle.backends if s.backend.name == "cand")
    assert state.completed == 3  # each copy's usage and timings were learned, like a primary's
