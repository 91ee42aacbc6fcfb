#!/usr/bin/env python3
"""Status-page load times while the proxy carries ~1,000 requests/s of background traffic.

Starts three simulated runtimes and one `python -m proxy serve` as subprocesses (a 90/10 split route with a
5 % shadow and a result cache, so every page has data), drives open-loop traffic at `--rate` from a
separate load process (this script with `--load-worker`), and times sequential GETs of each page and its
JSON twin from here: first under load, then again once the load stopped (same data, idle proxy). Times
are wall-clock per request on a keep-alive connection, request sent to body read. (The proxy's access log
is no help here: uvloop's loop clock ticks in milliseconds.) Numbers, not pass/fail; results also go to
bench/results/ui-<UTC>.json.

    .venv/bin/python bench/ui.py                       # 1,000 req/s, 200 loads per page, ~25 s
    .venv/bin/python bench/ui.py --rate 500 --loads 50
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PAGES = ("/ui/", "/ui/backends", "/ui/shadow", "/ui/cache",
         "/admin/overview", "/admin/backends", "/admin/shadow", "/admin/cache")
TARGET_P95_MS = 100.0
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()


def rules(ports: dict[str, int]) -> str:
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    return f"""\
server: {{max_inflight: 100000}}
backends:
  a: {{url: "{url['a']}", kind: vllm}}
  b: {{url: "{url['b']}", kind: vllm}}
  shadow: {{url: "{url['shadow']}", kind: vllm}}
pools:
  stable: {{backends: [a], model: sim-model}}
  canary: {{backends: [b], model: sim-model}}
  next: {{backends: [shadow], model: sim-model}}
routes:
  - name: chat
    match: {{model: "llama*"}}
    split:
      variants:
        - {{name: stable, pool: stable, weight: 90}}
        - {{name: canary, pool: canary, weight: 10}}
    shadow: [{{pool: next, sample: 0.05}}]
    cache: {{ttl: 10m}}
"""


# ------------------------------------------------------------------------------------------ load worker


async def load_worker(url: str, rate: float, duration: float, concurrency: int) -> dict[str, Any]:
    """Open loop: request i is due at start + i / rate; at most `concurrency` in flight (then it lags, and
    the achieved rate says so). 20 % streams, 5 % repeated temperature-0 prompts (cache hits)."""
    rng = random.Random(1)
    statuses: Counter[str] = Counter()
    semaphore = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one(session: aiohttp.ClientSession) -> None:
        body: dict[str, Any] = {"model": "llama-3.1-8b", "max_tokens": 8,
                                "messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=12))}]}
        draw = rng.random()
        if draw < 0.05:
            body["temperature"] = 0
            body["messages"] = [{"role": "user", "content": rng.choice(WORDS)}]
        elif draw < 0.25:
            body["stream"] = True
        try:
            async with session.post(url, json=body) as response:
                await response.read()
                statuses[f"{response.status // 100}xx"] += 1
        except aiohttp.ClientError:
            statuses["exception"] += 1
        finally:
            semaphore.release()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while (now := loop.time()) < start + duration:
            due = start + sent / rate
            if due > now:
                await asyncio.sleep(due - now)  # pacing the open loop, not synchronisation
            await semaphore.acquire()
            task = asyncio.create_task(one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    return {"sent": sent, "elapsed": elapsed, "rate": sent / elapsed, "statuses": dict(statuses)}


# ------------------------------------------------------------------------------------------ measuring


def time_pages(port: int, loads: int, rps_probe: list[float]) -> dict[str, list[float]]:
    """`loads` GETs of every page, interleaved (so each page sees the same moments), on one keep-alive
    connection; milliseconds per page. Also records the overview's own requests/s each round."""
    times: dict[str, list[float]] = {page: [] for page in PAGES}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(loads):
            for page in PAGES:
                started = time.perf_counter()
                conn.request("GET", page)
                response = conn.getresponse()
                body = response.read()
                times[page].append((time.perf_counter() - started) * 1000)
                if response.status != 200:
                    raise harness.BenchError(f"GET {page}: HTTP {response.status}")
                if page == "/admin/overview":
                    rps_probe.append(json.loads(body)["totals"]["rps"])
    finally:
        conn.close()
    return times


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": ordered[-1], "n": len(ordered)}


