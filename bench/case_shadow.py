"""The shadow case of overhead.py (only with --only shadow): the primary's latency with 100 % shadowing.

An instant primary runtime and a slow one (20 tokens/s, 200 ms TTFT); two proxies on the same pools, one
route to the primary, one of them with `shadow: [{pool: slow, sample: 1.0}]`. Copies pile up on the slow
pool (8 run, 64 wait by default) and the rest are dropped. Rounds of wrk c=32 alternate off / on; reported:
the p99 and rps ratios, both proxies' CPU, and the shadow outcomes from the shadowing proxy's /metrics.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from clients import run_load
from harness import (OTHER_CORES_LIMIT, BenchError, Proc, check_errors, med, metric_by, metric_total,
                     note_neighbours, rotated, with_cpu)
from report import Row, added, fmt, ratio, verdict
from stack import BODY, completions_url, proxy_log_summary, rules_yaml, sanity_request, start_proxy, start_sim, write_rules

SLOW_TPS = 20.0
SLOW_TTFT_MS = 200.0
MODES = ("off", "on")
OUTCOMES = ("ok", "dropped", "error", "timeout")
TARGETS = {"shadow_p99_ratio": 1.05}
SHADOW_METRIC = "splitstream_shadow_requests_total"


def outcomes(port: int) -> dict[str, float]:
    counts = dict.fromkeys(OUTCOMES, 0.0)
    counts.update(metric_by(port, SHADOW_METRIC, "outcome"))
    return counts


def settle(proxy_port: int, slow_port: int, timeout: float) -> dict[str, float]:
    """Wait until no copy runs on the slow runtime and the outcome counts stop moving; the last counts."""
    deadline = time.monotonic() + timeout
    last = outcomes(proxy_port)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = outcomes(proxy_port)
        busy = (metric_total(slow_port, "vllm:num_requests_running")
                + metric_total(slow_port, "vllm:num_requests_waiting"))
        if now == last and busy == 0:
            return now
        last = now
    return last


def run(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    base = tmp / "shadow"
    base.mkdir()
    procs: list[Proc] = []
    try:
        primary, primary_port = start_sim("shadow-primary-sim", base, tps=0, ttft_ms=0, max_batch=1000)
        procs.append(primary)
        slow, slow_port = start_sim("shadow-slow-sim", base, tps=SLOW_TPS, ttft_ms=SLOW_TTFT_MS, max_batch=64)
        procs.append(slow)
        sims, pools = {"sim": primary_port, "slow": slow_port}, {"p": ["sim"], "slow": ["slow"]}
        proxies: dict[str, Proc] = {}
        ports: dict[str, int] = {}
        for mode, route in (("off", "pool: p"), ("on", "pool: p\nshadow: [{pool: slow, sample: 1.0}]")):
            rules = write_rules(base / f"{mode}-rules", rules_yaml(sims, pools, route))
            proxies[mode], ports[mode] = start_proxy(f"shadow-{mode}-proxy", base, rules)
            procs.append(proxies[mode])
        urls = {mode: completions_url(port) for mode, port in ports.items()}

        def check() -> None:
            for p in procs:
                p.check()

        for mode in MODES:
            sanity_request(urls[mode], BODY, False, proxies[mode])
        if settle(ports["on"], slow_port, 10)["ok"] < 1:
            raise BenchError("shadow sanity request: no shadow copy reached the slow runtime")
        for mode in MODES:
            run_load(client, urls[mode], 32, 1)  # warm-up
        check()
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for mode in rotated(MODES, r):
                url = urls[mode]
                out0, slow0 = outcomes(ports["on"]), metric_total(slow_port, "vllm:request_success_total")
                res = with_cpu(lambda: run_load(client, url, 32, args.duration), {"": proxies[mode]}, ours=procs)
                out1, slow1 = outcomes(ports["on"]), metric_total(slow_port, "vllm:request_success_total")
                check()
                res["proxy_cpu_share"] = res["cpu_ms_per_req"] * res["requests"] / 1e3 / res["elapsed_s"]
                res["shadow_outcomes"] = {k: out1[k] - out0[k] for k in OUTCOMES}
                res["slow_runtime_requests"] = slow1 - slow0
                res.update(round=r, mode=mode)
                check_errors(f"shadow round {r} {mode}", res, problems)
                rounds.append(res)
                o = res["shadow_outcomes"]
                print(f"  round {r + 1}/{args.rounds} c=32 shadow {mode:<3} {res['rps']:9.0f} rps  "
                      f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  cpu {res['cpu_ms_per_req']:.3f} ms/req"
                      f" ({res['proxy_cpu_share']:.0%} of a core; others {res['other_cores']:.2f} cores)  "
                      f"copies ok {o['ok']:.0f} dropped {o['dropped']:.0f}", flush=True)
        final = settle(ports["on"], slow_port, 15)
        final["slow_runtime_requests"] = metric_total(slow_port, "vllm:request_success_total")
        logs = {mode: proxy_log_summary(proxies[mode]) for mode in MODES}
    finally:
        for p in reversed(procs):
            p.stop()
    summary = summarize(rounds, final)
    note_neighbours("shadow", rounds, problems)
    if summary["outcomes"]["error"] or summary["outcomes"]["timeout"]:
        problems.append(f"shadow: copies failed: {summary['outcomes']}")
    return {"client": client, "slow_runtime": {"tokens_per_second": SLOW_TPS, "ttft_ms": SLOW_TTFT_MS},
            "rounds": rounds, "summary": summary, "proxy_log": logs["on"], "proxy_log_off": logs["off"]}


def summarize(rounds: list[dict[str, Any]], final: dict[str, float]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for mode in MODES:
        sel = [x for x in rounds if x["mode"] == mode]
        for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req", "proxy_cpu_share", "other_cores"):
            s[f"{mode}_{key}"] = med([x[key] for x in sel])
        s[f"{mode}_requests"] = sum(x["requests"] for x in sel)
    s["p99_ratio"] = ratio(s["on_p99_ms"], s["off_p99_ms"])
    s["rps_ratio"] = ratio(s["on_rps"], s["off_rps"])
    by_round = {(x["round"], x["mode"]): x for x in rounds}
    pairs = [(by_round[(r, "on")], by_round[(r, "off")]) for r in sorted({x["round"] for x in rounds})]
    s["p99_ratio_per_round"] = [ratio(on["p99_ms"], off["p99_ms"]) for on, off in pairs]
    s["cpu_ratio_per_round"] = [ratio(on["cpu_ms_per_req"], off["cpu_ms_per_req"]) for on, off in pairs]
    # a pair is clean when neither of its rounds shared the machine with busy neighbours
    s["clean_pairs"] = [max(on["other_cores"], off["other_cores"]) <= OTHER_CORES_LIMIT for on, off in pairs]
    s["outcomes"] = final  # whole case, counted after the last copies finished (sanity + warm-up included)
    s["outcomes_in_on_rounds"] = {k: sum(x["shadow_outcomes"][k] for x in rounds if x["mode"] == "on")
                                  for k in OUTCOMES}
    return s


def rows(s: dict[str, Any]) -> list[Row]:
    limit = TARGETS["shadow_p99_ratio"]
    o, during = s["outcomes"], s["outcomes_in_on_rounds"]
    return [
        ("shadow c=32 p99 (ms) [off | 100% shadow]", fmt(s["off_p99_ms"]), fmt(s["on_p99_ms"]),
         f"ratio {s['p99_ratio']:.2f}", verdict(s["p99_ratio"] <= limit, f"ratio <= {limit:g}")),
        ("shadow c=32 p99 ratio per round (on / off)", "-", _per_round(s["p99_ratio_per_round"], s["clean_pairs"]),
         "", "* = neighbours busy in that pair" if not all(s["clean_pairs"]) else ""),
        ("shadow c=32 p50 (ms) [off | 100% shadow]", fmt(s["off_p50_ms"]), fmt(s["on_p50_ms"]),
         added(s["on_p50_ms"] - s["off_p50_ms"]), ""),
        ("shadow c=32 rps [off | 100% shadow]", fmt(s["off_rps"]), fmt(s["on_rps"]), f"ratio {s['rps_ratio']:.2f}", ""),
        ("shadow proxy CPU/req (ms) [off | 100% shadow]", fmt(s["off_cpu_ms_per_req"]), fmt(s["on_cpu_ms_per_req"]),
         added(s["on_cpu_ms_per_req"] - s["off_cpu_ms_per_req"]),
         "ratio per round " + _per_round(s["cpu_ratio_per_round"], s["clean_pairs"])),
        ("shadow proxy CPU, share of one core [off | on]", f"{s['off_proxy_cpu_share']:.0%}",
         f"{s['on_proxy_cpu_share']:.0%}", "", f"others {s['off_other_cores']:.2f} | {s['on_other_cores']:.2f} cores"),
        ("shadow copies in on rounds: ok / dropped", "-", f"{during['ok']:,.0f} / {during['dropped']:,.0f}",
         f"of {s['on_requests']:,} primaries", ""),
        ("shadow copies, whole case: ok / dropped / error / timeout", "-",
         f"{o['ok']:,.0f} / {o['dropped']:,.0f} / {o['error']:,.0f} / {o['timeout']:,.0f}",
         f"slow runtime answered {o['slow_runtime_requests']:,.0f}", ""),
    ]


def _per_round(values: list[float], clean: list[bool]) -> str:
    return " ".join(f"{v:.2f}{'' if ok else '*'}" for v, ok in zip(values, clean))
