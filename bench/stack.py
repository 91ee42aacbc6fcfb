"""The processes a case measures: simulated runtimes and proxies as subprocesses, their rule files, the bodies.

A `Stack` is one simulated runtime and one plain proxy in front of it; cases that need more (a second
proxy on other rules, a second runtime) add them with `start_sim` / `start_proxy`. Used by the case
modules of overhead.py; no load generation and no statistics here.
"""

from __future__ import annotations

import json
import re
import ssl
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from harness import ROOT, BenchError, Proc, free_port, tail, wait_ready

MODEL = "sim-model"
HEADERS = {"Content-Type": "application/json"}
# Must stay byte-identical to the body in bench/wrk_post.lua (the Python fallback client sends this one).
BODY = b'{"model":"sim-model","messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}'
WRK_POST = ROOT / "bench" / "wrk_post.lua"
CHAT_PATH = "/v1/chat/completions"
# The same small request as BODY on the OpenAI Responses API, not stored (no response id for the proxy to
# remember). Must stay byte-identical to the body in bench/wrk_responses.lua.
RESPONSES_PATH = "/v1/responses"
RESPONSES_BODY = b'{"model":"sim-model","input":"Hello there","max_output_tokens":8,"store":false}'
WRK_RESPONSES = ROOT / "bench" / "wrk_responses.lua"


def stream_body(max_tokens: int) -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens,
         "stream": True},
        separators=(",", ":"),
    ).encode()


class SimTls(NamedTuple):
    """Files for a runtime served over https: its certificate and key, and the CA a proxy trusts it with."""

    cert: Path
    key: Path
    ca_file: Path


def rules_yaml(sims: dict[str, int], pools: dict[str, list[str]], route: str,
               tls: Mapping[str, SimTls] | None = None) -> str:
    """A rules file: a vllm backend per sim port, the pools (all on MODEL), and one route `bench` matching
    MODEL whose remaining keys are the YAML lines of `route` (written unindented). Sims named in `tls` are
    https:// backends verified with their CA."""
    tls = tls or {}
    backends = "".join(f'  {name}: {_backend_yaml(port, tls.get(name))}\n' for name, port in sims.items())
    pool_lines = "".join(f'  {name}: {{backends: [{", ".join(members)}], model: "{MODEL}"}}\n'
                         for name, members in pools.items())
    route_lines = "".join(f"    {line}\n" for line in route.strip("\n").splitlines())
    return (f"server: {{max_inflight: 100000}}\nbackends:\n{backends}pools:\n{pool_lines}routes:\n"
            f"  - name: bench\n    match: {{model: \"{MODEL}\"}}\n{route_lines}")


def _backend_yaml(port: int, tls: SimTls | None) -> str:
    if tls is None:
        return f'{{url: "http://127.0.0.1:{port}", kind: vllm}}'
    return f'{{url: "https://127.0.0.1:{port}", kind: vllm, tls: {{ca_file: "{tls.ca_file}"}}}}'


def write_rules(rules_dir: Path, text: str) -> Path:
    """Create `rules_dir` holding one bench.yaml; returns the directory (what `serve --rules` takes)."""
    rules_dir.mkdir()
    (rules_dir / "bench.yaml").write_text(text)
    return rules_dir


def start_sim(name: str, log_dir: Path, *, tps: float, ttft_ms: float, max_batch: int,
              tls: SimTls | None = None) -> tuple[Proc, int]:
    """`proxy sim-backend` on a free port, serving MODEL (over https with `tls`), once /health answers."""
    port = free_port()
    args = [sys.executable, "-m", "proxy", "sim-backend", "--host", "127.0.0.1", "--port", str(port),
            "--model", MODEL, "--tokens-per-second", str(tps), "--ttft-ms", str(ttft_ms), "--max-batch", str(max_batch)]
    scheme, context = "http", None
    if tls is not None:
        args += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        scheme, context = "https", ssl.create_default_context(cafile=str(tls.ca_file))
    proc = Proc(name, args, log_dir)
    _ready_or_stop(proc, f"{scheme}://127.0.0.1:{port}/health", context)
    return proc, port


