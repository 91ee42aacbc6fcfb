"""The A/B report and client feedback end to end: real proxy, simulated runtimes, answers from the openai SDK
and aiohttp, feedback joined by x-request-id, every refusal OpenAI-shaped."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

import aiohttp
import openai

from tests.conftest import backend_url

MESSAGES = [{"role": "user", "content": "report"}]
TOKEN = "experiments-admin-token"


def rules(stable: Any, canary: Any) -> str:
    return f"""
backends:
  stable-1: {{url: "{backend_url(stable)}", kind: vllm}}
  canary-1: {{url: "{backend_url(canary)}", kind: vllm}}
pools:
  stable: {{backends: [stable-1], model: sim-model}}
  canary: {{backends: [canary-1], model: sim-model}}
health: {{failures: 1000}}
routes:
  - name: chat
    match: {{model: my-model}}
    split:
      variants:
        - {{name: stable, pool: stable, weight: 50}}
        - {{name: canary, pool: canary, weight: 50}}
    retry: {{attempts: 1}}
"""


async def test_the_ab_report_joins_feedback_to_variants(sim: Any, proxy: Any) -> None:
    _, stable = await sim()
    _, canary = await sim(fail_rate=0.25, seed=5)
    handle = await proxy(rules(stable, canary), admin_token=TOKEN)
    handle.splitter.rng = random.Random(3)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ids: dict[str, list[str]] = defaultdict(list)
    async with openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0) as client:
        async def one(stream: bool) -> None:
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="my-model", messages=MESSAGES, max_tokens=3, stream=stream)
                if stream:
                    async for _ in raw.parse():
                        pass
                headers = raw.headers
            except openai.InternalServerError as exc:  # the canary's 500s, relayed
                headers = exc.response.headers
            ids[headers["x-splitstream-variant"]].append(headers["x-request-id"])

        await asyncio.gather(*(one(stream=i % 2 == 0) for i in range(120)))
    assert len(ids["stable"]) > 20 and len(ids["canary"]) > 20

    # The caller that made the requests (same key) scores them; anyone else would get a 404.
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as session:
        async def feedback(body: Any, raw: bytes | None = None) -> tuple[int, Any]:
            kwargs: dict[str, Any] = {"data": raw, "headers": {"Content-Type": "application/json"}} \
                if raw is not None else {"json": body}
            async with session.post(handle.url("/v1/feedback"), **kwargs) as response:
                return response.status, await response.json()

        for request_id in ids["stable"][:20]:
            status, body = await feedback({"request_id": request_id, "score": 1})
            assert status == 200 and body["variant"] == "stable" and body["route"] == "chat"
        for i, request_id in enumerate(ids["canary"][:20]):
            assert (await feedback({"request_id": request_id, "score": 1}))[0] == 200
            status, body = await feedback({"request_id": request_id, "score": 0.0 if i % 2 else -1})  # replaces
            assert status == 200 and body == {"object": "feedback", "request_id": request_id, "route": "chat",
                                              "variant": "canary", "score": 0.0 if i % 2 else -1.0}

        refusals = [
            (None, b"{not json", 400, "invalid_json"),
            ([1, 2], None, 400, "invalid_json"),
            ({"score": 1}, None, 400, "invalid_feedback"),
            ({"request_id": ids["stable"][0]}, None, 400, "invalid_feedback"),
            ({"request_id": ids["stable"][0], "score": "good"}, None, 400, "invalid_feedback"),
            ({"request_id": ids["stable"][0], "score": True}, None, 400, "invalid_feedback"),
            ({"request_id": "x" * 129, "score": 1}, None, 400, "invalid_feedback"),
            ({"request_id": "never-served", "score": 1}, None, 404, "request_not_found"),
        ]
        for body, raw, status, code in refusals:
            got_status, got = await feedback(body, raw)
            assert (got_status, got["error"]["code"], got["error"]["type"]) == (status, code, "invalid_request_error")

        async with session.get(handle.url("/admin/experiments/chat")) as response:
            assert response.status == 401  # guarded like every /admin endpoint
        async with session.get(handle.url("/admin/experiments/nope"), headers=auth) as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "route_not_found"
        async with session.get(handle.url("/admin/experiments/chat"), headers=auth) as response:
            assert response.status == 200
            report = await response.json()

    assert report["baseline"] == "stable" and report["confidence"] == 0.95
    stable_row, canary_row = report["variants"]
    assert [stable_row["name"], canary_row["name"]] == ["stable", "canary"]
    assert (stable_row["requests"], canary_row["requests"]) == (len(ids["stable"]), len(ids["canary"]))
    assert stable_row["errors"] == 0 and canary_row["errors"] > 0
    rate = canary_row["error_rate"]
    assert rate["low"] < rate["value"] == canary_row["errors"] / canary_row["requests"] < rate["high"]
    for row in (stable_row, canary_row):
        for timing in ("latency", "ttft"):
            numbers = row[timing]
            assert numbers["n"] > 5
            for name in ("mean", "p50", "p95"):
                estimate = numbers[name]
                assert estimate["low"] <= estimate["value"] <= estimate["high"], (row["name"], timing, name)
        assert row["tokens_per_request"]["completion"] > 0
    assert stable_row["vs_baseline"] is None
    assert stable_row["feedback"] == {"count": 20, "mean": {"value": 1.0, "low": 1.0, "high": 1.0}}
    scores = canary_row["feedback"]
    assert scores["count"] == 20 and scores["mean"]["value"] == -0.5  # ten 0s and ten -1s, the 1s replaced
    assert scores["mean"]["low"] < -0.5 < scores["mean"]["high"]
    versus = canary_row["vs_baseline"]
    assert versus["error_rate_p"] < 0.05 and versus["feedback_p"] < 0.001
    assert 0 <= versus["latency_p"] <= 1 and 0 <= versus["ttft_p"] <= 1
