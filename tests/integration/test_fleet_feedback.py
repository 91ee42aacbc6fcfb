"""Feedback on any replica: two real `python -m proxy serve` processes on one real redis-server, simulated
runtimes behind them. A request served by one replica is scored on the other; a score for someone else's
request is refused whatever replica it reaches (the admin token excepted); scores are clamped to the route's
range; a client's own X-Request-Id never becomes, or rebinds, a join; generated ids are unguessable; and
a Redis outage costs the fleet-wide join, never a request.

Synchronisation is on observable state: the batched join is awaited by polling Redis for its key (bounded),
never by sleeping a fixed time."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from typing import Any, Protocol

import aiohttp

from tests.conftest import backend_url
from tests.integration.conftest import RedisServer, Served, ServedFactory

TOKEN = "fleet-admin-token"
KEYS = {"ONE_KEYS": "k1", "TWO_KEYS": "k2", "SPLITSTREAM_ADMIN_TOKEN": TOKEN}  # two tenants, one key each
OWN_ID = re.compile(r"[0-9a-f]{32}")
JOIN_DEADLINE = 10.0  # seconds for a batched join to reach Redis (it is flushed every 0.5 s)


class Replica(Protocol):
    """A splitstream process (`Served`) or an in-process proxy (`ProxyHandle`)."""

    def url(self, path: str) -> str: ...


def rules(stable: Any, canary: Any, tenants: bool = True) -> str:
    """Two tenants (`one`: key k1, `two`: key k2), or none: an open API."""
    block = "tenants:\n  one: {keys_env: ONE_KEYS}\n  two: {keys_env: TWO_KEYS}\n" if tenants else ""
    return f"""
backends:
  stable-1: {{url: "{backend_url(stable)}", kind: vllm}}
  canary-1: {{url: "{backend_url(canary)}", kind: vllm}}
pools:
  stable: {{backends: [stable-1], model: sim-model}}
  canary: {{backends: [canary-1], model: sim-model}}
{block}routes:
  - name: chat
    match: {{model: my-model}}
    split:
      variants:
        - {{name: stable, pool: stable, weight: 50}}
        - {{name: canary, pool: canary, weight: 50}}
    feedback: {{min: 0, max: 1}}
"""


async def fleet(sim: Any, served: ServedFactory, redis: RedisServer) -> tuple[Served, Served]:
    _, stable = await sim()
    _, canary = await sim()
    text = rules(stable, canary)
    first = await served(text, "--redis", redis.url, env=KEYS)  # one at a time: each gets its own rules dir
    return first, await served(text, "--redis", redis.url, env=KEYS)


async def ask(session: aiohttp.ClientSession, replica: Replica, key: str | None,
              headers: dict[str, str] | None = None) -> Mapping[str, str]:
    sent = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.post(replica.url("/v1/chat/completions"), headers={**sent, **(headers or {})},
                            json={"model": "my-model", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 2}) as response:
        assert response.status == 200, await response.text()
        await response.read()
        return response.headers


async def score(session: aiohttp.ClientSession, replica: Replica, authorization: str | None, request_id: str,
                value: Any) -> tuple[int, Any]:
    headers = {"Authorization": authorization} if authorization else {}
    async with session.post(replica.url("/v1/feedback"), headers=headers,
                            json={"request_id": request_id, "score": value}) as response:
        return response.status, await response.json()


def joined_in_redis(redis: RedisServer, request_id: str) -> bool:
    return redis.command(b"EXISTS", f"splitstream:feedback:join:{request_id}".encode()) == b":1\r\n"


async def until_joined(redis: RedisServer, *request_ids: str, within: float = JOIN_DEADLINE) -> None:
    """Bounded wait for the serving replica's batched writer to put these joins in Redis."""
    deadline = time.monotonic() + within
    while not all(joined_in_redis(redis, request_id) for request_id in request_ids):
        assert time.monotonic() < deadline, f"joins not in Redis after {within}s"
        await asyncio.sleep(0.02)


def stored_score(redis: RedisServer, request_id: str) -> bytes:
    return redis.command(b"GET", f"splitstream:feedback:score:{request_id}".encode())


