"""Tenant limits held by a fleet: two real `python -m proxy serve` processes on one real redis-server, simulated
runtimes behind them, the real `openai` SDK and aiohttp as clients.

A 60 requests/minute tenant spreading 120 requests over both replicas gets 60 through (plus what the limit
refills while the test runs) and the rest 429 with OpenAI's headers; max_concurrent holds across replicas;
Redis killed mid-load costs no request (each replica limits on its own, says so once, and counts it) and
the limits are fleet-wide again once Redis is back; no key ever reaches a log line."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Gate, backend_url
from tests.integration.conftest import RedisServer, Served, ServedFactory

KEYS = {"SEARCH_KEYS": "search-secret-1", "BATCH_KEYS": "batch-secret-1", "OPEN_KEYS": "open-secret-1"}
MESSAGES = [{"role": "user", "content": "hi"}]


def rules(runtime: Any) -> str:
    return f"""
backends:
  sim-1: {{url: "{backend_url(runtime)}", kind: vllm}}
pools:
  main: {{backends: [sim-1], model: sim-model}}
tenants:
  search:
    keys_env: SEARCH_KEYS
    limits: {{requests_per_minute: 60}}
  batch:
    keys_env: BATCH_KEYS
    limits: {{max_concurrent: 2}}
  open:
    keys_env: OPEN_KEYS
    limits: {{requests_per_minute: 1000}}
routes:
  - name: chat
    match: {{model: "llama*"}}
    pool: main
"""


async def fleet(runtime: Any, served: ServedFactory, redis: RedisServer) -> tuple[Served, Served]:
    text = rules(runtime)
    first = await served(text, "--redis", redis.url, env=KEYS)
    return first, await served(text, "--redis", redis.url, env=KEYS)


async def post(session: aiohttp.ClientSession, replica: Served, key: str) -> tuple[int, Any]:
    async with session.post(replica.url("/v1/chat/completions"), headers={"Authorization": f"Bearer {key}"},
                            json={"model": "llama-3", "messages": MESSAGES, "max_tokens": 2}) as response:
        await response.read()
        return response.status, response.headers


async def metric(session: aiohttp.ClientSession, replica: Served, name: str) -> float:
    async with session.get(replica.url("/metrics")) as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_a_60_per_minute_tenant_gets_60_through_across_two_replicas(
        sim: Any, served: ServedFactory, redis_server: RedisServer) -> None:
    _, runtime = await sim()
    replicas = await fleet(runtime, served, redis_server)
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(post(session, replicas[i % 2], "search-secret-1") for i in range(120)))
    elapsed = time.monotonic() - started
    statuses = Counter(status for status, _ in results)
    assert set(statuses) == {200, 429}
    # GCRA: a full minute's worth at once, then one more per second the test ran (rounded up)
    assert 60 <= statuses[200] <= 60 + int(elapsed) + 1, (statuses, elapsed)
    for status, headers in results:
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert int(headers["x-ratelimit-remaining-requests"]) >= 0
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
    # both replicas refused some: the limit is the fleet's, not each replica's
    assert {i % 2 for i, (status, _) in enumerate(results) if status == 429} == {0, 1}
    client = openai.AsyncOpenAI(base_url=replicas[1].base_url, api_key="search-secret-1", max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="llama-3", messages=MESSAGES)
    assert caught.value.code == "rate_limit_exceeded" and "requests_per_minute" in caught.value.message
    for replica in replicas:
        assert await replica.stop() == 0  # (its buffered access lines are all out once it stopped)
        assert "search-secret-1" not in replica.log and "batch-secret-1" not in replica.log
        assert '"tenant":"search"' in replica.log.replace(" ", "")  # access lines name the tenant


async def test_max_concurrent_holds_across_replicas(sim: Any, served: ServedFactory,
                                                    redis_server: RedisServer) -> None:
    gate = Gate()
    sim_runtime, runtime = await sim(gate)
    first, second = await fleet(runtime, served, redis_server)
    async with aiohttp.ClientSession() as session:
        held = [asyncio.create_task(post(session, first, "batch-secret-1")) for _ in range(2)]
        while sim_runtime.stats.requests < 2:  # both reached the runtime (which holds their first token)
            await asyncio.sleep(0.01)
        status, headers = await post(session, second, "batch-secret-1")
        assert status == 429
        gate.open_all()
        assert [status for status, _ in await asyncio.gather(*held)] == [200, 200]
        # The leases were released: a claim on the replica that held them carries its releases (they go
        # first in the batch), so it is admitted at once; the other replica sees them within SETTLE_SECONDS.
        assert (await post(session, first, "batch-secret-1"))[0] == 200
        assert await metric(session, second, 'splitstream_ratelimited_total{limit="max_concurrent"') == 1


async def test_redis_killed_mid_load_fails_no_request_and_limits_come_back(
        sim: Any, served: ServedFactory, redis_server: RedisServer) -> None:
    _, runtime = await sim()
    first, second = await fleet(runtime, served, redis_server)
    async with aiohttp.ClientSession() as session:
        before = await asyncio.gather(*(post(session, (first, second)[i % 2], "open-secret-1") for i in range(20)))
        redis_server.stop()
        during = await asyncio.gather(*(post(session, (first, second)[i % 2], "open-secret-1") for i in range(40)))
        assert [status for status, _ in before + during] == [200] * 60
        for replica in (first, second):
            assert await metric(session, replica, "splitstream_tenant_limit_fallbacks_total") > 0
            assert replica.log.count("tenant limits: store unavailable") == 1  # once per outage, not per request
        redis_server.start()
        # Back to one fleet-wide count: B's remaining is one below A's right after A's request.
        for _ in range(200):
            _, a = await post(session, first, "open-secret-1")
            status, b = await post(session, second, "open-secret-1")
            assert status == 200
            if int(b["x-ratelimit-remaining-requests"]) == int(a["x-ratelimit-remaining-requests"]) - 1:
                break
            await asyncio.sleep(0.05)  # the breaker probes Redis again after its cooldown (real time)
        else:
            raise AssertionError("limits never became fleet-wide again after Redis came back")
