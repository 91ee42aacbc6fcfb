"""Hot reload end to end: edits to the rules directory change routing for the next request, never for one in
flight; broken edits are refused whole and reported; /admin/* answers and is guarded. Reloads are awaited
through the `Reloader`'s hooks, never slept for."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import Gate, ProxyHandle, backend_url

MESSAGES = [{"role": "user", "content": "hi"}]
T = TypeVar("T")


async def settle(awaitable: Awaitable[T]) -> T:
    """Await a reload hook; the bound only turns a broken watcher into a failure instead of a hang."""
    return await asyncio.wait_for(awaitable, 30)


def two_pools(a: TestServer, b: TestServer, pool: str, comment: str = "") -> str:
    """Backends a and b, each alone in its pool; route `main` (model my-model) goes to `pool`."""
    return f"""# {comment}
backends:
  a: {{url: "{backend_url(a)}", kind: vllm}}
  b: {{url: "{backend_url(b)}", kind: vllm}}
pools:
  pool-a: {{backends: [a], model: sim-model}}
  pool-b: {{backends: [b], model: sim-model}}
routes:
  - name: main
    match: {{model: my-model}}
    pool: {pool}
"""


def client(handle: ProxyHandle) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)  # no retry hides a loss


async def served_by(handle: ProxyHandle) -> str:
    response = await client(handle).chat.completions.with_raw_response.create(
        model="my-model", messages=MESSAGES, max_tokens=2
    )
    return response.headers["x-splitstream-backend"]


async def admin(handle: ProxyHandle, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"X-Splitstream-Admin": "1", **({"Authorization": f"Bearer {token}"} if token is not None else {})}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, handle.url(path), headers=headers) as response:
            return response.status, await response.json()


async def metric(handle: ProxyHandle, line_start: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(handle.url("/metrics")) as response:
            text = await response.text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start + " ")]
    return values[0] if values else 0.0


def rewrite(handle: ProxyHandle, text: str) -> None:
    (handle.rules_dir / "rules.yaml").write_text(text)


async def test_an_edit_changes_routing_for_the_next_request(sim: Any, proxy: Any) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(two_pools(a, b, "pool-a"))
    assert await served_by(handle) == "a"
    rewrite(handle, two_pools(a, b, "pool-b"))
    await settle(handle.reloader.wait_for_generation(2))
    assert await served_by(handle) == "b"
    assert await metric(handle, "splitstream_rules_generation") == 2.0
    assert await metric(handle, 'splitstream_rules_reloads_total{result="success"}') == 2.0  # startup + edit


async def test_an_atomic_rename_save_is_seen(sim: Any, proxy: Any) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(two_pools(a, b, "pool-a"))
    fd, temp = tempfile.mkstemp(dir=handle.rules_dir, prefix=".rules.yaml.", suffix=".tmp")  # as editors do
    with os.fdopen(fd, "w") as out:
        out.write(two_pools(a, b, "pool-b"))
    os.replace(temp, handle.rules_dir / "rules.yaml")
    await settle(handle.reloader.wait_for_generation(2))
    assert await served_by(handle) == "b"


async def test_a_new_file_merges_into_the_rules(sim: Any, proxy: Any) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(two_pools(a, b, "pool-a"))
    (handle.rules_dir / "zz-extra.yml").write_text(
        "routes:\n  - name: extra\n    match: {model: other-model}\n    pool: pool-b\n"
    )
    await settle(handle.reloader.wait_for_generation(2))
    response = await client(handle).chat.completions.with_raw_response.create(
        model="other-model", messages=MESSAGES, max_tokens=2
    )
    assert response.headers["x-splitstream-route"] == "extra"


async def test_a_broken_edit_keeps_the_old_rules_and_is_reported(sim: Any, proxy: Any) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(two_pools(a, b, "pool-a"))
    reloader = handle.reloader
    # Line 3 gets a typo and the route points at an undefined pool: both are reported, neither is applied.
    rewrite(handle, two_pools(a, b, "pool-bb").replace("kind: vllm", "kind: vlm", 1))
    await settle(reloader.wait_until(lambda: reloader.last_error is not None))
    assert await served_by(handle) == "a"
    assert reloader.generation == 1

    status, body = await admin(handle, "GET", "/admin/rules")
    assert status == 200 and body["generation"] == 1
    path = handle.rules_dir / "rules.yaml"
    assert body["last_error"]["errors"] == [
        f"{path}:3: backend 'a': kind must be one of vllm, llamacpp, ollama, tgi, openai, got 'vlm' "
        "(did you mean 'vllm'?)",
        f"{path}:11: route 'main': pool 'pool-bb' is not defined (did you mean 'pool-b'?)",
    ]
    assert body["last_error"]["trigger"] == "watch" and body["last_error"]["at"].endswith("Z")
    assert await metric(handle, 'splitstream_rules_reloads_total{result="error"}') >= 1.0
    assert await metric(handle, 'splitstream_rules_reloads_total{result="success"}') == 1.0  # startup only

    rewrite(handle, two_pools(a, b, "pool-b"))  # fixed: applied, and the error is history
    await settle(reloader.wait_for_generation(2))
    assert await served_by(handle) == "b"
    _, body = await admin(handle, "GET", "/admin/rules")
    assert body["last_error"] is None and body["generation"] == 2


async def test_a_stream_in_flight_finishes_on_the_rules_it_started_with(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime_a, a = await sim(pacer=gate)
    runtime_b, b = await sim()
    handle = await proxy(two_pools(a, b, "pool-a"))
    gate.open(0)
    stream = await client(handle).chat.completions.create(
        model="my-model", messages=MESSAGES, max_tokens=6, stream=True
    )
    chunks = [await anext(stream)]

    rewrite(handle, two_pools(a, b, "pool-b"))
    await settle(handle.reloader.wait_for_generation(2))
    assert await served_by(handle) == "b"  # the next request follows the new rules...

    gate.open_all()
    chunks += [chunk async for chunk in stream]  # ...while the stream goes on from pool-a, uncut
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 6
    assert chunks[-1].choices[0].finish_reason == "length"
    assert (runtime_a.stats.requests, runtime_a.stats.completed, runtime_a.stats.cancelled) == (1, 1, 0)
    assert runtime_b.stats.requests == 1


def load_rules_text(s0: TestServer, s1: TestServer, step: int) -> str:
    """Odd steps: pool of b0 and b1; even steps: b1 is removed from the rules entirely (so it drains)."""
    b1 = f'  b1: {{url: "{backend_url(s1)}", kind: vllm}}\n' if step % 2 else ""
    members = "b0, b1" if step % 2 else "b0"
    return f"""# step {step}
