"""The result cache end to end: real proxy, simulated runtimes, the openai SDK, and a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from proxy.store.redis import RedisStore
from tests.conftest import Gate, backend_url

MESSAGES = [{"role": "user", "content": "cache me"}]
BODY = {"model": "my-model", "messages": MESSAGES, "temperature": 0, "max_tokens": 6}


def cache_rules(server: TestServer, cache: str = "{ttl: 1m}", extra: str = "") -> str:
    return f"""
backends:
  b: {{url: "{backend_url(server)}", kind: vllm}}
pools:
  p: {{backends: [b], model: "sim-model"}}
routes:
  - name: chat
    match: {{model: "my-model"}}
    pool: p
    cache: {cache}
{extra}
"""


TENANT = {"Authorization": "Bearer tenant-a"}  # an identified client: anonymous ones bypass an unshared cache


async def post(handle: Any, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """As one identified client (tenant-a) unless `headers` say otherwise: anonymous clients bypass the cache."""
    headers = {**TENANT, **(headers or {})}
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/chat/completions"), json=body, headers=headers) as r:
            return r.status, r.headers.get("x-splitstream-cache", ""), await r.read()


async def test_hit_after_miss_is_byte_identical(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(cache_rules(server))
    for stream, max_tokens in ((False, 5), (True, 7)):  # different questions: a stream is not answered from JSON
        body = {**BODY, "stream": stream, "max_tokens": max_tokens}
        first = await post(handle, body)
        await handle.cache.writes_done()
        second = await post(handle, body)
        assert first[:2] == (200, "miss") and second[:2] == (200, "hit")
        assert second[2] == first[2]
    assert runtime.stats.requests == 2  # one per shape; the hits never reached the runtime


@pytest.mark.parametrize(("first_stream", "second_stream"), [(False, False), (False, True), (True, False), (True, True)])
async def test_every_shape_through_the_sdk(sim: Any, proxy: Any, first_stream: bool, second_stream: bool) -> None:
    runtime, server = await sim()
    handle = await proxy(cache_rules(server))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k")

    async def ask(stream: bool) -> tuple[str, str, int | None]:
        if stream:
            raw = await client.chat.completions.with_raw_response.create(
                model="my-model", messages=MESSAGES, temperature=0, max_tokens=6, stream=True,
                stream_options={"include_usage": True})
            chunks = [c async for c in raw.parse()]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = [c.usage for c in chunks if c.usage]
            return raw.headers["x-splitstream-cache"], text, usage[0].completion_tokens if usage else None
        raw = await client.chat.completions.with_raw_response.create(
            model="my-model", messages=MESSAGES, temperature=0, max_tokens=6)
        completion = raw.parse()
        return raw.headers["x-splitstream-cache"], completion.choices[0].message.content or "", \
            completion.usage.completion_tokens if completion.usage else None

    miss = await ask(first_stream)
    await handle.cache.writes_done()
    hit = await ask(second_stream)
    assert miss[0] == "miss" and hit[0] == "hit"
    assert hit[1] == miss[1] and hit[1]
    assert hit[2] == miss[2] == 6
    assert runtime.stats.requests == 1


async def test_twenty_identical_misses_reach_the_runtime_once(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    handle = await proxy(cache_rules(server))
    body = {**BODY, "stream": True}
    async with aiohttp.ClientSession(headers=TENANT) as session:
        responses = [asyncio.ensure_future(session.post(handle.url("/v1/chat/completions"), json=body)) for _ in range(20)]
        await gate.wait_reached(0)
        gate.open(0)
        # followers of a streaming leader get the stream as it arrives: token 0 before token 1 is allowed
        leader_or_follower = await responses[-1]
        first = await asyncio.wait_for(leader_or_follower.content.readuntil(b"\n\n"), 30)
        assert first.startswith(b"data: ") and not gate._event(gate._events, 1).is_set()
        gate.open_all()
        bodies = [first + await leader_or_follower.read()]
        for future in responses[:-1]:
            response = await future
            assert response.status == 200
            bodies.append(await response.read())
    assert runtime.stats.requests == 1
    assert len(set(bodies)) == 1
    counts = handle.cache.counts["chat"]
    assert counts["miss"] == 1 and counts["coalesced"] == 19


async def test_cut_stream_is_never_cached(sim: Any, proxy: Any) -> None:
    runtime, server = await sim(stream_fail_rate=1.0)
    handle = await proxy(cache_rules(server))
    for _ in range(2):
        status, result, raw = await post(handle, {**BODY, "stream": True})
        assert result == "miss" and b"event: error" in raw
        await handle.cache.writes_done()
    assert runtime.stats.requests == 2


async def test_bypass_rules_and_opt_out(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(cache_rules(server))
    assert (await post(handle, {**BODY, "temperature": 0.8}))[1] == "bypass"
    assert (await post(handle, BODY, {"Cache-Control": "no-cache"}))[1] == "bypass"
    assert (await post(handle, {**BODY, "temperature": 0.8}, {"x-splitstream-cache": "force"}))[1] == "miss"
    await handle.cache.writes_done()
    assert (await post(handle, {**BODY, "temperature": 0.8}, {"x-splitstream-cache": "force"}))[1] == "hit"


@pytest.mark.parametrize("shared", [False, True])
async def test_tenants_are_isolated_unless_shared(sim: Any, proxy: Any, shared: bool) -> None:
    runtime, server = await sim()
    handle = await proxy(cache_rules(server, cache=f"{{ttl: 1m, shared: {str(shared).lower()}}}"))
    first = await post(handle, BODY, {"Authorization": "Bearer tenant-a"})
    await handle.cache.writes_done()
    second = await post(handle, BODY, {"Authorization": "Bearer tenant-b"})
    assert first[1] == "miss"
    assert second[1] == ("hit" if shared else "miss")


async def test_entries_over_the_size_limit_are_not_kept(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    handle = await proxy(cache_rules(server, cache="{ttl: 1m, max_entry_bytes: 64}"))
    for _ in range(2):
        assert (await post(handle, BODY))[1] == "miss"
        await handle.cache.writes_done()


async def test_shadow_copies_never_fill_the_cache(sim: Any, proxy: Any) -> None:
    runtime, server = await sim(models=["sim-model", "other"])
    extra_pool = '  next: {backends: [b], model: "other"}\n'
    rules = cache_rules(server).replace("pools:\n", "pools:\n" + extra_pool) + "    shadow: [{pool: next}]\n"
    handle = await proxy(rules)
    await post(handle, BODY)
    await handle.shadows.idle()
    await handle.cache.writes_done()
    assert len(handle.cache.store) == 1  # type: ignore[arg-type]  # the primary's answer only
    assert (await post(handle, BODY))[1] == "hit"


async def test_redis_cache_and_redis_down_is_bypass(sim: Any, proxy: Any, redis_server: Any) -> None:
    runtime, server = await sim()
    store = RedisStore(redis_server.url, timeout=0.5)
    handle = await proxy(cache_rules(server), store=store)
    assert (await post(handle, BODY))[1] == "miss"
    await handle.cache.writes_done()
    assert (await post(handle, BODY))[1] == "hit"
    assert b"splitstream:cache:" in redis_server.command(b"KEYS", b"splitstream:cache:*")
    redis_server.stop()
    for _ in range(3):
        status, result, _ = await post(handle, BODY)
        assert status == 200 and result == "bypass"
    assert handle.cache.counts["chat"]["bypass"] == 3


class HeldStore:
    """A store whose lookups wait until the test lets them go (to cancel a leader mid-lookup)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.values: dict[str, bytes] = {}
        self.counts: dict[str, dict[str, float]] = {}

    async def get(self, key: str) -> bytes | None:
        self.entered.set()
        await self.release.wait()
        return self.values.get(key)

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        if key in self.values:
            return self.values[key]
        self.values[key] = value
        return None

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.values[key] = value

    async def delete(self, key: str) -> None:
        self.values.pop(key, None)

    async def set_many(self, values: dict[str, bytes], ttl: float) -> None:  # feedback joins (a shared store)
        self.values.update(values)

    async def add_counts(self, increments: dict[str, dict[str, float]], ttl: float) -> None:  # pooled statistics
        for key, fields in increments.items():
            counts = self.counts.setdefault(key, {})
            for name, amount in fields.items():
                counts[name] = counts.get(name, 0.0) + amount

    async def read_counts(self, keys: list[str]) -> list[dict[str, float]]:
        return [dict(self.counts.get(key, {})) for key in keys]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_leader_leaving_mid_lookup_does_not_strand_its_twins(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    store = HeldStore()
    handle = await proxy(cache_rules(server), store=store)
    async with aiohttp.ClientSession(headers=TENANT) as leader_session, \
            aiohttp.ClientSession(headers=TENANT) as twin_session:
        leader = asyncio.ensure_future(leader_session.post(handle.url("/v1/chat/completions"), json=BODY))
        await store.entered.wait()  # the leader is looking the key up
        twin = asyncio.ensure_future(twin_session.post(handle.url("/v1/chat/completions"), json=BODY))
        while handle.cache.counts.get("chat", {}).get("coalesced", 0) < 1:
            await asyncio.sleep(0)  # yield until the twin has joined the leader's flight (in-process state)
        leader.cancel()
        await leader_session.close()  # the leader's client goes away while the store is still answering
        response = await asyncio.wait_for(twin, 30)
        assert response.status == 200  # the twin went upstream itself instead of waiting forever
        await response.read()
        store.release.set()
