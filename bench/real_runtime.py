#!/usr/bin/env python3
"""Real-runtime routing benchmark: round_robin vs least_conn vs least_cost in front of two llama.cpp servers.

Run on purpose, never in CI. Two real `llama-server` processes (llama.cpp built once from the source vendored in
the pinned llama-cpp-python sdist, see bench/llama_build.py) serve one model name, `bench-model`, from two
random-weight llama GGUF files of different size, so one server is ~3-4x faster per token than the other. Each
runs `--parallel 4 -t 1` on 127.0.0.1. Random weights write random tokens: every request sends `max_tokens`
and `ignore_eos: true`, so an answer is exactly as long as the workload asks (checked).

1. Alone: each server measured directly, the other idle, at n = 1..4 concurrent streams of one size (a few
   rounds): per-request decode and prefill tokens/s from llama.cpp's own `timings` (ground truth) and as the
   client sees them (TTFT; completion / (end - TTFT)). Then again with both servers busy at once at the same n
   ("both busy": what the machine looks like under load). Then the pair's capacity (requests/s of the mix):
   4 closed-loop streams of the mix per server, both servers at once (or --capacity R to pin it, so that two
   invocations offer the same load). n means n streams started together: at n > 1 their prompts are
   prefilled in one batch, so a request's prefill speed is its prompt over the whole batch's prompt time.
2. One `python -m proxy serve` per policy (backends `kind: llamacpp, concurrency: 4`, one pool, one route with
   `balance: <policy>`), all up at once, each warmed up identically; then per load (default 50 % once, 70 %
   three times) an open-loop Poisson workload, policies interleaved seed by seed with the order rotating, so
   noise on the machine hits every policy alike. A proxy keeps what it learned across runs.
   Workload: 80 % short (30-120 words of prompt, 16-48 tokens of answer), 20 % long (300-700 words, 96-192
   tokens; ~1.7 prompt tokens per word); streaming chat completions with `stream_options.include_usage`;
   each request's text is unique, so no runtime prefix cache skews one policy.
3. After every run the proxy's `GET /admin/backends` (learned `prefill_tps` / `decode_tps`, and the
   `*_by_inflight` maps once the cost model has them) is read and, at the end, shown next to the speeds
   measured alone at the same in-flight count.

Reported: p50/p99 end-to-end and TTFT per policy and load (medians over seeds), least_cost / least_conn ratios
per seed, each backend's share of requests, learned vs measured speeds. Everything goes to
bench/results/real_runtime-<UTC>.json. Exit status non-zero only when the harness could not measure.

    .venv/bin/python bench/real_runtime.py                  # build once (~11 min on 2 cores), then ~13 min
    .venv/bin/python bench/real_runtime.py --quick          # one 20 s 70 % run per policy: smoke run (~2.5 min)
    .venv/bin/python bench/real_runtime.py --loads 0.7 --seeds 5 --policies least_conn,least_cost
    .venv/bin/python bench/real_runtime.py --proxy-ref HEAD # the committed proxy, not the work tree
    .venv/bin/python bench/real_runtime.py --debug-chunk    # print llama.cpp's last stream chunks verbatim
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import llama_build  # noqa: E402
import runinfo  # noqa: E402

ALIAS = "bench-model"
POLICIES = ("round_robin", "least_conn", "least_cost")
PARALLEL = 4  # llama-server --parallel, and the backends' `concurrency`
SLOT_CTX = 2048  # tokens per slot: -c PARALLEL * SLOT_CTX
BACKENDS = ("fast", "slow")  # llama_build.MODELS names; the pool lists them in this order

# Workload: (share, prompt words, max_tokens), each range drawn uniformly.
MIX = (("short", 0.8, (30, 120), (16, 48)), ("long", 0.2, (300, 700), (96, 192)))
ALONE_WORDS, ALONE_MAX_TOKENS = 200, 64  # one size for the alone measurement
WARMUP_REQUESTS, WARMUP_LOAD = 30, 0.3
ADMIN_TOKEN = "real-runtime-bench"
# No host-RAM prompt cache: every prompt is unique, so it would only copy each slot's KV state away for nothing.
# 64 HTTP threads: cpp-httplib holds a thread per open connection (idle keep-alive ones too, up to 5 s), and the
# default (--parallel + 4 = 8) would make requests beyond 8 open connections wait for a thread, not a slot.
SERVER_FLAGS = ("--cache-ram", "0", "--threads-http", "64")
OTHER_CPU_LIMIT = 30.0  # % of a core used by other processes during a run before it is marked contended
TARGETS = {"p99_ratio_at_70": 0.7, "p50_ratio_at_70": 1.0, "learned_within": 0.3}


# ---------------------------------------------------------------------------------------------------
# workload


@dataclass(frozen=True)
class Req:
    offset: float  # seconds after the run's start
    kind: str
    words: int
    max_tokens: int


def schedule(rate: float, duration: float, seed: int, limit: int | None = None) -> list[Req]:
    """Poisson arrivals at `rate` req/s for `duration` seconds (or `limit` requests), sizes from MIX.

    Arrival gaps and sizes come from separate streams: the same seed gives the same requests at any rate."""
    arrivals = random.Random(f"arrivals-{seed}")
    sizes = random.Random(f"sizes-{seed}")
    out: list[Req] = []
    t = 0.0
    while limit is None or len(out) < limit:
        t += arrivals.expovariate(rate)
        if limit is None and t > duration:
            break
        u = sizes.random()
        for kind, share, words, mt in MIX:
            if u < share:
                break
            u -= share
        out.append(Req(t, kind, sizes.randint(*words), sizes.randint(*mt)))
    return out


def mix_means() -> dict[str, float]:
    words = sum(share * (lo + hi) / 2 for _, share, (lo, hi), _ in MIX)
    tokens = sum(share * (lo + hi) / 2 for _, share, _, (lo, hi) in MIX)
    return {"prompt_words": words, "completion_tokens": tokens}


def prompt(key: str, words: int) -> str:
    """`words` pseudo-words from the models' own vocabulary, different for every key (no prefix-cache hits)."""
    return " ".join(llama_build.words(random.Random(key), words))


