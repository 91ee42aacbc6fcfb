"""The responses case of overhead.py (only with --only responses): the OpenAI Responses API next to chat.

One instant runtime and one plain proxy in front of it (a `Stack`). Four targets in the same rounds: chat
completions (`BODY`, wrk_post.lua) and a Responses request of the same size (`RESPONSES_BODY`,
wrk_responses.lua: `"store": false`, so the proxy has no response id to remember), each straight to the
runtime and through the proxy, non-streaming, at c=1 and c=32. Reported per endpoint: added p50 over its own
direct (per round, then the median), proxy CPU per request, requests/s; and responses − chat.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NamedTuple

from clients import run_load
from harness import Proc, check_errors, med, note_neighbours, rotated, with_cpu
from report import Row, added, fmt, ratio
from stack import (BODY, CHAT_PATH, RESPONSES_BODY, RESPONSES_PATH, WRK_POST, WRK_RESPONSES, Stack,
                   proxy_log_summary, sanity_request)


class Endpoint(NamedTuple):
    path: str
    body: bytes
    script: Path  # the wrk script sending `body`
    expect: bytes  # what a non-streaming answer contains


ENDPOINTS = {
    "chat": Endpoint(CHAT_PATH, BODY, WRK_POST, b'"choices"'),
    "responses": Endpoint(RESPONSES_PATH, RESPONSES_BODY, WRK_RESPONSES, b'"object":"response"'),
}
RESPONSES_TARGETS = ("chat_direct", "chat_proxy", "responses_direct", "responses_proxy")
TARGETS: dict[str, float] = {}  # no target of its own: the question is responses − chat, not a limit


def _split(target: str) -> tuple[str, str]:
    """("chat", "proxy") of "chat_proxy"."""
    endpoint, _, where = target.rpartition("_")
    return endpoint, where


def run(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    stack = Stack(tmp, "responses", tps=0, ttft_ms=0, max_batch=1000)
    try:
        assert stack.sim is not None and stack.proxy is not None
        procs: list[Proc] = [stack.sim, stack.proxy]
        urls = {t: stack.url(_split(t)[1], ENDPOINTS[_split(t)[0]].path) for t in RESPONSES_TARGETS}
        answer_bytes: dict[str, int] = {}
        for target in RESPONSES_TARGETS:
            endpoint = ENDPOINTS[_split(target)[0]]
            headers = sanity_request(urls[target], endpoint.body, False, stack.proxy, expect=endpoint.expect)
            answer_bytes[target] = int(headers.get("content-length", "0"))
        for target in RESPONSES_TARGETS:  # warm-up
            endpoint = ENDPOINTS[_split(target)[0]]
            run_load(client, urls[target], 32, 1, endpoint.body, endpoint.script)
        stack.check()
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for conns in (1, 32):
                for target in rotated(RESPONSES_TARGETS, r):
                    url, endpoint = urls[target], ENDPOINTS[_split(target)[0]]
                    answering = stack.proxy if _split(target)[1] == "proxy" else stack.sim
                    res = with_cpu(lambda: run_load(client, url, conns, args.duration, endpoint.body, endpoint.script),
                                   {"": answering, "runtime_": stack.sim}, ours=procs)
                    stack.check()
                    res.update(round=r, target=target, conns=conns)
                    check_errors(f"responses round {r} {target} c={conns}", res, problems)
                    rounds.append(res)
                    print(f"  round {r + 1}/{args.rounds} c={conns:<2} {target:<16} {res['rps']:9.0f} rps  "
                          f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  cpu {res['cpu_ms_per_req']:.3f} "
                          f"ms/req  runtime cpu {res['runtime_cpu_ms_per_req']:.3f} ms/req  "
                          f"(others {res['other_cores']:.2f} cores)", flush=True)
        log = proxy_log_summary(stack.proxy)
    finally:
        stack.close()
    note_neighbours("responses", rounds, problems)
    return {"client": client, "answer_bytes": answer_bytes, "rounds": rounds, "summary": summarize(rounds),
            "proxy_log": log}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds; the added numbers are per round (each proxy round against the direct round of
    the same endpoint, round and concurrency: they ran back to back), then their median."""
    s: dict[str, Any] = {}
    for conns in (1, 32):
        by = {(x["target"], x["round"]): x for x in rounds if x["conns"] == conns}
        done = sorted({x["round"] for x in rounds})
        for target in RESPONSES_TARGETS:
            for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req", "runtime_cpu_ms_per_req"):
                s[f"c{conns}_{target}_{key}"] = med([by[target, r][key] for r in done if (target, r) in by])
        per_round: dict[str, list[float]] = {}
        for ep in ENDPOINTS:
            per_round[ep] = [by[f"{ep}_proxy", r]["p50_ms"] - by[f"{ep}_direct", r]["p50_ms"] for r in done
                             if (f"{ep}_proxy", r) in by and (f"{ep}_direct", r) in by]
            s[f"c{conns}_{ep}_added_p50_per_round"] = per_round[ep]
            s[f"c{conns}_{ep}_added_p50_ms"] = med(per_round[ep])
        diff = [b - a for a, b in zip(per_round["chat"], per_round["responses"])]
        s[f"c{conns}_responses_minus_chat_p50_per_round"] = diff
        s[f"c{conns}_responses_minus_chat_p50_ms"] = med(diff)
        cpu = [by["responses_proxy", r]["cpu_ms_per_req"] - by["chat_proxy", r]["cpu_ms_per_req"] for r in done
               if ("responses_proxy", r) in by and ("chat_proxy", r) in by]
        s[f"c{conns}_responses_minus_chat_cpu_per_round"] = cpu
        s[f"c{conns}_responses_minus_chat_cpu_ms_per_req"] = med(cpu)
    return s