backends:
  b0: {{url: "{backend_url(s0)}", kind: vllm, weight: {1 + step % 3}}}
{b1}pools:
  main-pool: {{backends: [{members}], model: sim-model}}
routes:
  - name: main
    match: {{model: my-model}}
    pool: main-pool
"""


async def test_reloads_under_streaming_load_lose_no_request_and_cut_no_stream(sim: Any, proxy: Any) -> None:
    gate = Gate()
    runtime0, s0 = await sim(pacer=gate)
    runtime1, s1 = await sim(pacer=gate)
    handle = await proxy(load_rules_text(s0, s1, 0))
    openai_client = client(handle)
    tokens, reloads, streams_per_step = 14, 10, 2

    async def finish(stream: Any, first: Any) -> list[Any]:
        return [first] + [chunk async for chunk in stream]

    gate.open(0)
    running: list[asyncio.Task[list[Any]]] = []
    for step in range(reloads):
        for _ in range(streams_per_step):  # new streams start on whatever rules are current
            stream = await openai_client.chat.completions.create(
                model="my-model", messages=MESSAGES, max_tokens=tokens, stream=True
            )
            running.append(asyncio.create_task(finish(stream, await anext(stream))))
        rewrite(handle, load_rules_text(s0, s1, step + 1))
        status, outcome = await admin(handle, "POST", "/admin/reload")
        # The watcher may have applied this edit first; either way exactly this edit is now running.
        assert status == 200 and outcome["result"] in ("success", "unchanged"), outcome
        assert handle.reloader.generation == step + 2
        gate.open(step + 1)
    gate.open_all()

    results = await asyncio.gather(*running)
    assert len(results) == reloads * streams_per_step
    for chunks in results:
        content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(content) == tokens
        assert chunks[-1].choices[0].finish_reason == "length"
    assert runtime0.stats.cancelled == runtime1.stats.cancelled == 0
    assert runtime0.stats.completed + runtime1.stats.completed == reloads * streams_per_step
    assert runtime1.stats.requests > 0  # b1 served streams, and was removed while they ran
    assert await served_by(handle) == "b0"
    # The last rules (step 10) have no b1: once the last handler is done (close waits for them), b1's
    # state has drained and is forgotten; b0's was kept throughout.
    await handle.server.close()
    assert [s.backend.name for s in handle.backends] == ["b0"]


async def test_admin_reload_answers_the_outcome(sim: Any, proxy: Any) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(two_pools(a, b, "pool-a"), watch_rules=False)
    status, outcome = await admin(handle, "POST", "/admin/reload")
    assert status == 200
    assert (outcome["result"], outcome["generation"], outcome["errors"]) == ("unchanged", 1, [])

    rewrite(handle, two_pools(a, b, "pool-b"))
    status, outcome = await admin(handle, "POST", "/admin/reload")
    assert (status, outcome["result"], outcome["generation"], outcome["trigger"]) == (200, "success", 2, "admin")
    assert outcome["at"].endswith("Z") and outcome["duration_ms"] >= 0
    assert await served_by(handle) == "b"

    rewrite(handle, "routes: [")
    status, outcome = await admin(handle, "POST", "/admin/reload")
    assert (status, outcome["result"], outcome["generation"]) == (200, "error", 2)
    assert len(outcome["errors"]) == 1
    assert outcome["errors"][0].startswith(f"{handle.rules_dir / 'rules.yaml'}:1: invalid YAML: ")
    assert await metric(handle, 'splitstream_rules_reloads_total{result="error"}') == 1.0
    assert await served_by(handle) == "b"


async def test_admin_rules_describes_the_running_snapshot(sim: Any, proxy: Any) -> None:
    _, a = await sim()
    _, b = await sim()
    rules = two_pools(a, b, "pool-a").replace("kind: vllm}", "kind: vllm, api_key_env: SIM_KEY}", 1)
    handle = await proxy(rules, env={"SIM_KEY": "backend-secret-value"})
    async with aiohttp.ClientSession() as session:
        async with session.get(handle.url("/admin/rules")) as response:
            assert response.status == 200
            raw = await response.text()
            body = await response.json()
    assert "backend-secret-value" not in raw
    path = handle.rules_dir / "rules.yaml"
    assert body["rules_dir"] == str(handle.rules_dir) and body["generation"] == 1
    assert body["files"] == [{"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert body["backends"][0] == {"name": "a", "url": backend_url(a), "kind": "vllm", "weight": 1.0,
                                   "max_inflight": 0, "has_api_key": True}
    assert body["pools"] == [{"name": "pool-a", "model": "sim-model", "backends": ["a"]},
                             {"name": "pool-b", "model": "sim-model", "backends": ["b"]}]
    route = body["routes"][0]
    assert (route["name"], route["models"], route["source"]) == ("main", ["my-model"], f"{path}:9")
    assert route["variants"] == [{"name": "pool-a", "pool": "pool-a", "weight": 1.0}]
    assert body["last_error"] is None and body["loaded_at"].endswith("Z")


@pytest.mark.parametrize(("method", "path"), [("GET", "/admin/rules"), ("POST", "/admin/reload")])
async def test_admin_requires_the_token_when_one_is_set(sim: Any, proxy: Any, method: str, path: str) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(two_pools(a, b, "pool-a"), admin_token="s3cret-admin", watch_rules=False)
    for token in (None, "wrong", ""):
        status, body = await admin(handle, method, path, token)
        assert status == 401
        assert body["error"]["code"] == "invalid_admin_token" and body["error"]["type"] == "authentication_error"
    status, body = await admin(handle, method, path, "s3cret-admin")
    assert status == 200 and body["generation"] == 1


async def test_admin_reload_without_a_rules_dir_is_409(sim: Any, aiohttp_client: Any) -> None:
    from proxy.app import build_app
    from proxy.config.loader import load_rules

    _, a = await sim()
    _, b = await sim()
    rules = Path(tempfile.mkdtemp())
    (rules / "rules.yaml").write_text(two_pools(a, b, "pool-a"))
    app_client = await aiohttp_client(build_app(load_rules(rules, env={}), admin_token=""))
    response = await app_client.post("/admin/reload", headers={"X-Splitstream-Admin": "1"})
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "reload_unavailable"
    response = await app_client.get("/admin/rules")
    assert response.status == 200 and (await response.json())["rules_dir"] is None
