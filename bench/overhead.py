#!/usr/bin/env python3
"""Proxy-overhead benchmark: the same load straight to a simulated runtime and through splitstream.

Three cases, each on its own fresh pair of subprocesses (`python -m proxy sim-backend` and
`python -m proxy serve`); this script is the load client and never runs inside the proxy's process:

  nonstream     small non-streaming chat completions against an instant runtime, wrk at c=1 and c=32:
                latency p50/p99, requests/s, and the proxy's CPU time per request (/proc/<pid>/stat).
  stream        streaming completions (32 tokens at 200 tokens/s) from 32 asyncio workers: TTFT p50/p99
                and streams/s.
  open-streams  N (default 2,000) slow streams opened at once through one proxy process: errors and the
                proxy's peak RSS (VmRSS sampled every 100 ms, plus the kernel's VmHWM).
  reload        (optional: only with --only reload) the c=32 non-streaming load through the proxy, once
                plain and once while the rules file is rewritten every 100 ms (hot reload each time):
                failed requests and the p99 ratio.
  sticky        (optional: only with --only sticky) direct vs. a plain proxy vs. a proxy with a 90/10 split
                sticky by `x-user-id` through Redis (`serve --redis`, a redis-server it starts), wrk cycling
                10,000 subjects at c=1 and c=32: added p50, the split's own cost, CPU per request.

Direct and proxy rounds are interleaved (the order flips every round) and the table shows the median of
the rounds, because a 2-core machine is noisy. The numbers are printed next to the project's targets and
written as JSON to bench/results/overhead-<UTC timestamp>.json. This is a measurement, not a test: a
missed target does not change the exit status. The exit status is non-zero only when the harness could
not measure (a process died, the sanity request failed, or a measured round had >1% failed requests).

    .venv/bin/python bench/overhead.py                     # everything, about 2-3 minutes
    .venv/bin/python bench/overhead.py --duration 3 --rounds 1 --streams 500
    .venv/bin/python bench/overhead.py --only nonstream
    .venv/bin/python bench/overhead.py --only reload
    .venv/bin/python bench/overhead.py --only sticky
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "wrk_post.lua"
RESULTS = ROOT / "bench" / "results"
MODEL = "sim-model"
CASES = ("nonstream", "stream", "open-streams")
OPTIONAL_CASES = ("reload", "sticky")  # run only when named with --only
RELOAD_EVERY_S = 0.1

# Must stay byte-identical to the body in bench/wrk_post.lua (the Python fallback client sends this one).
BODY = b'{"model":"sim-model","messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}'
STREAM_TOKENS = 32
OPEN_STREAM_TOKENS = 20
OPEN_STREAM_TPS = 10.0
HEADERS = {"Content-Type": "application/json"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

TARGETS = {
    "c1_added_p50_ms": 0.2,
    "c1_added_p99_ms": 1.0,
    "proxy_cpu_ms_per_req": 0.1,
    "c32_proxy_rps": 8000.0,
    "stream_added_ttft_p50_ms": 1.0,
    "open_streams_rss_mb": 300.0,
    "reload_p99_ratio": 1.1,
    "reload_failed": 0,
    "sticky_added_p50_ms": 0.5,
}


def stream_body(max_tokens: int) -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens,
         "stream": True},
        separators=(",", ":"),
    ).encode()


class BenchError(Exception):
    """The harness cannot produce valid numbers (a process died, a sanity request failed, ...)."""


# ---------------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 15, scan_bytes: int = 512 * 1024) -> str:
    """The last lines of a process log that are not access-log lines (errors, tracebacks), then its last line.

    The proxy writes one JSON access-log line per request, so a plain tail would show only those.
    """
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - scan_bytes))
            data = f.read()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    all_lines = data.decode("utf-8", "replace").splitlines()
    if size > scan_bytes:
        all_lines = all_lines[1:]  # probably cut in the middle
    other = [ln for ln in all_lines if not ln.startswith('{"request_id"')][-lines:]
    if all_lines and (not other or other[-1] != all_lines[-1]):
        other.append(all_lines[-1])
    return "\n".join(ln if len(ln) <= 2000 else ln[:2000] + " ..." for ln in other) or "<empty>"


class Proc:
    """One subprocess with stdout+stderr redirected to a file (never a pipe nobody reads)."""

    def __init__(self, name: str, args: list[str], tmp: Path) -> None:
        self.name = name
        self.log = tmp / f"{name}.log"
        self._file = self.log.open("wb")
        self.popen = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._file,
                                      stderr=subprocess.STDOUT)
        self.pid = self.popen.pid

    def check(self) -> None:
        rc = self.popen.poll()
        if rc is not None:
            raise BenchError(f"{self.name} (pid {self.pid}) exited with status {rc}; last output:\n"
                             f"{tail(self.log)}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} (pid {self.pid}) ignored SIGTERM for 10 s: killing it", file=sys.stderr)
                self.popen.kill()
                self.popen.wait()
        self._file.close()

    def cpu_ticks(self) -> int:
        """utime + stime (fields 14 and 15 of /proc/<pid>/stat), in clock ticks."""
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()  # fields[0] is field 3 (state)
        return int(fields[11]) + int(fields[12])

    def status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
        return 0


def wait_ready(proc: Proc, url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc.check()
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(f"{proc.name} not ready at {url} after {timeout:.0f} s ({last}); last output:\n"
                     f"{tail(proc.log)}")


class Stack:
    """A simulated runtime and a proxy in front of it, both fresh subprocesses."""

    def __init__(self, tmp: Path, name: str, *, tps: float, ttft_ms: float, max_batch: int) -> None:
        self.dir = tmp / name
        self.dir.mkdir()
        self.sim_port = free_port()
        self.proxy_port = free_port()
        self.sim: Proc | None = None
        self.proxy: Proc | None = None
        py = sys.executable
        self.sim = Proc(f"{name}-sim", [
            py, "-m", "proxy", "sim-backend", "--host", "127.0.0.1", "--port", str(self.sim_port),
            "--model", MODEL, "--tokens-per-second", str(tps), "--ttft-ms", str(ttft_ms),
            "--max-batch", str(max_batch)], self.dir)
        # The proxy probes its backends at start: the runtime must answer first, as in a deployment.
        wait_ready(self.sim, f"http://127.0.0.1:{self.sim_port}/health")
        rules = self.dir / "rules"
        rules.mkdir()
        (rules / "bench.yaml").write_text(f"""\
