"""Weighted and sticky splits end to end: real proxies, real simulated runtimes, a real redis-server.

Statistical checks use 5-sigma binomial bounds computed from the weights (or seeded RNGs), never timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import signal
import textwrap
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import openai

from proxy.config.loader import load_rules
from proxy.auth import hash_api_key
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.conftest import FakeClock, ProxyHandle, backend_url
from tests.integration.conftest import RedisServer

MESSAGES = [{"role": "user", "content": "hi"}]
HEADER_STICKY = 'sticky: {by: "header:x-user-id", ttl: 1h}'
# Generous: these tests count sources exactly, and a busy test loop must not turn into spurious fallbacks.
TEST_TIMEOUT = 5.0


def split_rules(*servers: Any, variants: Iterable[tuple[str, int, float]], sticky: str = HEADER_STICKY) -> str:
    """One route `canary` for model my-model; each variant (name, server index, weight) has its own pool."""
    backends = "\n".join(f'  b{i}: {{url: "{backend_url(s)}", kind: vllm}}' for i, s in enumerate(servers))
    pools = "\n".join(f"  pool{i}: {{backends: [b{i}], model: sim-model}}" for i in range(len(servers)))
    items = "\n".join(f"        - {{name: {n}, pool: pool{i}, weight: {w}}}" for n, i, w in variants)
    return f"""
backends:
{backends}
pools:
{pools}
routes:
  - name: canary
    match: {{model: my-model}}
    split:
      {sticky}
      variants:
{items}
"""


def five_sigma(n: int, p: float) -> tuple[float, float]:
    sd = math.sqrt(n * p * (1 - p))
    return n * p - 5 * sd, n * p + 5 * sd


def assignments(handle: ProxyHandle) -> Counter[tuple[str, str]]:
    """split_assignments_total of route `canary` as {(variant, source): count}, read from the registry."""
    counts: Counter[tuple[str, str]] = Counter()
    for family in handle.metrics.registry.collect():
        if family.name == "splitstream_split_assignments":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["route"] == "canary":
                    counts[(sample.labels["variant"], sample.labels["source"])] += int(sample.value)
    return counts


def by_source(counts: Counter[tuple[str, str]]) -> Counter[str]:
    result: Counter[str] = Counter()
    for (_, source), n in counts.items():
        result[source] += n
    return result


async def ask(session: aiohttp.ClientSession, handle: ProxyHandle, subject: str | None = None) -> str:
    """One chat completion through the proxy; the variant that served it (it must succeed)."""
    headers = {"x-user-id": subject} if subject is not None else {}
    body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 1}
    async with session.post(handle.url("/v1/chat/completions"), json=body, headers=headers) as response:
        await response.read()
        assert response.status == 200
        return response.headers["x-splitstream-variant"]


async def ask_many(session: aiohttp.ClientSession, handle: ProxyHandle, subjects: list[str]) -> dict[str, str]:
    limit = asyncio.Semaphore(32)

    async def one(subject: str) -> str:
        async with limit:
            return await ask(session, handle, subject)

    return dict(zip(subjects, await asyncio.gather(*(one(s) for s in subjects)), strict=True))


async def reload_rules(handle: ProxyHandle, rules_yaml: str) -> None:
    """Edit the proxy's rule file and reload it the way the watcher, SIGHUP and /admin/reload do."""
    (handle.rules_dir / "rules.yaml").write_text(rules_yaml)
    outcome = await handle.reloader.reload("test")
    assert outcome.result in ("success", "unchanged"), outcome  # unchanged: the watcher got there first
    assert handle.rules.current.files == load_rules(handle.rules_dir, env={}).files


# ---------------------------------------------------------------------------------------------- tests


async def test_two_replicas_on_one_redis_agree_for_1000_subjects(sim: Any, proxy: Any, redis_server: RedisServer) -> None:
    _, stable = await sim()
    _, canary = await sim()
    # The replicas disagree on the weights (a rollout half done), so only the store can make them agree.
    replica_a = await proxy(split_rules(stable, canary, variants=[("stable", 0, 90), ("canary", 1, 10)]),
                            store=RedisStore(redis_server.url, timeout=TEST_TIMEOUT))
    replica_b = await proxy(split_rules(stable, canary, variants=[("stable", 0, 10), ("canary", 1, 90)]),
                            store=RedisStore(redis_server.url, timeout=TEST_TIMEOUT))
    subjects = [f"user-{i}" for i in range(1000)]
    limit = asyncio.Semaphore(16)

    async def both(subject: str) -> tuple[str, str]:
        async with limit:  # the two replicas see each new subject at the same moment
            a, b = await asyncio.gather(ask(session, replica_a, subject), ask(session, replica_b, subject))
            return a, b

    async with aiohttp.ClientSession() as session:
        pairs = await asyncio.gather(*(both(s) for s in subjects))
        again = await ask_many(session, replica_b, subjects[:100])
    assert all(a == b for a, b in pairs), [p for p in pairs if p[0] != p[1]][:5]
    assert all(again[s] == pairs[i][0] for i, s in enumerate(subjects[:100]))
    sources = by_source(assignments(replica_a)) + by_source(assignments(replica_b))
    assert sources["new"] == 1000 and sources["sticky"] == 1100 and sources["fallback"] == 0  # one writer each
    keys = redis_server.command(b"EVAL", b"return #redis.call('KEYS', 'splitstream:sticky:*')", b"0")
    assert keys == b":1000\r\n"  # (the store also holds other things: feedback joins, statistics)


