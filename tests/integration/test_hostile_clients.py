"""Hostile clients against a real splitstream process: nothing they send may cost memory, slots or a
variant's record. Each test reproduces an attack found in review (see the hostile-inputs issue)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
import orjson

from tests.conftest import Gate, backend_url, simple_rules
from tests.integration.conftest import ServedFactory
from tests.integration.test_cache import cache_rules

MESSAGES = [{"role": "user", "content": "hi"}]


async def post(url: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """Status and JSON answer (a stream's text as it came)."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as session, session.post(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    ) as response:
        if response.content_type == "text/event-stream":
            return response.status, await response.text()
        return response.status, await response.json(content_type=None)


async def test_a_model_name_past_256_characters_is_a_400(sim: Any, served: ServedFactory) -> None:
    runtime, server = await sim()
    s = await served(simple_rules(server))
    status, body = await post(s.url("/v1/chat/completions"), {"model": "m" * 257, "messages": MESSAGES})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert runtime.stats.requests == 0


async def test_learning_is_keyed_by_pool_not_by_the_clients_model_name(sim: Any, proxy: Any) -> None:
    runtime, server = await sim(models=[f"any-{i}" for i in range(20)])
    rules = simple_rules(server).replace('model: "sim-model"', "").replace('"my-model"', '"any-*"')
    handle = await proxy(rules)
    for i in range(20):
        status, _ = await post(handle.url("/v1/chat/completions"), {"model": f"any-{i}", "messages": MESSAGES})
        assert status == 200
    assert set(handle.dispatcher.model_stats) == {"main-pool"}  # one entry, whatever the clients sent


async def slow_body(port: int, declared: int = 100) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request whose head is complete and whose body stops after one byte (slowloris on the body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n{" % declared)
    await writer.drain()
    return reader, writer


async def test_slow_bodies_hold_no_slot_and_get_408(sim: Any, served: ServedFactory) -> None:
    runtime, server = await sim()
    s = await served(simple_rules(server, server_block="server: {max_inflight: 2, read_timeout: 1s}"))
    slow = [await slow_body(s.port) for _ in range(5)]
    # With bodies still missing, nothing is in flight: a real request is served, not refused with 429.
    status, body = await post(s.url("/v1/chat/completions"), {"model": "my-model", "messages": MESSAGES})
    assert status == 200, body
    for reader, writer in slow:  # each slow client is told, then cut off
        answer = await asyncio.wait_for(reader.read(), 30)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert b'"request_timeout"' in answer
        writer.close()


async def test_a_head_that_never_ends_gets_408_and_the_connection_closes(sim: Any, served: ServedFactory) -> None:
    runtime, server = await sim()
    s = await served(simple_rules(server, server_block="server: {read_timeout: 1s}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # ...and nothing more
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 30)  # EOF after the answer: the connection was closed
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
    writer.close()
    status, _ = await post(s.url("/v1/chat/completions"), {"model": "my-model", "messages": MESSAGES})
    assert status == 200  # and the process serves on


def two_variant_rules(server: Any) -> str:
    return f"""
backends:
  b0: {{url: "{backend_url(server)}", kind: vllm, max_inflight: 1}}
pools:
  p: {{backends: [b0], model: "sim-model"}}
server: {{max_queue: 0}}
routes:
  - name: chat
    match: {{model: "my-model"}}
    split:
      sticky: {{by: "header:x-user"}}
      variants:
        - {{name: stable, pool: p, weight: 50}}
        - {{name: canary, pool: p, weight: 50}}
"""


async def variant_errors(s: Any) -> dict[str, tuple[int, int]]:
    async with aiohttp.ClientSession() as session, session.get(s.url("/admin/experiments/chat")) as response:
        report = await response.json()
    return {row["name"]: (row["requests"], row["errors"]) for row in report["variants"]}



async def test_anonymous_clients_never_share_cached_answers(sim: Any, served: ServedFactory) -> None:
    runtime, server = await sim()
    s = await served(cache_rules(server))
    body = {"model": "my-model", "messages": [{"role": "user", "content": "my secret question"}], "temperature": 0}
    results = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # two clients without keys: one must not read what the other asked
            async with session.post(s.url("/v1/chat/completions"), json=body) as response:
                assert response.status == 200
                results.append(response.headers["x-splitstream-cache"])
    assert results == ["bypass", "bypass"] and runtime.stats.requests == 2
    shared = await served(cache_rules(server, cache="{ttl: 1m, shared: true}"))  # unless the route says so
    async with aiohttp.ClientSession() as session:
        for expected in ("miss", "hit"):
            async with session.post(shared.url("/v1/chat/completions"), json=body) as response:
                assert response.headers["x-splitstream-cache"] == expected


async def test_the_redis_url_can_stay_off_the_command_line(sim: Any, served: ServedFactory, redis_server: Any) -> None:
    runtime, server = await sim()
    s = await served(two_variant_rules(server), env={"SPLITSTREAM_REDIS_URL": redis_server.url})
    status, _ = await post(s.url("/v1/chat/completions"), {"model": "my-model", "messages": MESSAGES},
                           {"x-user": "someone"})
    assert status == 200
    assert redis_server.command(b"DBSIZE") != b":0\r\n"  # the sticky assignment went to Redis
    with open(f"/proc/{s.proc.pid}/cmdline", "rb") as cmdline:
        assert b"redis://" not in cmdline.read()  # nothing for `ps` to show


async def test_a_rule_file_with_secrets_never_shows_them(sim: Any, served: ServedFactory) -> None:
    runtime, server = await sim()
    s = await served(simple_rules(server))
    (s.rules_dir / "zz-bad.yaml").write_text(
        "backends:\n  leaky: {url: 'http://admin:hunter2@127.0.0.1:9', api_key_env: 'sk-live-4f9a8b7c6d5e4f3a2b1c'}\n")
    admin = {"X-Splitstream-Admin": "1", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(s.url("/admin/reload"), headers=admin) as response:
            outcome = await response.text()
        async with session.get(s.url("/admin/rules")) as response:
            rules = await response.text()
        async with session.get(s.url("/ui/")) as response:
            page = await response.text()
    assert '"error"' in outcome and "credentials" in rules  # refused, and said why
    for surface in (outcome, rules, page, s.log):
        assert "hunter2" not in surface and "4f9a8b7c6d5e4f3a2b1c" not in surface


async def test_readyz_floods_share_one_round_of_probes(proxy: Any, aiohttp_server: Any) -> None:
    probes: list[str] = []

    async def health(request: web.Request) -> web.Response:
        probes.append(request.path)
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", health)
    backend = await aiohttp_server(app)
    handle = await proxy(simple_rules(backend).replace("backends:", "health: {interval: 10m}\nbackends:", 1))
    await handle.health.wait_round()  # the health checker's own first probe is done
    before = len(probes)
    async with aiohttp.ClientSession() as session:
        async def ready() -> int:
            async with session.get(handle.url("/readyz")) as response:
                return response.status

        statuses = await asyncio.gather(*(ready() for _ in range(20)))
    assert statuses == [200] * 20
    assert len(probes) - before == 1  # unauthenticated callers cannot make us probe every backend per call