server: {{max_inflight: 100000}}
backends:
  sim: {{url: "http://127.0.0.1:{self.sim_port}", kind: vllm}}
pools:
  p: {{backends: [sim], model: "{MODEL}"}}
routes:
  - name: bench
    match: {{model: "{MODEL}"}}
    pool: p
""")
        self.proxy = Proc(f"{name}-proxy", [
            py, "-m", "proxy", "serve", "--rules", str(rules), "--host", "127.0.0.1",
            "--port", str(self.proxy_port)], self.dir)
        wait_ready(self.proxy, f"http://127.0.0.1:{self.proxy_port}/healthz")

    def url(self, target: str) -> str:
        port = self.sim_port if target == "direct" else self.proxy_port
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    def check(self) -> None:
        for p in (self.sim, self.proxy):
            if p is not None:
                p.check()

    def close(self) -> None:
        for p in (self.proxy, self.sim):
            if p is not None:
                p.stop()

    def proxy_log_summary(self) -> dict[str, Any]:
        """Statuses of the proxy's access-log lines and its error/warning lines (first few kept)."""
        assert self.proxy is not None
        statuses: Counter[str] = Counter()
        levels: Counter[str] = Counter()
        samples: list[str] = []
        with self.proxy.log.open("rb") as f:
            for raw in f:
                m = re.search(rb'"status":(\d+)', raw)
                if m and raw.startswith(b'{"request_id"'):
                    statuses[m.group(1).decode()] += 1
                    continue
                m = re.search(rb'"level":"(\w+)"', raw)
                level = m.group(1).decode() if m else "other"
                levels[level] += 1
                if level in ("error", "warning", "critical", "other") and len(samples) < 3:
                    samples.append(raw.decode("utf-8", "replace")[:600].rstrip())
        return {"access_log_statuses": dict(statuses), "log_levels": dict(levels), "samples": samples}


def sanity_check(stack: Stack, stream: bool) -> None:
    """One request each way before measuring: a benchmark of 500s is not a benchmark."""
    body = stream_body(2) if stream else BODY
    for target in ("direct", "proxy"):
        req = urllib.request.Request(stack.url(target), data=body, headers=HEADERS, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                data = resp.read()
                ok = resp.status == 200 and (b"data: [DONE]" in data if stream else b'"choices"' in data)
        except urllib.error.HTTPError as exc:
            data = exc.read()
            ok = False
            data = f"HTTP {exc.code}: ".encode() + data
        except OSError as exc:
            data, ok = str(exc).encode(), False
        if not ok:
            stack.check()
            assert stack.proxy is not None
            raise BenchError(f"sanity request {target} -> {stack.url(target)} failed: "
                             f"{data[:400].decode('utf-8', 'replace')}\nproxy output tail:\n{tail(stack.proxy.log)}")


# ---------------------------------------------------------------------------------------------------
# statistics


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def med(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


# ---------------------------------------------------------------------------------------------------
# load generators

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out)
    res["requests"] = int(m.group(1)) if m else 0
    res["elapsed_s"] = float(m.group(2)) * _UNITS[m.group(3)] / 1e3 if m else float("nan")
    for p, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M):
        res[f"p{p}_ms"] = float(value) * _UNITS[unit]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    if "p50_ms" not in res or res["requests"] == 0:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    return res


def run_wrk(url: str, conns: int, duration: float) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    args = [wrk, "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "5s",
            "-s", str(LUA), url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}: {proc.stderr or proc.stdout}")
    return parse_wrk(proc.stdout)


async def _closed_loop(url: str, conns: int, duration: float) -> dict[str, Any]:
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
                    async with s.post(url, data=BODY, headers=HEADERS) as resp:
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


def run_load(client: str, url: str, conns: int, duration: float) -> dict[str, Any]:
    if client == "wrk":
        return run_wrk(url, conns, duration)
    return run_async(_closed_loop(url, conns, duration))


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


