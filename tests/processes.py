"""Helpers for tests that run splitstream (or a service) as a separate process: ports, start, wait, reap."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """`python -m proxy ARGS...` from the repository root, stdout and stderr piped; `env` adds variables."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


async def wait_for_line(stream: asyncio.StreamReader, needle: str) -> str:
    """Read lines until one contains `needle` (the process says it reached a state; no polling)."""
    seen = []
    while True:
        line = (await asyncio.wait_for(stream.readline(), 60)).decode()
        if not line:
            raise AssertionError(f"stream ended before {needle!r}; saw: {''.join(seen)[-2000:]}")
        seen.append(line)
        if needle in line:
            return line


@asynccontextmanager
async def reaped(proc: asyncio.subprocess.Process) -> AsyncIterator[asyncio.subprocess.Process]:
    """The process, killed and awaited on the way out if the test left it running (a failed assertion)."""
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
