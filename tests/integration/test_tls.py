"""https:// backends end to end: a simulated runtime served over TLS with a throwaway CA (trustme), the real
splitstream in front of it, the real openai SDK (or aiohttp, where the exact error body matters) as client.

The runtime records, per request, its path and the connection it came on, so tests count connections at the
server side. The `proxy` fixture checks afterwards that every backend's in-flight count and load went back
to zero, failures included.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.sim.runtime import SimConfig, SimRuntime
from tests.conftest import FakeClock, backend_url
from tests.integration.test_cli import no_traceback, run

MESSAGES = [{"role": "user", "content": "hello over TLS"}]
RUNTIME_NAME = "splitstream-runtime.test"  # resolves nowhere: the URL says 127.0.0.1, `server_name` this name


class Seen:
    """What a runtime was asked: each request's path, the connection it came on, and whether that was TLS."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, asyncio.BaseTransport | None, bool]] = []

    async def record(self, request: web.Request, response: web.StreamResponse) -> None:
        transport = request.transport
        over_tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        self.requests.append((request.path, transport, over_tls))  # holding the transport keeps its id() unique

    def connections(self, path: str) -> int:
        """Distinct connections that carried requests for `path`."""
        return len({id(transport) for seen_path, transport, _ in self.requests if seen_path == path})

    def paths_over_tls(self) -> set[str]:
        return {path for path, _, over_tls in self.requests if over_tls}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def tls_sim(aiohttp_server: Any, ca: trustme.CA) -> Callable[..., Awaitable[tuple[SimRuntime, TestServer, Seen]]]:
    """Start an instant runtime over TLS whose certificate (from `ca`) names `names` (default: 127.0.0.1 and
    localhost)."""

    async def make(*names: str) -> tuple[SimRuntime, TestServer, Seen]:
        runtime = SimRuntime(SimConfig(tokens_per_second=0.0, ttft_ms=0.0))
        app = runtime.build_app()
        seen = Seen()
        app.on_response_prepare.append(seen.record)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(context)
        return runtime, await aiohttp_server(app, ssl=context), seen

    return make


def https_url(server: TestServer, host: str = "127.0.0.1") -> str:
    return f"https://{host}:{server.port}"


def rules(backend: str, top: str = "health: {interval: 10m}") -> str:
    """One backend `secure` (its YAML flow mapping given) behind route `main` for model `my-model`."""
    return f"""
{top}
backends:
  secure: {backend}
pools:
  main-pool: {{backends: [secure], model: "sim-model"}}
routes:
  - name: main
    match: {{model: "my-model"}}
    pool: main-pool
"""


def client_for(handle: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=handle.url("/v1"), api_key="x", max_retries=0)


async def chat(handle: Any, model: str = "my-model") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 2}
        async with session.post(handle.url("/v1/chat/completions"), json=body) as r:
            return r.status, await r.json()


async def metrics_text(handle: Any) -> str:
    async with aiohttp.ClientSession() as session, session.get(handle.url("/metrics")) as r:
        return await r.text()


def state_of(handle: Any, name: str) -> Any:
    return next(s for s in handle.backends if s.backend.name == name)


async def test_https_backend_serves_chat_and_streams(tls_sim: Any, proxy: Any, ca_file: str) -> None:
    runtime, server, seen = await tls_sim()
    handle = await proxy(rules(f'{{url: "{https_url(server)}", kind: vllm, tls: {{ca_file: "{ca_file}"}}}}'))
    client = client_for(handle)
    answer = await client.chat.completions.with_raw_response.create(model="my-model", messages=MESSAGES, max_tokens=5)
    completion = answer.parse()
    assert answer.headers["x-splitstream-backend"] == "secure"
    assert completion.choices[0].message.content and completion.usage is not None
    assert completion.usage.completion_tokens == 5
    stream = await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=4, stream=True)
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 4 and all(c.choices[0].delta.content for c in chunks)
    assert runtime.stats.completed == 2
    assert runtime.last_headers["host"] == f"127.0.0.1:{server.port}"  # the URL's authority
    assert "/v1/chat/completions" in seen.paths_over_tls()


async def test_keep_alive_reuses_one_tls_connection(tls_sim: Any, proxy: Any, ca_file: str) -> None:
    runtime, server, seen = await tls_sim("localhost")  # a DNS name this time, checked against the certificate
    handle = await proxy(rules(f'{{url: "{https_url(server, "localhost")}", kind: vllm, tls: {{ca_file: "{ca_file}"}}}}'))
    client = client_for(handle)
    for _ in range(5):  # one after the other; a whole answer is read before it is relayed, so the connection
        await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2)  # is pooled again
    assert runtime.stats.completed == 5
    assert seen.connections("/v1/chat/completions") == 1  # one handshake, then keep-alive as over plain TCP
    assert runtime.last_headers["host"] == f"localhost:{server.port}"


async def test_untrusted_certificate_is_502_naming_the_backend_then_ejected(tls_sim: Any, proxy: Any) -> None:
    runtime, server, _ = await tls_sim()
    health = "health: {interval: 10m, unhealthy_interval: 10m, failures: 3, panic_threshold: 0}"
    clock = FakeClock()  # the ejection lasts until the test moves the clock, on any machine
    # No tls block: the system trust store, which does not know the test CA.
    handle = await proxy(rules(f'{{url: "{https_url(server)}", kind: vllm}}', top=health), backend_clock=clock)
    status, body = await chat(handle)
    assert (status, body["error"]["code"], body["error"]["type"]) == (502, "backend_tls_error", "api_error")
    assert body["error"]["message"] == (f"TLS verification of backend 'secure' (127.0.0.1:{server.port}) failed: "
                                        "certificate verify failed: unable to get local issuer certificate")
    # The request's three tries (retry.attempts) each failed the handshake: three failures in a row eject.
    assert 'splitstream_upstream_errors_total{backend="secure",reason="tls"} 3.0' in await metrics_text(handle)
    state = state_of(handle, "secure")
    assert state.ejections_total == 1 and not state.is_available(clock())
    status, body = await chat(handle)
    assert (status, body["error"]["code"]) == (503, "no_healthy_backend")
    assert runtime.stats.requests == 0  # nothing ever reached the runtime