def body(key: str, words: int, max_tokens: int) -> bytes:
    return json.dumps({
        "model": ALIAS, "messages": [{"role": "user", "content": prompt(key, words)}],
        "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True,  # random weights: without it an answer may end at any token
    }, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------------
# one streaming request


@dataclass
class Result:
    rid: str
    kind: str
    words: int
    max_tokens: int
    scheduled: float = 0.0
    lag: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    error: str | None = None
    unfinished: bool = False
    backend: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    timings: dict[str, Any] | None = None
    final_chunks: list[str] = field(default_factory=list)

    def server_decode_tps(self) -> float | None:
        """llama.cpp's predicted_per_second: (predicted_n - 1) / predicted_ms, the first token excluded."""
        v = (self.timings or {}).get("predicted_per_second")
        return float(v) if v else None

    def server_prefill_tps(self) -> float | None:
        """llama.cpp's prompt_per_second: prompt_n (tokens evaluated, cached ones excluded) / prompt_ms."""
        v = (self.timings or {}).get("prompt_per_second")
        return float(v) if v else None

    def client_decode_tps(self) -> float | None:
        """completion / (end - TTFT): what the proxy's cost model sees."""
        if self.completion_tokens and self.ttft is not None and self.e2e is not None and self.e2e > self.ttft:
            return self.completion_tokens / (self.e2e - self.ttft)
        return None

    def client_prefill_tps(self) -> float | None:
        if self.prompt_tokens and self.ttft:
            return self.prompt_tokens / self.ttft
        return None


async def fire(session: aiohttp.ClientSession, url: str, payload: bytes, res: Result, headers: dict[str, str],
               started: dict[str, float]) -> None:
    t0 = time.perf_counter()
    started[res.rid] = t0
    done = False
    try:
        async with session.post(url, data=payload, headers={"Content-Type": "application/json",
                                                            "X-Request-Id": res.rid, **headers}) as resp:
            res.backend = resp.headers.get("x-splitstream-backend")
            if resp.status != 200:
                await resp.read()
                res.error = f"HTTP {resp.status}"
                return
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                if res.ttft is None:
                    res.ttft = time.perf_counter() - t0
                if line.startswith(b"data: [DONE]"):
                    res.e2e = time.perf_counter() - t0
                    done = True
                    continue
                if b'"usage"' in line or b'"timings"' in line:
                    res.final_chunks.append(line.decode("utf-8", "replace").strip())
                    try:
                        doc = json.loads(line[5:])
                    except ValueError:
                        continue
                    usage = doc.get("usage")
                    if isinstance(usage, dict):
                        res.prompt_tokens = usage.get("prompt_tokens")
                        res.completion_tokens = usage.get("completion_tokens")
                        details = usage.get("prompt_tokens_details") or {}
                        res.cached_tokens = details.get("cached_tokens") if isinstance(details, dict) else None
                    if isinstance(doc.get("timings"), dict):
                        res.timings = doc["timings"]
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        res.error = type(exc).__name__
        return
    if res.ttft is None:
        res.error = "no data chunk"
    elif not done:
        res.error = "missing [DONE]"
    elif res.completion_tokens is not None and res.completion_tokens != res.max_tokens:
        res.error = f"answer of {res.completion_tokens} tokens, asked {res.max_tokens}"


def new_session(keep_alive: bool = True) -> aiohttp.ClientSession:
    """keep_alive=False for requests straight to llama-server: it closes idle connections after 5 s, and a
    reused connection it is closing fails (ServerDisconnectedError)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=not keep_alive),
                                 timeout=aiohttp.ClientTimeout(total=None))


# ---------------------------------------------------------------------------------------------------
# processes


class Servers(harness.ProcGroup):
    """The two llama-servers, one model each, on free ports."""

    def __init__(self, tmp: Path, binary: Path, models: dict[str, dict[str, Any]], extra: list[str]) -> None:
        super().__init__()
        self.ports = {name: harness.free_port() for name in BACKENDS}
        self.args: dict[str, list[str]] = {}
        try:
            for name in BACKENDS:
                args = [str(binary), "-m", models[name]["path"], "--host", "127.0.0.1",
                        "--port", str(self.ports[name]), "--parallel", str(PARALLEL),
                        "-c", str(PARALLEL * SLOT_CTX), "-t", "1", "-tb", "1", "--alias", ALIAS, "--metrics",
                        *SERVER_FLAGS, *extra]
                self.args[name] = args
                self.procs[name] = harness.Proc(f"llama-{name}", args, tmp)
            for name in BACKENDS:
                harness.wait_ready(self.procs[name], self.url(name) + "/health", timeout=120)
        except BaseException:
            self.close()
            raise


def proxy_tree(ref: str | None, tmp: Path) -> tuple[dict[str, str], list[str], str]:
    """(env, python flags, description) that make `python -m proxy` import the work tree or `git archive REF`."""
    if not ref:
        return {}, [], "work tree"
    out = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "proxy"], capture_output=True, check=False)
    if out.returncode != 0:
        raise harness.BenchError(f"git archive {ref} proxy failed: {out.stderr.decode(errors='replace')}")
    dest = tmp / "proxy-src"
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tf:
        tf.extractall(dest, filter="data")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True,
                            text=True).stdout.strip()
    env = {"PYTHONPATH": str(dest)}
    flags = ["-P"]  # do not put the work tree (the cwd) first on sys.path
    probe = subprocess.run([sys.executable, *flags, "-c", "import proxy; print(proxy.__file__)"],
                           cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if not probe.stdout.startswith(str(dest)):
        raise harness.BenchError(f"--proxy-ref {ref}: python imports {probe.stdout.strip() or probe.stderr!r}, "
                                 f"not {dest}")
    return env, flags, f"git {ref} ({commit})"


def start_proxy(tmp: Path, policy: str, servers: Servers, tree: tuple[dict[str, str], list[str], str]
                ) -> tuple[harness.Proc, int]:
    d = tmp / f"rules-{policy}"
    d.mkdir()
    port = harness.free_port()
    backends = "\n".join(f'  {n}: {{url: "{servers.url(n)}", kind: llamacpp, concurrency: {PARALLEL}}}'
                         for n in BACKENDS)
    (d / "bench.yaml").write_text(f"""\
server: {{max_inflight: 100000}}
backends:
{backends}
pools:
  p: {{backends: [{", ".join(BACKENDS)}], model: "{ALIAS}"}}
routes:
  - name: bench
    match: {{model: "{ALIAS}"}}
    pool: p
    balance: {policy}
    timeouts: {{total: 10m, first_token: 5m, queue: 5m}}
""")
    env, flags, _ = tree
    proc = harness.Proc(f"proxy-{policy}", [sys.executable, *flags, "-m", "proxy", "serve", "--rules", str(d),
                                            "--host", "127.0.0.1", "--port", str(port), "--no-watch"], tmp,
                        env={**env, "SPLITSTREAM_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        harness.wait_ready(proc, f"http://127.0.0.1:{port}/healthz")
        harness.wait_ready(proc, f"http://127.0.0.1:{port}/readyz", timeout=30)
    except BaseException:
        proc.stop()
        raise
    return proc, port


def admin_backends(port: int) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/admin/backends",
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc = json.loads(resp.read())
    keep = ("prefill_tps", "decode_tps", "prefill_tps_by_inflight", "decode_tps_by_inflight", "learned_from",
            "inflight", "predicted_load", "status")
    return {row["name"]: {k: row[k] for k in keep if k in row} | {"other_speed_keys": sorted(
        k for k in row if ("tps" in k or "speed" in k) and k not in keep)} for row in doc.get("backends", [])}


# ---------------------------------------------------------------------------------------------------
# 1. each server alone


async def _round(session: aiohttp.ClientSession, url: str, n: int, tag: str) -> list[Result]:
    res = [Result(f"{tag}.{i}", "alone", ALONE_WORDS, ALONE_MAX_TOKENS) for i in range(n)]
    await asyncio.gather(*(fire(session, url, body(r.rid, ALONE_WORDS, ALONE_MAX_TOKENS), r, {}, {})
                           for r in res))
    return res


async def measure_alone(servers: Servers, rounds: int, busy_window: float) -> dict[str, Any]:
    """Per server and n = 1..PARALLEL: `rounds` rounds of n identical-size streams, the other server idle;
    then both servers at once, each looping rounds of n for `busy_window` seconds (at least `rounds` each)."""
    url = {n: servers.url(n) + "/v1/chat/completions" for n in BACKENDS}
    alone: dict[str, dict[int, list[Result]]] = {b: {} for b in BACKENDS}
    both: dict[str, dict[int, list[Result]]] = {b: {} for b in BACKENDS}
    async with new_session(keep_alive=False) as session:
        for b in BACKENDS:
            for r in range(2):  # the first use of each slot pays one-time costs
                await _round(session, url[b], PARALLEL, f"prime-{b}-r{r}")
            for n in range(1, PARALLEL + 1):
                alone[b][n] = []
                for r in range(rounds):
                    alone[b][n] += await _round(session, url[b], n, f"alone-{b}-n{n}-r{r}")
        for n in range(1, PARALLEL + 1):
            stop_at = time.monotonic() + busy_window

            async def loop(b: str) -> None:
                both[b][n] = []
                r = 0
                while r < rounds or time.monotonic() < stop_at:
                    both[b][n] += await _round(session, url[b], n, f"both-{b}-n{n}-r{r}")
                    r += 1

            await asyncio.gather(*(loop(b) for b in BACKENDS))
    return {"alone": alone, "both_busy": both}


def speed_table(raw: dict[str, dict[int, list[Result]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Medians per server and n: server-side decode/prefill tokens/s (llama.cpp timings), client-side ones, TTFT."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for b, by_n in raw.items():
        out[b] = {}
        for n, results in by_n.items():
            ok = [r for r in results if r.error is None]

            def m(vals: list[float | None]) -> float:
                return harness.med([v for v in vals if v is not None])

            out[b][str(n)] = {
                "requests": len(results), "errors": len(results) - len(ok),
                "decode_tps": m([r.server_decode_tps() for r in ok]),
                "prefill_tps": m([r.server_prefill_tps() for r in ok]),
                "client_decode_tps": m([r.client_decode_tps() for r in ok]),
                "client_prefill_tps": m([r.client_prefill_tps() for r in ok]),
                "ttft_ms": m([r.ttft * 1e3 if r.ttft is not None else None for r in ok]),
                "e2e_s": m([r.e2e for r in ok]),
                "prompt_tokens": m([r.prompt_tokens for r in ok]),
                "cached_tokens": m([r.cached_tokens for r in ok]),
                "aggregate_decode_tps": m([r.server_decode_tps() for r in ok]) * int(n),
            }
    return out


TEMPLATE_TOKENS = 10  # "<|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n": about ten tokens


def tokens_per_word(raw: dict[str, dict[int, list[Result]]]) -> float:
    """Prompt tokens per word of text, from the alone requests (the chat template's tokens taken off)."""
    toks = [r.prompt_tokens for by_n in raw.values() for rs in by_n.values() for r in rs if r.prompt_tokens]
    return (statistics.median(toks) - TEMPLATE_TOKENS) / ALONE_WORDS if toks else 1.7


def capacity(speeds: dict[str, dict[str, dict[str, Any]]], tpw: float) -> dict[str, Any]:
    """Requests/s of the workload mix each server sustains with PARALLEL streams: PARALLEL / mean service time
    at n = PARALLEL (per-request prefill and decode speeds measured with that many in flight)."""
    per: dict[str, Any] = {}
    for b in BACKENDS:
        s = speeds[b][str(PARALLEL)]
        service = 0.0
        for _, share, (wlo, whi), (tlo, thi) in MIX:
            prompt_tokens = tpw * (wlo + whi) / 2 + TEMPLATE_TOKENS
            service += share * (prompt_tokens / s["prefill_tps"] + (tlo + thi) / 2 / s["decode_tps"])
        per[b] = {"mean_service_s": service, "rps": PARALLEL / service}
    return {"backends": per, "rps": sum(p["rps"] for p in per.values())}


async def measure_capacity(servers: Servers, window: float) -> dict[str, Any]:
    """Closed loop straight to each server, both at once: PARALLEL workers per server send the workload mix
    (the same sequence of sizes for both) back to back for `window` seconds; a server's requests/s is the
    requests it completed within the window, plus the elapsed share of those still running at its end, over
    the window."""
    sizes = schedule(1.0, 0.0, 777, limit=4000)
    out: dict[str, Any] = {}
    async with new_session(keep_alive=False) as session:
        async def one(b: str) -> None:
            url = servers.url(b) + "/v1/chat/completions"
            t0 = time.perf_counter()
            stop = t0 + window
            done: list[Result] = []
            starts: dict[str, float] = {}
            ends: dict[str, float] = {}
            counter = iter(range(len(sizes)))

            async def worker() -> None:
                while time.perf_counter() < stop:
                    i = next(counter)
                    q = sizes[i]
                    r = Result(f"cap-{b}-{i}", q.kind, q.words, q.max_tokens)
                    starts[r.rid] = time.perf_counter()
                    await fire(session, url, body(r.rid, q.words, q.max_tokens), r, {}, {})
                    ends[r.rid] = time.perf_counter()
                    done.append(r)

            await asyncio.gather(*(worker() for _ in range(PARALLEL)))
            ok = [r for r in done if r.error is None and ends[r.rid] <= stop]
            partial = sum((stop - starts[r.rid]) / (ends[r.rid] - starts[r.rid]) for r in done
                          if r.error is None and ends[r.rid] > stop)
            out[b] = {"completed_in_window": len(ok), "long": sum(r.kind == "long" for r in ok),
                      "running_at_end": partial, "errors": sum(1 for r in done if r.error),
                      "rps": (len(ok) + partial) / window,
                      "error_kinds": dict(Counter(r.error for r in done if r.error))}

        await asyncio.gather(*(one(b) for b in BACKENDS))
    return {"backends": out, "rps": sum(v["rps"] for v in out.values()), "window_s": window}


# ---------------------------------------------------------------------------------------------------
# 2. open-loop runs through the proxies


async def run_load(url: str, reqs: list[Req], tag: str, drain_cap: float) -> dict[str, Any]:
    results = [Result(f"{tag}.{i}", r.kind, r.words, r.max_tokens, r.offset) for i, r in enumerate(reqs)]
    payloads = [body(res.rid, r.words, r.max_tokens) for res, r in zip(results, reqs)]
    started: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    async with new_session() as session:
        tasks = []
        t_start = loop.time() + 0.05
        wall_start = time.perf_counter() + 0.05
        for req, payload, res in zip(reqs, payloads, results):
            target = t_start + req.offset
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            res.lag = max(0.0, loop.time() - target)
            tasks.append(asyncio.create_task(fire(session, url, payload, res, {}, started)))
        last = loop.time()
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, last + drain_cap - loop.time())) if tasks else (
            set(), set())
        cutoff = time.perf_counter()
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if r.e2e is None and r.error is None:
            r.unfinished = True
            r.e2e = cutoff - started.get(r.rid, cutoff)
    ends = [started[r.rid] + r.e2e for r in results if not r.unfinished and r.e2e is not None and r.error is None]
    span = (cutoff if pending else max(ends, default=cutoff)) - wall_start
    return {"results": results, "span_s": span, "window_s": reqs[-1].offset if reqs else 0.0,
            "unfinished": len(pending)}