def print_table(title: str, times: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"  {'page':<18} {'p50':>9} {'p95':>9} {'max':>9}   target p95")
    for page in PAGES:
        c = summary(times[page])
        verdict = "met" if c["p95"] < TARGET_P95_MS else "MISSED"
        print(f"  {page:<18} {c['p50']:>7.2f}ms {c['p95']:>7.2f}ms {c['max']:>7.2f}ms   "
              f"< {TARGET_P95_MS:.0f} ms {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="background requests per second")
    parser.add_argument("--loads", type=int, default=200, help="timed loads per page and phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before timing")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--load-worker", nargs=2, metavar=("URL", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_worker:
        result = asyncio.run(load_worker(args.load_worker[0], args.rate, float(args.load_worker[1]),
                                         args.concurrency))
        print(json.dumps(result), flush=True)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="splitstream-ui-bench-"))
    procs: list[harness.Proc] = []
    try:
        ports = {name: harness.free_port() for name in ("a", "b", "shadow")}
        for name, port in ports.items():
            sim = harness.Proc(f"sim-{name}", [sys.executable, "-m", "proxy", "sim-backend", "--host", "127.0.0.1",
                                          "--port", str(port), "--model", "sim-model", "--tokens-per-second", "0",
                                          "--ttft-ms", "0", "--max-batch", "1024"], tmp)
            procs.append(sim)
            harness.wait_ready(sim, f"http://127.0.0.1:{port}/health")
        rules_dir = tmp / "rules"
        rules_dir.mkdir()
        (rules_dir / "bench.yaml").write_text(rules(ports))
        proxy_port = harness.free_port()
        proxy = harness.Proc("proxy", [sys.executable, "-m", "proxy", "serve", "--rules", str(rules_dir),
                                  "--host", "127.0.0.1", "--port", str(proxy_port)], tmp)
        procs.append(proxy)
        harness.wait_ready(proxy, f"http://127.0.0.1:{proxy_port}/healthz")

        # Load long enough to cover the warm-up and the timed loads under load, whatever they take.
        budget = args.warmup + max(10.0, args.loads * len(PAGES) * 0.01)
        load = harness.Proc("load", [sys.executable, str(Path(__file__).resolve()), "--rate", str(args.rate),
                                "--concurrency", str(args.concurrency), "--load-worker",
                                f"http://127.0.0.1:{proxy_port}/v1/chat/completions", str(budget)], tmp)
        procs.append(load)
        print(f"background load: {args.rate:.0f} req/s open loop for {budget:.0f} s (warm-up {args.warmup:.0f} s)")
        time.sleep(args.warmup)  # let the window fill (a benchmark's pacing, not synchronisation)
        for proc in procs:
            proc.check()
        window_rps: list[float] = []
        started = time.monotonic()
        loaded = time_pages(proxy_port, args.loads, window_rps)
        loaded_for = time.monotonic() - started
        if load.popen.poll() is not None:
            print("  warning: the load ended before the timed loads did; raise the budget", file=sys.stderr)
        load.popen.wait(budget + 60)
        load_result = json.loads(load.log.read_text().strip().splitlines()[-1])
        idle_rps: list[float] = []
        idle = time_pages(proxy_port, args.loads, idle_rps)
    finally:
        for proc in reversed(procs):
            proc.stop()

    print(f"load process: {load_result['sent']} requests in {load_result['elapsed']:.1f} s = "
          f"{load_result['rate']:.0f} req/s, statuses {load_result['statuses']}")
    print(f"proxy's own requests/s (overview, 60 s window) while timing: "
          f"median {statistics.median(window_rps):.0f}, min {min(window_rps):.0f}")
    print_table(f"under load ({args.loads} loads per page over {loaded_for:.1f} s)", loaded)
    print_table("idle (same data, load stopped)", idle)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"ui-{stamp}.json"
    out.write_text(json.dumps({
        "rate": args.rate, "loads": args.loads, "load": load_result, "window_rps": window_rps,
        "under_load_ms": {p: summary(loaded[p]) for p in PAGES},
        "idle_ms": {p: summary(idle[p]) for p in PAGES},
        "machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0]},
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
