"""The sticky case of overhead.py (only with --only sticky): a 90/10 split sticky by x-user-id through Redis.

Direct vs. a plain `pool:` proxy vs. a proxy whose route is the sticky split (`serve --redis`, a
redis-server it starts), all in front of one instant runtime; wrk cycles 10,000 subjects (wrk_sticky.lua).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from harness import (ROOT, BenchError, Proc, check_errors, med, metric_by, redis_dbsize, rotated, run_wrk,
                     start_redis, with_cpu)
from report import Row, added, fmt, verdict
from stack import (BODY, HEADERS, Stack, completions_url, post, proxy_log_summary, rules_yaml, sanity_check,
                   start_proxy, write_rules)

STICKY_LUA = ROOT / "bench" / "wrk_sticky.lua"
STICKY_TARGETS = ("direct", "plain", "sticky")
TARGETS = {"sticky_added_p50_ms": 0.5}
SPLIT_ROUTE = """\
split:
  sticky: {by: "header:x-user-id", ttl: 1h}
  variants:
    - {name: stable, pool: p, weight: 90}
    - {name: canary, pool: q, weight: 10}
"""


def split_sources(port: int) -> dict[str, float]:
    """splitstream_split_assignments_total summed by source, from the proxy's /metrics."""
    sources = {"sticky": 0.0, "new": 0.0, "fallback": 0.0}
    sources.update(metric_by(port, "splitstream_split_assignments_total", "source"))
    return sources


def run(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    if client != "wrk":
        raise BenchError("the sticky case needs wrk (its Lua script varies the x-user-id header)")
    redis, redis_port = start_redis(tmp, "the sticky case")
    stack: Stack | None = None
    sticky: Proc | None = None
    try:
        stack = Stack(tmp, "sticky", tps=0, ttft_ms=0, max_batch=1000)
        rules = write_rules(stack.dir / "sticky-rules",
                            rules_yaml({"sim": stack.sim_port}, {"p": ["sim"], "q": ["sim"]}, SPLIT_ROUTE))
        sticky, sticky_port = start_proxy(  # the Stack's own proxy is "sticky-proxy"
            "split-proxy", stack.dir, rules, redis_url=f"redis://127.0.0.1:{redis_port}/0")
        urls = {"direct": stack.url("direct"), "plain": stack.url("proxy"), "sticky": completions_url(sticky_port)}
        procs = {"direct": stack.sim, "plain": stack.proxy, "sticky": sticky}
        sanity_check(stack, stream=False)
        status, headers, _ = post(urls["sticky"], BODY, {**HEADERS, "x-user-id": "sanity"})
        if status != 200 or headers.get("x-splitstream-variant") not in ("stable", "canary"):
            raise BenchError(f"sticky sanity request: HTTP {status}, variant {headers.get('x-splitstream-variant')}")
        if redis_dbsize(redis_port) != 1:
            raise BenchError("sticky sanity request stored nothing in Redis")
        for target in STICKY_TARGETS:  # warm-up; also assigns most of the 10,000 subjects
            run_wrk(urls[target], 32, 1, STICKY_LUA)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for conns in (1, 32):
                for target in rotated(STICKY_TARGETS, r):
                    watched = procs[target]
                    assert watched is not None
                    url = urls[target]
                    sources0 = split_sources(sticky_port)
                    res = with_cpu(lambda: run_wrk(url, conns, args.duration, STICKY_LUA),
                                   {"": watched, "redis_": redis})
                    sources1 = split_sources(sticky_port)
                    stack.check()
                    sticky.check()
                    redis.check()
                    res["sources"] = {k: sources1.get(k, 0.0) - sources0.get(k, 0.0) for k in sources1}
                    res.update(round=r, target=target, conns=conns)
                    check_errors(f"sticky round {r} {target} c={conns}", res, problems)
                    rounds.append(res)
                    print(f"  round {r + 1}/{args.rounds} c={conns:<2} {target:<6} {res['rps']:9.0f} rps  "
                          f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                          f"cpu {res['cpu_ms_per_req']:.3f} ms/req"
                          + (f"  sources {res['sources']}" if target == "sticky" else ""), flush=True)
        log = proxy_log_summary(sticky)  # the sticky proxy's log, not the plain one's
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


def rows(s: dict[str, Any]) -> list[Row]:
    """Direct vs. the sticky-split proxy; the plain proxy's and the split's own share on extra rows."""
    out: list[Row] = []
    limit = TARGETS["sticky_added_p50_ms"]
    for c in (1, 32):
        out += [
            (f"sticky c={c:<2} p50 (ms) [direct | sticky]", fmt(s[f"c{c}_direct_p50_ms"]), fmt(s[f"c{c}_sticky_p50_ms"]),
             added(s[f"c{c}_sticky_added_p50_ms"]), verdict(s[f"c{c}_sticky_added_p50_ms"] <= limit, f"added <= {limit:g}")),
            (f"sticky c={c:<2} p50 (ms) [plain | sticky]", fmt(s[f"c{c}_plain_p50_ms"]), fmt(s[f"c{c}_sticky_p50_ms"]),
             added(s[f"c{c}_split_cost_p50_ms"]), "(the split + Redis alone)"),
            (f"sticky c={c:<2} p99 (ms) [direct | sticky]", fmt(s[f"c{c}_direct_p99_ms"]), fmt(s[f"c{c}_sticky_p99_ms"]),
             added(s[f"c{c}_sticky_p99_ms"] - s[f"c{c}_direct_p99_ms"]), ""),
            (f"sticky c={c:<2} rps [plain | sticky]", fmt(s[f"c{c}_plain_rps"]), fmt(s[f"c{c}_sticky_rps"]),
             f"ratio {s[f'c{c}_sticky_rps'] / s[f'c{c}_plain_rps']:.2f}", ""),
            (f"sticky c={c:<2} proxy CPU/req (ms) [plain | sticky]", fmt(s[f"c{c}_plain_cpu_ms_per_req"]),
             fmt(s[f"c{c}_sticky_cpu_ms_per_req"]), added(s[f"c{c}_sticky_cpu_ms_per_req"] - s[f"c{c}_plain_cpu_ms_per_req"]),
             f"redis {fmt(s[f'c{c}_redis_cpu_ms_per_req'])} ms/req"),
        ]
    out.append(("sticky assignments by source", "-", ", ".join(f"{k} {v:,}" for k, v in sorted(s["sources"].items())),
                f"{s['redis_keys']:,} keys", ""))
    return out