async def test_canary_90_10_lands_within_a_binomial_bound_and_sticks(sim: Any, proxy: Any) -> None:
    _, stable = await sim()
    _, canary = await sim()
    handle = await proxy(split_rules(stable, canary, variants=[("stable", 0, 90), ("canary", 1, 10)]))
    subjects = [f"s{i}" for i in range(1000)]
    async with aiohttp.ClientSession() as session:
        first = await ask_many(session, handle, subjects)
        second = await ask_many(session, handle, subjects[:200])
    low, high = five_sigma(1000, 0.1)
    assert low <= Counter(first.values())["canary"] <= high
    assert all(second[s] == first[s] for s in second)
    counts = assignments(handle)
    assert counts[("canary", "new")] == Counter(first.values())["canary"]
    assert by_source(counts) == Counter({"new": 1000, "sticky": 200})


async def test_without_sticky_each_request_draws_by_weight(sim: Any, proxy: Any) -> None:
    _, stable = await sim()
    _, canary = await sim()
    handle = await proxy(split_rules(stable, canary, sticky="", variants=[("stable", 0, 80), ("canary", 1, 20)]))
    handle.splitter.rng = random.Random(5)
    async with aiohttp.ClientSession() as session:
        served = await asyncio.gather(*(ask(session, handle, "same-user") for _ in range(400)))
    low, high = five_sigma(400, 0.2)
    assert low <= served.count("canary") <= high  # the header means nothing here: no stickiness
    assert by_source(assignments(handle)) == Counter({"new": 400})
    assert isinstance(handle.splitter.store, MemoryStore) and len(handle.splitter.store) == 0


async def test_weight_zero_and_blue_green_reloads(sim: Any, proxy: Any) -> None:
    _, blue_server = await sim()
    _, green_server = await sim()

    def rules(*variants: tuple[str, int, float]) -> str:
        return split_rules(blue_server, green_server, variants=variants)

    handle = await proxy(rules(("blue", 0, 100), ("green", 1, 0)))
    old = [f"old{i}" for i in range(150)]
    new = [f"new{i}" for i in range(150)]
    async with aiohttp.ClientSession() as session:
        assert set((await ask_many(session, handle, old)).values()) == {"blue"}  # weight 0 gets nothing

        await reload_rules(handle, rules(("blue", 0, 50), ("green", 1, 50)))
        assert set((await ask_many(session, handle, old)).values()) == {"blue"}  # weight > 0: they keep it
        half = await ask_many(session, handle, new)
        low, high = five_sigma(150, 0.5)
        assert low <= Counter(half.values())["green"] <= high  # new subjects follow the new weights

        await reload_rules(handle, rules(("blue", 0, 0), ("green", 1, 100)))
        before = assignments(handle)
        assert set((await ask_many(session, handle, old + new)).values()) == {"green"}
        moved = assignments(handle) - before
        blue_new = sum(1 for v in half.values() if v == "blue")
        assert moved == Counter({("green", "new"): 150 + blue_new, ("green", "sticky"): 150 - blue_new})

        # blue removed outright, a new variant at weight 0: everyone stays on green, nobody on teal
        await reload_rules(handle, rules(("green", 1, 100), ("teal", 0, 0)))
        before = assignments(handle)
        assert set((await ask_many(session, handle, old + new)).values()) == {"green"}
        assert assignments(handle) - before == Counter({("green", "sticky"): 300})