def _rounds(values: list[float]) -> str:
    return "rounds " + ", ".join(f"{v:+.3f}" for v in values)


def rows(s: dict[str, Any]) -> list[Row]:
    """Per endpoint direct vs proxy, then chat vs responses through the proxy side by side (the "direct"
    column: chat, the "proxy" column: responses)."""
    out: list[Row] = []
    for c in (1, 32):
        p = f"responses c={c:<2}"

        def v(target: str, key: str, c: int = c) -> float:
            return float(s[f"c{c}_{target}_{key}"])

        for ep in ENDPOINTS:
            out.append((f"{p} p50 (ms) [direct | proxy] {ep}", fmt(v(f"{ep}_direct", "p50_ms")),
                        fmt(v(f"{ep}_proxy", "p50_ms")), added(s[f"c{c}_{ep}_added_p50_ms"]),
                        f"(added: median of per-round; {_rounds(s[f'c{c}_{ep}_added_p50_per_round'])})"))
        out += [
            (f"{p} added p50 (ms) [chat | responses]", added(s[f"c{c}_chat_added_p50_ms"]),
             added(s[f"c{c}_responses_added_p50_ms"]), added(s[f"c{c}_responses_minus_chat_p50_ms"]),
             f"(responses - chat; {_rounds(s[f'c{c}_responses_minus_chat_p50_per_round'])})"),
            (f"{p} p99 (ms) via proxy [chat | responses]", fmt(v("chat_proxy", "p99_ms")),
             fmt(v("responses_proxy", "p99_ms")), added(v("responses_proxy", "p99_ms") - v("chat_proxy", "p99_ms")),
             f"direct {fmt(v('chat_direct', 'p99_ms'))} | {fmt(v('responses_direct', 'p99_ms'))} ms"),
            (f"{p} rps via proxy [chat | responses]", fmt(v("chat_proxy", "rps")), fmt(v("responses_proxy", "rps")),
             f"ratio {ratio(v('responses_proxy', 'rps'), v('chat_proxy', 'rps')):.2f}",
             f"direct {fmt(v('chat_direct', 'rps'))} | {fmt(v('responses_direct', 'rps'))}"),
            (f"{p} proxy CPU/req (ms) [chat | responses]", fmt(v("chat_proxy", "cpu_ms_per_req"), 4),
             fmt(v("responses_proxy", "cpu_ms_per_req"), 4), added(s[f"c{c}_responses_minus_chat_cpu_ms_per_req"]),
             f"runtime {fmt(v('chat_direct', 'runtime_cpu_ms_per_req'))} | "
             f"{fmt(v('responses_direct', 'runtime_cpu_ms_per_req'))} ms/req (direct); "
             f"{_rounds(s[f'c{c}_responses_minus_chat_cpu_per_round'])}"),
        ]
    return out
