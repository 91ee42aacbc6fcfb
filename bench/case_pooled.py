"""The pooled case of overhead.py (only with --only pooled): per-variant statistics pooled in Redis vs embedded.

Direct vs. two proxies on the same 90/10 split (a per-request draw: nothing in the store on the request path),
one with `--redis` (its statistics flushed to Redis about once a second; a shared store also gets the feedback
joins) and one with the embedded store; wrk c=32: rps, p50/p99, added p50 and the proxy's CPU per request.
The proxies' own A/B report (/admin/experiments/bench, pooled numbers) must count what wrk was answered (plus
at most the 32 requests in flight when wrk stopped).

Then the pooled path alone, in this process against the same redis-server: `RequestStats.record` for as many
requests a second as the Redis round served, and one `PooledStats.flush` a second (the proxy's loop), replayed
without waiting: its CPU per request (target < 0.01 ms: the flush is batched, the request path is a few
additions).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness import (ROOT, BenchError, Proc, check_errors, med, note_neighbours, rotated, run_async, run_wrk,
                     start_redis, with_cpu)
from report import Row, added, fmt, ratio, verdict
from stack import Stack, completions_url, proxy_log_summary, rules_yaml, sanity_check, start_proxy, write_rules

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = {"pooled_cpu_ms_per_req": 0.01}
POOLED_TARGETS = ("direct", "embedded", "redis")
SPLIT_ROUTE = """\
split:
  variants:
    - {name: stable, pool: p, weight: 90}
    - {name: canary, pool: q, weight: 10}
"""
WRK_POST = ROOT / "bench" / "wrk_post.lua"


def counted(port: int) -> int:
    """Requests the pooled statistics hold for route `bench` (the A/B report: every variant, every replica)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/experiments/bench", timeout=10) as resp:
        report = json.load(resp)
    return sum(int(row["requests"]) for row in report["variants"])


def replay(redis_port: int, rps: float, seconds: int) -> dict[str, Any]:
    """The pooled path by itself: `rps` requests a second through `RequestStats.record` (90/10 over two
    variants, realistic timings) and one flush into Redis a second, for `seconds` simulated seconds."""
    from proxy.observe.metrics import Metrics
    from proxy.observe.pooled import PooledStats
    from proxy.observe.stats import RequestStats
    from proxy.store.redis import RedisStore

    async def main() -> dict[str, Any]:
        now = [time.time()]
        store = RedisStore(f"redis://127.0.0.1:{redis_port}/0", timeout=5.0)
        local = RequestStats(lambda: now[0])
        pooled = PooledStats(store, local, "bench-replay", Metrics(), lambda: now[0])
        rng = random.Random(7)
        timings = [(rng.uniform(0.0005, 0.002), rng.uniform(0.0002, 0.001)) for _ in range(4096)]
        per_second = max(1, round(rps))
        record = local.record
        try:
            await pooled.flush()  # connect first: the replay measures steady state
            record_cpu = flush_cpu = 0.0
            ok = 0
            for second in range(seconds):
                t0 = time.process_time()
                for i in range(per_second):
                    latency, ttft = timings[(second * per_second + i) & 4095]
                    record("bench", "canary" if i % 10 == 9 else "stable", latency, ttft, False, 12, 8)
                t1 = time.process_time()
                ok += await pooled.flush()
                t2 = time.process_time()
                record_cpu += t1 - t0
                flush_cpu += t2 - t1
                now[0] += 1.0
        finally:
            await store.close()
        n = per_second * seconds
        return {"requests": n, "seconds": seconds, "flushes_ok": ok, "record_us_per_req": record_cpu * 1e6 / n,
                "flush_ms_per_flush": flush_cpu * 1e3 / seconds, "flush_us_per_req": flush_cpu * 1e6 / n,
                "cpu_ms_per_req": (record_cpu + flush_cpu) * 1e3 / n}

    result: dict[str, Any] = run_async(main())
    return result