def summarize(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and not r.unfinished]
    unfinished = [r for r in results if r.unfinished]
    e2e = [r.e2e for r in results if r.error is None and r.e2e is not None]  # unfinished: lower bounds
    ttft = [r.ttft for r in ok if r.ttft is not None]
    floor = min((r.e2e for r in unfinished if r.e2e is not None), default=math.inf)
    out: dict[str, Any] = {
        "requests": len(results), "completed": len(ok), "errors": sum(1 for r in results if r.error),
        "error_kinds": dict(Counter(r.error for r in results if r.error)), "unfinished": len(unfinished),
        "e2e_p50_s": harness.pct(e2e, 50), "e2e_p99_s": harness.pct(e2e, 99),
        "ttft_p50_ms": harness.pct(ttft, 50) * 1e3, "ttft_p99_ms": harness.pct(ttft, 99) * 1e3,
        "max_fire_lag_ms": max((r.lag for r in results), default=0.0) * 1e3,
    }
    for key in ("e2e_p50_s", "e2e_p99_s"):
        out[key + "_lower_bound"] = bool(out[key] >= floor)
    share: Counter[str] = Counter(r.backend or "?" for r in results)
    out["share"] = {b: share.get(b, 0) / max(1, len(results)) for b in (*BACKENDS, "?") if share.get(b) or b != "?"}
    kinds: dict[str, dict[str, Any]] = {}
    for kind in (k for k, *_ in MIX):
        rs = [r for r in results if r.kind == kind]
        kinds[kind] = {"requests": len(rs), "on": dict(Counter(r.backend or "?" for r in rs)),
                       "e2e_p50_s": harness.pct([r.e2e for r in rs if r.error is None and r.e2e is not None], 50)}
    out["by_kind"] = kinds
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    out["cached_tokens_mean"] = statistics.fmean(cached) if cached else None
    return out