def start_proxy(name: str, log_dir: Path, rules_dir: Path, redis_url: str | None = None,
                env: Mapping[str, str] | None = None) -> tuple[Proc, int]:
    """`proxy serve` on a free port with the rules in `rules_dir` (and `--redis` if given), once /healthz answers.
    `env`: variables added to its environment (a tenant's `keys_env`).

    Start the runtimes first: the proxy probes its backends at start, as in a deployment.
    """
    port = free_port()
    args = [sys.executable, "-m", "proxy", "serve", "--rules", str(rules_dir), "--host", "127.0.0.1",
            "--port", str(port)]
    if redis_url is not None:
        args += ["--redis", redis_url]
    proc = Proc(name, args, log_dir, env)
    _ready_or_stop(proc, f"http://127.0.0.1:{port}/healthz")
    return proc, port


def _ready_or_stop(proc: Proc, url: str, context: ssl.SSLContext | None = None) -> None:
    """wait_ready, but a process that never got ready is stopped before the error goes up (no orphans)."""
    try:
        wait_ready(proc, url, context=context)
    except BaseException:
        proc.stop()
        raise


def completions_url(port: int, path: str = CHAT_PATH) -> str:
    """The chat completions URL on 127.0.0.1:`port` (or another endpoint's `path`)."""
    return f"http://127.0.0.1:{port}{path}"


class Stack:
    """A simulated runtime and a plain proxy in front of it (route `bench` -> pool `p`), fresh subprocesses."""

    def __init__(self, tmp: Path, name: str, *, tps: float, ttft_ms: float, max_batch: int) -> None:
        self.dir = tmp / name
        self.dir.mkdir()
        self.sim: Proc | None = None
        self.proxy: Proc | None = None
        self.sim, self.sim_port = start_sim(f"{name}-sim", self.dir, tps=tps, ttft_ms=ttft_ms, max_batch=max_batch)
        try:
            rules = write_rules(self.dir / "rules", rules_yaml({"sim": self.sim_port}, {"p": ["sim"]}, "pool: p"))
            self.proxy, self.proxy_port = start_proxy(f"{name}-proxy", self.dir, rules)
        except BaseException:
            self.sim.stop()
            raise

    def url(self, target: str, path: str = CHAT_PATH) -> str:
        return completions_url(self.sim_port if target == "direct" else self.proxy_port, path)

    def check(self) -> None:
        for p in (self.sim, self.proxy):
            if p is not None:
                p.check()

    def close(self) -> None:
        for p in (self.proxy, self.sim):
            if p is not None:
                p.stop()


def proxy_log_summary(proxy: Proc) -> dict[str, Any]:
    """Statuses of a proxy's access-log lines and its error/warning lines (first few kept)."""
    statuses: Counter[str] = Counter()
    levels: Counter[str] = Counter()
    samples: list[str] = []
    with proxy.log.open("rb") as f:
        for raw in f:
            m = re.search(rb'"status":(\d+)', raw)
            if m and raw.startswith(b'{"request_id"'):
                statuses[m.group(1).decode()] += 1
                continue
            m = re.search(rb'"level":"(\w+)"', raw)
            level = m.group(1).decode() if m else "other"
            levels[level] += 1
            if level in ("error", "warning", "critical", "other") and len(samples) < 3:
                samples.append(raw.decode("utf-8", "replace")[:600].rstrip())
    return {"access_log_statuses": dict(statuses), "log_levels": dict(levels), "samples": samples}


def post(url: str, body: bytes, headers: dict[str, str] = HEADERS) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one POST; status 0 and the error text when none came."""
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
    except OSError as exc:
        return 0, {}, str(exc).encode()


def sanity_request(url: str, body: bytes, stream: bool, proxy: Proc,
                   headers: dict[str, str] = HEADERS, expect: bytes = b'"choices"') -> dict[str, str]:
    """One request before measuring (a benchmark of 500s is not a benchmark); its response headers.
    A non-streaming answer must contain `expect` (the chat default; a Responses object: `"object":"response"`)."""
    status, resp_headers, data = post(url, body, headers)
    ok = status == 200 and (b"data: [DONE]" in data if stream else expect in data)
    if not ok:
        proxy.check()
        raise BenchError(f"sanity request -> {url} failed: HTTP {status}: {data[:400].decode('utf-8', 'replace')}"
                         f"\nproxy output tail:\n{tail(proxy.log)}")
    return resp_headers


def sanity_check(stack: Stack, stream: bool) -> None:
    """One request each way, direct and through the proxy."""
    assert stack.proxy is not None
    body = stream_body(2) if stream else BODY
    for target in ("direct", "proxy"):
        stack.check()
        sanity_request(stack.url(target), body, stream, stack.proxy)
