"""Issue 15 item 3, regression: a client cannot push errors into the variant it is pinned to (and so cannot
steer a rollout or a canary alert). Only upstream-attributable failures — a runtime's 5xx, timeouts, cut
streams, no healthy backend in the variant's pool — count as a variant's errors; never what the proxy refused
itself (400/401/404/413/429), a runtime's answer to the client's own mistake, or a client that went away.

Against a real splitstream process; the variant's errors are read where a rollout reads them (the A/B report,
/admin/experiments/{route}) and where dashboards and alerts read them (splitstream_requests_total, 5xx).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gate, backend_url
from tests.integration.conftest import Served, ServedFactory

MESSAGES = [{"role": "user", "content": "hi"}]
SUBJECT = "attacker"  # the sticky subject every request of the attack carries: one variant gets them all
KEY = "good-key"
MAX_BODY = 4096
IDLE_TIMEOUT = 10.0  # seconds the proxy may take to finish a request its client left


def rules(runtime: TestServer, broken: TestServer) -> str:
    """Route `chat` splits one runtime (one request at a time, no queue) between two variants, sticky by
    header; route `broken` does the same on a runtime that answers every request 500."""
    split = """
      sticky: {by: "header:x-user", ttl: 1h}
      variants:
        - {name: stable, pool: POOL, weight: 50}
        - {name: canary, pool: POOL, weight: 50}"""
    return f"""
server: {{max_body_bytes: {MAX_BODY}, max_queue: 0}}
backends:
  b0: {{url: "{backend_url(runtime)}", kind: vllm, max_inflight: 1}}
  broken: {{url: "{backend_url(broken)}", kind: vllm}}
pools:
  p: {{backends: [b0], model: "sim-model"}}
  bad: {{backends: [broken], model: "sim-model"}}
routes:
  - name: chat
    match: {{model: "my-model"}}
    split:{split.replace("POOL", "p")}
  - name: broken
    match: {{model: "broken-model"}}
    split:{split.replace("POOL", "bad")}
"""


async def broken_runtime(aiohttp_server: Any) -> TestServer:
    """Healthy to probes, 500 to every inference request."""
    async def fail(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "boom", "type": "server_error", "code": None}}, status=500)

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", fail)
    app.router.add_get("/health", health)
    server: TestServer = await aiohttp_server(app)
    return server


def headers(subject: str = SUBJECT, key: str = KEY, content_type: str = "application/json") -> dict[str, str]:
    return {"Content-Type": content_type, "Authorization": f"Bearer {key}", "x-user": subject}


async def post(session: aiohttp.ClientSession, s: Served, body: bytes | dict[str, Any],
               head: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    """Status, the JSON answer and the variant that served it ("" when none was chosen)."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(s.url("/v1/chat/completions"), data=data, headers=head or headers()) as response:
        return response.status, await response.json(content_type=None), response.headers.get(
            "x-splitstream-variant", "")


async def scrape(session: aiohttp.ClientSession, s: Served) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with session.get(s.url("/metrics")) as response:
        text = await response.text()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


async def wait_until_idle(session: aiohttp.ClientSession, s: Served) -> None:
    """Poll (bounded) until no backend has a request in flight: the proxy finished what the client left."""
    deadline = asyncio.get_running_loop().time() + IDLE_TIMEOUT
    while True:
        inflight = sum(value for _, value in (await scrape(session, s)).get("splitstream_upstream_inflight", []))
        if inflight == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{inflight} still in flight after {IDLE_TIMEOUT}s"
        await asyncio.sleep(0.02)


async def variant_counts(session: aiohttp.ClientSession, s: Served, route: str) -> dict[str, tuple[int, int, int]]:
    """Per variant of `route`: (requests, errors) of the A/B report, and the 5xx answers in requests_total."""
    async with session.get(s.url(f"/admin/experiments/{route}")) as response:
        assert response.status == 200, await response.text()
        report = await response.json()
    fives: dict[str, int] = {}
    for labels, value in (await scrape(session, s)).get("splitstream_requests_total", []):
        if labels["route"] == route and labels["status"] == "5xx":
            fives[labels["variant"]] = fives.get(labels["variant"], 0) + int(value)
    return {row["name"]: (row["requests"], row["errors"], fives.get(row["name"], 0)) for row in report["variants"]}