async def test_feedback_posted_to_a_replica_that_did_not_serve_the_request_is_joined(
        sim: Any, served: ServedFactory, redis_server: RedisServer) -> None:
    a, b = await fleet(sim, served, redis_server)
    async with aiohttp.ClientSession() as session:
        answers = [await ask(session, a, "k1") for _ in range(12)]
        ids = [h["x-splitstream-request-id"] for h in answers]
        assert all(h["x-request-id"] == h["x-splitstream-request-id"] for h in answers)  # no id of the client's
        assert {h["x-splitstream-variant"] for h in answers} == {"stable", "canary"}  # rng: 2 * 0.5^12 to fail
        await until_joined(redis_server, *ids)

        for headers in answers:  # B never saw these requests: it joins them through Redis
            request_id = headers["x-splitstream-request-id"]
            status, body = await score(session, b, "Bearer k1", request_id, 0.75)
            assert status == 200, body
            assert body == {"object": "feedback", "request_id": request_id, "route": "chat",
                            "variant": headers["x-splitstream-variant"], "score": 0.75}

        first = ids[0]
        # Clamped to the route's feedback range [0, 1]; the last score wins on whichever replica it lands.
        assert (await score(session, a, "Bearer k1", first, 7))[1]["score"] == 1.0
        assert stored_score(redis_server, first) == b"$3\r\n1.0\r\n"
        assert (await score(session, b, "Bearer k1", first, -3))[1]["score"] == 0.0
        assert stored_score(redis_server, first) == b"$3\r\n0.0\r\n"
        assert (await score(session, b, "Bearer k1", first, 0.5))[1]["score"] == 0.5

        # Not finite, or not a number: refused before any join.
        async with session.post(b.url("/v1/feedback"), headers={"Authorization": "Bearer k1",
                                                                "Content-Type": "application/json"},
                                data=f'{{"request_id": "{first}", "score": 1e999}}'.encode()) as response:
            assert response.status == 400
        assert (await score(session, b, "Bearer k1", first, "1"))[0] == 400
        assert stored_score(redis_server, first) == b"$3\r\n0.5\r\n"

        # Unknown anywhere: a 404 from both replicas.
        for replica in (a, b):
            status, body = await score(session, replica, "Bearer k1", "0" * 32, 1)
            assert (status, body["error"]["code"]) == (404, "request_not_found")


async def test_a_spoofed_score_for_someone_elses_request_is_refused(
        sim: Any, served: ServedFactory, redis_server: RedisServer) -> None:
    a, b = await fleet(sim, served, redis_server)
    async with aiohttp.ClientSession() as session:
        victim = await ask(session, a, "k1")
        victim_id, variant = victim["x-splitstream-request-id"], victim["x-splitstream-variant"]
        await until_joined(redis_server, victim_id)

        for replica in (a, b):  # the replica that served it and one that joins it through Redis
            status, body = await score(session, replica, "Bearer k2", victim_id, 0)
            assert (status, body["error"]["code"]) == (404, "request_not_found")  # as if it did not exist
            status, body = await score(session, replica, None, victim_id, 0)
            assert (status, body["error"]["code"]) == (401, "invalid_api_key")
            status, body = await score(session, replica, "Bearer wrong-admin-token", victim_id, 0)
            assert status == 401
        assert stored_score(redis_server, victim_id) == b"$-1\r\n"  # nothing was booked

        # A client-chosen X-Request-Id is echoed for tracing, but the join is under a fresh id of ours: naming
        # the victim's id does not rebind the victim's join to another tenant or variant.
        for _ in range(4):
            spoof = await ask(session, b, "k2", headers={"X-Request-Id": victim_id})
            assert spoof["x-request-id"] == victim_id
            assert OWN_ID.fullmatch(spoof["x-splitstream-request-id"])
            assert spoof["x-splitstream-request-id"] != victim_id
        traced = await ask(session, a, "k2", headers={"X-Request-Id": "my-trace-id"})
        assert traced["x-request-id"] == "my-trace-id"
        await until_joined(redis_server, spoof["x-splitstream-request-id"], traced["x-splitstream-request-id"])
        for replica in (a, b):
            status, body = await score(session, replica, "Bearer k2", victim_id, 0)
            assert (status, body["error"]["code"]) == (404, "request_not_found")
            status, body = await score(session, replica, "Bearer k2", "my-trace-id", 0)  # not a join key
            assert (status, body["error"]["code"]) == (404, "request_not_found")
        status, body = await score(session, b, "Bearer k2", traced["x-splitstream-request-id"], 1)
        assert status == 200 and body["variant"] == traced["x-splitstream-variant"]  # its own id works

        # The owner still scores its request, joined to the variant that served it; so may the admin.
        status, body = await score(session, b, "Bearer k1", victim_id, 0.25)
        assert (status, body["variant"], body["score"]) == (200, variant, 0.25)
        status, body = await score(session, b, f"Bearer {TOKEN}", victim_id, 0.5)
        assert (status, body["variant"], body["score"]) == (200, variant, 0.5)
        status, body = await score(session, a, f"Bearer {TOKEN}", victim_id, 0.75)
        assert (status, body["variant"]) == (200, variant)
        assert stored_score(redis_server, victim_id) == b"$4\r\n0.75\r\n"