class Cell:
    """One policy: its proxy (kept for the whole benchmark), its warm-up, its runs per load."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.proxy: harness.Proc | None = None
        self.port = 0
        self.warmup: dict[str, Any] = {}
        self.runs: dict[float, list[dict[str, Any]]] = defaultdict(list)
        self.raw: dict[float, list[list[Result]]] = defaultdict(list)
        self.learned: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


def measure_run(c: Cell, servers: Servers, reqs: list[Req], load: float, seed: int, drain_cap: float,
                problems: list[str]) -> dict[str, Any]:
    assert c.proxy is not None
    tag = f"L{round(100 * load)}-s{seed}-{c.policy}"
    ticks0 = (c.proxy.cpu_ticks(), servers.cpu_ticks(), harness.self_cpu_ticks(), harness.machine_ticks()[0])
    t0 = time.monotonic()
    r = harness.run_async(run_load(c.url, reqs, tag, drain_cap))
    wall = time.monotonic() - t0
    ticks1 = (c.proxy.cpu_ticks(), servers.cpu_ticks(), harness.self_cpu_ticks(), harness.machine_ticks()[0])
    s = summarize(r["results"])
    cpu = {k: 100.0 * (b - a) / harness.CLK_TCK / wall
           for k, a, b in zip(("proxy", "servers", "client", "machine"), ticks0, ticks1)}
    cpu["other"] = max(0.0, cpu["machine"] - cpu["proxy"] - cpu["servers"] - cpu["client"])
    s.update(seed=seed, load=load, wall_s=wall, window_s=r["window_s"], span_s=r["span_s"], cpu_pct=cpu,
             contended=cpu["other"] > OTHER_CPU_LIMIT)
    if s["contended"]:
        problems.append(f"{tag}: other processes used {cpu['other']:.0f}% of a core during the run")
    if s["errors"]:
        problems.append(f"{tag}: {s['errors']} errors {s['error_kinds']}")
    learned = admin_backends(c.port)
    c.learned.append({"after": tag, "backends": learned})
    s["learned"] = learned
    s["detail"] = {"fields": ["request_id", "kind", "backend", "words", "max_tokens", "prompt_tokens",
                              "completion_tokens", "cached_tokens", "scheduled_s", "ttft_s", "e2e_s", "error",
                              "unfinished", "server_prompt_ms", "server_predicted_ms"],
                   "rows": [[x.rid, x.kind, x.backend, x.words, x.max_tokens, x.prompt_tokens, x.completion_tokens,
                             x.cached_tokens, round(x.scheduled, 3), _r(x.ttft), _r(x.e2e), x.error, x.unfinished,
                             (x.timings or {}).get("prompt_ms"), (x.timings or {}).get("predicted_ms")]
                            for x in r["results"]]}
    c.runs[load].append(s)
    c.raw[load].append(r["results"])
    share = " ".join(f"{b} {100 * v:.0f}%" for b, v in s["share"].items())
    print(f"    {tag:<22} {len(reqs)} req in {r['window_s']:.0f}s, wall {wall:4.0f}s  p50 {_sec(s, 'e2e_p50_s')}  "
          f"p99 {_sec(s, 'e2e_p99_s')}  ttft p50/p99 {s['ttft_p50_ms']:.0f}/{s['ttft_p99_ms']:.0f} ms  "
          f"err {s['errors']} unfin {s['unfinished']}  {share}  cpu% proxy {cpu['proxy']:.0f} "
          f"servers {cpu['servers']:.0f} client {cpu['client']:.0f} other {cpu['other']:.0f}", flush=True)
    return s


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _sec(d: dict[str, Any], key: str) -> str:
    v = d[key]
    if v != v:
        return "-"
    return (">" if d.get(key + "_lower_bound") else "") + f"{v:.2f}s"


# ---------------------------------------------------------------------------------------------------
# report


def print_speeds(title: str, table: dict[str, dict[str, dict[str, Any]]]) -> None:
    print(f"\n{title}")
    print(f"  {'server':<6} {'n':>2}  {'decode tok/s':>12}  {'(client)':>9}  {'x n':>7}  {'prefill tok/s':>13}  "
          f"{'(client)':>9}  {'TTFT ms':>8}  {'e2e s':>6}  {'prompt':>6}  {'cached':>6}")
    for b, by_n in table.items():
        for n, s in by_n.items():
            print(f"  {b:<6} {n:>2}  {s['decode_tps']:12.1f}  {s['client_decode_tps']:9.1f}  "
                  f"{s['aggregate_decode_tps']:7.0f}  {s['prefill_tps']:13.0f}  {s['client_prefill_tps']:9.0f}  "
                  f"{s['ttft_ms']:8.0f}  {s['e2e_s']:6.2f}  {s['prompt_tokens']:6.0f}  {s['cached_tokens']:6.0f}")


HEADER = ["load", "policy", "p50 e2e", "p99 e2e", "p50 ttft", "p99 ttft", "errors", "unfinished", "share fast/slow",
          "long on fast"]


def table_rows(cells: list[Cell], loads: list[float]) -> list[list[str]]:
    rows = []
    for load in loads:
        for c in cells:
            runs = c.runs.get(load)
            if not runs:
                continue
            m = {k: harness.med([r[k] for r in runs]) for k in ("e2e_p50_s", "e2e_p99_s", "ttft_p50_ms",
                                                                  "ttft_p99_ms")}
            for k in ("e2e_p50_s", "e2e_p99_s"):
                m[k + "_lower_bound"] = sum(r[k + "_lower_bound"] for r in runs) * 2 >= len(runs)
            share = "/".join(f"{100 * statistics.fmean(r['share'].get(b, 0.0) for r in runs):.0f}" for b in BACKENDS)
            long_fast = [r["by_kind"]["long"]["on"].get("fast", 0) / r["by_kind"]["long"]["requests"]
                         for r in runs if r["by_kind"]["long"]["requests"]]
            mark = "*" if any(r["contended"] for r in runs) else ""
            rows.append([f"{100 * load:.0f}% x{len(runs)}", c.policy + mark, _sec(m, "e2e_p50_s"),
                         _sec(m, "e2e_p99_s"), f"{m['ttft_p50_ms']:.0f}ms", f"{m['ttft_p99_ms']:.0f}ms",
                         str(sum(r["errors"] for r in runs)), str(sum(r["unfinished"] for r in runs)), share,
                         f"{100 * statistics.fmean(long_fast):.0f}%" if long_fast else "-"])
    return rows


def print_table(title: str, rows: list[list[str]]) -> None:
    harness.print_aligned(title, HEADER, rows)
    if any(r[1].endswith("*") for r in rows):
        print(f"* other processes used more than {OTHER_CPU_LIMIT:g}% of a core during at least one run (see problems)")


def ratios(cells: list[Cell], load: float) -> dict[str, Any] | None:
    a = next((c for c in cells if c.policy == "least_cost"), None)
    b = next((c for c in cells if c.policy == "least_conn"), None)
    if a is None or b is None or not a.runs.get(load) or not b.runs.get(load):
        return None
    out: dict[str, Any] = {}
    for key in ("e2e_p99_s", "e2e_p50_s", "ttft_p99_ms"):
        per = [x[key] / y[key] for x, y in zip(a.runs[load], b.runs[load])]
        pooled_a = summarize([r for rs in a.raw[load] for r in rs])[key]
        pooled_b = summarize([r for rs in b.raw[load] for r in rs])[key]
        out[key] = {"per_seed": per, "median": harness.med(per), "pooled": pooled_a / pooled_b,
                    "lower_bounds": [x[key + "_lower_bound"] or y[key + "_lower_bound"]
                                     for x, y in zip(a.runs[load], b.runs[load])] if key.startswith("e2e") else []}
    return out


def print_ratios(cells: list[Cell], loads: list[float]) -> dict[str, Any]:
    print("\nleast_cost / least_conn (per seed; `pooled`: the percentile of all seeds' requests together):")
    out = {}
    for load in loads:
        r = ratios(cells, load)
        if r is None:
            continue
        out[str(load)] = r
        p99, p50, t99 = r["e2e_p99_s"], r["e2e_p50_s"], r["ttft_p99_ms"]
        verdict = ""
        if abs(load - 0.7) < 1e-9:
            met = all(x <= TARGETS["p99_ratio_at_70"] for x in p99["per_seed"]) and all(
                x <= TARGETS["p50_ratio_at_70"] for x in p50["per_seed"])
            verdict = (f"   target: p99 <= {TARGETS['p99_ratio_at_70']:g} and p50 <= {TARGETS['p50_ratio_at_70']:g} "
                       f"in every seed: {'met' if met else 'MISSED'}")
        print(f"  {100 * load:.0f}%: p99 e2e {', '.join(f'{x:.2f}' for x in p99['per_seed'])} (pooled "
              f"{p99['pooled']:.2f}); p50 e2e {', '.join(f'{x:.2f}' for x in p50['per_seed'])} (pooled "
              f"{p50['pooled']:.2f}); p99 TTFT {', '.join(f'{x:.2f}' for x in t99['per_seed'])}{verdict}")
        if any(p99["lower_bounds"]):
            print("        (some p99s are lower bounds: requests were still unfinished at the drain cap)")
    return out


def learned_vs_measured(cells: list[Cell], alone: dict[str, Any], both: dict[str, Any]) -> list[dict[str, Any]]:
    """The last /admin/backends of each policy's proxy next to the measured speeds at the same in-flight count."""
    rows = []
    for c in cells:
        if not c.learned:
            continue
        last = c.learned[-1]
        for b in BACKENDS:
            got = last["backends"].get(b, {})
            for what in ("decode", "prefill"):
                curve: dict[str, float] = {}
                if isinstance(got.get(f"{what}_tps_by_inflight"), dict):
                    curve = {str(k): float(v) for k, v in got[f"{what}_tps_by_inflight"].items()}
                if f"{what}_tps" in got and "1" not in curve:
                    curve = {"1": float(got[f"{what}_tps"]), **curve}  # the flat speed: one request alone
                for n, v in sorted(curve.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 99):
                    a = alone.get(b, {}).get(n, {}).get(f"{what}_tps")
                    bb = both.get(b, {}).get(n, {}).get(f"{what}_tps")
                    rows.append({"policy": c.policy, "backend": b, "what": what, "inflight": n, "learned": v,
                                 "alone": a, "both_busy": bb,
                                 "ratio_alone": v / a if a else None, "ratio_both_busy": v / bb if bb else None,
                                 "flat": f"{what}_tps_by_inflight" not in got, "after": last["after"],
                                 "learned_from": got.get("learned_from")})
    return rows