async def open_streams_load(stack: Stack, n: int) -> dict[str, Any]:
    assert stack.proxy is not None
    proxy = stack.proxy
    url = stack.url("proxy")
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
                return  # process gone: reported by stack.check()
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


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---------------------------------------------------------------------------------------------------
# cases


def check_errors(label: str, res: dict[str, Any], problems: list[str]) -> None:
    bad = res.get("non_2xx", 0) + res.get("socket_errors", 0) + res.get("errors", 0)
    total = res.get("requests", res.get("streams", 0)) + res.get("errors", 0)
    if bad:
        problems.append(f"{label}: {bad} failed of {total} ({res.get('error_kinds') or res})")
        if bad > 0.01 * max(total, 1):
            raise BenchError(f"{label}: {bad} of {total} requests failed, the numbers are meaningless: {res}")


def case_nonstream(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    stack = Stack(tmp, "nonstream", tps=0, ttft_ms=0, max_batch=1000)
    try:
        assert stack.sim is not None and stack.proxy is not None
        sanity_check(stack, stream=False)
        for target in ("direct", "proxy"):  # warm-up: connections, caches, branch predictors
            run_load(client, stack.url(target), 32, 1)
        stack.check()
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = ("direct", "proxy") if r % 2 == 0 else ("proxy", "direct")
            for conns in (1, 32):
                for target in order:
                    watched = stack.sim if target == "direct" else stack.proxy
                    ticks0 = watched.cpu_ticks()
                    res = run_load(client, stack.url(target), conns, args.duration)
                    ticks1 = watched.cpu_ticks()
                    stack.check()
                    res["cpu_ms_per_req"] = (ticks1 - ticks0) * 1e3 / CLK_TCK / max(res["requests"], 1)
                    res.update(round=r, target=target, conns=conns)
                    check_errors(f"nonstream round {r} {target} c={conns}", res, problems)
                    rounds.append(res)
                    print(f"  round {r + 1}/{args.rounds} c={conns:<2} {target:<6} {res['rps']:9.0f} rps  "
                          f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                          f"cpu {res['cpu_ms_per_req']:.3f} ms/req", flush=True)
        log = stack.proxy_log_summary()
    finally:
        stack.close()
    summary: dict[str, Any] = {}
    for conns in (1, 32):
        for target in ("direct", "proxy"):
            sel = [x for x in rounds if x["conns"] == conns and x["target"] == target]
            for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req"):
                summary[f"c{conns}_{target}_{key}"] = med([x[key] for x in sel])
        summary[f"c{conns}_added_p50_ms"] = summary[f"c{conns}_proxy_p50_ms"] - summary[f"c{conns}_direct_p50_ms"]
        summary[f"c{conns}_added_p99_ms"] = summary[f"c{conns}_proxy_p99_ms"] - summary[f"c{conns}_direct_p99_ms"]
        summary[f"c{conns}_rps_ratio"] = summary[f"c{conns}_proxy_rps"] / summary[f"c{conns}_direct_rps"]
    return {"client": client, "rounds": rounds, "summary": summary, "proxy_log": log}


def case_stream(tmp: Path, args: argparse.Namespace, problems: list[str]) -> dict[str, Any]:
    stack = Stack(tmp, "stream", tps=200, ttft_ms=0, max_batch=1000)
    workers = 32
    try:
        assert stack.sim is not None and stack.proxy is not None
        sanity_check(stack, stream=True)
        for target in ("direct", "proxy"):
            run_async(stream_load(stack.url(target), workers, 1))
        stack.check()
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = ("direct", "proxy") if r % 2 == 0 else ("proxy", "direct")
            for target in order:
                ticks0 = stack.proxy.cpu_ticks()
                res = run_async(stream_load(stack.url(target), workers, args.duration))
                ticks1 = stack.proxy.cpu_ticks()
                stack.check()
                if target == "proxy":
                    res["proxy_cpu_ms_per_stream"] = (ticks1 - ticks0) * 1e3 / CLK_TCK / max(res["streams"], 1)
                res.update(round=r, target=target)
                check_errors(f"stream round {r} {target}", res, problems)
                rounds.append(res)
                print(f"  round {r + 1}/{args.rounds} stream c={workers} {target:<6} "
                      f"{res['streams_per_s']:7.1f} streams/s  TTFT p50 {res['ttft_p50_ms']:.3f} ms  "
                      f"p99 {res['ttft_p99_ms']:.3f} ms", flush=True)
        log = stack.proxy_log_summary()
    finally:
        stack.close()
    summary: dict[str, Any] = {}
    for target in ("direct", "proxy"):
        sel = [x for x in rounds if x["target"] == target]
        for key in ("streams_per_s", "ttft_p50_ms", "ttft_p99_ms", "total_p50_ms"):
            summary[f"{target}_{key}"] = med([x[key] for x in sel])
    summary["proxy_cpu_ms_per_stream"] = med([x["proxy_cpu_ms_per_stream"] for x in rounds if x["target"] == "proxy"])
    summary["added_ttft_p50_ms"] = summary["proxy_ttft_p50_ms"] - summary["direct_ttft_p50_ms"]
    summary["added_ttft_p99_ms"] = summary["proxy_ttft_p99_ms"] - summary["direct_ttft_p99_ms"]
    summary["streams_ratio"] = summary["proxy_streams_per_s"] / summary["direct_streams_per_s"]
    return {"workers": workers, "tokens": STREAM_TOKENS, "tokens_per_second": 200, "rounds": rounds,
            "summary": summary, "proxy_log": log}


def case_open_streams(tmp: Path, args: argparse.Namespace, problems: list[str]) -> dict[str, Any]:
    n = args.streams
    stack = Stack(tmp, "open-streams", tps=OPEN_STREAM_TPS, ttft_ms=0, max_batch=max(4000, 2 * n))
    try:
        assert stack.proxy is not None
        sanity_check(stack, stream=True)
        res = run_async(open_streams_load(stack, n))
        stack.check()
        log = stack.proxy_log_summary()
    finally:
        stack.close()
    if res["errors"]:
        problems.append(f"open-streams: {res['errors']} of {n} streams failed: {res['error_kinds']}")
    print(f"  {n} streams: {res['ok']} ok, {res['errors']} errors, peak open {res['peak_concurrently_open']}, "
          f"peak RSS {res['peak_rss_mb']:.1f} MB (VmHWM {res['vm_hwm_mb']:.1f} MB), {res['elapsed_s']:.1f} s",
          flush=True)
    return {"tokens": OPEN_STREAM_TOKENS, "tokens_per_second": OPEN_STREAM_TPS, **res, "proxy_log": log}


class RuleChurn:
    """A thread that rewrites the proxy's rule file every RELOAD_EVERY_S, in place (truncate + write, as a
    careless editor would), alternating the backend's weight and bumping a comment so every hash differs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = path.read_text()
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rule-churn", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RELOAD_EVERY_S):
            self.writes += 1
            weight = 1 + self.writes % 2
            text = self.text.replace("kind: vllm}", f"kind: vllm, weight: {weight}}}")
            self.path.write_text(f"# rewrite {self.writes}\n{text}")

    def __enter__(self) -> RuleChurn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def reload_counters(stack: Stack) -> dict[str, float]:
    """The proxy's rules_reloads_total by result and rules_generation, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.proxy_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    counters = {"success": 0.0, "error": 0.0, "generation": 0.0}
    for line in text.splitlines():
        m = re.match(r'splitstream_rules_reloads_total\{result="(\w+)"\} ([\d.e+]+)$', line)
        if m:
            counters[m.group(1)] = float(m.group(2))
        elif line.startswith("splitstream_rules_generation "):
            counters["generation"] = float(line.split()[1])
    return counters


def case_reload(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    stack = Stack(tmp, "reload", tps=0, ttft_ms=0, max_batch=1000)
    rules_file = stack.dir / "rules" / "bench.yaml"
    try:
        assert stack.proxy is not None
        sanity_check(stack, stream=False)
        run_load(client, stack.url("proxy"), 32, 1)  # warm-up
        stack.check()
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = ("plain", "reload") if r % 2 == 0 else ("reload", "plain")
            for mode in order:
                before = reload_counters(stack)
                if mode == "reload":
                    with RuleChurn(rules_file) as churn:
                        res = run_load(client, stack.url("proxy"), 32, args.duration)
                    res["rule_writes"] = churn.writes
                else:
                    res = run_load(client, stack.url("proxy"), 32, args.duration)
                after = reload_counters(stack)
                stack.check()
                res["reloads_applied"] = after["success"] - before["success"]
                res["reloads_rejected"] = after["error"] - before["error"]
                res["failed"] = res["non_2xx"] + res["socket_errors"]
                res.update(round=r, mode=mode)
                check_errors(f"reload round {r} {mode}", res, problems)
                rounds.append(res)
                print(f"  round {r + 1}/{args.rounds} c=32 {mode:<6} {res['rps']:9.0f} rps  "
                      f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  failed {res['failed']}  "
                      f"reloads {res['reloads_applied']:.0f} applied / {res['reloads_rejected']:.0f} rejected",
                      flush=True)
        log = stack.proxy_log_summary()
    finally:
        stack.close()
    summary: dict[str, Any] = {}
    for mode in ("plain", "reload"):
        sel = [x for x in rounds if x["mode"] == mode]
        for key in ("rps", "p50_ms", "p99_ms"):
            summary[f"{mode}_{key}"] = med([x[key] for x in sel])
        summary[f"{mode}_failed"] = sum(x["failed"] for x in sel)
        summary[f"{mode}_requests"] = sum(x["requests"] for x in sel)
    summary["p99_ratio"] = summary["reload_p99_ms"] / summary["plain_p99_ms"]
    summary["reloads_applied"] = sum(x["reloads_applied"] for x in rounds)
    summary["reloads_rejected"] = sum(x["reloads_rejected"] for x in rounds)
    summary["rule_writes"] = sum(x.get("rule_writes", 0) for x in rounds)
    return {"client": client, "rounds": rounds, "summary": summary, "proxy_log": log}


# ---------------------------------------------------------------------------------------------------
# sticky split through Redis (optional case)

STICKY_LUA = ROOT / "bench" / "wrk_sticky.lua"
STICKY_TARGETS = ("direct", "plain", "sticky")


def start_redis(tmp: Path) -> tuple[Proc, int]:
    """A throwaway redis-server (no persistence) on a free port, answering PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("the sticky case needs redis-server (apt-get install redis-server)")
    port = free_port()
    proc = Proc("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(tmp)], tmp)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        proc.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.02)
    raise BenchError(f"redis-server not answering on {port}; last output:\n{tail(proc.log)}")


def redis_dbsize(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"DBSIZE\r\n")
        return int(sock.recv(64)[1:].strip())


def split_sources(port: int) -> dict[str, float]:
    """splitstream_split_assignments_total summed by source, from the proxy's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    sources: dict[str, float] = {"sticky": 0.0, "new": 0.0, "fallback": 0.0}
    for line in text.splitlines():
        if line.startswith("splitstream_split_assignments_total{"):
            m = re.search(r'source="(\w+)"', line)
            if m:
                sources[m.group(1)] = sources.get(m.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return sources


def run_wrk_sticky(url: str, conns: int, duration: float) -> dict[str, Any]:
    args = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "5s",
            "-s", str(STICKY_LUA), url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}: {proc.stderr or proc.stdout}")
    return parse_wrk(proc.stdout)


def case_sticky(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    """Direct vs. a plain `pool:` proxy vs. a proxy whose route is a 90/10 split sticky by `x-user-id`
    through Redis (`serve --redis`), all in front of the same instant runtime, with 10,000 cycling subjects."""
    if client != "wrk":
        raise BenchError("the sticky case needs wrk (its Lua script varies the x-user-id header)")
    redis, redis_port = start_redis(tmp)
    stack: Stack | None = None
    sticky: Proc | None = None
    try:
        stack = Stack(tmp, "sticky", tps=0, ttft_ms=0, max_batch=1000)
        rules = stack.dir / "sticky-rules"
        rules.mkdir()
        (rules / "bench.yaml").write_text(f"""\
server: {{max_inflight: 100000}}
backends:
  sim: {{url: "http://127.0.0.1:{stack.sim_port}", kind: vllm}}
pools:
  p: {{backends: [sim], model: "{MODEL}"}}
  q: {{backends: [sim], model: "{MODEL}"}}
routes:
  - name: bench
    match: {{model: "{MODEL}"}}
    split:
      sticky: {{by: "header:x-user-id", ttl: 1h}}
      variants:
        - {{name: stable, pool: p, weight: 90}}
        - {{name: canary, pool: q, weight: 10}}
""")
        sticky_port = free_port()
        sticky = Proc("split-proxy", [  # the Stack's own proxy is "sticky-proxy"
            sys.executable, "-m", "proxy", "serve", "--rules", str(rules), "--host", "127.0.0.1",
            "--port", str(sticky_port), "--redis", f"redis://127.0.0.1:{redis_port}/0"], stack.dir)
        wait_ready(sticky, f"http://127.0.0.1:{sticky_port}/healthz")
        urls = {"direct": stack.url("direct"), "plain": stack.url("proxy"),
                "sticky": f"http://127.0.0.1:{sticky_port}/v1/chat/completions"}
        procs = {"direct": stack.sim, "plain": stack.proxy, "sticky": sticky}
        sanity_check(stack, stream=False)
        req = urllib.request.Request(urls["sticky"], data=BODY, method="POST",
                                     headers={**HEADERS, "x-user-id": "sanity"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200 or resp.headers.get("x-splitstream-variant") not in ("stable", "canary"):
                raise BenchError(f"sticky sanity request: HTTP {resp.status}, variant "
                                 f"{resp.headers.get('x-splitstream-variant')}")
        if redis_dbsize(redis_port) != 1:
            raise BenchError("sticky sanity request stored nothing in Redis")
        for target in STICKY_TARGETS:  # warm-up; also assigns most of the 10,000 subjects
            run_wrk_sticky(urls[target], 32, 1)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = STICKY_TARGETS[r % 3:] + STICKY_TARGETS[:r % 3]  # rotate who goes first
            for conns in (1, 32):
                for target in order:
                    watched = procs[target]
                    assert watched is not None
                    ticks0, redis0, sources0 = watched.cpu_ticks(), redis.cpu_ticks(), split_sources(sticky_port)
                    res = run_wrk_sticky(urls[target], conns, args.duration)
                    ticks1, redis1, sources1 = watched.cpu_ticks(), redis.cpu_ticks(), split_sources(sticky_port)
                    stack.check()
                    sticky.check()
                    redis.check()
                    n = max(res["requests"], 1)
                    res["cpu_ms_per_req"] = (ticks1 - ticks0) * 1e3 / CLK_TCK / n
                    res["redis_cpu_ms_per_req"] = (redis1 - redis0) * 1e3 / CLK_TCK / n
                    res["sources"] = {k: sources1.get(k, 0.0) - sources0.get(k, 0.0) for k in sources1}
                    res.update(round=r, target=target, conns=conns)
                    check_errors(f"sticky round {r} {target} c={conns}", res, problems)
                    rounds.append(res)
                    print(f"  round {r + 1}/{args.rounds} c={conns:<2} {target:<6} {res['rps']:9.0f} rps  "
                          f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                          f"cpu {res['cpu_ms_per_req']:.3f} ms/req"
                          + (f"  sources {res['sources']}" if target == "sticky" else ""), flush=True)
        plain_proxy, stack.proxy = stack.proxy, sticky  # the summary of the sticky proxy's log, not the plain one's
        try:
            log = stack.proxy_log_summary()
        finally:
            stack.proxy = plain_proxy
        subjects = redis_dbsize(redis_port)
    finally:
        if sticky is not None:
            sticky.stop()
        if stack is not None:
            stack.close()
        redis.stop()
    summary: dict[str, Any] = {"redis_keys": subjects}
    for conns in (1, 32):
        for target in STICKY_TARGETS:
            sel = [x for x in rounds if x["conns"] == conns and x["target"] == target]
            for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req"):
                summary[f"c{conns}_{target}_{key}"] = med([x[key] for x in sel])
        summary[f"c{conns}_redis_cpu_ms_per_req"] = med(
            [x["redis_cpu_ms_per_req"] for x in rounds if x["conns"] == conns and x["target"] == "sticky"])
        for target in ("plain", "sticky"):
            summary[f"c{conns}_{target}_added_p50_ms"] = (summary[f"c{conns}_{target}_p50_ms"]
                                                          - summary[f"c{conns}_direct_p50_ms"])
        summary[f"c{conns}_split_cost_p50_ms"] = summary[f"c{conns}_sticky_p50_ms"] - summary[f"c{conns}_plain_p50_ms"]
    totals: Counter[str] = Counter()
    for x in rounds:
        if x["target"] == "sticky":
            totals.update({k: int(v) for k, v in x["sources"].items()})
    summary["sources"] = dict(totals)
    if totals["fallback"]:
        problems.append(f"sticky: {totals['fallback']} assignments fell back (Redis slow or unavailable)")
    return {"client": client, "rounds": rounds, "summary": summary, "proxy_log": log}


# ---------------------------------------------------------------------------------------------------
# report


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if v != v:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def _added(v: float) -> str:
    return "n/a" if v != v else f"{v:+.3f}"


def _target(ok: bool, text: str) -> str:
    return f"{text}  {'met' if ok else 'MISSED'}"


def build_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows: list[tuple[str, str, str, str, str]] = []
    ns = results.get("nonstream")
    if ns:
        s = ns["summary"]
        rows += [
            ("c=1  p50 latency (ms)", _f(s["c1_direct_p50_ms"]), _f(s["c1_proxy_p50_ms"]), _added(s["c1_added_p50_ms"]),
             _target(s["c1_added_p50_ms"] <= TARGETS["c1_added_p50_ms"], "added <= 0.2")),
            ("c=1  p99 latency (ms)", _f(s["c1_direct_p99_ms"]), _f(s["c1_proxy_p99_ms"]), _added(s["c1_added_p99_ms"]),
             _target(s["c1_added_p99_ms"] <= TARGETS["c1_added_p99_ms"], "added <= 1")),
            ("c=1  rps", _f(s["c1_direct_rps"]), _f(s["c1_proxy_rps"]), f"ratio {s['c1_rps_ratio']:.2f}", ""),
            ("c=32 rps", _f(s["c32_direct_rps"]), _f(s["c32_proxy_rps"]), f"ratio {s['c32_rps_ratio']:.2f}",
             _target(s["c32_proxy_rps"] >= TARGETS["c32_proxy_rps"], "proxy >= 8,000")),
            ("c=32 p50 latency (ms)", _f(s["c32_direct_p50_ms"]), _f(s["c32_proxy_p50_ms"]), _added(s["c32_added_p50_ms"]), ""),
            ("c=32 p99 latency (ms)", _f(s["c32_direct_p99_ms"]), _f(s["c32_proxy_p99_ms"]), _added(s["c32_added_p99_ms"]), ""),
            ("proxy CPU per request c=32 (ms)", "-", _f(s["c32_proxy_cpu_ms_per_req"]), "",
             _target(s["c32_proxy_cpu_ms_per_req"] <= TARGETS["proxy_cpu_ms_per_req"], "<= 0.1")),
            ("proxy CPU per request c=1 (ms)", "-", _f(s["c1_proxy_cpu_ms_per_req"]), "",
             _target(s["c1_proxy_cpu_ms_per_req"] <= TARGETS["proxy_cpu_ms_per_req"], "<= 0.1")),
            ("(ref) sim CPU per request c=32 (ms)", _f(s["c32_direct_cpu_ms_per_req"]), "-", "", ""),
        ]
    st = results.get("stream")
    if st:
        s = st["summary"]
        rows += [
            ("stream c=32 TTFT p50 (ms)", _f(s["direct_ttft_p50_ms"]), _f(s["proxy_ttft_p50_ms"]),
             _added(s["added_ttft_p50_ms"]), _target(s["added_ttft_p50_ms"] <= TARGETS["stream_added_ttft_p50_ms"], "added <= 1")),
            ("stream c=32 TTFT p99 (ms)", _f(s["direct_ttft_p99_ms"]), _f(s["proxy_ttft_p99_ms"]),
             _added(s["added_ttft_p99_ms"]), ""),
            ("stream c=32 total p50 (ms)", _f(s["direct_total_p50_ms"]), _f(s["proxy_total_p50_ms"]),
             _added(s["proxy_total_p50_ms"] - s["direct_total_p50_ms"]), ""),
            ("stream c=32 streams/s", _f(s["direct_streams_per_s"], 1), _f(s["proxy_streams_per_s"], 1),
             f"ratio {s['streams_ratio']:.2f}", ""),
            ("proxy CPU per stream (ms)", "-", _f(s["proxy_cpu_ms_per_stream"]), "", ""),
        ]
    rl = results.get("reload")
    if rl:
        s = rl["summary"]
        rows += [
            ("reload c=32 p99 (ms) [plain | reloading]", _f(s["plain_p99_ms"]), _f(s["reload_p99_ms"]),
             f"ratio {s['p99_ratio']:.2f}", _target(s["p99_ratio"] <= TARGETS["reload_p99_ratio"], "ratio <= 1.1")),
            ("reload c=32 p50 (ms) [plain | reloading]", _f(s["plain_p50_ms"]), _f(s["reload_p50_ms"]), "", ""),
            ("reload c=32 rps [plain | reloading]", _f(s["plain_rps"]), _f(s["reload_rps"]),
             f"ratio {s['reload_rps'] / s['plain_rps']:.2f}", ""),
            ("reload c=32 failed requests", str(s["plain_failed"]), str(s["reload_failed"]),
             f"of {s['reload_requests']:,}", _target(s["reload_failed"] <= TARGETS["reload_failed"], "0")),
            ("reload: rule writes / applied / rejected", "-",
             f"{s['rule_writes']} / {s['reloads_applied']:.0f} / {s['reloads_rejected']:.0f}", "", ""),
        ]
    sk = results.get("sticky")
    if sk:
        rows += sticky_rows(sk["summary"])
    return rows


def sticky_rows(s: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Direct vs. the sticky-split proxy; the plain proxy's and the split's own share on extra rows."""
    rows: list[tuple[str, str, str, str, str]] = []
    limit = TARGETS["sticky_added_p50_ms"]
    for c in (1, 32):
        rows += [
            (f"sticky c={c:<2} p50 (ms) [direct | sticky]", _f(s[f"c{c}_direct_p50_ms"]), _f(s[f"c{c}_sticky_p50_ms"]),
             _added(s[f"c{c}_sticky_added_p50_ms"]), _target(s[f"c{c}_sticky_added_p50_ms"] <= limit, f"added <= {limit:g}")),
            (f"sticky c={c:<2} p50 (ms) [plain | sticky]", _f(s[f"c{c}_plain_p50_ms"]), _f(s[f"c{c}_sticky_p50_ms"]),
             _added(s[f"c{c}_split_cost_p50_ms"]), "(the split + Redis alone)"),
            (f"sticky c={c:<2} p99 (ms) [direct | sticky]", _f(s[f"c{c}_direct_p99_ms"]), _f(s[f"c{c}_sticky_p99_ms"]),
             _added(s[f"c{c}_sticky_p99_ms"] - s[f"c{c}_direct_p99_ms"]), ""),
            (f"sticky c={c:<2} rps [plain | sticky]", _f(s[f"c{c}_plain_rps"]), _f(s[f"c{c}_sticky_rps"]),
             f"ratio {s[f'c{c}_sticky_rps'] / s[f'c{c}_plain_rps']:.2f}", ""),
            (f"sticky c={c:<2} proxy CPU/req (ms) [plain | sticky]", _f(s[f"c{c}_plain_cpu_ms_per_req"]),
             _f(s[f"c{c}_sticky_cpu_ms_per_req"]), _added(s[f"c{c}_sticky_cpu_ms_per_req"] - s[f"c{c}_plain_cpu_ms_per_req"]),
             f"redis {_f(s[f'c{c}_redis_cpu_ms_per_req'])} ms/req"),
        ]
    rows.append(("sticky assignments by source", "-", ", ".join(f"{k} {v:,}" for k, v in sorted(s["sources"].items())),
                 f"{s['redis_keys']:,} keys", ""))
    return rows


def print_report(results: dict[str, Any], client: str) -> None:
    rows = build_rows(results)
    header = ("case", "direct", "proxy", "added / ratio", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    print()
    if client != "wrk" and "nonstream" in results:
        print("NOTE: wrk not used; non-streaming numbers come from the Python aiohttp closed-loop client,"
              " which is much slower than wrk (client-bound rps, inflated latencies).")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) if i < 4 else h for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) if i < 4 else c for i, (c, w) in enumerate(zip(r, widths))))
    os_ = results.get("open_streams")
    if os_:
        ok = os_["errors"] == 0 and os_["peak_rss_mb"] <= TARGETS["open_streams_rss_mb"]
        print(f"{os_['streams']} open streams: errors {os_['errors']}, peak RSS {os_['peak_rss_mb']:.0f} MB "
              f"(VmHWM {os_['vm_hwm_mb']:.0f} MB, idle {os_['rss_base_mb']:.0f} MB), "
              f"peak concurrently open {os_['peak_concurrently_open']}, stream p50/p99 "
              f"{os_['total_p50_ms'] / 1e3:.2f}/{os_['total_p99_ms'] / 1e3:.2f} s"
              f"   target: no errors, RSS <= 300 MB  {'met' if ok else 'MISSED'}")
        if os_["error_kinds"]:
            print(f"  error kinds: {os_['error_kinds']}")


# ---------------------------------------------------------------------------------------------------
# machine info


def git_commit() -> str | None:
    """Short HEAD commit, read from .git directly (no git process needed)."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:7]
        ref = head[5:]
        path = git / ref
        if path.exists():
            return path.read_text().strip()[:7]
        packed = git / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:7]
    except OSError:
        pass
    return None


def machine_info(client: str) -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_version = None
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        wrk_version = (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else None
    versions = {}
    for mod in ("aiohttp", "uvloop", "httptools", "orjson"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - informational only
            versions[mod] = None
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "wrk": wrk_version,
        "load_client": client,
        "git_commit": git_commit(),
        "packages": versions,
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


# ---------------------------------------------------------------------------------------------------


def _no_nan(v: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_no_nan(x) for x in v]
    return v


def raise_nofile(need: int) -> None:
    """2,000 streams need ~4,000 descriptors in the proxy and 2,000 in the client; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved direct/proxy rounds (default 3)")
    parser.add_argument("--streams", type=int, default=2000, help="open streams in that case (default 2000)")
    parser.add_argument("--only", action="append", metavar="CASE",
                        help=f"run only this case ({'|'.join(CASES + OPTIONAL_CASES)}); repeat or comma-separate "
                             "for several")
    parser.add_argument("--python-client", action="store_true",
                        help="use the Python closed-loop client for the non-streaming case even if wrk exists")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the process logs")
    args = parser.parse_args(argv)
    cases = [c.strip() for item in (args.only or list(CASES)) for c in item.split(",") if c.strip()]
    for c in cases:
        if c not in CASES + OPTIONAL_CASES:
            parser.error(f"unknown case {c!r} (choose from {', '.join(CASES + OPTIONAL_CASES)})")
    if args.rounds < 1 or args.duration <= 0 or args.streams < 1:
        parser.error("--rounds, --duration and --streams must be positive")

    client = "wrk" if shutil.which("wrk") and not args.python_client else "python"
    if client != "wrk":
        print("wrk not used (not found, or --python-client): using the Python aiohttp closed-loop client for the "
              "non-streaming case; its numbers are client-bound and not comparable with wrk's.", flush=True)
    raise_nofile(max(65536, 4 * args.streams + 1024))

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="splitstream-bench-"))
    results: dict[str, Any] = {}
    problems: list[str] = []
    status = 0
    try:
        if "nonstream" in cases:
            print(f"[nonstream] instant runtime, {client} c=1 and c=32, {args.rounds} x {args.duration:g} s", flush=True)
            results["nonstream"] = case_nonstream(tmp, args, client, problems)
        if "stream" in cases:
            print(f"[stream] {STREAM_TOKENS} tokens at 200 tok/s, 32 workers, {args.rounds} x {args.duration:g} s",
                  flush=True)
            results["stream"] = case_stream(tmp, args, problems)
        if "open-streams" in cases:
            print(f"[open-streams] {args.streams} streams of {OPEN_STREAM_TOKENS} tokens at "
                  f"{OPEN_STREAM_TPS:g} tok/s at once through one proxy", flush=True)
            results["open_streams"] = case_open_streams(tmp, args, problems)
        if "reload" in cases:
            print(f"[reload] instant runtime, {client} c=32, plain vs rules rewritten every "
                  f"{RELOAD_EVERY_S * 1000:.0f} ms, {args.rounds} x {args.duration:g} s", flush=True)
            results["reload"] = case_reload(tmp, args, client, problems)
        if "sticky" in cases:
            print(f"[sticky] instant runtime, {client} c=1 and c=32, direct vs plain proxy vs 90/10 split sticky by "
                  f"x-user-id through Redis (10,000 subjects), {args.rounds} x {args.duration:g} s", flush=True)
            results["sticky"] = case_sticky(tmp, args, client, problems)
    except BenchError as exc:
        sys.stdout.flush()
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        problems.append(f"aborted: {str(exc).splitlines()[0]}")
        status = 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        status = 130
    finally:
        if args.keep_logs or status:
            print(f"process logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - t0

    if results:
        print_report(results, client)
    for key in ("nonstream", "stream", "open_streams", "reload", "sticky"):
        log = results.get(key, {}).get("proxy_log")
        if log and log["samples"]:
            problems.append(f"{key}: proxy logged {log['log_levels']}; first: {log['samples'][0][:300]}")
    if problems:
        print("\nproblems:")
        for p in problems:
            print(f"  - {p}")
    print(f"\nwall time {wall:.0f} s")

    if results:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"overhead-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        doc = {
            "benchmark": "overhead",
            "started_utc": started.isoformat(timespec="seconds"),
            "wall_time_s": round(wall, 1),
            "complete": status == 0,
            "args": {"duration": args.duration, "rounds": args.rounds, "streams": args.streams, "cases": cases},
            "machine": machine_info(client),
            "targets": TARGETS,
            "table": [dict(zip(("case", "direct", "proxy", "added_or_ratio", "target"), r)) for r in build_rows(results)],
            "results": results,
            "problems": problems,
        }
        out.write_text(json.dumps(_no_nan(doc), indent=2, default=str) + "\n")
        print(f"results written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
