#!/usr/bin/env python3
"""Proxy-overhead benchmark: the same load straight to a simulated runtime and through splitstream.

Each case runs on its own fresh subprocesses (`python -m proxy sim-backend` and `python -m proxy serve`);
this script is the load client and never runs inside the proxy's process:

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
  cache         (optional: only with --only cache) one warmed temperature-0 entry answered from the result
                cache through Redis and through the embedded store, at c=1 and c=32, next to direct and a
                plain proxy: hit p50/p99, rps, CPU; the runtime's request counter must not move meanwhile.
  shadow        (optional: only with --only shadow) c=32 through a proxy mirroring 100 % of requests to a
                slow pool vs. the same proxy without the shadow: p99 and rps ratios, CPU, copies ok/dropped.
  pooled        (optional: only with --only pooled) c=32 through a 90/10 split whose per-variant statistics
                are pooled in Redis (`serve --redis`) vs the embedded store: rps, added p50, CPU per request,
                the pooled counts checked against wrk's; then the pooled path alone (record + the 1-a-second
                flush into that Redis, replayed at the measured rate): its CPU per request, target < 0.01 ms.
  tenants       (optional: only with --only tenants) direct vs a proxy without tenants vs a proxy with one limited
                tenant (limits never reached) on the embedded store and on Redis (`serve --redis`), wrk sending
                its key at c=1 and c=32: p50/p99, rps, proxy and redis-server CPU per request, and what the
                tenant adds over no tenants (p50, CPU per request; target < 0.05 ms CPU); no 429, no failure.
  tls           (optional: only with --only tls) direct vs a proxy to the runtime over http vs a proxy to an identical
                runtime over https (trustme certificate, keep-alive warm), at c=1 and c=32: added p50 over direct
                for both, https - http, and the proxy's CPU per request with each upstream.
  responses     (optional: only with --only responses) the OpenAI Responses API (POST /v1/responses, "store": false)
                next to chat completions in the same rounds, each direct and through one proxy, at c=1 and c=32:
                added p50 over its own direct, proxy CPU per request and rps per endpoint, and responses - chat.

Compared rounds are interleaved (who goes first rotates every round) and the table shows the median of
the rounds, because a 2-core machine is noisy. The numbers are printed next to the project's targets and
written as JSON to bench/results/overhead-<UTC timestamp>.json. This is a measurement, not a test: a
missed target does not change the exit status. The exit status is non-zero only when the harness could
not measure (a process died, the sanity request failed, or a measured round had >1% failed requests).

    .venv/bin/python bench/overhead.py                     # the default cases, about 2-3 minutes
    .venv/bin/python bench/overhead.py --duration 3 --rounds 1 --streams 500
    .venv/bin/python bench/overhead.py --only nonstream
    .venv/bin/python bench/overhead.py --only reload
    .venv/bin/python bench/overhead.py --only sticky
    .venv/bin/python bench/overhead.py --only cache
    .venv/bin/python bench/overhead.py --only shadow
    .venv/bin/python bench/overhead.py --only pooled
    .venv/bin/python bench/overhead.py --only tenants
    .venv/bin/python bench/overhead.py --only tls
    .venv/bin/python bench/overhead.py --only responses

Layout: harness.py (processes, ports, CPU accounting, Redis, /metrics, wrk, statistics), runinfo.py
(machine info, results file), stack.py (runtimes and proxies, rules, bodies), clients.py (Python load
clients), report.py (the table), one case_*.py per case group. This file is the command line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import case_cache
import case_default
import case_pooled
import case_reload
import case_responses
import case_shadow
import case_sticky
import case_tenants
import case_tls
from clients import OPEN_STREAM_TOKENS, OPEN_STREAM_TPS, STREAM_TOKENS
from harness import raise_nofile, reported_session
from report import Row, print_table
from runinfo import machine_info, write_results


CaseRun = Callable[[Path, argparse.Namespace, str, list[str]], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    key: str  # its entry in the results JSON
    run: CaseRun
    banner: Callable[[argparse.Namespace, str], str]
    rows: Callable[[dict[str, Any]], list[Row]] | None  # None: printed under the table instead


def _rounds(a: argparse.Namespace) -> str:
    return f"{a.rounds} x {a.duration:g} s"


# In the order they run and print.
ALL_CASES = {
    "nonstream": Case("nonstream", case_default.run_nonstream,
                      lambda a, c: f"[nonstream] instant runtime, {c} c=1 and c=32, {_rounds(a)}",
                      case_default.nonstream_rows),
    "stream": Case("stream", lambda tmp, a, c, p: case_default.run_stream(tmp, a, p),
                   lambda a, c: f"[stream] {STREAM_TOKENS} tokens at 200 tok/s, 32 workers, {_rounds(a)}",
                   case_default.stream_rows),
    "open-streams": Case("open_streams", lambda tmp, a, c, p: case_default.run_open_streams(tmp, a, p),
                         lambda a, c: f"[open-streams] {a.streams} streams of {OPEN_STREAM_TOKENS} tokens at "
                                      f"{OPEN_STREAM_TPS:g} tok/s at once through one proxy", None),
    "reload": Case("reload", case_reload.run,
                   lambda a, c: f"[reload] instant runtime, {c} c=32, plain vs rules rewritten every "
                                f"{case_reload.RELOAD_EVERY_S * 1000:.0f} ms, {_rounds(a)}", case_reload.rows),
    "sticky": Case("sticky", case_sticky.run,
                   lambda a, c: f"[sticky] instant runtime, {c} c=1 and c=32, direct vs plain proxy vs 90/10 split "
                                f"sticky by x-user-id through Redis (10,000 subjects), {_rounds(a)}", case_sticky.rows),
    "cache": Case("cache", case_cache.run,
                  lambda a, c: f"[cache] instant runtime, {c} c=1 and c=32, direct vs plain proxy vs cache hits "
                               f"through Redis and the embedded store, {_rounds(a)}", case_cache.rows),
    "shadow": Case("shadow", case_shadow.run,
                   lambda a, c: f"[shadow] instant primary, {c} c=32, shadowing off vs 100 % to a slow pool "
                                f"({case_shadow.SLOW_TPS:g} tok/s, TTFT {case_shadow.SLOW_TTFT_MS:g} ms), "
                                f"{_rounds(a)}", case_shadow.rows),
    "pooled": Case("pooled", case_pooled.run,
                   lambda a, c: f"[pooled] instant runtime, {c} c=32, direct vs a 90/10 split with its statistics "
                                f"pooled in Redis vs embedded, {_rounds(a)}; then the pooled path alone",
                   case_pooled.rows),
    "tenants": Case("tenants", case_tenants.run,
                    lambda a, c: f"[tenants] instant runtime, {c} c=1 and c=32, direct vs no tenants vs one limited "
                                 f"tenant on the embedded store and on Redis, {_rounds(a)}", case_tenants.rows),
    "tls": Case("tls", case_tls.run,
                lambda a, c: f"[tls] instant runtimes, {c} c=1 and c=32, direct vs a proxy to an http upstream vs "
                             f"to an https one (keep-alive warm), {_rounds(a)}", case_tls.rows),
    "responses": Case("responses", case_responses.run,
                      lambda a, c: f"[responses] instant runtime, {c} c=1 and c=32, chat vs /v1/responses, each direct "
                                   f"vs through a plain proxy, {_rounds(a)}", case_responses.rows),
}
CASES = ("nonstream", "stream", "open-streams")
# run only when named with --only
OPTIONAL_CASES = ("reload", "sticky", "cache", "shadow", "pooled", "tenants", "tls", "responses")
TARGETS = {**case_default.TARGETS, **case_reload.TARGETS, **case_sticky.TARGETS, **case_cache.TARGETS,
           **case_shadow.TARGETS, **case_pooled.TARGETS, **case_tenants.TARGETS, **case_tls.TARGETS,
           **case_responses.TARGETS}


def build_rows(results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for case in ALL_CASES.values():
        if case.rows is not None and case.key in results:
            rows += case.rows(results[case.key]["summary"])
    return rows


def print_report(results: dict[str, Any], client: str) -> None:
    print()
    if client != "wrk" and "nonstream" in results:
        print("NOTE: wrk not used; non-streaming numbers come from the Python aiohttp closed-loop client,"
              " which is much slower than wrk (client-bound rps, inflated latencies).")
    print_table(build_rows(results))
    if "open_streams" in results:
        print(case_default.open_streams_line(results["open_streams"]))


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
    with reported_session(tmp, args.keep_logs, problems) as session:
        for name, case in ALL_CASES.items():
            if name in cases:
                print(case.banner(args, client), flush=True)
                results[case.key] = case.run(tmp, args, client, problems)
    status = session.status
    wall = time.monotonic() - t0

    if results:
        print_report(results, client)
    for key, result in results.items():
        for log_key in sorted(k for k in result if k.startswith("proxy_log")):
            log = result[log_key]
            if log["samples"]:
                where = key + log_key[len("proxy_log"):].replace("_", " ")
                problems.append(f"{where}: proxy logged {log['log_levels']}; first: {log['samples'][0][:300]}")
    if problems:
        print("\nproblems:")
        for p in problems:
            print(f"  - {p}")
    print(f"\nwall time {wall:.0f} s")

    if results:
        write_results("overhead", started, wall, status == 0, {
            "args": {"duration": args.duration, "rounds": args.rounds, "streams": args.streams, "cases": cases},
            "machine": machine_info(client),
            "targets": TARGETS,
            "table": [dict(zip(("case", "direct", "proxy", "added_or_ratio", "target"), r)) for r in build_rows(results)],
            "results": results,
            "problems": problems,
        })
    return status


if __name__ == "__main__":
    sys.exit(main())