async def test_subject_from_body_user_and_api_key_via_the_openai_sdk(sim: Any, proxy: Any) -> None:
    _, stable = await sim()
    _, canary = await sim()
    variants = [("stable", 0, 50), ("canary", 1, 50)]
    by_user = await proxy(split_rules(stable, canary, variants=variants, sticky="sticky: {by: body:user}"))
    by_key = await proxy(split_rules(stable, canary, variants=variants, sticky="sticky: {by: api_key}"))
    async with openai.AsyncOpenAI(base_url=by_user.base_url, api_key="k") as client:
        for i in range(20):
            served = [(await client.chat.completions.with_raw_response.create(
                model="my-model", messages=MESSAGES, max_tokens=1, user=f"alice-{i}")).headers["x-splitstream-variant"]
                for _ in range(2)]
            assert served[0] == served[1]
    for i in range(20):
        async with openai.AsyncOpenAI(base_url=by_key.base_url, api_key=f"sk-client-secret-{i}") as keyed:
            served = [(await keyed.chat.completions.with_raw_response.create(
                model="my-model", messages=MESSAGES, max_tokens=1)).headers["x-splitstream-variant"] for _ in range(2)]
            assert served[0] == served[1]
    assert by_source(assignments(by_user)) == Counter({"new": 20, "sticky": 20})
    assert by_source(assignments(by_key)) == Counter({"new": 20, "sticky": 20})
    # What the stores hold names neither the subject nor the key, nor the hash the key is checked against.
    for handle, secrets in ((by_user, ["alice"]), (by_key, ["sk-client", hash_api_key("sk-client-secret-0")[:32]])):
        store = handle.splitter.store
        assert isinstance(store, MemoryStore)
        keys = list(store._entries)  # the test looks inside the embedded store
        assert len(keys) == 20 and all(re.fullmatch(r"splitstream:sticky:canary:[0-9a-f]{32}", k) for k in keys)
        assert not any(secret in key for key in keys for secret in secrets)


async def test_requests_without_a_subject_draw_per_request_and_count_as_new(sim: Any, proxy: Any) -> None:
    _, stable = await sim()
    _, canary = await sim()
    handle = await proxy(split_rules(stable, canary, variants=[("stable", 0, 50), ("canary", 1, 50)]))
    handle.splitter.rng = random.Random(11)
    async with aiohttp.ClientSession() as session:
        served = Counter([await ask(session, handle) for _ in range(200)] + [await ask(session, handle, "") for _ in range(20)])
        async with session.get(handle.url("/metrics")) as response:
            exposition = await response.text()
    low, high = five_sigma(220, 0.5)
    assert low <= served["canary"] <= high
    assert by_source(assignments(handle)) == Counter({"new": 220})
    assert isinstance(handle.splitter.store, MemoryStore) and len(handle.splitter.store) == 0
    lines = [ln for ln in exposition.splitlines() if ln.startswith("splitstream_split_assignments_total{")]
    assert any(all(f'{k}="{v}"' in ln for k, v in (("route", "canary"), ("variant", "canary"), ("source", "new")))
               for ln in lines), lines


async def test_plain_pool_routes_make_no_split_decision(sim: Any, proxy: Any) -> None:
    from tests.conftest import simple_rules

    _, server = await sim()
    handle = await proxy(simple_rules(server))
    async with aiohttp.ClientSession() as session:
        body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 1}
        async with session.post(handle.url("/v1/chat/completions"), json=body, headers={"x-user-id": "u"}) as r:
            assert r.status == 200 and r.headers["x-splitstream-variant"] == "main-pool"
    samples = [s for f in handle.metrics.registry.collect() if f.name == "splitstream_split_assignments"
               for s in f.samples]
    assert samples == []


async def test_redis_outage_mid_load_falls_back_then_recovers(
    sim: Any, proxy: Any, redis_server: RedisServer
) -> None:
    _, stable = await sim()
    _, canary = await sim()
    clock = FakeClock()
    store = RedisStore(redis_server.url, timeout=TEST_TIMEOUT, cooldown=1.0, clock=clock)
    handle = await proxy(split_rules(stable, canary, variants=[("stable", 0, 70), ("canary", 1, 30)]), store=store)
    # Every request must reach the store here: this is about the store's breaker and the hash fallback, not
    # the in-process memory of recent answers (which would answer these repeat subjects during the outage).
    handle.splitter.recent = None
    subjects = [f"u{i}" for i in range(60)]
    async with aiohttp.ClientSession() as session:
        assigned = await ask_many(session, handle, subjects)
        assert by_source(assignments(handle)) == Counter({"new": 60})

        # Load from 16 workers; Redis stops once 100 answers are in, while requests are in flight.
        answers: list[tuple[str, str]] = []
        halfway = asyncio.Event()

        async def worker(offset: int) -> None:
            for i in range(25):
                subject = subjects[(offset * 25 + i) % len(subjects)]
                answers.append((subject, await ask(session, handle, subject)))
                if len(answers) >= 100:
                    halfway.set()

        workers = [asyncio.ensure_future(worker(w)) for w in range(16)]
        await halfway.wait()
        redis_server.stop()
        await asyncio.gather(*workers)  # every request succeeded (ask asserts 200)
        assert len(answers) == 400
        assert all(variant == assigned[subject] for subject, variant in answers)  # the fallback agrees
        counts = by_source(assignments(handle))
        assert counts["fallback"] > 0 and counts["new"] + counts["sticky"] + counts["fallback"] == 460
        assert store.breaker.is_open

        calls = store.calls
        more = await ask_many(session, handle, subjects)
        assert more == assigned
        assert store.calls == calls  # the breaker keeps requests off the dead Redis
        assert by_source(assignments(handle))["fallback"] == counts["fallback"] + 60

        redis_server.start()  # same port, empty
        clock.advance(1.0)  # the cooldown is over: the next request probes
        sticky_before = by_source(assignments(handle))["sticky"]
        for _ in range(3):  # probe (stores again: new), then the stored assignment is read back
            await ask(session, handle, "u0")
            if by_source(assignments(handle))["sticky"] > sticky_before:
                break
        assert by_source(assignments(handle))["sticky"] == sticky_before + 1
        assert not store.breaker.is_open


