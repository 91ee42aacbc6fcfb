"""The cache case of overhead.py (only with --only cache): result-cache hits through Redis and the embedded store.

Direct, a plain proxy, and `cache: {ttl: 10m}` proxies with `--redis` and with the embedded store, on one instant
runtime; one temperature-0 key at c=1 and c=32 (at c=32 mostly single-flight `coalesced`), 1,000 keys at c=32
(store lookups). The runtime's request counter must not move during a hit round.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from harness import (ROOT, BenchError, Proc, check_errors, med, metric_by, metric_total, note_neighbours, rotated,
                     run_wrk, start_redis, with_cpu)
from report import Row, added, fmt, ratio, verdict
from stack import Stack, completions_url, post, proxy_log_summary, rules_yaml, sanity_request, start_proxy, write_rules

# Must stay byte-identical to the body in bench/wrk_cache.lua.
CACHE_BODY = (b'{"model":"sim-model","messages":[{"role":"user","content":"Hello there"}],"max_tokens":8,'
              b'"temperature":0}')
KEYS = 1000  # as in bench/wrk_cache_keys.lua
# (name, connections, wrk script)
LOADS = (("c1", 1, ROOT / "bench" / "wrk_cache.lua"), ("c32", 32, ROOT / "bench" / "wrk_cache.lua"),
         ("c32keys", 32, ROOT / "bench" / "wrk_cache_keys.lua"))
CACHE_TARGETS = ("direct", "plain", "redis", "embedded")
HIT_TARGETS = ("redis", "embedded")
TARGETS = {"cache_hit_c1_p50_ms": 1.0}
RUNTIME_COUNTER = "vllm:request_success_total"


def keyed_body(i: int) -> bytes:
    """Body i of bench/wrk_cache_keys.lua."""
    return (b'{"model":"sim-model","messages":[{"role":"user","content":"Hello there %d"}],"max_tokens":8,'
            b'"temperature":0}' % i)


def wait_hit(url: str, body: bytes, label: str) -> list[str]:
    """Send `body` until it is a hit (entries are written after the answer, asynchronously); headers seen."""
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, headers, _ = post(url, body)
        seen.append(headers.get("x-splitstream-cache", "<none>"))
        if status == 200 and seen[-1] == "hit":
            return seen
        time.sleep(0.05)
    raise BenchError(f"cache {label}: no hit within 5 s (x-splitstream-cache seen: {seen[:10]})")


def warm(url: str, label: str, proxy: Proc) -> list[str]:
    """The one entry (the first answer must be a miss, a later one a hit), then the 1,000 keyed ones."""
    first = sanity_request(url, CACHE_BODY, False, proxy).get("x-splitstream-cache", "<none>")
    if first != "miss":
        raise BenchError(f"cache {label}: first request answered x-splitstream-cache: {first} (expected miss)")
    seen = [first, *wait_hit(url, CACHE_BODY, label)]
    for i in range(KEYS):
        status, _, data = post(url, keyed_body(i))
        if status != 200:
            raise BenchError(f"cache {label}: warming key {i}: HTTP {status}: {data[:200]!r}")
    wait_hit(url, keyed_body(KEYS - 1), label)
    return seen


def counter_at_rest(port: int) -> float:
    """The runtime's request counter once it stops moving (requests of the last round still finishing)."""
    last = metric_total(port, RUNTIME_COUNTER)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = metric_total(port, RUNTIME_COUNTER)
        if now == last:
            break
        last = now
    return last


