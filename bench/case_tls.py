"""The tls case of overhead.py (only with --only tls): an https:// upstream vs the same runtime over http.

Two identical instant runtimes, one serving https with a certificate from a throwaway CA (trustme,
`sim-backend --tls-cert/--tls-key`), and a plain proxy in front of each (the https one trusting that CA via
`tls.ca_file`). After the warm-up both proxies hold keep-alive connections upstream, so the rounds measure
TLS records (encrypt, decrypt), not handshakes. The load goes straight to the http runtime ("direct") and
through each proxy, at c=1 and c=32; reported: added p50 over direct, https − http, proxy CPU per request.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clients import run_load
from harness import BenchError, Proc, check_errors, med, note_neighbours, rotated, with_cpu
from report import Row, added, fmt
from stack import (BODY, SimTls, completions_url, proxy_log_summary, rules_yaml, sanity_request, start_proxy,
                   start_sim, write_rules)

TLS_TARGETS = ("direct", "http", "https")
TARGETS: dict[str, float] = {}  # no target: the numbers say what TLS to the runtime costs


def make_certificate(directory: Path) -> SimTls:
    """A CA and a certificate for 127.0.0.1 issued by it, written as PEM files."""
    try:
        import trustme
    except ImportError as exc:
        raise BenchError("the tls case needs trustme (the test extra: .venv/bin/pip install trustme)") from exc
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    files = SimTls(cert=directory / "runtime.pem", key=directory / "runtime.key", ca_file=directory / "ca.pem")
    for i, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(str(files.cert), append=i > 0)
    leaf.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca_file))
    return files


def run(tmp: Path, args: argparse.Namespace, client: str, problems: list[str]) -> dict[str, Any]:
    base = tmp / "tls"
    base.mkdir()
    tls = make_certificate(base)
    procs: list[Proc] = []
    try:
        plain, plain_port = start_sim("tls-http-sim", base, tps=0, ttft_ms=0, max_batch=1000)
        procs.append(plain)
        secure, secure_port = start_sim("tls-https-sim", base, tps=0, ttft_ms=0, max_batch=1000, tls=tls)
        procs.append(secure)
        proxies: dict[str, Proc] = {}
        urls = {"direct": completions_url(plain_port)}
        for target, port, sim_tls in (("http", plain_port, {}), ("https", secure_port, {"sim": tls})):
            rules = write_rules(base / f"{target}-rules", rules_yaml({"sim": port}, {"p": ["sim"]}, "pool: p", sim_tls))
            proxies[target], proxy_port = start_proxy(f"tls-{target}-proxy", base, rules)
            procs.append(proxies[target])
            urls[target] = completions_url(proxy_port)
        # What each round watches: the process answering the load, and the runtime behind it.
        watched = {"direct": (plain, plain), "http": (proxies["http"], plain), "https": (proxies["https"], secure)}

        def check() -> None:
            for p in procs:
                p.check()

        for target in ("http", "https"):
            sanity_request(urls[target], BODY, False, proxies[target])
        for target in TLS_TARGETS:
            run_load(client, urls[target], 32, 1)  # warm-up: the proxies' upstream connections are open after it
        check()
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for conns in (1, 32):
                for target in rotated(TLS_TARGETS, r):
                    url = urls[target]
                    answering, runtime = watched[target]
                    res = with_cpu(lambda: run_load(client, url, conns, args.duration),
                                   {"": answering, "runtime_": runtime}, ours=procs)
                    check()
                    res.update(round=r, target=target, conns=conns)
                    check_errors(f"tls round {r} {target} c={conns}", res, problems)
                    rounds.append(res)
                    print(f"  round {r + 1}/{args.rounds} c={conns:<2} {target:<6} {res['rps']:9.0f} rps  "
                          f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  cpu {res['cpu_ms_per_req']:.3f} "
                          f"ms/req  runtime cpu {res['runtime_cpu_ms_per_req']:.3f} ms/req  "
                          f"(others {res['other_cores']:.2f} cores)", flush=True)
        logs = {target: proxy_log_summary(proxies[target]) for target in ("http", "https")}
    finally:
        for p in reversed(procs):
            p.stop()
    note_neighbours("tls", rounds, problems)
    return {"client": client, "rounds": rounds, "summary": summarize(rounds),
            "proxy_log": logs["https"], "proxy_log_http": logs["http"]}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for conns in (1, 32):
        for target in TLS_TARGETS:
            sel = [x for x in rounds if x["conns"] == conns and x["target"] == target]
            for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req", "runtime_cpu_ms_per_req"):
                s[f"c{conns}_{target}_{key}"] = med([x[key] for x in sel])
        for target in ("http", "https"):
            s[f"c{conns}_{target}_added_p50_ms"] = s[f"c{conns}_{target}_p50_ms"] - s[f"c{conns}_direct_p50_ms"]
        s[f"c{conns}_tls_p50_ms"] = s[f"c{conns}_https_p50_ms"] - s[f"c{conns}_http_p50_ms"]
        s[f"c{conns}_tls_cpu_ms_per_req"] = s[f"c{conns}_https_cpu_ms_per_req"] - s[f"c{conns}_http_cpu_ms_per_req"]
    return s


def rows(s: dict[str, Any]) -> list[Row]:
    """Direct vs each proxy, then https vs http upstream side by side (the "proxy" column: https)."""
    out: list[Row] = []
    for c in (1, 32):
        http, https = (lambda key: s[f"c{c}_http_{key}"]), (lambda key: s[f"c{c}_https_{key}"])
        direct_p50 = fmt(s[f"c{c}_direct_p50_ms"])
        out += [
            (f"tls c={c:<2} p50 (ms) [direct | http upstream]", direct_p50, fmt(http("p50_ms")),
             added(http("added_p50_ms")), ""),
            (f"tls c={c:<2} p50 (ms) [direct | https upstream]", direct_p50, fmt(https("p50_ms")),
             added(https("added_p50_ms")), ""),
            (f"tls c={c:<2} p50 (ms) [http | https upstream]", fmt(http("p50_ms")), fmt(https("p50_ms")),
             added(s[f"c{c}_tls_p50_ms"]), "(TLS to the runtime alone)"),
            (f"tls c={c:<2} p99 (ms) [http | https upstream]", fmt(http("p99_ms")), fmt(https("p99_ms")),
             added(https("p99_ms") - http("p99_ms")), ""),
            (f"tls c={c:<2} rps [http | https upstream]", fmt(http("rps")), fmt(https("rps")),
             f"ratio {https('rps') / http('rps'):.2f}", ""),
            (f"tls c={c:<2} proxy CPU/req (ms) [http | https upstream]", fmt(http("cpu_ms_per_req")),
             fmt(https("cpu_ms_per_req")), added(s[f"c{c}_tls_cpu_ms_per_req"]),
             f"runtime {fmt(http('runtime_cpu_ms_per_req'))} | {fmt(https('runtime_cpu_ms_per_req'))} ms/req"),
        ]
    return out