async def test_serve_with_redis_flag_stores_assignments_in_redis(
    sim: Any, tmp_path: Path, redis_server: RedisServer
) -> None:
    from tests.processes import free_port, reaped, start, wait_for_line

    _, stable = await sim()
    _, canary = await sim()
    (tmp_path / "rules.yaml").write_text(
        split_rules(stable, canary, variants=[("stable", 0, 50), ("canary", 1, 50)]))
    port = free_port()
    async with reaped(await start("serve", "--rules", str(tmp_path), "--port", str(port), "--redis", redis_server.url)) as proc:
        assert proc.stderr is not None
        assert f"127.0.0.1:{redis_server.port}" in await wait_for_line(proc.stderr, "redis store at")
        await wait_for_line(proc.stderr, "listening")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 1}
        async with aiohttp.ClientSession() as session:
            for subject in ("a", "b", "c"):
                async with session.post(url, json=body, headers={"x-user-id": subject}) as response:
                    assert response.status == 200
                    variant = response.headers["x-splitstream-variant"]
                key = f"splitstream:sticky:canary:{hashlib.sha256(subject.encode()).hexdigest()[:32]}"
                assert redis_server.command(b"GET", key.encode()) == f"${len(variant)}\r\n{variant}\r\n".encode()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_serve_refuses_a_bad_redis_url(tmp_path: Path) -> None:
    from tests.processes import start

    (tmp_path / "rules.yaml").write_text(textwrap.dedent("""\
        backends: {b: {url: "http://127.0.0.1:9"}}
        pools: {p: {backends: [b]}}
        routes: [{name: r, match: {model: m}, pool: p}]
        """))
    proc = await start("serve", "--rules", str(tmp_path), "--redis", "http://user:hunter2@127.0.0.1:1")
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"invalid --redis URL" in stderr and b"hunter2" not in stderr


class StickyCounting(RedisStore):
    """A RedisStore that counts the calls on sticky-assignment keys. The app's background flushes (pooled
    statistics, about once a second) use the same store meanwhile; they are not what is counted here."""

    sticky_calls = 0

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        self.sticky_calls += key.startswith("splitstream:sticky:")
        return await super().set_if_absent(key, value, ttl)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.sticky_calls += key.startswith("splitstream:sticky:")
        await super().set(key, value, ttl)


async def test_repeat_subjects_skip_the_redis_round_trip_but_removed_variants_do_not(
    sim: Any, proxy: Any, redis_server: RedisServer
) -> None:
    _, stable = await sim()
    _, canary = await sim()
    store = StickyCounting(redis_server.url, timeout=TEST_TIMEOUT)
    handle = await proxy(split_rules(stable, canary, variants=[("stable", 0, 50), ("canary", 1, 50)]), store=store)
    subjects = [f"user-{i}" for i in range(40)]
    async with aiohttp.ClientSession() as session:
        first = await ask_many(session, handle, subjects)
        calls = store.sticky_calls
        assert calls >= len(subjects)  # the first asks went to Redis
        again = await ask_many(session, handle, subjects)
        assert again == first and store.sticky_calls == calls  # answered from this process's memory of Redis
        # canary set to 0 by a reload: its subjects must move at once, memory or not
        await reload_rules(handle, split_rules(stable, canary, variants=[("stable", 0, 100), ("canary", 1, 0)]))
        moved = await ask_many(session, handle, subjects)
    assert set(moved.values()) == {"stable"}
    assert "canary" in set(first.values())
