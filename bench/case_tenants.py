"""The tenants case of overhead.py (only with --only tenants): what a limited tenant's request costs.

Four targets on one instant runtime: direct, a proxy with no tenants ("plain"), and two proxies with one
tenant whose limits are far too high to ever refuse (so every request pays the whole path: a claim of two
rates and a lease before dispatch, the settlement and the release after it), one on the embedded store
("embedded": decided in-process) and one `serve --redis` on a redis-server the case starts ("redis": the claim
is one batched EVALSHA the request waits for; settlements ride the next batch). wrk sends the tenant's key
(wrk_tenant.lua) to every target. At c=1 and c=32: p50/p99, rps, the proxy's CPU per request, redis-server's
CPU per request, and what the tenant adds over the plain proxy (p50 and CPU per request; target: under
0.05 ms CPU). Verified per round: no non-2xx answer (wrk), and for the tenant proxies no 429 and no store
fallback (their /metrics), and their per-tenant 200s match what wrk was answered (+ those in flight at its end:
answered late, or 499 when wrk closed their connections).
"""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path
from typing import Any

from harness import (ROOT, BenchError, Proc, check_errors, med, metric_by, metric_total, note_neighbours, rotated,
                     run_wrk, start_redis, with_cpu)
from report import Row, added, fmt, ratio, verdict
from stack import (BODY, HEADERS, Stack, completions_url, post, proxy_log_summary, rules_yaml, sanity_check,
                   start_proxy, write_rules)

TENANT_LUA = ROOT / "bench" / "wrk_tenant.lua"
TENANT_KEY = "bench-tenant-key-1"  # must match bench/wrk_tenant.lua
KEYS_ENV = "BENCH_TENANT_KEYS"
TENANT = "bench"
TENANT_TARGETS = ("direct", "plain", "embedded", "redis")
LIMITED = ("embedded", "redis")
TARGETS = {"tenants_added_cpu_ms_per_req": 0.05}
# Never refused during a run (~10k requests/s at most here): every request claims 2 rates and a lease.
LIMITS = {"requests_per_minute": 100_000_000, "tokens_per_minute": 1_000_000_000, "max_concurrent": 10_000}
TENANTS_YAML = (f"tenants:\n  {TENANT}:\n    keys_env: {KEYS_ENV}\n    limits: {{"
                + ", ".join(f"{k}: {v}" for k, v in LIMITS.items()) + "}\n")


def redis_exists(port: int, *keys: str) -> int:
    """How many of `keys` exist in the redis-server on `port` (EXISTS, RESP by hand)."""
    parts = [b"EXISTS", *(k.encode() for k in keys)]
    cmd = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(cmd)
        reply = sock.recv(64)
    if not reply.startswith(b":"):
        raise BenchError(f"redis EXISTS answered {reply!r}")
    return int(reply[1:].strip())


def redis_calls(port: int, command: str = "evalsha") -> int:
    """How many times the redis-server on `port` ran `command` (INFO commandstats), 0 if never."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        data = sock.recv(65536)  # a bulk string: `$<length>\r\n<text>\r\n`
        while b"\r\n" in data and len(data) < data.index(b"\r\n") + 2 + int(data[1:data.index(b"\r\n")]) + 2:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    m = re.search(rb"cmdstat_%s:calls=(\d+)" % command.encode(), data)
    return int(m.group(1)) if m else 0


def tenant_counts(port: int) -> dict[str, Any]:
    """The tenant's answered requests by status code, its 429s and the store fallbacks, from /metrics."""
    codes = {code: v for code, v in metric_by(port, "splitstream_tenant_requests_total", "code").items() if code}
    return {"codes": codes, "ratelimited": metric_total(port, "splitstream_ratelimited_total"),
            "fallbacks": metric_total(port, "splitstream_tenant_limit_fallbacks_total")}


def counts_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    codes = {code: int(v - before["codes"].get(code, 0.0)) for code, v in after["codes"].items()}
    return {"codes": {c: n for c, n in codes.items() if n}, "ratelimited": int(after["ratelimited"] - before["ratelimited"]),
            "fallbacks": int(after["fallbacks"] - before["fallbacks"])}


def sanity_tenant(url: str, proxy: Proc) -> None:
    """The limited proxy refuses a request without the key and answers one with it, with its limit headers."""
    status, _, data = post(url, BODY)
    if status != 401:
        raise BenchError(f"tenants: a request without a key got HTTP {status}, not 401 (tenants not on?): {data[:200]!r}")
    status, headers, data = post(url, BODY, {**HEADERS, "Authorization": f"Bearer {TENANT_KEY}"})
    proxy.check()
    want = str(LIMITS["requests_per_minute"])
    if status != 200 or headers.get("x-ratelimit-limit-requests") != want:
        raise BenchError(f"tenants: the tenant's sanity request got HTTP {status}, x-ratelimit-limit-requests "
                         f"{headers.get('x-ratelimit-limit-requests')!r} (want {want}): {data[:300]!r}")


