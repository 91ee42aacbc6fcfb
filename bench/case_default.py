"""The default cases of overhead.py: nonstream, stream and open-streams, their summaries and table rows.

Each case starts its own Stack (runtime + plain proxy), interleaves direct and proxy rounds and returns
the rounds and their medians. Called by overhead.py only.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clients import OPEN_STREAM_TOKENS, OPEN_STREAM_TPS, STREAM_TOKENS, open_streams_load, run_load, stream_load
from harness import CLK_TCK, check_errors, med, rotated, run_async, with_cpu
from report import Row, added, fmt, verdict
from stack import Stack, proxy_log_summary, sanity_check

TARGETS = {
    "c1_added_p50_ms": 0.2,
    "c1_added_p99_ms": 1.0,
    "proxy_cpu_ms_per_req": 0.1,
    "c32_proxy_rps": 8000.0,
    "stream_added_ttft_p50_ms": 1.0,
    "open_streams_rss_mb": 300.0,
}
SIDES = ("direct", "proxy")


def run_nonstream(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    stack = Stack(tmp, "nonstream", tps=0, ttft_ms=0, max_batch=1000)
    try:
        assert stack.sim is not None and stack.proxy is not None
        sanity_check(stack, stream=False)
        for target in SIDES:  # warm-up: connections, caches, branch predictors
            run_load(client, stack.url(target), 32, 1)
        stack.check()
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for conns in (1, 32):
                for target in rotated(SIDES, r):
                    watched = stack.sim if target == "direct" else stack.proxy
                    url = stack.url(target)
                    res = with_cpu(lambda: run_load(client, url, conns, args.duration), {"": watched})
                    stack.check()
                    res.update(round=r, target=target, conns=conns)
                    check_errors(f"nonstream round {r} {target} c={conns}", res, problems)
                    rounds.append(res)
                    print(f"  round {r + 1}/{args.rounds} c={conns:<2} {target:<6} {res['rps']:9.0f} rps  "
                          f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                          f"cpu {res['cpu_ms_per_req']:.3f} ms/req", flush=True)
        log = proxy_log_summary(stack.proxy)
    finally:
        stack.close()
    summary: dict[str, Any] = {}
    for conns in (1, 32):
        for target in SIDES:
            sel = [x for x in rounds if x["conns"] == conns and x["target"] == target]
            for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req"):
                summary[f"c{conns}_{target}_{key}"] = med([x[key] for x in sel])
        summary[f"c{conns}_added_p50_ms"] = summary[f"c{conns}_proxy_p50_ms"] - summary[f"c{conns}_direct_p50_ms"]
        summary[f"c{conns}_added_p99_ms"] = summary[f"c{conns}_proxy_p99_ms"] - summary[f"c{conns}_direct_p99_ms"]
        summary[f"c{conns}_rps_ratio"] = summary[f"c{conns}_proxy_rps"] / summary[f"c{conns}_direct_rps"]
    return {"client": client, "rounds": rounds, "summary": summary, "proxy_log": log}


def run_stream(tmp: Path, args: argparse.Namespace, problems: list[str]) -> dict[str, Any]:
    stack = Stack(tmp, "stream", tps=200, ttft_ms=0, max_batch=1000)
    workers = 32
    try:
        assert stack.sim is not None and stack.proxy is not None
        sanity_check(stack, stream=True)
        for target in SIDES:
            run_async(stream_load(stack.url(target), workers, 1))
        stack.check()
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for target in rotated(SIDES, r):
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
        log = proxy_log_summary(stack.proxy)
    finally:
        stack.close()
    summary: dict[str, Any] = {}
    for target in SIDES:
        sel = [x for x in rounds if x["target"] == target]
        for key in ("streams_per_s", "ttft_p50_ms", "ttft_p99_ms", "total_p50_ms"):
            summary[f"{target}_{key}"] = med([x[key] for x in sel])
    summary["proxy_cpu_ms_per_stream"] = med([x["proxy_cpu_ms_per_stream"] for x in rounds if x["target"] == "proxy"])
    summary["added_ttft_p50_ms"] = summary["proxy_ttft_p50_ms"] - summary["direct_ttft_p50_ms"]
    summary["added_ttft_p99_ms"] = summary["proxy_ttft_p99_ms"] - summary["direct_ttft_p99_ms"]
    summary["streams_ratio"] = summary["proxy_streams_per_s"] / summary["direct_streams_per_s"]
    return {"workers": workers, "tokens": STREAM_TOKENS, "tokens_per_second": 200, "rounds": rounds,
            "summary": summary, "proxy_log": log}


def run_open_streams(tmp: Path, args: argparse.Namespace, problems: list[str]) -> dict[str, Any]:
    n = args.streams
    stack = Stack(tmp, "open-streams", tps=OPEN_STREAM_TPS, ttft_ms=0, max_batch=max(4000, 2 * n))
    try:
        assert stack.proxy is not None
        sanity_check(stack, stream=True)
        res = run_async(open_streams_load(stack.proxy, stack.url("proxy"), n))
        stack.check()
        log = proxy_log_summary(stack.proxy)
    finally:
        stack.close()
    if res["errors"]:
        problems.append(f"open-streams: {res['errors']} of {n} streams failed: {res['error_kinds']}")
    print(f"  {n} streams: {res['ok']} ok, {res['errors']} errors, peak open {res['peak_concurrently_open']}, "
          f"peak RSS {res['peak_rss_mb']:.1f} MB (VmHWM {res['vm_hwm_mb']:.1f} MB), {res['elapsed_s']:.1f} s",
          flush=True)
    return {"tokens": OPEN_STREAM_TOKENS, "tokens_per_second": OPEN_STREAM_TPS, **res, "proxy_log": log}


def nonstream_rows(s: dict[str, Any]) -> list[Row]:
    return [
        ("c=1  p50 latency (ms)", fmt(s["c1_direct_p50_ms"]), fmt(s["c1_proxy_p50_ms"]), added(s["c1_added_p50_ms"]),
         verdict(s["c1_added_p50_ms"] <= TARGETS["c1_added_p50_ms"], "added <= 0.2")),
        ("c=1  p99 latency (ms)", fmt(s["c1_direct_p99_ms"]), fmt(s["c1_proxy_p99_ms"]), added(s["c1_added_p99_ms"]),
         verdict(s["c1_added_p99_ms"] <= TARGETS["c1_added_p99_ms"], "added <= 1")),
        ("c=1  rps", fmt(s["c1_direct_rps"]), fmt(s["c1_proxy_rps"]), f"ratio {s['c1_rps_ratio']:.2f}", ""),
        ("c=32 rps", fmt(s["c32_direct_rps"]), fmt(s["c32_proxy_rps"]), f"ratio {s['c32_rps_ratio']:.2f}",
         verdict(s["c32_proxy_rps"] >= TARGETS["c32_proxy_rps"], "proxy >= 8,000")),
        ("c=32 p50 latency (ms)", fmt(s["c32_direct_p50_ms"]), fmt(s["c32_proxy_p50_ms"]), added(s["c32_added_p50_ms"]), ""),
        ("c=32 p99 latency (ms)", fmt(s["c32_direct_p99_ms"]), fmt(s["c32_proxy_p99_ms"]), added(s["c32_added_p99_ms"]), ""),
        ("proxy CPU per request c=32 (ms)", "-", fmt(s["c32_proxy_cpu_ms_per_req"]), "",
         verdict(s["c32_proxy_cpu_ms_per_req"] <= TARGETS["proxy_cpu_ms_per_req"], "<= 0.1")),
        ("proxy CPU per request c=1 (ms)", "-", fmt(s["c1_proxy_cpu_ms_per_req"]), "",
         verdict(s["c1_proxy_cpu_ms_per_req"] <= TARGETS["proxy_cpu_ms_per_req"], "<= 0.1")),
        ("(ref) sim CPU per request c=32 (ms)", fmt(s["c32_direct_cpu_ms_per_req"]), "-", "", ""),
    ]


def stream_rows(s: dict[str, Any]) -> list[Row]:
    return [
        ("stream c=32 TTFT p50 (ms)", fmt(s["direct_ttft_p50_ms"]), fmt(s["proxy_ttft_p50_ms"]),
         added(s["added_ttft_p50_ms"]), verdict(s["added_ttft_p50_ms"] <= TARGETS["stream_added_ttft_p50_ms"], "added <= 1")),
        ("stream c=32 TTFT p99 (ms)", fmt(s["direct_ttft_p99_ms"]), fmt(s["proxy_ttft_p99_ms"]),
         added(s["added_ttft_p99_ms"]), ""),
        ("stream c=32 total p50 (ms)", fmt(s["direct_total_p50_ms"]), fmt(s["proxy_total_p50_ms"]),
         added(s["proxy_total_p50_ms"] - s["direct_total_p50_ms"]), ""),
        ("stream c=32 streams/s", fmt(s["direct_streams_per_s"], 1), fmt(s["proxy_streams_per_s"], 1),
         f"ratio {s['streams_ratio']:.2f}", ""),
        ("proxy CPU per stream (ms)", "-", fmt(s["proxy_cpu_ms_per_stream"]), "", ""),
    ]


def open_streams_line(r: dict[str, Any]) -> str:
    """open-streams is one measurement, not direct vs proxy: a sentence under the table, not a row."""
    ok = r["errors"] == 0 and r["peak_rss_mb"] <= TARGETS["open_streams_rss_mb"]
    text = (f"{r['streams']} open streams: errors {r['errors']}, peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(VmHWM {r['vm_hwm_mb']:.0f} MB, idle {r['rss_base_mb']:.0f} MB), "
            f"peak concurrently open {r['peak_concurrently_open']}, stream p50/p99 "
            f"{r['total_p50_ms'] / 1e3:.2f}/{r['total_p99_ms'] / 1e3:.2f} s"
            f"   target: no errors, RSS <= 300 MB  {'met' if ok else 'MISSED'}")
    if r["error_kinds"]:
        text += f"\n  error kinds: {r['error_kinds']}"
    return text