async def open_stream(s: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream request on a raw connection (so the test decides when the client vanishes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    body = orjson.dumps({"model": "my-model", "messages": MESSAGES, "stream": True, "max_tokens": 4})
    head = "".join(f"{name}: {value}\r\n" for name, value in headers().items())
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Length: %d\r\n\r\n%s"
                 % (head.encode(), len(body), body))
    await writer.drain()
    return reader, writer


def vanish(writer: asyncio.StreamWriter) -> None:
    """The client disappears: the connection is reset (no wait_closed: nothing to wait for)."""
    writer.transport.abort()


async def test_a_client_cannot_push_errors_into_its_variant(
    sim: Any, aiohttp_server: Any, served: ServedFactory,
) -> None:
    gate = Gate()  # token i of any request is sent only once the test opens it
    runtime, server = await sim(pacer=gate)
    s = await served(rules(server, await broken_runtime(aiohttp_server)), env={"SPLITSTREAM_API_KEYS": KEY})
    async with aiohttp.ClientSession() as session:
        # 1. A client that leaves while its variant's runtime is still before the first token.
        reader, writer = await open_stream(s)
        await gate.wait_reached(0)
        vanish(writer)
        await wait_until_idle(session, s)

        gate.open(0)  # from here on one-token answers complete; longer ones wait at token 1
        status, _, pinned = await post(session, s, {"model": "my-model", "messages": MESSAGES, "max_tokens": 1})
        assert status == 200 and pinned in ("stable", "canary")

        # 2. Refused by the proxy itself: each is the client's mistake, answered before or after the split.
        deep = b'{"model": "my-model", "messages": ' + b"[" * 300 + b"]" * 300 + b"}"
        too_large = orjson.dumps({"model": "my-model", "messages": MESSAGES, "padding": "a" * MAX_BODY})
        refusals: list[tuple[bytes | dict[str, Any], dict[str, str], int, str]] = [
            (deep, headers(), 400, "invalid_request_error"),
            (b'{"model": "my-model", "messages": [', headers(), 400, "invalid_request_error"),
            (too_large, headers(), 413, "invalid_request_error"),
            ({"model": "no-such-model", "messages": MESSAGES}, headers(), 404, "invalid_request_error"),
            ({"model": "my-model", "messages": MESSAGES}, headers(key="wrong-key"), 401, "authentication_error"),
            ({"model": "my-model", "messages": MESSAGES}, headers(content_type="text/plain"), 400,
             "invalid_request_error"),
        ]
        for body, head, expected, kind in refusals:
            status, answer, _ = await post(session, s, body, head)
            assert (status, answer["error"]["type"]) == (expected, kind), answer

        # 3. The runtime refuses the client's own mistake (a 400 relayed as it came), after the split.
        status, answer, variant = await post(session, s, {"model": "my-model", "messages": "not a list"})
        assert status == 400 and variant == pinned, answer

        # 4. A stream holds the variant's only runtime slot: the next request is the proxy's own 429...
        reader, writer = await open_stream(s)
        assert b" 200 " in (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)).split(b"\r\n")[0]
        await asyncio.wait_for(reader.readuntil(b"data:"), IDLE_TIMEOUT)  # the first token is out
        status, answer, variant = await post(session, s, {"model": "my-model", "messages": MESSAGES})
        assert (status, answer["error"]["code"], variant) == (429, "overloaded", pinned), answer
        # 5. ...and then that stream's client vanishes mid-stream.
        vanish(writer)
        await wait_until_idle(session, s)

        gate.open_all()
        status, _, variant = await post(session, s, {"model": "my-model", "messages": MESSAGES, "max_tokens": 2})
        assert (status, variant) == (200, pinned)  # the variant serves on

        counts = await variant_counts(session, s, "chat")
        requests, errors, fives = counts[pinned]
        # Its evidence is what it answered: the two 200s and the runtime's 400, not the proxy's 429 or the
        # clients that left (which would dilute its error rate and feed it fast latency samples).
        assert requests == 3, counts
        assert (errors, fives) == (0, 0), counts
        assert all(row[1:] == (0, 0) for row in counts.values()), counts

        # The positive control: a runtime's 500s are errors of the variant that got them.
        status, answer, variant = await post(session, s, {"model": "broken-model", "messages": MESSAGES})
        assert status in (502, 503) and variant in ("stable", "canary"), answer
        broken = await variant_counts(session, s, "broken")
        assert broken[variant][1] >= 1 and broken[variant][2] >= 1, broken


async def test_a_client_cannot_push_5xx_into_its_variant_through_a_crash(sim: Any, served: ServedFactory) -> None:
    # Found by fuzzing (the same crash as test_fuzz.py::test_a_bearer_key_that_is_not_utf8_is_no_500): on a
    # split route with a per-tenant cache (as `chat` of rules/demo.yaml), `Authorization: Bearer \xff` makes
    # tenant_of() (proxy/pipeline/cache_policy.py) raise UnicodeEncodeError *after* the split. The proxy's own
    # 500 then counts in splitstream_requests_total{variant=<the client's>, status="5xx"}: the series of the
    # canary error-rate alert (dashboards/alerts.yml) and panel. (The A/B report's `errors` stay 0.)
    runtime, server = await sim()
    # (route `broken` is unused here: it gets the healthy runtime too)
    cached = rules(server, server).replace('match: {model: "my-model"}', 'match: {model: "my-model"}\n    cache: {ttl: 1m}')
    s = await served(cached)
    body = orjson.dumps({"model": "my-model", "messages": MESSAGES, "temperature": 0})
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer \xff\xfe\r\nx-user: %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                 % (SUBJECT.encode(), len(body), body))
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), IDLE_TIMEOUT)
    writer.close()
    async with aiohttp.ClientSession() as session:
        counts = await variant_counts(session, s, "chat")
    assert sum(row[0] for row in counts.values()) == 1, counts  # the request did reach a variant
    assert all(row[1:] == (0, 0) for row in counts.values()), (counts, answer.split(b"\r\n")[0])
