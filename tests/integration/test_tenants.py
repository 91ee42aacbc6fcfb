"""Tenants in one proxy (the embedded store): keys, the routes a tenant may use, match by tenant, limits
(requests, tokens reserved and settled, concurrency) with OpenAI's 429 and x-ratelimit-* headers, and
priority order in a saturated pool's queue. Clients are the real `openai` SDK or aiohttp; the runtimes are
simulated (or, for the queue order, a small runtime that records the order requests reached it).

The fleet-wide behaviour (two processes on one Redis, Redis killed mid-load) is `test_fleet_tenants.py`."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Gate, ProxyHandle, backend_url

MESSAGES = [{"role": "user", "content": "hi"}]
SEARCH, BATCH, INTERNAL, PLAIN = "search-key-1", "batch-key-1", "internal-key-1", "plain-key-1"
ENV = {"SEARCH_KEYS": f"{SEARCH}, search-key-2", "BATCH_KEYS": BATCH}


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def tenant_rules(stable: TestServer, candidate: TestServer, limits: str = "", batch_limits: str = "",
                 extra: str = "") -> str:
    return f"""
backends:
  stable-1: {{url: "{backend_url(stable)}", kind: vllm}}
  next-1: {{url: "{backend_url(candidate)}", kind: vllm}}
pools:
  stable: {{backends: [stable-1], model: sim-model}}
  next: {{backends: [next-1], model: sim-model}}
tenants:
  search-team:
    keys_env: SEARCH_KEYS
    routes: ["chat*"]
    priority: high
    {limits}
  batch:
    keys_env: BATCH_KEYS
    priority: low
    {batch_limits}
  internal:
    key_hashes: ["{sha(INTERNAL)}"]
{extra}
routes:
  - name: chat-internal
    match: {{model: "llama*", tenants: [internal]}}
    pool: next
  - name: chat
    match: {{model: "llama*"}}
    pool: stable
  - name: embed
    match: {{model: "embedder"}}
    pool: stable
