"""Load clients of overhead.py: wrk or the Python closed loop for small requests, asyncio streaming workers.

Each returns one round's numbers as a dict (requests or streams, errors, percentiles in ms); none starts
a process or decides what a number means. wrk itself is driven by harness.run_wrk.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from harness import Proc, pct, run_async, run_wrk
from stack import BODY, HEADERS, WRK_POST, stream_body

STREAM_TOKENS = 32
OPEN_STREAM_TOKENS = 20
OPEN_STREAM_TPS = 10.0


async def _closed_loop(url: str, conns: int, duration: float, body: bytes) -> dict[str, Any]:
    """Fallback when wrk is missing: `conns` workers each send the next request when the last one ends."""
    lat: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as s:
        t_start = time.perf_counter()
        deadline = t_start + duration

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with s.post(url, data=body, headers=HEADERS) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1
                    continue
                lat.append((time.perf_counter() - t0) * 1e3)

        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.perf_counter() - t_start
    n = len(lat) + errors
    return {"rps": n / elapsed, "requests": n, "elapsed_s": elapsed, "p50_ms": pct(lat, 50),
            "p75_ms": pct(lat, 75), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99), "non_2xx": errors,
            "socket_errors": 0}


def run_load(client: str, url: str, conns: int, duration: float, body: bytes = BODY,
             script: Path = WRK_POST) -> dict[str, Any]:
    """The small non-streaming request (BODY / wrk_post.lua) at `conns` connections for `duration` s.
    Another request: its `body` for the Python client and the wrk `script` sending the same bytes."""
    if client == "wrk":
        return run_wrk(url, conns, duration, script)
    return run_async(_closed_loop(url, conns, duration, body))


async def _one_stream(session: aiohttp.ClientSession, url: str, body: bytes,
                      on_first: Any = None) -> tuple[float, float] | str:
    """(ttft_s, total_s) of one streamed completion, or an error label."""
    t0 = time.perf_counter()
    ttft: float | None = None
    done = False
    try:
        async with session.post(url, data=body, headers=HEADERS) as resp:
            if resp.status != 200:
                await resp.read()
                return f"HTTP {resp.status}"
            async for line in resp.content:
                if line.startswith(b"data:"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                        if on_first is not None:
                            on_first()
                    if line.startswith(b"data: [DONE]"):
                        done = True
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return type(exc).__name__
    total = time.perf_counter() - t0
    if ttft is None:
        return "no data chunk"
    if not done:
        return "missing [DONE]"
    return ttft, total


async def stream_load(url: str, workers: int, duration: float) -> dict[str, Any]:
    body = stream_body(STREAM_TOKENS)
    ttfts: list[float] = []
    totals: list[float] = []
    errors: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t_start = time.perf_counter()
        deadline = t_start + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                r = await _one_stream(session, url, body)
                if isinstance(r, str):
                    errors[r] += 1
                else:
                    ttfts.append(r[0] * 1e3)
                    totals.append(r[1] * 1e3)

        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.perf_counter() - t_start
    return {"streams": len(ttfts), "errors": sum(errors.values()), "error_kinds": dict(errors),
            "elapsed_s": elapsed, "streams_per_s": len(ttfts) / elapsed,
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99),
            "total_p50_ms": pct(totals, 50), "total_p99_ms": pct(totals, 99)}


async def open_streams_load(proxy: Proc, url: str, n: int) -> dict[str, Any]:
    """`n` slow streams opened at once through `proxy` at `url`, its RSS sampled every 100 ms meanwhile."""
    body = stream_body(OPEN_STREAM_TOKENS)
    rss_base_kb = proxy.status_kb("VmRSS")
    peak_rss_kb = rss_base_kb
    open_now = 0
    peak_open = 0
    stop = asyncio.Event()

    async def sample_rss() -> None:
        nonlocal peak_rss_kb
        while not stop.is_set():
            try:
                peak_rss_kb = max(peak_rss_kb, proxy.status_kb("VmRSS"))
            except OSError:
                return  # process gone: reported by the caller's check()
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    async def one() -> tuple[float, float] | str:
        nonlocal open_now
        opened = False

        def first() -> None:
            nonlocal opened, open_now, peak_open
            opened = True
            open_now += 1
            peak_open = max(peak_open, open_now)

        r = await _one_stream(session, url, body, first)
        if opened:
            open_now -= 1
        return r

    sampler = asyncio.create_task(sample_rss())
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120, sock_connect=30)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.perf_counter() - t0
    stop.set()
    await sampler
    ok = [r for r in results if not isinstance(r, str)]
    errors = Counter(r for r in results if isinstance(r, str))
    ttfts = [r[0] * 1e3 for r in ok]
    totals = [r[1] * 1e3 for r in ok]
    return {"streams": n, "ok": len(ok), "errors": sum(errors.values()), "error_kinds": dict(errors),
            "peak_concurrently_open": peak_open, "elapsed_s": elapsed,
            "rss_base_mb": rss_base_kb / 1024, "peak_rss_mb": peak_rss_kb / 1024,
            "vm_hwm_mb": proxy.status_kb("VmHWM") / 1024,
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99),
            "total_p50_ms": pct(totals, 50), "total_p99_ms": pct(totals, 99)}