def print_learned(rows: list[dict[str, Any]], cells: list[Cell]) -> None:
    print("\nlearned (proxy GET /admin/backends after its last run) vs measured (llama.cpp timings, medians), "
          "tokens/s per request:")
    if not rows:
        print("  nothing learned")
        return
    flat = any(r["flat"] for r in rows)
    keys = sorted({k for c in cells for snap in c.learned[-1:] for b in snap["backends"].values()
                   for k in b if "tps" in k} | {k for c in cells for snap in c.learned[-1:]
                                                for b in snap["backends"].values() for k in b["other_speed_keys"]})
    print(f"  (speed fields this proxy exposes: {', '.join(keys) or 'none'})")
    lim = TARGETS["learned_within"]
    print(f"  {'policy':<12} {'backend':<7} {'what':<8} {'n':>2}  {'learned':>8}  {'alone':>8}  {'ratio':>6}  "
          f"{'both busy':>9}  {'ratio':>6}  within {100 * lim:.0f}% of alone")
    for r in rows:
        ra, rb = r["ratio_alone"], r["ratio_both_busy"]
        ok = "-" if ra is None else ("yes" if abs(ra - 1) <= lim else "NO")
        print(f"  {r['policy']:<12} {r['backend']:<7} {r['what']:<8} {r['inflight']:>2}  {r['learned']:8.1f}  "
              f"{_f(r['alone'], 8)}  {_f(ra, 6, 2)}  {_f(r['both_busy'], 9)}  {_f(rb, 6, 2)}  {ok}")
    if flat:
        print("  (this proxy learns one speed per backend, shown at n=1: no `*_tps_by_inflight` maps yet)")