def run(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    if client != "wrk":
        raise BenchError("the tenants case needs wrk (its Lua script sends the tenant's key)")
    redis, redis_port = start_redis(tmp, "the tenants case")
    stack: Stack | None = None
    limited: dict[str, Proc] = {}
    try:
        stack = Stack(tmp, "tenants", tps=0, ttft_ms=0, max_batch=1000)
        rules = write_rules(stack.dir / "tenant-rules",
                            rules_yaml({"sim": stack.sim_port}, {"p": ["sim"]}, "pool: p") + TENANTS_YAML)
        ports: dict[str, int] = {}
        for store, redis_url in (("redis", f"redis://127.0.0.1:{redis_port}/0"), ("embedded", None)):
            limited[store], ports[store] = start_proxy(f"tenants-{store}-proxy", stack.dir, rules, redis_url,
                                                       env={KEYS_ENV: TENANT_KEY})
        urls = {"direct": stack.url("direct"), "plain": stack.url("proxy"),
                **{store: completions_url(port) for store, port in ports.items()}}
        assert stack.sim is not None and stack.proxy is not None
        procs = {"direct": stack.sim, "plain": stack.proxy, **limited}
        sanity_check(stack, stream=False)
        for store in LIMITED:
            sanity_tenant(urls[store], limited[store])
        # (its rpm key lives ~1 s past its TAT; the settlement gave the tpm key's over-reservation back, which
        # with these limits empties it: it is deleted)
        if redis_exists(redis_port, f"splitstream:quota:{TENANT}:rpm") != 1:
            raise BenchError("tenants: the Redis proxy's sanity request left no rpm quota key in Redis")
        for target in TENANT_TARGETS:  # warm-up
            run_wrk(urls[target], 32, 1, TENANT_LUA)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for conns in (1, 32):
                for target in rotated(TENANT_TARGETS, r):
                    url = urls[target]
                    before = tenant_counts(ports[target]) if target in ports else None
                    evalsha0 = redis_calls(redis_port)
                    res = with_cpu(lambda: run_wrk(url, conns, args.duration, TENANT_LUA),
                                   {"": procs[target], "redis_": redis}, ours=[redis, *procs.values()])
                    stack.check()
                    redis.check()
                    for proc in limited.values():
                        proc.check()
                    res.update(round=r, target=target, conns=conns)
                    res["evalsha_per_req"] = (redis_calls(redis_port) - evalsha0) / max(res["requests"], 1)
                    label = f"tenants round {r} {target} c={conns}"
                    if before is not None:
                        res["tenant"] = delta = counts_delta(before, tenant_counts(ports[target]))
                        # 499: wrk closed its connections with requests in flight when its time ran out
                        ok, gone = delta["codes"].get("200", 0), delta["codes"].get("499", 0)
                        other = {c: n for c, n in delta["codes"].items() if c not in ("200", "499")}
                        if delta["ratelimited"] or delta["fallbacks"] or other:
                            problems.append(f"{label}: {delta['ratelimited']} refused (429), {delta['fallbacks']} "
                                            f"store fallbacks, other statuses {other}")
                        if not 0 <= ok + gone - res["requests"] <= conns:
                            problems.append(f"{label}: the proxy counted {ok} answered and {gone} abandoned requests "
                                            f"of the tenant, wrk was answered {res['requests']} (+ <= {conns} in "
                                            "flight when it stopped)")
                    check_errors(label, res, problems)
                    rounds.append(res)
                    print(f"  round {r + 1}/{args.rounds} c={conns:<2} {target:<8} {res['rps']:9.0f} rps  "
                          f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                          f"cpu {res['cpu_ms_per_req']:.4f} ms/req  redis-server {res['redis_cpu_ms_per_req']:.4f} "
                          f"ms/req  non-2xx {res['non_2xx']}  others {res['other_cores']:.2f} cores"
                          + (f"  EVALSHA/req {res['evalsha_per_req']:.3f}" if target == "redis" else ""), flush=True)
        logs = {store: proxy_log_summary(proc) for store, proc in limited.items()}
    finally:
        for proc in limited.values():
            proc.stop()
        if stack is not None:
            stack.close()
        redis.stop()
    summary = summarize(rounds)
    note_neighbours("tenants", rounds, problems)
    return {"client": client, "limits": LIMITS, "rounds": rounds, "summary": summary,
            "proxy_log": logs["redis"], "proxy_log_embedded": logs["embedded"]}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for conns in (1, 32):
        for target in TENANT_TARGETS:
            sel = [x for x in rounds if x["conns"] == conns and x["target"] == target]
            for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req", "redis_cpu_ms_per_req", "evalsha_per_req"):
                s[f"c{conns}_{target}_{key}"] = med([x[key] for x in sel])
        for target in LIMITED:
            sel = [x for x in rounds if x["conns"] == conns and x["target"] == target]
            # per round, against the plain round of the same round (they ran back to back), then the median
            plain = {x["round"]: x for x in rounds if x["conns"] == conns and x["target"] == "plain"}
            s[f"c{conns}_{target}_added_p50_ms"] = s[f"c{conns}_{target}_p50_ms"] - s[f"c{conns}_plain_p50_ms"]
            s[f"c{conns}_{target}_added_cpu_ms_per_req"] = (s[f"c{conns}_{target}_cpu_ms_per_req"]
                                                            - s[f"c{conns}_plain_cpu_ms_per_req"])
            s[f"c{conns}_{target}_added_cpu_per_round"] = [x["cpu_ms_per_req"] - plain[x["round"]]["cpu_ms_per_req"]
                                                           for x in sel if x["round"] in plain]
    s["non_2xx"] = sum(x["non_2xx"] + x["socket_errors"] for x in rounds)
    s["ratelimited"] = sum(x["tenant"]["ratelimited"] for x in rounds if "tenant" in x)
    s["fallbacks"] = sum(x["tenant"]["fallbacks"] for x in rounds if "tenant" in x)
    s["requests"] = sum(x["requests"] for x in rounds)
    return s


def rows(s: dict[str, Any]) -> list[Row]:
    limit = TARGETS["tenants_added_cpu_ms_per_req"]
    out: list[Row] = []
    for c in (1, 32):
        p = f"tenants c={c:<2}"
        out.append((f"{p} p50 (ms) [direct | no tenants]", fmt(s[f"c{c}_direct_p50_ms"]), fmt(s[f"c{c}_plain_p50_ms"]),
                    added(s[f"c{c}_plain_p50_ms"] - s[f"c{c}_direct_p50_ms"]), "(the proxy without tenants)"))
        for store in LIMITED:
            out.append((f"{p} p50 (ms) [no tenants | {store}]", fmt(s[f"c{c}_plain_p50_ms"]),
                        fmt(s[f"c{c}_{store}_p50_ms"]), added(s[f"c{c}_{store}_added_p50_ms"]), "(the tenant's limits)"))
        for store in LIMITED:
            out.append((f"{p} p99 (ms) [no tenants | {store}]", fmt(s[f"c{c}_plain_p99_ms"]),
                        fmt(s[f"c{c}_{store}_p99_ms"]), added(s[f"c{c}_{store}_p99_ms"] - s[f"c{c}_plain_p99_ms"]), ""))
        for store in LIMITED:
            out.append((f"{p} rps [no tenants | {store}]", fmt(s[f"c{c}_plain_rps"]), fmt(s[f"c{c}_{store}_rps"]),
                        f"ratio {ratio(s[f'c{c}_{store}_rps'], s[f'c{c}_plain_rps']):.2f}", ""))
        for store in LIMITED:
            extra = s[f"c{c}_{store}_added_cpu_ms_per_req"]
            rounds = ", ".join(f"{v:+.3f}" for v in s[f"c{c}_{store}_added_cpu_per_round"])
            out.append((f"{p} proxy CPU/req (ms) [no tenants | {store}]", fmt(s[f"c{c}_plain_cpu_ms_per_req"], 4),
                        fmt(s[f"c{c}_{store}_cpu_ms_per_req"], 4), added(extra),
                        verdict(extra < limit, f"added < {limit:g}") + f"  (rounds {rounds})"))
        out.append((f"{p} redis-server CPU/req (ms) [- | redis]", "-", fmt(s[f"c{c}_redis_redis_cpu_ms_per_req"], 4),
                    f"EVALSHA/req {fmt(s[f'c{c}_redis_evalsha_per_req'])}", "(not in the proxy's CPU above)"))
    out.append(("tenants: failed / 429 / store fallbacks", "-",
                f"{s['non_2xx']} / {s['ratelimited']} / {s['fallbacks']}", f"of {s['requests']:,}",
                verdict(s["non_2xx"] == 0 and s["ratelimited"] == 0 and s["fallbacks"] == 0, "0 / 0 / 0")))
    return out