"""


def client(handle: ProxyHandle, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=handle.base_url, api_key=key, max_retries=0)


async def test_keys_decide_the_tenant_and_anything_else_is_401(sim: Any, proxy: Any) -> None:
    _, stable = await sim(models=["sim-model"])
    _, candidate = await sim(models=["sim-model"])
    handle = await proxy(tenant_rules(stable, candidate), env=ENV)
    with pytest.raises(openai.AuthenticationError) as caught:
        await client(handle, "wrong-key").chat.completions.create(model="llama-3", messages=MESSAGES)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    # both keys of one tenant, a hashed key, and the Anthropic-style header all identify their tenant
    for key in (SEARCH, "search-key-2", INTERNAL):
        answer = await client(handle, key).chat.completions.create(model="llama-3", messages=MESSAGES)
        assert answer.choices[0].message.content
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/chat/completions"), headers={"x-api-key": BATCH},
                                json={"model": "llama-3", "messages": MESSAGES}) as response:
            assert response.status == 200
            assert response.headers["x-splitstream-route"] == "chat"
        async with session.post(handle.url("/v1/chat/completions"),  # no key at all
                                json={"model": "llama-3", "messages": MESSAGES}) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_api_key"
        async with session.get(handle.url("/v1/models")) as response:
            assert response.status == 401


async def test_a_route_the_tenant_may_not_use_is_a_404_and_is_not_listed(sim: Any, proxy: Any) -> None:
    _, stable = await sim(models=["sim-model"])
    _, candidate = await sim(models=["sim-model"])
    handle = await proxy(tenant_rules(stable, candidate), env=ENV)
    search = client(handle, SEARCH)
    with pytest.raises(openai.NotFoundError) as caught:
        await search.embeddings.create(model="embedder", input="x")
    assert caught.value.code == "model_not_found" and "do not have access" in caught.value.message
    assert [m.id async for m in search.models.list()] == []  # `llama*` is a glob: no plain name to list
    assert [m.id async for m in client(handle, BATCH).models.list()] == ["embedder"]
    embedded = await client(handle, BATCH).embeddings.create(model="embedder", input="x")
    assert embedded.data


async def test_match_by_tenant_sends_internal_users_to_the_candidate(sim: Any, proxy: Any) -> None:
    stable_runtime, stable = await sim(models=["sim-model"])
    next_runtime, candidate = await sim(models=["sim-model"])
    handle = await proxy(tenant_rules(stable, candidate), env=ENV)
    raw = await client(handle, INTERNAL).chat.completions.with_raw_response.create(model="llama-3", messages=MESSAGES)
    assert raw.headers["x-splitstream-route"] == "chat-internal"
    raw = await client(handle, SEARCH).chat.completions.with_raw_response.create(model="llama-3", messages=MESSAGES)
    assert raw.headers["x-splitstream-route"] == "chat"
    assert (stable_runtime.stats.requests, next_runtime.stats.requests) == (1, 1)


async def test_requests_per_minute_then_429_with_openai_headers(sim: Any, proxy: Any) -> None:
    _, stable = await sim(models=["sim-model"])
    _, candidate = await sim(models=["sim-model"])
    handle = await proxy(tenant_rules(stable, candidate, limits="limits: {requests_per_minute: 5}"), env=ENV)
    search = client(handle, SEARCH)
    remaining = []
    for _ in range(5):
        raw = await search.chat.completions.with_raw_response.create(model="llama-3", messages=MESSAGES)
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in raw.headers  # no token limit set
    assert remaining == [4, 3, 2, 1, 0]
    with pytest.raises(openai.RateLimitError) as caught:
        await search.chat.completions.create(model="llama-3", messages=MESSAGES)
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.type == "rate_limit_error"
    assert "requests_per_minute" in error.message
    assert int(error.response.headers["Retry-After"]) >= 1
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    # other tenants are not limited by search-team's spending
    await client(handle, BATCH).chat.completions.create(model="llama-3", messages=MESSAGES)
    text = handle.metrics.registry.get_sample_value
    assert text("splitstream_ratelimited_total", {"tenant": "search-team", "limit": "requests_per_minute"}) == 1
    assert text("splitstream_tenant_requests_total", {"tenant": "search-team", "route": "chat", "code": "200"}) == 5
    assert text("splitstream_tenant_requests_total", {"tenant": "search-team", "route": "chat", "code": "429"}) == 1


async def test_a_stream_cut_early_gives_its_reserved_tokens_back(sim: Any, proxy: Any) -> None:
    """tokens_per_minute 1000: a stream reserving ~925 tokens, cut after one token, leaves room for a second
    such request at once; a stream that ran to the end (the control) does not."""
    gate = Gate()
    runtime, stable = await sim(gate, models=["sim-model"])
    _, candidate = await sim(models=["sim-model"])
    handle = await proxy(tenant_rules(stable, candidate, limits="limits: {tokens_per_minute: 1000}"), env=ENV)
    search = client(handle, SEARCH)
    gate.open(0)  # the first token flows (a stream's answer starts with it); the second never does
    stream = await search.chat.completions.create(model="llama-3", messages=MESSAGES, max_tokens=900, stream=True)
    async with stream:
        assert stream.response.headers["x-ratelimit-limit-tokens"] == "1000"
        assert int(stream.response.headers["x-ratelimit-remaining-tokens"]) < 100  # ~925 reserved
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the client leaves after its first token
    await wait_for(lambda: runtime.stats.cancelled == 1)
    await wait_for(lambda: handle.endpoints.inflight == 0)
    gate.open_all(1000)
    answer = await search.chat.completions.create(model="llama-3", messages=MESSAGES, max_tokens=900)
    assert answer.usage is not None and answer.usage.completion_tokens == 900
    with pytest.raises(openai.RateLimitError) as caught:  # the control: 900 really used, settled as such
        await search.chat.completions.create(model="llama-3", messages=MESSAGES, max_tokens=900)
    assert "tokens_per_minute" in caught.value.message
    # a short request still fits in what is left
    await search.chat.completions.create(model="llama-3", messages=MESSAGES, max_tokens=5)


async def test_max_concurrent_counts_requests_in_flight(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime, stable = await sim(gate, models=["sim-model"])
    _, candidate = await sim(models=["sim-model"])
    handle = await proxy(tenant_rules(stable, candidate, limits="limits: {max_concurrent: 2}"), env=ENV)
    search = client(handle, SEARCH)
    held = [asyncio.create_task(search.chat.completions.create(model="llama-3", messages=MESSAGES, max_tokens=2))
            for _ in range(2)]
    await wait_for(lambda: runtime.stats.requests == 2)
    with pytest.raises(openai.RateLimitError) as caught:
        await search.chat.completions.create(model="llama-3", messages=MESSAGES, max_tokens=2)
    assert "max_concurrent" in caught.value.message
    gate.open_all()
    await asyncio.gather(*held)
    await search.chat.completions.create(model="llama-3", messages=MESSAGES, max_tokens=2)  # slots came back


class OrderedRuntime:
    """A runtime with one slot's worth of patience: it records the X-Request-Id of each request in the order
    they reach it, and holds the first until `release` is set."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.release = asyncio.Event()
        self.first_arrived = asyncio.Event()

    async def chat(self, request: web.Request) -> web.Response:
        self.order.append(request.headers.get("X-Request-Id", ""))
        if len(self.order) == 1:
            self.first_arrived.set()
            await self.release.wait()
        return web.json_response({"id": "x", "object": "chat.completion", "model": "sim-model",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({})


async def test_a_saturated_pool_serves_high_before_normal_before_low(aiohttp_server: Any, sim: Any,
                                                                    proxy: Any) -> None:
    runtime = OrderedRuntime()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", runtime.chat)
    app.router.add_get("/health", runtime.health)
    slow = await aiohttp_server(app)
    _, candidate = await sim(models=["sim-model"])
    rules = tenant_rules(slow, candidate, extra=f'  plain:\n    key_hashes: ["{sha(PLAIN)}"]\n').replace(
        f'stable-1: {{url: "{backend_url(slow)}", kind: vllm}}',
        f'stable-1: {{url: "{backend_url(slow)}", kind: vllm, max_inflight: 1}}')
    rules = rules.replace("  - name: chat\n    match: {model: \"llama*\"}\n    pool: stable",
                          "  - name: chat\n    match: {model: \"llama*\"}\n    pool: stable\n    timeouts: {queue: 60s}")
    handle = await proxy(rules, env=ENV)
    keys = {"first": BATCH, "low": BATCH, "normal": PLAIN, "high": SEARCH}
    async with aiohttp.ClientSession() as session:
        async def ask(name: str) -> int:
            async with session.post(handle.url("/v1/chat/completions"),
                                    headers={"Authorization": f"Bearer {keys[name]}", "X-Request-Id": name},
                                    json={"model": "llama-3", "messages": MESSAGES}) as response:
                await response.read()
                return response.status

        first = asyncio.create_task(ask("first"))
        await runtime.first_arrived.wait()
        tasks = []
        for name in ("low", "normal", "high"):  # arrival order: the reverse of priority
            tasks.append(asyncio.create_task(ask(name)))
            await wait_for(lambda n=len(tasks): handle.dispatcher.queue.waiting("stable") == n)
        runtime.release.set()
        assert await asyncio.gather(first, *tasks) == [200] * 4
    assert runtime.order == ["first", "high", "normal", "low"]


async def wait_for(predicate: Callable[[], bool], turns: int = 2000) -> None:
    """Let the loop run until `predicate` holds (bounded): the proxy and the runtime share this loop."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def test_admin_tenants_shows_usage_limit_use_and_routes(sim: Any, proxy: Any) -> None:
    _, stable = await sim(models=["sim-model"])
    _, candidate = await sim(models=["sim-model"])
    handle = await proxy(tenant_rules(stable, candidate, limits="limits: {requests_per_minute: 4}"), env=ENV)
    search = client(handle, SEARCH)
    started = time.monotonic()
    for _ in range(4):
        await search.chat.completions.create(model="llama-3", messages=MESSAGES, max_tokens=3)
    with pytest.raises(openai.RateLimitError):
        await search.chat.completions.create(model="llama-3", messages=MESSAGES, max_tokens=3)
    async with aiohttp.ClientSession() as session:
        async with session.get(handle.url("/admin/tenants")) as response:
            refilled = (time.monotonic() - started) / 15  # 4 a minute: a fifteenth of the limit back per second
            assert response.status == 200
            page = await response.json()
        async with session.get(handle.url("/ui/tenants")) as response:
            assert response.status == 200
            html = await response.text()
    assert page["enabled"] and page["pooled"]
    rows = {row["tenant"]: row for row in page["tenants"]}
    search_row = rows["search-team"]
    assert search_row["priority"] == "high" and search_row["routes"] == ["chat"]  # not chat-internal, not embed
    assert search_row["last_minute"]["requests"] == 5 and search_row["last_minute"]["limited"] == 1
    assert search_row["last_day"]["requests"] == 5
    assert search_row["last_minute"]["tokens"] > 0
    # 4 admitted of 4: all spent, less what refilled since the first (GCRA refills evenly)
    assert 1.0 - refilled <= search_row["limit_use"]["requests_per_minute"] <= 1.0
    assert rows["batch"]["limit_use"] == {}  # no limits: nothing to spend
    assert search_row["limits"]["requests_per_minute"] == 4
    assert rows["batch"]["last_minute"]["requests"] == 0 and rows["batch"]["routes"] == ["chat", "embed"]
    assert 'data-tenant="search-team"' in html and SEARCH not in html


async def test_the_cache_is_per_tenant_so_a_rotated_key_keeps_it(sim: Any, proxy: Any) -> None:
    runtime, stable = await sim(models=["sim-model"])
    _, candidate = await sim(models=["sim-model"])
    rules = tenant_rules(stable, candidate).replace("    pool: stable\n  - name: embed",
                                                    "    pool: stable\n    cache: {ttl: 10m}\n  - name: embed")
    handle = await proxy(rules, env=ENV)
    outcomes = []
    for key in (SEARCH, "search-key-2", BATCH):  # two keys of search-team, then another tenant
        raw = await client(handle, key).chat.completions.with_raw_response.create(
            model="llama-3", messages=MESSAGES, temperature=0, max_tokens=3)
        outcomes.append(raw.headers["x-splitstream-cache"])
    assert outcomes == ["miss", "hit", "miss"]
    assert runtime.stats.requests == 2
