"""A real `redis-server` per test on a free loopback port, which a test may stop and start again.

Readiness is the server's own "Ready to accept connections" line (read with a deadline), confirmed by a
PING; stopping is SIGTERM to the PID we started and waiting for it to exit. Never fakeredis: the point
is to exercise the real protocol, real SET NX GET semantics and real outages.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.processes import free_port, start, wait_for_line

READY_TIMEOUT = 10.0  # seconds for redis-server to start listening; it needs a few milliseconds


class RedisServer:
    """One redis-server process on `port` (kept across stop/start, so clients reconnect to the same URL)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run .ci/run, or apt-get install redis-server")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--loglevel", "notice"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._wait_ready(self.proc)
        assert self.command(b"PING") == b"+PONG\r\n"

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        seen = b""
        while b"Ready to accept connections" not in seen:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([proc.stdout], [], [], max(0.0, remaining))
            if not readable:
                proc.kill()
                raise AssertionError(f"redis-server not ready after {READY_TIMEOUT}s: {seen.decode()[-2000:]}")
            chunk = os.read(proc.stdout.fileno(), 65536)  # raw fd: a buffered readline would hide data from select
            if not chunk:
                raise AssertionError(f"redis-server exited ({proc.wait()}): {seen.decode()[-2000:]}")
            seen += chunk
        # Nobody reads its output from here on; redis ignores SIGPIPE, so its few later lines are dropped.
        proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def command(self, *args: bytes) -> bytes:
        """One RESP command on a fresh connection, the raw reply (the tests' own view of the server)."""
        payload = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(payload)
            return s.recv(65536)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


ThrottlerFactory = Callable[..., Awaitable[tuple[TestServer, list[str]]]]


@pytest.fixture
def throttler(aiohttp_server: Any) -> ThrottlerFactory:
    """A runtime that answers every inference request 429 with `Retry-After` (and /health 200); the list
    collects the paths it was asked for."""

    async def make(retry_after: str = "60") -> tuple[TestServer, list[str]]:
        hits: list[str] = []

        async def throttled(request: web.Request) -> web.Response:
            hits.append(request.path)
            return web.json_response({"error": {"message": "slow down", "type": "rate_limit", "code": 429}},
                                     status=429, headers={"Retry-After": retry_after})

        async def health(request: web.Request) -> web.Response:
            return web.Response()

        app = web.Application()
        app.router.add_post("/v1/chat/completions", throttled)
        app.router.add_get("/health", health)
        return await aiohttp_server(app), hits

    return make


class Served:
    """A real splitstream process (`python -m proxy serve`) on loopback, for attacks that need one: its
    output is collected as it comes (so no pipe fills up), and `log` is everything it printed so far."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, rules_dir: Path) -> None:
        self.proc = proc
        self.port = port
        self.rules_dir = rules_dir
        self.lines: list[str] = []
        self._readers = [asyncio.create_task(self._collect(stream)) for stream in (proc.stdout, proc.stderr)
                         if stream is not None]

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode("utf-8", "replace"))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def stop(self) -> int:
        """SIGTERM, then the exit status (killed if it does not stop within a minute)."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        assert self.proc.returncode is not None
        return self.proc.returncode


ServedFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[ServedFactory]:
    """Start splitstream processes on rule YAML: `await served(rules_yaml, *serve_args, env={...})`. Each is
    stopped after the test, and must not have logged a traceback."""
    started: list[Served] = []
    numbers = itertools.count()  # several may start at once (asyncio.gather)

    async def make(rules_yaml: str, *args: str, env: dict[str, str] | None = None) -> Served:
        rules_dir = tmp_path / f"served{next(numbers)}"
        rules_dir.mkdir()
        (rules_dir / "rules.yaml").write_text(rules_yaml)
        port = free_port()
        proc = await start("serve", "--rules", str(rules_dir), "--port", str(port), "--no-watch", *args, env=env)
        assert proc.stderr is not None
        try:
            await wait_for_line(proc.stderr, "listening")
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        handle = Served(proc, port, rules_dir)
        started.append(handle)
        return handle

    yield make
    for handle in started:
        await handle.stop()
        assert "Traceback" not in handle.log, handle.log[-4000:]