def _f(v: float | None, w: int, nd: int = 1) -> str:
    return "-".rjust(w) if v is None or v != v else f"{v:{w}.{nd}f}"


# ---------------------------------------------------------------------------------------------------


def debug_chunks(servers: Servers) -> dict[str, Any]:
    """One short streaming request straight to each server: its usage/timings chunks, verbatim."""
    out: dict[str, Any] = {}

    async def go() -> None:
        async with new_session(keep_alive=False) as session:
            for b in BACKENDS:
                r = Result(f"debug-{b}", "debug", 20, 8)
                await fire(session, servers.url(b) + "/v1/chat/completions", body(r.rid, 20, 8), r, {}, {})
                out[b] = {"error": r.error, "final_chunks": r.final_chunks, "completion_tokens": r.completion_tokens}

    harness.run_async(go())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", default="0.5,0.7", help="fractions of the pair's capacity (default 0.5,0.7)")
    ap.add_argument("--seeds", default="1,3",
                    help="runs per policy at each load: one number for all, or one per load (default 1,3)")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated subset of {POLICIES}")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run (default 40)")
    ap.add_argument("--drain-cap", type=float, default=30.0,
                    help="seconds to wait after the last arrival before cancelling what is left (default 30)")
    ap.add_argument("--warmup", type=int, default=WARMUP_REQUESTS,
                    help=f"warm-up requests per proxy at {100 * WARMUP_LOAD:.0f}%% load (default {WARMUP_REQUESTS})")
    ap.add_argument("--alone-rounds", type=int, default=5,
                    help="rounds per server and n when measuring alone (default 5: single rounds vary by ~20%%)")
    ap.add_argument("--busy-window", type=float, default=6.0,
                    help="seconds per n of the both-busy measurement (default 6)")
    ap.add_argument("--capacity", type=float, default=None,
                    help="the pair's capacity in requests/s: skips measuring it (pin it to compare invocations)")
    ap.add_argument("--capacity-window", type=float, default=25.0,
                    help="seconds of the closed-loop capacity measurement (default 25)")
    ap.add_argument("--quick", action="store_true", help="70%% only, one seed, 20 s runs, 1 alone round: smoke run")
    ap.add_argument("--proxy-ref", default=None,
                    help="run the proxy from `git archive REF proxy` (e.g. HEAD) instead of the work tree")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra llama-server argument (repeatable, e.g. --server-arg=--threads-http --server-arg=2)")
    ap.add_argument("--debug-chunk", action="store_true", help="print llama.cpp's last stream chunks verbatim")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the process logs")
    args = ap.parse_args(argv)
    if args.quick:
        args.loads, args.seeds, args.duration, args.alone_rounds, args.warmup = "0.7", "1", 20.0, 1, 15
        args.busy_window, args.capacity_window = 3.0, 10.0
    loads = [float(x) for x in args.loads.split(",") if x.strip()]
    seeds_list = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    if len(seeds_list) == 1:
        seeds_list = seeds_list * len(loads)
    if len(seeds_list) != len(loads) or any(s < 1 for s in seeds_list):
        ap.error("--seeds: one positive number, or one per load")
    seeds = dict(zip(loads, seeds_list))
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r}")
    if not loads or any(not 0 < x < 2 for x in loads):
        ap.error("loads must be in (0, 2)")
    harness.raise_nofile(8192)

    binary = llama_build.build()
    models = llama_build.ensure_models()
    build = llama_build.build_info()
    print(f"llama-server: {binary} (llama-cpp-python {llama_build.LLAMA_CPP_PYTHON_VERSION}; built in "
          f"{build.get('build_seconds', '?')} s)")
    for name, info in models.items():
        s = info["spec"]
        print(f"model {name}: {info['params'] / 1e6:.1f} M parameters (F16, {info['bytes'] / 2**20:.0f} MiB), "
              f"embd {s['n_embd']}, {s['n_layer']} layers, ff {s['n_ff']}, vocab {info['n_vocab']}")

    started = dt.datetime.now(dt.timezone.utc)
    t_begin = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="splitstream-real-"))
    problems: list[str] = []
    cells = [Cell(p) for p in policies]
    speeds: dict[str, Any] = {}
    cap: dict[str, Any] = {}
    chunks: dict[str, Any] = {}
    tree: tuple[dict[str, str], list[str], str] = ({}, [], "work tree")
    loadavg0 = runinfo.loadavg()
    server_args: dict[str, list[str]] = {}
    with harness.reported_session(tmp, args.keep_logs, problems) as session:
        tree = proxy_tree(args.proxy_ref, tmp)
        print(f"proxy: {tree[2]}", flush=True)
        servers = Servers(tmp, binary, models, args.server_arg)
        server_args = servers.args
        try:
            chunks = debug_chunks(servers)
            for b, d in chunks.items():
                if d["error"]:
                    raise harness.BenchError(f"sanity request to llama-server {b}: {d['error']}")
                if args.debug_chunk:
                    print(f"\nllama-server {b}: last stream chunks (verbatim):")
                    for ln in d["final_chunks"]:
                        print(f"  {ln}")
            t0 = time.monotonic()
            print(f"measuring each server directly: n = 1..{PARALLEL}, {args.alone_rounds} round(s) alone, then "
                  f"both busy for {args.busy_window:g} s per n ...", flush=True)
            raw = harness.run_async(measure_alone(servers, args.alone_rounds, args.busy_window))
            servers.check()
            speeds = {"alone": speed_table(raw["alone"]), "both_busy": speed_table(raw["both_busy"])}
            bad = [f"{b} n={n}: {s['errors']} of {s['requests']}" for kind in speeds.values()
                   for b, by_n in kind.items() for n, s in by_n.items() if s["errors"]]
            errs = Counter(r.error for kind in raw.values() for by_n in kind.values() for rs in by_n.values()
                           for r in rs if r.error)
            if bad:
                raise harness.BenchError(f"direct requests failed ({'; '.join(bad)}): {dict(errs)}")
            tpw = tokens_per_word(raw["alone"])
            model_cap = capacity(speeds["both_busy"], tpw)
            speeds["tokens_per_word"] = tpw
            speeds["seconds"] = time.monotonic() - t0
            print_speeds("measured alone (one server at a time), medians per request:", speeds["alone"])
            print_speeds("measured both busy (each server at n while the other also runs n):", speeds["both_busy"])
            mm = mix_means()
            kinds = ", ".join(f"{100 * sh:.0f}% {k} ({w[0]}-{w[1]} words, {t[0]}-{t[1]} tokens)"
                              for k, sh, w, t in MIX)
            print(f"\nworkload: {kinds}; {tpw:.2f} prompt tokens per word: mean prompt "
                  f"~{mm['prompt_words'] * tpw + TEMPLATE_TOKENS:.0f} tokens, mean answer "
                  f"{mm['completion_tokens']:.0f} tokens")
            print(f"capacity from the both-busy speeds at n={PARALLEL}: {model_cap['rps']:.2f} req/s ("
                  + ", ".join(f"{b} {v['rps']:.2f} req/s, {v['mean_service_s']:.2f} s per request"
                              for b, v in model_cap["backends"].items()) + ")", flush=True)
            if args.capacity is not None:
                cap = {"rps": args.capacity, "source": "--capacity", "model": model_cap}
                print(f"capacity: {args.capacity:g} req/s (--capacity)")
            else:
                measured = harness.run_async(measure_capacity(servers, args.capacity_window))
                servers.check()
                if any(v["errors"] for v in measured["backends"].values()):
                    raise harness.BenchError(f"capacity measurement: requests failed: {measured}")
                cap = {"rps": measured["rps"], "source": "measured", "measured": measured, "model": model_cap}
                print(f"capacity measured ({PARALLEL} closed-loop streams of the mix per server, both at once, "
                      f"{args.capacity_window:g} s): {measured['rps']:.2f} req/s ("
                      + ", ".join(f"{b} {v['rps']:.2f} ({v['completed_in_window']} done, {v['long']} long)"
                                  for b, v in measured["backends"].items())
                      + f"); pin it with --capacity {measured['rps']:.2f} to compare invocations", flush=True)

            for c in cells:
                c.proxy, c.port = start_proxy(tmp, c.policy, servers, tree)
            warm = schedule(WARMUP_LOAD * cap["rps"], 0.0, 424242, limit=args.warmup)
            for c in cells:
                t0 = time.monotonic()
                r = harness.run_async(run_load(c.url, warm, f"warm-{c.policy}", 60.0))
                c.warmup = summarize(r["results"]) | {"wall_s": time.monotonic() - t0}
                c.learned.append({"after": "warm-up", "backends": admin_backends(c.port)})
                bad_warm = c.warmup["errors"] + c.warmup["unfinished"]
                print(f"  warm-up {c.policy:<12} {len(warm)} requests in {c.warmup['wall_s']:.0f} s, "
                      f"errors {c.warmup['errors']}, unfinished {c.warmup['unfinished']}", flush=True)
                if bad_warm > 0.5 * len(warm):
                    raise harness.BenchError(f"warm-up through the {c.policy} proxy failed: {c.warmup['error_kinds']}")
            for load in loads:
                rate = load * cap["rps"]
                print(f"  [{100 * load:.0f}%] {rate:.2f} req/s offered, {args.duration:g} s per run, "
                      f"{seeds[load]} seed(s)", flush=True)
                for seed in range(1, seeds[load] + 1):
                    reqs = schedule(rate, args.duration, seed)
                    k = (seed - 1) % len(cells)
                    for c in cells[k:] + cells[:k]:
                        time.sleep(0.5)
                        servers.check()
                        assert c.proxy is not None
                        c.proxy.check()
                        measure_run(c, servers, reqs, load, seed, args.drain_cap, problems)
        finally:
            for c in cells:
                if c.proxy is not None:
                    c.proxy.stop()
            servers.close()
    status = session.status
    wall = time.monotonic() - t_begin

    rows = table_rows(cells, loads)
    ratio_doc: dict[str, Any] = {}
    learned_rows: list[dict[str, Any]] = []
    if rows:
        print_table(f"two llama-servers (fast/slow), capacity {cap.get('rps', float('nan')):.2f} req/s; medians over "
                    f"seeds; proxy: {tree[2]}", rows)
        ratio_doc = print_ratios(cells, loads)
        learned_rows = learned_vs_measured(cells, speeds.get("alone", {}), speeds.get("both_busy", {}))
        print_learned(learned_rows, cells)
    if problems:
        print("\nproblems:")
        for p in problems:
            print(f"  - {p}")
    print(f"\nwall time {wall:.0f} s")

    if speeds:
        machine = runinfo.machine_info("python")
        machine["loadavg_start"] = loadavg0
        machine["loadavg_end"] = runinfo.loadavg()
        runinfo.write_results("real_runtime", started, wall, status == 0, {
            "args": vars(args) | {"loads": loads, "seeds": seeds, "policies": policies},
            "machine": machine,
            "proxy": tree[2],
            "llama_cpp": {"llama_cpp_python": llama_build.LLAMA_CPP_PYTHON_VERSION, "build": build,
                          "server_args": server_args},
            "models": models,
            "workload": {"mix": MIX, "alone_size": [ALONE_WORDS, ALONE_MAX_TOKENS], "means": mix_means(),
                         "warmup": {"requests": args.warmup, "load": WARMUP_LOAD}},
            "final_stream_chunks": chunks,
            "measured": speeds,
            "capacity": cap,
            "targets": TARGETS,
            "table": [dict(zip(HEADER, r)) for r in rows],
            "ratios_least_cost_over_least_conn": ratio_doc,
            "learned_vs_measured": learned_rows,
            "cells": [{"policy": c.policy, "warmup": c.warmup, "learned": c.learned,
                       "runs": {str(k): v for k, v in c.runs.items()}} for c in cells],
            "problems": problems,
        })
    return status


if __name__ == "__main__":
    sys.exit(main())