async def test_server_name_verifies_a_runtime_reached_by_ip(tls_sim: Any, proxy: Any, ca_file: str) -> None:
    runtime, server, _ = await tls_sim(RUNTIME_NAME)
    url, tls = https_url(server), f'ca_file: "{ca_file}"'
    handle = await proxy(f"""
health: {{interval: 10m}}
backends:
  named: {{url: "{url}", kind: vllm, tls: {{{tls}, server_name: {RUNTIME_NAME}}}}}
  unnamed: {{url: "{url}", kind: vllm, tls: {{{tls}}}}}
pools:
  named-pool: {{backends: [named], model: "sim-model"}}
  unnamed-pool: {{backends: [unnamed], model: "sim-model"}}
routes:
  - {{name: named, match: {{model: "named"}}, pool: named-pool}}
  - {{name: unnamed, match: {{model: "unnamed"}}, pool: unnamed-pool}}
""")
    status, body = await chat(handle, "named")
    assert status == 200 and body["choices"]
    assert runtime.last_headers["host"] == f"127.0.0.1:{server.port}"  # Host stays the URL's; SNI and the check change
    status, body = await chat(handle, "unnamed")  # the certificate names RUNTIME_NAME, not 127.0.0.1
    assert (status, body["error"]["code"]) == (502, "backend_tls_error")
    assert body["error"]["message"].startswith(f"TLS verification of backend 'unnamed' (127.0.0.1:{server.port}) "
                                               "failed: certificate verify failed: ")
    assert "127.0.0.1" in body["error"]["message"].split("certificate verify failed: ")[1]  # what did not match
    assert runtime.stats.completed == 1


async def test_verify_false_accepts_an_untrusted_certificate(tls_sim: Any, proxy: Any) -> None:
    runtime, server, seen = await tls_sim(RUNTIME_NAME)  # neither trusted nor naming the URL's host
    handle = await proxy(rules(f'{{url: "{https_url(server)}", kind: vllm, tls: {{verify: false}}}}'))
    answer = await client_for(handle).chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=3)
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    assert "/v1/chat/completions" in seen.paths_over_tls()


async def test_health_probes_go_over_tls(tls_sim: Any, proxy: Any, ca_file: str) -> None:
    runtime, server, seen = await tls_sim()
    trusted = await proxy(rules(f'{{url: "{https_url(server)}", kind: vllm, tls: {{ca_file: "{ca_file}"}}}}'))
    untrusted = await proxy(rules(f'{{url: "{https_url(server)}", kind: vllm}}'))
    await trusted.health.wait_round()
    await untrusted.health.wait_round()
    assert "/health" in seen.paths_over_tls()
    assert state_of(trusted, "secure").probe_misses == 0
    assert state_of(untrusted, "secure").probe_misses >= 1  # its probes fail the handshake: a miss each
    assert 'splitstream_upstream_healthy{backend="secure"} 1.0' in await metrics_text(trusted)
    async with aiohttp.ClientSession() as session:
        async with session.get(trusted.url("/readyz")) as r:
            assert r.status == 200 and (await r.json())["status"] == "ready"
        async with session.get(untrusted.url("/readyz")) as r:
            assert r.status == 503 and (await r.json())["routes_without_backend"] == ["main"]


async def test_https_url_to_a_plain_http_runtime_is_a_tls_error(sim: Any, proxy: Any) -> None:
    runtime, server = await sim()
    url = backend_url(server).replace("http://", "https://")
    handle = await proxy(rules(f'{{url: "{url}", kind: vllm, tls: {{verify: false}}}}'))
    status, body = await chat(handle)
    assert (status, body["error"]["code"]) == (502, "backend_tls_error")
    assert body["error"]["message"].startswith(f"TLS handshake with backend 'secure' (127.0.0.1:{server.port}) failed: ")
    assert runtime.stats.requests == 0


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts and never says a word: a TLS handshake with it never ends."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in accepted:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_tls_handshake_counts_against_the_connect_timeout(proxy: Any, silent_server: int) -> None:
    handle = await proxy(rules(f'{{url: "https://127.0.0.1:{silent_server}", kind: vllm, tls: {{verify: false}}}}')
                         + "    timeouts: {connect: 200ms}\n    retry: {attempts: 1}\n")
    status, body = await chat(handle)
    assert (status, body["error"]["code"]) == (504, "backend_timeout")
    assert body["error"]["message"] == f"connecting to 127.0.0.1:{silent_server} timed out"


@pytest.mark.parametrize(("tls_args", "said"), [
    (["--tls-cert", "cert.pem"], "sim-backend: --tls-cert and --tls-key go together"),
    (["--tls-cert", "ca.pem", "--tls-key", "ca.pem"], "sim-backend: cannot load --tls-cert"),  # no private key
])
async def test_sim_backend_tls_options_are_checked_before_listening(
    ca_file: str, tls_args: list[str], said: str
) -> None:
    args = [ca_file if arg == "ca.pem" else arg for arg in tls_args]
    code, out, err = await run("sim-backend", "--port", "1", "--model", "m", *args)
    assert code == 2 and said in err and out == ""
    no_traceback(err)