def run(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    if client != "wrk":
        raise BenchError("the pooled case needs wrk")
    redis, redis_port = start_redis(tmp, "the pooled case")
    stack: Stack | None = None
    split: dict[str, Proc] = {}
    try:
        stack = Stack(tmp, "pooled", tps=0, ttft_ms=0, max_batch=1000)
        rules = write_rules(stack.dir / "pooled-rules",
                            rules_yaml({"sim": stack.sim_port}, {"p": ["sim"], "q": ["sim"]}, SPLIT_ROUTE))
        ports: dict[str, int] = {}
        for store, redis_url in (("redis", f"redis://127.0.0.1:{redis_port}/0"), ("embedded", None)):
            split[store], ports[store] = start_proxy(f"pooled-{store}-proxy", stack.dir, rules, redis_url)
        urls = {"direct": stack.url("direct"), **{store: completions_url(port) for store, port in ports.items()}}
        procs = {"direct": stack.sim, **split}
        sanity_check(stack, stream=False)
        for target in POOLED_TARGETS:  # warm-up
            run_wrk(urls[target], 32, 1, WRK_POST)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for target in rotated(POOLED_TARGETS, r):
                watched = procs[target]
                assert watched is not None
                url = urls[target]
                before = counted(ports[target]) if target in ports else 0
                res = with_cpu(lambda: run_wrk(url, 32, args.duration, WRK_POST), {"": watched, "redis_": redis},
                               ours=[redis, *[p for p in procs.values() if p is not None]])
                res["pooled_counted"] = counted(ports[target]) - before if target in ports else None
                stack.check()
                redis.check()
                for proc in split.values():
                    proc.check()
                res.update(round=r, target=target, conns=32)
                check_errors(f"pooled round {r} {target}", res, problems)
                # wrk counts the answers it read before its time ran out; the up to 32 still in flight then
                # are answered too (and counted by the proxy) but not by wrk.
                if res["pooled_counted"] is not None and not 0 <= res["pooled_counted"] - res["requests"] <= 32:
                    problems.append(f"pooled round {r} {target}: the pooled statistics counted "
                                    f"{res['pooled_counted']} requests, wrk was answered {res['requests']} (+ <= 32 "
                                    "in flight when it stopped)")
                rounds.append(res)
                print(f"  round {r + 1}/{args.rounds} c=32 {target:<8} {res['rps']:9.0f} rps  "
                      f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                      f"cpu {res['cpu_ms_per_req']:.4f} ms/req  redis-server {res['redis_cpu_ms_per_req']:.4f} ms/req  "
                      f"others {res['other_cores']:.2f} cores"
                      + (f"  counted {res['pooled_counted']}" if res["pooled_counted"] is not None else ""),
                      flush=True)
        logs = {store: proxy_log_summary(proc) for store, proc in split.items()}
        redis_rps = med([x["rps"] for x in rounds if x["target"] == "redis"])
        seconds = max(10, round(args.duration * args.rounds))
        path = replay(redis_port, redis_rps, seconds)
        print(f"  pooled path alone: {path['requests']:,} requests over {seconds} simulated seconds at "
              f"{redis_rps:,.0f}/s: record {path['record_us_per_req']:.2f} us/req, flush "
              f"{path['flush_ms_per_flush']:.2f} ms/flush ({path['flush_us_per_req']:.3f} us/req), "
              f"{path['cpu_ms_per_req']:.5f} ms CPU/req", flush=True)
    finally:
        for proc in split.values():
            proc.stop()
        if stack is not None:
            stack.close()
        redis.stop()
    summary = summarize(rounds, path)
    note_neighbours("pooled", rounds, problems)
    return {"client": client, "rounds": rounds, "path": path, "summary": summary,
            "proxy_log": logs["redis"], "proxy_log_embedded": logs["embedded"]}


def summarize(rounds: list[dict[str, Any]], path: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for target in POOLED_TARGETS:
        sel = [x for x in rounds if x["target"] == target]
        for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req", "redis_cpu_ms_per_req"):
            s[f"{target}_{key}"] = med([x[key] for x in sel])
    s["path_cpu_ms_per_req"] = path["cpu_ms_per_req"]
    s["path_record_us_per_req"] = path["record_us_per_req"]
    s["path_flush_ms_per_flush"] = path["flush_ms_per_flush"]
    return s


def rows(s: dict[str, Any]) -> list[Row]:
    limit = TARGETS["pooled_cpu_ms_per_req"]
    out: list[Row] = []
    for store in ("embedded", "redis"):
        out.append((f"pooled c=32: rps [direct | {store}]", fmt(s["direct_rps"]), fmt(s[f"{store}_rps"]),
                    f"ratio {ratio(s[f'{store}_rps'], s['direct_rps']):.2f}", ""))
        out.append((f"pooled c=32: p50 (ms) [direct | {store}]", fmt(s["direct_p50_ms"]), fmt(s[f"{store}_p50_ms"]),
                    added(s[f"{store}_p50_ms"] - s["direct_p50_ms"]), ""))
    out.append(("pooled c=32: p50 (ms) [embedded | redis]", fmt(s["embedded_p50_ms"]), fmt(s["redis_p50_ms"]),
                added(s["redis_p50_ms"] - s["embedded_p50_ms"]), "(pooling through Redis)"))
    out.append(("pooled c=32: proxy CPU/req (ms) [embedded | redis]", fmt(s["embedded_cpu_ms_per_req"], 4),
                fmt(s["redis_cpu_ms_per_req"], 4), added(s["redis_cpu_ms_per_req"] - s["embedded_cpu_ms_per_req"]),
                f"redis-server {fmt(s['redis_redis_cpu_ms_per_req'], 4)} ms/req; with feedback joins"))
    out.append(("pooled path alone: CPU/req (ms) [record | record+flush]",
                fmt(s["path_record_us_per_req"] / 1e3, 5), fmt(s["path_cpu_ms_per_req"], 5),
                f"flush {fmt(s['path_flush_ms_per_flush'])} ms/s",
                verdict(s["path_cpu_ms_per_req"] < limit, f"< {limit:g} ms")))
    return out