def run(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    if client != "wrk":
        raise BenchError("the cache case needs wrk (its Lua scripts send temperature-0 bodies)")
    redis, redis_port = start_redis(tmp, "the cache case")
    stack: Stack | None = None
    cached: dict[str, Proc] = {}
    try:
        stack = Stack(tmp, "cache", tps=0, ttft_ms=0, max_batch=1000)
        assert stack.sim is not None and stack.proxy is not None
        rules = write_rules(stack.dir / "cache-rules",
                            rules_yaml({"sim": stack.sim_port}, {"p": ["sim"]}, "pool: p\ncache: {ttl: 10m}"))
        ports: dict[str, int] = {}
        for store, redis_url in (("redis", f"redis://127.0.0.1:{redis_port}/0"), ("embedded", None)):
            cached[store], ports[store] = start_proxy(f"cache-{store}-proxy", stack.dir, rules, redis_url)
        urls = {"direct": stack.url("direct"), "plain": stack.url("proxy"),
                **{store: completions_url(port) for store, port in ports.items()}}
        procs = {"direct": stack.sim, "plain": stack.proxy, **cached}
        sanity_request(urls["direct"], CACHE_BODY, False, stack.proxy)
        sanity_request(urls["plain"], CACHE_BODY, False, stack.proxy)
        warmed = {store: warm(urls[store], store, cached[store]) for store in HIT_TARGETS}
        print(f"  warm: x-splitstream-cache {warmed}, then {KEYS:,} more keys each", flush=True)
        for target in CACHE_TARGETS:
            for _, _, script in LOADS[1:]:
                run_wrk(urls[target], 32, 1, script)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for load, conns, script in LOADS:
                for target in rotated(CACHE_TARGETS, r):
                    url = urls[target]
                    hit_port = ports.get(target)
                    sim0 = counter_at_rest(stack.sim_port)
                    results0 = metric_by(hit_port, "splitstream_cache_requests_total", "result") if hit_port else {}
                    res = with_cpu(lambda: run_wrk(url, conns, args.duration, script),
                                   {"": procs[target], "redis_": redis}, ours=[redis, *procs.values()])
                    sim1 = counter_at_rest(stack.sim_port)
                    results1 = metric_by(hit_port, "splitstream_cache_requests_total", "result") if hit_port else {}
                    stack.check()
                    redis.check()
                    for proc in cached.values():
                        proc.check()
                    res["runtime_requests"] = sim1 - sim0
                    res["cache_results"] = {k: v - results0.get(k, 0.0) for k, v in results1.items()}
                    res.update(round=r, target=target, load=load, conns=conns)
                    check_errors(f"cache round {r} {target} {load}", res, problems)
                    rounds.append(res)
                    c = res["cache_results"]
                    print(f"  round {r + 1}/{args.rounds} {load:<7} {target:<8} {res['rps']:9.0f} rps  "
                          f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                          f"cpu {res['cpu_ms_per_req']:.3f} ms/req  others {res['other_cores']:.2f} cores  "
                          f"runtime requests {res['runtime_requests']:.0f}"
                          + (f"  hit {c.get('hit', 0):.0f} coalesced {c.get('coalesced', 0):.0f}" if hit_port else ""),
                          flush=True)
        logs = {store: proxy_log_summary(proc) for store, proc in cached.items()}
    finally:
        for proc in cached.values():
            proc.stop()
        if stack is not None:
            stack.close()
        redis.stop()
    summary = summarize(rounds)
    note_neighbours("cache", rounds, problems)
    if summary["hit_rounds_runtime_requests"] or summary["hit_rounds_misses"]:
        problems.append(f"cache: during hit rounds the runtime answered {summary['hit_rounds_runtime_requests']:.0f}"
                        f" requests; cache results {summary['hit_rounds_results']}")
    return {"client": client, "keys": KEYS, "warm": warmed, "rounds": rounds, "summary": summary,
            "proxy_log": logs["redis"], "proxy_log_embedded": logs["embedded"]}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for load, _, _ in LOADS:
        for target in CACHE_TARGETS:
            sel = [x for x in rounds if x["load"] == load and x["target"] == target]
            for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req"):
                s[f"{load}_{target}_{key}"] = med([x[key] for x in sel])
            if target in HIT_TARGETS:
                results = [x["cache_results"] for x in sel]
                answered = sum(sum(c.values()) for c in results)
                s[f"{load}_{target}_coalesced_share"] = ratio(sum(c.get("coalesced", 0.0) for c in results), answered)
        s[f"{load}_redis_server_cpu_ms_per_req"] = med(
            [x["redis_cpu_ms_per_req"] for x in rounds if x["load"] == load and x["target"] == "redis"])
    hit_rounds = [x for x in rounds if x["target"] in HIT_TARGETS]
    totals: dict[str, float] = {}
    for x in hit_rounds:
        for k, v in x["cache_results"].items():
            totals[k] = totals.get(k, 0.0) + v
    s["hit_rounds_results"] = totals
    s["hit_rounds_requests"] = sum(x["requests"] for x in hit_rounds)
    s["hit_rounds_misses"] = totals.get("miss", 0.0) + totals.get("bypass", 0.0)
    s["hit_rounds_runtime_requests"] = sum(x["runtime_requests"] for x in hit_rounds)
    s["other_rounds_requests"] = sum(x["requests"] for x in rounds if x["target"] not in HIT_TARGETS)
    s["other_rounds_runtime_requests"] = sum(x["runtime_requests"] for x in rounds if x["target"] not in HIT_TARGETS)
    return s


def rows(s: dict[str, Any]) -> list[Row]:
    limit = TARGETS["cache_hit_c1_p50_ms"]
    out: list[Row] = []
    for load, title, metrics in (("c1", "c=1, one key", ("p50_ms", "p99_ms")),
                                 ("c32", "c=32, one key", ("rps", "p99_ms")),
                                 ("c32keys", f"c=32, {KEYS:,} keys", ("rps", "p50_ms", "p99_ms"))):
        d, p = f"{load}_direct", f"{load}_plain"
        for store in HIT_TARGETS:
            h = f"{load}_{store}"
            for m in metrics:
                if m == "rps":
                    cmp = f"ratio {ratio(s[f'{h}_rps'], s[f'{d}_rps']):.2f}"
                else:
                    cmp = added(s[f"{h}_{m}"] - s[f"{d}_{m}"])
                target = (verdict(s[f"{h}_{m}"] <= limit, f"hit p50 <= {limit:g}")
                          if (load, store, m) == ("c1", "redis", "p50_ms") else "")
                label = "rps" if m == "rps" else f"{m[:3]} (ms)"
                out.append((f"cache {title}: {label} [direct | hit, {store}]", fmt(s[f"{d}_{m}"]), fmt(s[f"{h}_{m}"]),
                            cmp, target))
        m = "p50_ms" if load == "c1" else "rps"
        cmp = (added(s[f"{load}_redis_p50_ms"] - s[f"{p}_p50_ms"]) if m == "p50_ms"
               else f"ratio {ratio(s[f'{load}_redis_rps'], s[f'{p}_rps']):.2f}")
        out.append((f"cache {title}: {'p50 (ms)' if m == 'p50_ms' else 'rps'} [plain proxy | hit, redis]",
                    fmt(s[f"{p}_{m}"]), fmt(s[f"{load}_redis_{m}"]), cmp, "(a hit vs forwarding)"))
        for store in HIT_TARGETS:
            h = f"{load}_{store}"
            note = f"redis-server {fmt(s[f'{load}_redis_server_cpu_ms_per_req'])} ms/req" if store == "redis" else ""
            if load != "c1":
                note += f"{'; ' if note else ''}coalesced {s[f'{h}_coalesced_share']:.0%}"
            out.append((f"cache {title}: proxy CPU/req (ms) [plain | hit, {store}]", fmt(s[f"{p}_cpu_ms_per_req"]),
                        fmt(s[f"{h}_cpu_ms_per_req"]), added(s[f"{h}_cpu_ms_per_req"] - s[f"{p}_cpu_ms_per_req"]), note))
    ok = s["hit_rounds_runtime_requests"] == 0 and s["hit_rounds_misses"] == 0
    res = s["hit_rounds_results"]
    out.append(("cache hit rounds: runtime requests / misses+bypasses", "-",
                f"{s['hit_rounds_runtime_requests']:.0f} / {s['hit_rounds_misses']:.0f}",
                f"{res.get('hit', 0):,.0f} hit, {res.get('coalesced', 0):,.0f} coalesced", verdict(ok, "0 / 0")))
    out.append(("(ref) runtime requests in direct+plain rounds", "-", f"{s['other_rounds_runtime_requests']:,.0f}",
                f"wrk {s['other_rounds_requests']:,}", "(the counter moves when it should)"))
    return out