async def test_ids_are_unguessable(sim: Any, served: ServedFactory, redis_server: RedisServer) -> None:
    a, b = await fleet(sim, served, redis_server)
    async with aiohttp.ClientSession() as session:
        ids = [(await ask(session, replica, "k1"))["x-splitstream-request-id"] for replica in (a, b) * 10]
    assert all(OWN_ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)
    # No shared prefix or counter: ids from one process look no more alike than random strings.
    assert len({i[:6] for i in ids}) == len(ids)
    same = sum(x == y for first, second in zip(ids, ids[1:]) for x, y in zip(first, second))
    assert same / (32 * (len(ids) - 1)) < 0.15  # 1/16 expected by chance


async def test_a_redis_outage_costs_the_fleet_wide_join_never_a_request(
        sim: Any, served: ServedFactory, redis_server: RedisServer) -> None:
    a, b = await fleet(sim, served, redis_server)
    async with aiohttp.ClientSession() as session:
        redis_server.stop()
        headers = await ask(session, a, "k1")  # served while Redis is down
        request_id = headers["x-splitstream-request-id"]
        status, body = await score(session, b, "Bearer k1", request_id, 1)  # B cannot reach the join
        assert (status, body["error"]["code"]) == (404, "request_not_found")
        status, body = await score(session, a, "Bearer k1", request_id, 1)  # A knows it
        assert (status, body["variant"]) == (200, headers["x-splitstream-variant"])
        status, body = await score(session, a, "Bearer k2", request_id, 1)  # and still checks who asks
        assert status == 404
        redis_server.start()
        # A batch the store refused is dropped, not retried; once the store's breaker lets calls through
        # again (a cooldown of a second or more), the next requests' joins are written.
        deadline = time.monotonic() + 3 * JOIN_DEADLINE
        while True:
            after = (await ask(session, a, "k1"))["x-splitstream-request-id"]
            try:
                await until_joined(redis_server, after, within=1.0)
                break
            except AssertionError:
                assert time.monotonic() < deadline, a.log[-3000:]
        assert (await score(session, b, "Bearer k1", after, 1))[0] == 200


async def test_one_replica_without_redis_applies_the_same_rules(sim: Any, proxy: Any) -> None:
    """The embedded store: the ledger is the whole join. Keys are off here, so a request made without one
    may be scored by whoever has its id, and one made with a key only by that key (or the admin token)."""
    _, stable = await sim()
    _, canary = await sim()
    replica = await proxy(rules(stable, canary, tenants=False), admin_token=TOKEN)
    async with aiohttp.ClientSession() as session:
        anonymous = (await ask(session, replica, None))["x-splitstream-request-id"]
        keyed = await ask(session, replica, "someone")
        keyed_id = keyed["x-splitstream-request-id"]
        assert (await score(session, replica, None, anonymous, 0.5))[0] == 200
        assert (await score(session, replica, "Bearer other", anonymous, 2))[1]["score"] == 1.0  # clamped
        for intruder in (None, "Bearer other", "Bearer wrong-admin-token"):
            status, body = await score(session, replica, intruder, keyed_id, 1)
            assert (status, body["error"]["code"]) == (404, "request_not_found")
        status, body = await score(session, replica, "Bearer someone", keyed_id, -1)
        assert (status, body["variant"], body["score"]) == (200, keyed["x-splitstream-variant"], 0.0)
        assert (await score(session, replica, f"Bearer {TOKEN}", keyed_id, 1))[0] == 200
        async with session.get(replica.url("/admin/experiments/chat"),
                               headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            scored = [row["feedback"] for row in (await response.json())["variants"]]
    assert sum(f["count"] for f in scored) == 2  # two requests scored, each replacement counted once
    assert sum(f["count"] * f["mean"]["value"] for f in scored if f["count"]) == 2.0  # last scores: 1.0 and 1.0
