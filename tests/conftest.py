"""Shared fixtures: simulated runtimes and splitstream proxies on real loopback sockets.

`sim` starts a `proxy.sim` runtime; `proxy` writes rule YAML to a temp dir, loads it with the real
loader and serves the real app, which watches that dir (tests edit `handle.rules_dir` and await
`handle.reloader`). After every test that used a proxy, its servers are closed (which waits for handlers
to finish) and every backend's in-flight count and predicted load must be back to zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.app import build_app
from proxy.config.loader import load_rules
from proxy.config.model import RULES, RulesHolder
from proxy.config.reloader import RELOADER, Reloader
from proxy.delivery.controller import ROLLOUTS, RolloutController, RolloutSettings
from proxy.delivery.weights import WEIGHTS, RolloutWeights
from proxy.observe.metrics import METRICS, Metrics
from proxy.pipeline.assignment import SPLITTER, Splitter
from proxy.pipeline.dispatch import DISPATCHER, Dispatcher
from proxy.pipeline.handler import ENDPOINTS, Endpoints
from proxy.pipeline.result_cache import CACHE, ResultCache
from proxy.pipeline.shadow import SHADOWS, ShadowMirror
from proxy.types import Clock
from proxy.upstream.health import HEALTH, HealthChecker
from proxy.upstream.state import BACKENDS, BackendStates
from proxy.sim.runtime import Pacer, SimConfig, SimRuntime
from proxy.store import OwnedStore


class Gate:
    """A pacer the test drives: token i of any request is emitted only after `open(i)`."""

    def __init__(self) -> None:
        self._events: dict[int, asyncio.Event] = {}
        self.reached: dict[int, asyncio.Event] = {}

    def _event(self, table: dict[int, asyncio.Event], index: int) -> asyncio.Event:
        if index not in table:
            table[index] = asyncio.Event()
        return table[index]

    def open(self, *indexes: int) -> None:
        for index in indexes:
            self._event(self._events, index).set()

    def open_all(self, upto: int = 1000) -> None:
        self.open(*range(upto))

    async def wait_reached(self, index: int) -> None:
        await self._event(self.reached, index).wait()

    async def __call__(self, request_id: str, index: int) -> None:
        self._event(self.reached, index).set()
        await self._event(self._events, index).wait()


class FakeClock:
    """A monotonic clock the test moves by hand: breaker cooldowns, embedded-store expiry, and the backend
    clock of `build_app(backend_clock=...)`, so an ejection lasts exactly as long as the test wants."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


SimFactory = Callable[..., Awaitable[tuple[SimRuntime, TestServer]]]


@pytest.fixture
async def sim(aiohttp_server: Any) -> SimFactory:
    async def make(pacer: Pacer | None = None, **config: Any) -> tuple[SimRuntime, TestServer]:
        config.setdefault("tokens_per_second", 0.0)
        config.setdefault("ttft_ms", 0.0)
        if "models" in config:
            config["models"] = tuple(config["models"])
        runtime = SimRuntime(SimConfig(**config), pacer)
        server = await aiohttp_server(runtime.build_app())  # TestServer enables handler_cancellation itself
        return runtime, server

    return make


def backend_url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


class ProxyHandle:
    """A served proxy and, by name, the parts tests look into (each under its app key)."""

    def __init__(self, server: TestServer, rules_dir: Path) -> None:
        self.server = server
        self.rules_dir = rules_dir

    @property
    def reloader(self) -> Reloader:
        return self.server.app[RELOADER]

    @property
    def rules(self) -> RulesHolder:
        return self.server.app[RULES]

    @property
    def metrics(self) -> Metrics:
        return self.server.app[METRICS]

    @property
    def backends(self) -> BackendStates:
        return self.server.app[BACKENDS]

    @property
    def dispatcher(self) -> Dispatcher:
        return self.server.app[DISPATCHER]

    @property
    def splitter(self) -> Splitter:
        return self.server.app[SPLITTER]

    @property
    def cache(self) -> ResultCache:
        return self.server.app[CACHE]

    @property
    def shadows(self) -> ShadowMirror:
        return self.server.app[SHADOWS]

    @property
    def rollouts(self) -> RolloutController:
        return self.server.app[ROLLOUTS]

    @property
    def weights(self) -> RolloutWeights:
        return self.server.app[WEIGHTS]

    @property
    def health(self) -> HealthChecker:
        return self.server.app[HEALTH]

    @property
    def endpoints(self) -> Endpoints:
        return self.server.app[ENDPOINTS]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.port}{path}"


@pytest.fixture
async def proxy(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ProxyHandle]]]:
    handles: list[ProxyHandle] = []

    async def make(rules_yaml: str, client_keys: list[str] | None = None, env: dict[str, str] | None = None,
                   store: OwnedStore | None = None, admin_token: str = "", watch_rules: bool = True,
                   rollout_settings: RolloutSettings | None = None,
                   backend_clock: Clock | None = None) -> ProxyHandle:
        rules_dir = tmp_path / f"rules{len(handles)}"
        rules_dir.mkdir()
        (rules_dir / "rules.yaml").write_text(rules_yaml)
        env = dict(env or {})
        if client_keys:  # the shorthand for one tenant named `default`
            env["SPLITSTREAM_API_KEYS"] = ",".join(client_keys)
        snapshot = load_rules(rules_dir, env=env, generation=1)
        app = build_app(snapshot, store=store, rules_dir=rules_dir,
                        admin_token=admin_token, rules_env=env, watch_rules=watch_rules,
                        rollout_settings=rollout_settings, backend_clock=backend_clock)
        server = await aiohttp_server(app)  # TestServer enables handler_cancellation itself
        handle = ProxyHandle(server, rules_dir)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        backends, endpoints = handle.backends, handle.endpoints
        await handle.server.close()  # waits for every handler to finish
        leftovers = [(s.backend.name, s.inflight, s.predicted_load) for s in backends if s.inflight or s.predicted_load]
        assert not leftovers, f"backend load not released: {leftovers}"
        assert endpoints.inflight == 0


def simple_rules(*servers: TestServer, model: str = "sim-model", client_model: str = "my-model",
                 extra_route: str = "", server_block: str = "", timeouts: str = "", backend_extra: str = "") -> str:
    """One route `main` matching `client_model` onto a pool of the given runtimes."""
    backends = "\n".join(
        f'  b{i}: {{url: "{backend_url(s)}", kind: vllm{backend_extra}}}' for i, s in enumerate(servers)
    )
    names = ", ".join(f"b{i}" for i in range(len(servers)))
    return f"""
{server_block}
backends:
{backends}
pools:
  main-pool: {{backends: [{names}], model: "{model}"}}
routes:
  - name: main
    match: {{model: "{client_model}"}}
    pool: main-pool
{timeouts}
{extra_route}
"""
