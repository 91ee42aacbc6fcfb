"""The reload case of overhead.py (only with --only reload): c=32 load while the rules file is rewritten.

Rounds alternate "plain" and "reloading" on one Stack's proxy; a thread rewrites its rules file every
RELOAD_EVERY_S. Returns failed requests, p50/p99 and rps per mode and the reloads the proxy applied.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

from clients import run_load
from harness import check_errors, med, metric_by, metric_total, rotated
from report import Row, fmt, verdict
from stack import Stack, proxy_log_summary, sanity_check

RELOAD_EVERY_S = 0.1
TARGETS = {"reload_p99_ratio": 1.1, "reload_failed": 0}


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


def reload_counters(port: int) -> dict[str, float]:
    """The proxy's rules_reloads_total by result and rules_generation, from /metrics."""
    counters = {"success": 0.0, "error": 0.0}
    counters.update(metric_by(port, "splitstream_rules_reloads_total", "result"))
    counters["generation"] = metric_total(port, "splitstream_rules_generation")
    return counters


def run(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    stack = Stack(tmp, "reload", tps=0, ttft_ms=0, max_batch=1000)
    rules_file = stack.dir / "rules" / "bench.yaml"
    try:
        assert stack.proxy is not None
        sanity_check(stack, stream=False)
        run_load(client, stack.url("proxy"), 32, 1)  # warm-up
        stack.check()
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for mode in rotated(("plain", "reload"), r):
                before = reload_counters(stack.proxy_port)
                if mode == "reload":
                    with RuleChurn(rules_file) as churn:
                        res = run_load(client, stack.url("proxy"), 32, args.duration)
                    res["rule_writes"] = churn.writes
                else:
                    res = run_load(client, stack.url("proxy"), 32, args.duration)
                after = reload_counters(stack.proxy_port)
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
        log = proxy_log_summary(stack.proxy)
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


def rows(s: dict[str, Any]) -> list[Row]:
    return [
        ("reload c=32 p99 (ms) [plain | reloading]", fmt(s["plain_p99_ms"]), fmt(s["reload_p99_ms"]),
         f"ratio {s['p99_ratio']:.2f}", verdict(s["p99_ratio"] <= TARGETS["reload_p99_ratio"], "ratio <= 1.1")),
        ("reload c=32 p50 (ms) [plain | reloading]", fmt(s["plain_p50_ms"]), fmt(s["reload_p50_ms"]), "", ""),
        ("reload c=32 rps [plain | reloading]", fmt(s["plain_rps"]), fmt(s["reload_rps"]),
         f"ratio {s['reload_rps'] / s['plain_rps']:.2f}", ""),
        ("reload c=32 failed requests", str(s["plain_failed"]), str(s["reload_failed"]),
         f"of {s['reload_requests']:,}", verdict(s["reload_failed"] <= TARGETS["reload_failed"], "0")),
        ("reload: rule writes / applied / rejected", "-",
         f"{s['rule_writes']} / {s['reloads_applied']:.0f} / {s['reloads_rejected']:.0f}", "", ""),
    ]
