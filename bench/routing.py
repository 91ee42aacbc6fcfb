#!/usr/bin/env python3
"""Routing benchmark: round_robin vs least_conn vs least_cost over simulated runtimes of different speeds.

Three simulated runtimes (fast 1x, mid 0.5x, slow 0.25x: per-stream decode speed, prefill speed and batch
size differ), each its own subprocess; one `python -m proxy serve` subprocess per (policy, load) with one
pool of the three and `balance: <policy>`; this script is the load client (aiohttp, asyncio) and never runs
inside the proxy's or a runtime's process.

Workload: heavy-tailed streaming chat completions: prompt length lognormal (median ~400 characters, capped at
16k), max_tokens from a mix (70% short, 25% medium, 5% long, scaled by --token-scale, default 0.25 so that
the default run fits ~4 minutes on 2 cores), open-loop Poisson arrivals at given fractions of the pool's
analytic capacity. Every request is fired at its scheduled time whatever happened to the earlier ones. Each
proxy gets the same warm-up first (least_cost learns backend speeds from completed requests); then, per load,
the runs alternate between the policies' proxies seed by seed, so intermittent foreign CPU load (measured
per run from /proc/stat and reported) hits all policies alike. A run waits for its requests up to --drain-cap
seconds after the last arrival; requests still running then are cancelled and counted as `unfinished`, with
their elapsed time as a lower bound of their latency (a percentile reached by such a value prints as `>x`).

The proxy's access log (JSON lines on stderr, one per request, tagged with our X-Request-Id) tells which
backend served each request; GET /admin/backends after the warm-up and after every run shows what least_cost
believed about each backend's speed.

`--workload multiturn,noshare` (or `prefix`) runs the prefix-cache scenario instead (bench/routing_prefix.py):
multi-turn conversations and shared system prompts on four equal runtimes with prefix caches.

    .venv/bin/python bench/routing.py                 # 3 seeds x 3 loads x 3 policies + homogeneous, ~3.5 min
    .venv/bin/python bench/routing.py --quick         # 1 seed, fewer requests: smoke run
    .venv/bin/python bench/routing.py --loads 0.8 --policies least_conn,least_cost --seeds 5
    .venv/bin/python bench/routing.py --workload prefix          # multiturn at 50/80 % + noshare at 80 %, ~10 min
    .venv/bin/python bench/routing.py --workload prefix --quick  # smoke run, ~2 min

Numbers, not pass/fail: the exit status is non-zero only when the harness could not measure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import json
import math
import random
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
import runinfo  # noqa: E402

MODEL = "sim-model"
POLICIES = ("round_robin", "least_conn", "least_cost")
TTFT_MS = 20.0


@dataclass(frozen=True)
class BackendSpec:
    name: str
    tokens_per_second: float  # decode speed per running request
    prefill_tokens_per_second: float
    max_batch: int
    ttft_ms: float = TTFT_MS
    cache_tokens: int = 0  # the runtime's prefix cache (SimConfig.prefix_cache_tokens), told to the proxy too
    batch_slowdown: float = 0.0  # per-token time x (1 + s (running - 1)) (SimConfig.batch_slowdown)
    block_tokens: int = 16  # SimConfig.prefix_block_tokens


HETERO = (
    BackendSpec("fast", 200.0, 20000.0, 8),
    BackendSpec("mid", 100.0, 10000.0, 8),
    BackendSpec("slow", 50.0, 5000.0, 4),
)
HOMO = tuple(BackendSpec(f"fast{i}", 200.0, 20000.0, 8) for i in (1, 2, 3))

# Workload. max_tokens: (share, low, high) drawn uniformly, then multiplied by --token-scale.
MAX_TOKENS_MIX = ((0.70, 16, 64), (0.25, 128, 256), (0.05, 512, 1024))
PROMPT_MEDIAN_CHARS = 400.0
PROMPT_SIGMA = 1.2  # lognormal shape: ~0.1% of draws would pass 16k characters (they are capped)
PROMPT_MIN_CHARS, PROMPT_MAX_CHARS = 20, 16000
WARMUP_REQUESTS = 30
WARMUP_LOAD = 0.3
WARMUP_SEED = 424242
CALIBRATION_TOKENS = 64
OTHER_CPU_LIMIT = 30.0  # % of one core used by other processes during a run before it is marked contended
FILLER = ("the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches " * 200)

TARGETS = {"hetero_80_least_cost_over_least_conn_p99": 0.7, "hetero_80_least_cost_over_round_robin_p99": 0.5,
           "homo_80_least_cost_over_least_conn_p99": 1.0}


# ---------------------------------------------------------------------------------------------------
# workload


@dataclass(frozen=True)
class Req:
    offset: float  # seconds after the run's start
    prompt_chars: int
    max_tokens: int


def draw_max_tokens(rng: random.Random, scale: float) -> int:
    u = rng.random()
    for share, lo, hi in MAX_TOKENS_MIX:
        if u < share:
            break
        u -= share
    return max(1, round(rng.randint(lo, hi) * scale))


def draw_prompt_chars(rng: random.Random) -> int:
    chars = PROMPT_MEDIAN_CHARS * math.exp(rng.gauss(0.0, PROMPT_SIGMA))
    return int(min(PROMPT_MAX_CHARS, max(PROMPT_MIN_CHARS, chars)))


def schedule(n: int, rate: float, seed: int, token_scale: float, max_tokens_cap: int | None = None,
             max_window: float | None = None) -> list[Req]:
    """n Poisson arrivals at `rate` req/s (cut at max_window seconds), each with a prompt length and max_tokens."""
    arrivals = random.Random(f"arrivals-{seed}")
    sizes = random.Random(f"sizes-{seed}")  # separate streams: the same seed gives the same requests at any load
    t = 0.0
    out = []
    for _ in range(n):
        t += arrivals.expovariate(rate)
        if max_window is not None and t > max_window:
            break
        chars = draw_prompt_chars(sizes)
        mt = draw_max_tokens(sizes, token_scale)
        if max_tokens_cap is not None:
            mt = min(mt, max_tokens_cap)
        out.append(Req(t, chars, mt))
    return out


def body_for(req: Req, uid: str) -> bytes:
    """The prompt starts with `uid` (then filler) so that no two requests share a prefix: a prefix-aware
    balancer must not see the whole workload as one shared prompt. Its length is prompt_chars all the same."""
    reps = req.prompt_chars // len(FILLER) + 1
    text = (f"[{uid}] " + FILLER * reps)[: req.prompt_chars]
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}],
                       "max_tokens": req.max_tokens, "stream": True}, separators=(",", ":")).encode()


def sim_prompt_tokens(chars: int) -> int:
    return max(1, chars // 4) + 4  # proxy/sim/runtime.py: _chat_prompt_tokens for one message


def workload_moments(token_scale: float, samples: int = 200_000) -> dict[str, float]:
    rng = random.Random(7)
    chars = [draw_prompt_chars(rng) for _ in range(samples)]
    mts = [draw_max_tokens(rng, token_scale) for _ in range(samples)]
    return {
        "mean_prompt_chars": statistics.fmean(chars),
        "median_prompt_chars": statistics.median(chars),
        "p99_prompt_chars": sorted(chars)[int(0.99 * samples)],
        "mean_prompt_tokens": statistics.fmean(sim_prompt_tokens(c) for c in chars),
        "mean_completion_tokens": statistics.fmean(mts),
        "p95_completion_tokens": sorted(mts)[int(0.95 * samples)],
    }


def capacity(specs: tuple[BackendSpec, ...], moments: dict[str, float]) -> dict[str, Any]:
    """Requests/s the pool sustains: per backend max_batch / mean time a request holds a batch slot.

    The sim holds a slot for ttft + prompt/prefill speed (the first token) and then (n - 1) gaps of
    1/tokens_per_second, and its per-stream speed does not depend on how many run at once."""
    per: dict[str, Any] = {}
    for s in specs:
        service = (s.ttft_ms / 1e3 + moments["mean_prompt_tokens"] / s.prefill_tokens_per_second
                   + (moments["mean_completion_tokens"] - 1) / s.tokens_per_second)
        per[s.name] = {"mean_service_s": service, "rps": s.max_batch / service,
                       "naive_rps": s.max_batch * s.tokens_per_second / moments["mean_completion_tokens"]}
    return {"backends": per, "rps": sum(p["rps"] for p in per.values()),
            "naive_rps": sum(p["naive_rps"] for p in per.values())}


# ---------------------------------------------------------------------------------------------------
# processes


def sim_main(argv: list[str]) -> int:
    """`routing.py _sim ...`: one simulated runtime in this process (the CLI has no prefill-speed flag)."""
    p = argparse.ArgumentParser(prog="routing.py _sim")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tps", type=float, required=True)
    p.add_argument("--prefill", type=float, required=True)
    p.add_argument("--ttft-ms", type=float, required=True)
    p.add_argument("--max-batch", type=int, required=True)
    p.add_argument("--cache-tokens", type=int, default=0)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--batch-slowdown", type=float, default=0.0)
    p.add_argument("--report-timings", action="store_true")
    a = p.parse_args(argv)
    import uvloop

    from proxy.sim.runtime import SimConfig, serve

    wanted: dict[str, Any] = {}
    if a.cache_tokens:
        wanted.update(prefix_cache_tokens=a.cache_tokens, prefix_block_tokens=a.block_tokens)
    if a.batch_slowdown:
        wanted["batch_slowdown"] = a.batch_slowdown
    if a.report_timings:
        wanted["report_timings"] = True
    known = sim_fields()
    missing = sorted(k for k in wanted if k not in known)
    if missing:
        print(f"routing.py _sim: SimConfig has no {', '.join(missing)}: running without", file=sys.stderr, flush=True)
    config = SimConfig(models=(MODEL,), tokens_per_second=a.tps, ttft_ms=a.ttft_ms,
                       prefill_tokens_per_second=a.prefill, max_batch=a.max_batch,
                       **{k: v for k, v in wanted.items() if k in known})

    async def run() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.ensure_future(serve(config, "127.0.0.1", a.port))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        failed = task.done() and not task.cancelled() and task.exception() is not None
        for t in (task, stopper):
            t.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)
        return 1 if failed else 0

    return uvloop.run(run())


def sim_fields() -> set[str]:
    """The fields SimConfig has in this tree (the prefix cache and batch slowdown may not have landed)."""
    from proxy.sim.runtime import SimConfig

    return {f.name for f in dataclasses.fields(SimConfig)}


class Sims(harness.ProcGroup):
    def __init__(self, tmp: Path, label: str, specs: tuple[BackendSpec, ...], report_timings: bool = False) -> None:
        self.specs = specs
        super().__init__()
        self.ports = {s.name: harness.free_port() for s in specs}
        try:
            for s in specs:
                extra = []
                if s.cache_tokens:
                    extra += ["--cache-tokens", str(s.cache_tokens), "--block-tokens", str(s.block_tokens)]
                if s.batch_slowdown:
                    extra += ["--batch-slowdown", str(s.batch_slowdown)]
                if report_timings:
                    extra.append("--report-timings")
                self.procs[s.name] = harness.Proc(f"{label}-sim-{s.name}", [
                    sys.executable, str(Path(__file__).resolve()), "_sim", "--port", str(self.ports[s.name]),
                    "--tps", str(s.tokens_per_second), "--prefill", str(s.prefill_tokens_per_second),
                    "--ttft-ms", str(s.ttft_ms), "--max-batch", str(s.max_batch), *extra], tmp)
            for s in specs:
                harness.wait_ready(self.procs[s.name], f"http://127.0.0.1:{self.ports[s.name]}/health")
        except BaseException:
            self.close()
            raise


def rules_text(sims: Sims, balance: str, cache_tokens: bool = False) -> str:
    """One pool of the runtimes; `balance` is YAML (a policy name or a flow mapping); `cache_tokens`: tell the
    proxy each runtime's prefix-cache size."""
    # `concurrency` tells the proxy each runtime's batch size, as an operator would (only least_cost uses it).
    backends = "\n".join(
        f'  {s.name}: {{url: "{sims.url(s.name)}", kind: vllm, concurrency: {s.max_batch}'
        + (f", cache_tokens: {s.cache_tokens}" if cache_tokens and s.cache_tokens else "") + "}"
        for s in sims.specs)
    return f"""\
server: {{max_inflight: 100000}}
backends:
{backends}
pools:
  p: {{backends: [{", ".join(s.name for s in sims.specs)}], model: "{MODEL}"}}
routes:
  - name: bench
    match: {{model: "{MODEL}"}}
    pool: p
    balance: {balance}
    timeouts: {{total: 10m, first_token: 5m, queue: 5m}}
"""


_CHECKED: dict[str, list[str]] = {}  # rules text with the runtimes' ports masked -> the loader's errors


def check_rules(tmp: Path, text: str) -> list[str]:
    """`python -m proxy check` on one rules text: [] when the loader takes it, else its error lines. Cached by
    the text with ports masked, so each form of rule is checked once per session."""
    import re
    import subprocess

    key = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    if key in _CHECKED:
        return _CHECKED[key]
    d = Path(tempfile.mkdtemp(prefix="check-", dir=tmp))
    (d / "bench.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "proxy", "check", str(d)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    errors = [] if proc.returncode == 0 else [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0 and not errors:
        errors = [f"exit status {proc.returncode}"]
    _CHECKED[key] = errors
    return errors


def start_proxy(tmp: Path, label: str, sims: Sims, policy: str, text: str | None = None) -> tuple[harness.Proc, int]:
    """A proxy on `text` (default: the plain `balance: <policy>` rules), ready."""
    d = tmp / label
    d.mkdir()
    port = harness.free_port()
    (d / "bench.yaml").write_text(rules_text(sims, policy) if text is None else text)
    proc = harness.Proc(f"{label}-proxy", [sys.executable, "-m", "proxy", "serve", "--rules", str(d), "--host",
                                      "127.0.0.1", "--port", str(port), "--no-watch"], tmp)
    try:
        harness.wait_ready(proc, f"http://127.0.0.1:{port}/healthz")
        harness.wait_ready(proc, f"http://127.0.0.1:{port}/readyz")
    except BaseException:
        proc.stop()
        raise
    return proc, port


# ---------------------------------------------------------------------------------------------------
# load


@dataclass
class Result:
    rid: str
    max_tokens: int
    prompt_chars: int
    scheduled: float  # offset in the run
    lag: float = 0.0  # fired this late (s)
    ttft: float | None = None
    e2e: float | None = None
    error: str | None = None
    unfinished: bool = False  # cancelled at the drain cap; e2e then is a lower bound


async def _fire(session: aiohttp.ClientSession, url: str, body: bytes, res: Result, sem: asyncio.Semaphore,
                started: dict[str, float]) -> None:
    async with sem:
        t0 = time.perf_counter()
        started[res.rid] = t0
        done = False
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json",
                                                             "X-Request-Id": res.rid,
                                                             "X-Conversation-Id": res.rid}) as resp:
                if resp.status != 200:
                    await resp.read()
                    res.error = f"HTTP {resp.status}"
                    return
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        if res.ttft is None:
                            res.ttft = time.perf_counter() - t0
                        if line.startswith(b"data: [DONE]"):
                            res.e2e = time.perf_counter() - t0
                            done = True
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            res.error = type(exc).__name__
            return
        if res.ttft is None:
            res.error = "no data chunk"
        elif not done:
            res.error = "missing [DONE]"


async def run_load(url: str, reqs: list[Req], tag: str, drain_cap: float, conc_cap: int) -> dict[str, Any]:
    results = [Result(f"{tag}.{i}", r.max_tokens, r.prompt_chars, r.offset) for i, r in enumerate(reqs)]
    bodies = [body_for(r, res.rid) for r, res in zip(reqs, results)]
    started: dict[str, float] = {}
    sem = asyncio.Semaphore(conc_cap)
    cap_bound = 0
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = []
        t_start = loop.time() + 0.05
        wall_start = time.perf_counter() + 0.05
        for req, body, res in zip(reqs, bodies, results):
            target = t_start + req.offset
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            res.lag = max(0.0, loop.time() - target)
            if sem.locked():
                cap_bound += 1
            tasks.append(asyncio.create_task(_fire(session, url, body, res, sem, started)))
        last_arrival = loop.time()
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, last_arrival + drain_cap - loop.time()))
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
            "cap_bound": cap_bound, "unfinished": len(pending)}


def summarize(results: list[Result], span: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and not r.unfinished]
    unfinished = [r for r in results if r.unfinished]
    e2e = [r.e2e for r in results if r.error is None and r.e2e is not None]  # unfinished: lower bounds
    ttft = [r.ttft for r in ok if r.ttft is not None]
    floor_unfinished = min((r.e2e for r in unfinished if r.e2e is not None), default=math.inf)

    def p(vals: list[float], q: float) -> float:
        return harness.pct(vals, q)

    out: dict[str, Any] = {
        "requests": len(results), "completed": len(ok), "errors": sum(1 for r in results if r.error),
        "error_kinds": dict(Counter(r.error for r in results if r.error)), "unfinished": len(unfinished),
        "e2e_p50_s": p(e2e, 50), "e2e_p95_s": p(e2e, 95), "e2e_p99_s": p(e2e, 99),
        "ttft_p50_ms": p(ttft, 50) * 1e3, "ttft_p99_ms": p(ttft, 99) * 1e3,
        "throughput_rps": len(ok) / span if span > 0 else float("nan"),
        "max_fire_lag_ms": max((r.lag for r in results), default=0.0) * 1e3,
    }
    # A percentile at or above the smallest censored value is only a lower bound.
    for key in ("e2e_p50_s", "e2e_p95_s", "e2e_p99_s"):
        out[key + "_lower_bound"] = bool(out[key] >= floor_unfinished)
    return out


# ---------------------------------------------------------------------------------------------------
# access log: which backend served what, and what least_cost learned


def read_access_log(path: Path) -> list[dict[str, Any]]:
    lines = []
    with path.open("rb") as f:
        for raw in f:
            if raw.startswith(b'{"request_id"'):
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    pass
    return lines


def other_log_lines(path: Path, limit: int = 5) -> tuple[Counter[str], list[str]]:
    levels: Counter[str] = Counter()
    samples: list[str] = []
    with path.open("rb") as f:
        for raw in f:
            if raw.startswith(b'{"request_id"'):
                continue
            try:
                level = json.loads(raw).get("level", "other")
            except ValueError:
                level = "other"
            levels[level] += 1
            if level not in ("info", "debug") and len(samples) < limit:
                samples.append(raw.decode("utf-8", "replace")[:400].rstrip())
    return levels, samples


def admin_get(port: int, path: str) -> Any:
    """GET an admin JSON document from the proxy (Bearer SPLITSTREAM_ADMIN_TOKEN when this process has it:
    the proxy inherits our environment; without it the proxy answers loopback clients)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    token = os.environ.get("SPLITSTREAM_ADMIN_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


LEARNED_KEYS = ("decode_tps", "prefill_tps", "learned_from", "decode_tps_by_inflight", "prefill_tps_by_inflight",
                "inflight", "predicted_load")


def learned_snapshot(port: int) -> dict[str, Any]:
    """What the proxy's balancer believes about each backend now (GET /admin/backends): learned speeds, and
    per in-flight count where the proxy has them. {"error": ...} when the proxy did not answer."""
    try:
        doc = admin_get(port, "/admin/backends")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"backends": {str(b.get("name")): {k: b[k] for k in LEARNED_KEYS if k in b}
                         for b in doc.get("backends", [])}}


def backend_breakdown(results: list[Result], by_rid: dict[str, dict[str, Any]], specs: tuple[BackendSpec, ...],
                      long_threshold: int) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    unknown = 0
    e2e_by: dict[str, list[float]] = defaultdict(list)
    for r in results:
        ln = by_rid.get(r.rid)
        name = None if ln is None else ln.get("backend")
        if ln is None or name is None:
            unknown += 1
            continue
        d = per.setdefault(name, {"requests": 0, "max_tokens_total": 0, "long_requests": 0, "attempts_gt1": 0,
                                  "statuses": Counter()})
        d["requests"] += 1
        d["max_tokens_total"] += r.max_tokens  # = tokens generated: the sim writes exactly max_tokens
        d["long_requests"] += r.max_tokens >= long_threshold
        d["attempts_gt1"] += (ln.get("attempts") or 1) > 1
        d["statuses"][str(ln.get("status"))] += 1
        if r.e2e is not None and r.error is None:
            e2e_by[name].append(r.e2e)
    for name, d in per.items():
        d["statuses"] = dict(d["statuses"])
        d["e2e_p99_s"] = harness.pct(e2e_by[name], 99)
        d["e2e_p50_s"] = harness.pct(e2e_by[name], 50)
    order = [s.name for s in specs]
    return {"backends": {n: per[n] for n in order if n in per}, "not_in_access_log": unknown}


# ---------------------------------------------------------------------------------------------------
# calibration: are the sims as fast as configured?


def slowdown(s: BackendSpec) -> float:
    """The batch slowdown the runtime really applies: none while SimConfig has no `batch_slowdown`."""
    return s.batch_slowdown if s.batch_slowdown and "batch_slowdown" in sim_fields() else 0.0


async def calibrate(sims: Sims) -> dict[str, Any]:
    """max_batch concurrent fixed-size streams straight to each runtime (all at once, 2 rounds): measured mean
    service time vs the model (ttft + prompt/prefill + (n-1)/tps) x (1 + batch_slowdown x (max_batch - 1)), the
    sim slowing prefill and decode alike."""
    req = Req(0.0, 400, CALIBRATION_TOKENS)
    out: dict[str, Any] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one_backend(s: BackendSpec) -> None:
            url = sims.url(s.name) + "/v1/chat/completions"
            times: list[float] = []
            sem = asyncio.Semaphore(10**6)
            for rnd in range(2):
                res = [Result(f"cal{rnd}.{s.name}.{i}", req.max_tokens, req.prompt_chars, 0.0)
                       for i in range(s.max_batch)]
                await asyncio.gather(*(_fire(session, url, body_for(req, r.rid), r, sem, {}) for r in res))
                times += [r.e2e for r in res if r.e2e is not None and r.error is None]
            model = (s.ttft_ms / 1e3 + sim_prompt_tokens(req.prompt_chars) / s.prefill_tokens_per_second
                     + (req.max_tokens - 1) / s.tokens_per_second) * (1 + slowdown(s) * (s.max_batch - 1))
            measured = statistics.fmean(times) if times else float("nan")
            out[s.name] = {"model_s": model, "measured_s": measured, "ratio": measured / model}

        await asyncio.gather(*(one_backend(s) for s in sims.specs))
    return out


# ---------------------------------------------------------------------------------------------------
# one cell: a proxy with one policy, warmed up, then one run per seed


class Cell:
    """One (policy, load) on its own proxy: warmed up once, then one run per seed."""

    def __init__(self, label: str, policy: str, load: float, rate: float) -> None:
        self.label, self.policy, self.load, self.rate = label, policy, load, rate
        self.proxy: harness.Proc | None = None
        self.port = 0
        self.url = ""
        self.learned: dict[str, Any] = {}  # "end of warm" / "end of s<seed>" -> learned_snapshot()
        self.warmup: dict[str, Any] = {}
        self.warmup_s = 0.0
        self.runs: list[dict[str, Any]] = []
        self.raw: list[list[Result]] = []


def run_level(tmp: Path, sims: Sims, prefix: str, policies: list[str], load: float, cap: dict[str, Any],
              args: argparse.Namespace, problems: list[str]) -> list[dict[str, Any]]:
    """All policies at one load: one proxy each, the same warm-up each, then seed by seed every policy in turn
    (the order rotates), so a burst of foreign load on the machine hits every policy alike."""
    rate = load * cap["rps"]
    cells = [Cell(f"{prefix}L{round(100 * load)}-{policy}", policy, load, rate) for policy in policies]
    print(f"  [{prefix}L{round(100 * load)}] offered {rate:.2f} req/s; proxies: "
          + ", ".join(c.policy for c in cells), flush=True)
    try:
        for c in cells:
            c.proxy, c.port = start_proxy(tmp, c.label, sims, c.policy)
            c.url = f"http://127.0.0.1:{c.port}/v1/chat/completions"
        warm = schedule(args.warmup, WARMUP_LOAD * cap["rps"], WARMUP_SEED, args.token_scale,
                        max_tokens_cap=max(1, round(128 * args.token_scale)))
        for c in cells:
            t0 = time.monotonic()
            w = harness.run_async(run_load(c.url, warm, "warm", 30.0, args.concurrency_cap))
            c.warmup = summarize(w["results"], w["span_s"])
            c.warmup_s = time.monotonic() - t0
            c.learned["end of warm"] = learned_snapshot(c.port)
            if c.warmup["errors"] or c.warmup["unfinished"]:
                problems.append(f"{c.label}: warm-up had {c.warmup['errors']} errors, "
                                f"{c.warmup['unfinished']} unfinished")
        for seed in range(1, args.seeds + 1):
            reqs = schedule(args.requests, rate, seed, args.token_scale, max_window=args.max_window)
            k = (seed - 1) % len(cells)
            for c in cells[k:] + cells[:k]:
                time.sleep(0.2)
                sims.check()
                assert c.proxy is not None
                c.proxy.check()
                c.runs.append(_measure(c, sims, reqs, seed, args, problems))
    finally:
        for c in cells:
            if c.proxy is not None:
                c.proxy.stop()
    return [_finish_cell(c, sims, args, problems) for c in cells]


def _measure(c: Cell, sims: Sims, reqs: list[Req], seed: int, args: argparse.Namespace,
             problems: list[str]) -> dict[str, Any]:
    assert c.proxy is not None
    ticks0 = (c.proxy.cpu_ticks(), sims.cpu_ticks(), harness.self_cpu_ticks(), harness.machine_ticks()[0])
    t0 = time.monotonic()
    r = harness.run_async(run_load(c.url, reqs, f"s{seed}", args.drain_cap, args.concurrency_cap))
    wall = time.monotonic() - t0
    ticks1 = (c.proxy.cpu_ticks(), sims.cpu_ticks(), harness.self_cpu_ticks(), harness.machine_ticks()[0])
    s = summarize(r["results"], r["span_s"])
    s.update(seed=seed, wall_s=wall, window_s=r["window_s"], span_s=r["span_s"], offered_rps=c.rate,
             cap_bound=r["cap_bound"],
             cpu_pct={k: 100.0 * (b - a) / harness.CLK_TCK / wall
                      for k, a, b in zip(("proxy", "sims", "client", "machine"), ticks0, ticks1)})
    cpu = s["cpu_pct"]
    cpu["other"] = max(0.0, cpu["machine"] - cpu["proxy"] - cpu["sims"] - cpu["client"])
    s["contended"] = cpu["other"] > OTHER_CPU_LIMIT
    if s["contended"]:
        problems.append(f"{c.label} seed {seed}: other processes used {cpu['other']:.0f}% of a core during the "
                        f"run (this benchmark {cpu['machine'] - cpu['other']:.0f}%): its numbers are suspect")
    if s["errors"]:
        problems.append(f"{c.label} seed {seed}: {s['errors']} errors {s['error_kinds']}")
    if r["cap_bound"]:
        problems.append(f"{c.label} seed {seed}: the client concurrency cap bound {r['cap_bound']} times")
    c.raw.append(r["results"])
    c.learned[f"end of s{seed}"] = learned_snapshot(c.port)
    print(f"    {c.label:<20} seed {seed}: {len(reqs)} req in {r['window_s']:.1f}s, wall {wall:4.1f}s  "
          f"p50 {_sec(s, 'e2e_p50_s')}  p99 {_sec(s, 'e2e_p99_s')}  ttft p99 {s['ttft_p99_ms']:5.0f} ms  "
          f"err {s['errors']}  unfin {s['unfinished']}  cpu% proxy {cpu['proxy']:.0f} sims {cpu['sims']:.0f} "
          f"client {cpu['client']:.0f} other {cpu['other']:.0f}", flush=True)
    return s


def _finish_cell(c: Cell, sims: Sims, args: argparse.Namespace, problems: list[str]) -> dict[str, Any]:
    """Join the runs with the proxy's access log: backends per request, statuses, what least_cost learned."""
    assert c.proxy is not None
    lines = read_access_log(c.proxy.log)
    by_rid = {str(ln.get("request_id")): ln for ln in lines}
    long_threshold = round(MAX_TOKENS_MIX[-1][1] * args.token_scale)
    for s, results in zip(c.runs, c.raw):
        s["by_backend"] = backend_breakdown(results, by_rid, sims.specs, long_threshold)
        s["detail"] = {"fields": ["request_id", "backend", "max_tokens", "prompt_chars", "scheduled_s", "ttft_s",
                                  "e2e_s", "error", "unfinished"],
                       "rows": [[r.rid, (by_rid.get(r.rid) or {}).get("backend"), r.max_tokens, r.prompt_chars,
                                 round(r.scheduled, 4), None if r.ttft is None else round(r.ttft, 4),
                                 None if r.e2e is None else round(r.e2e, 4), r.error, r.unfinished]
                                for r in results]}
        if s["by_backend"]["not_in_access_log"]:
            problems.append(f"{c.label} seed {s['seed']}: {s['by_backend']['not_in_access_log']} requests missing "
                            f"from the access log")
    levels, samples = other_log_lines(c.proxy.log)
    if samples:
        problems.append(f"{c.label}: proxy logged {dict(levels)}; first: {samples[0][:300]}")
    statuses = Counter(str(ln.get("status")) for ln in lines if ln.get("path", "").startswith("/v1/"))
    learned = c.learned
    if c.policy == "least_cost":
        for when, snap in learned.items():
            if "error" in snap:
                problems.append(f"{c.label} {when}: GET /admin/backends failed: {snap['error']}")
                continue
            for spec in sims.specs:
                got = snap["backends"].get(spec.name, {}).get("decode_tps")
                if got is None:
                    continue
                if got > 2 * spec.tokens_per_second or got < spec.tokens_per_second / 2:
                    problems.append(f"{c.label} {when}: least_cost's decode speed for {spec.name} is {got:g} "
                                    f"tokens/s (the runtime does {spec.tokens_per_second:g})")
    pooled = summarize([r for results in c.raw for r in results], sum(s["span_s"] for s in c.runs))
    return {"label": c.label, "policy": c.policy, "load": c.load, "offered_rps": c.rate, "warmup": c.warmup,
            "warmup_s": c.warmup_s, "runs": c.runs, "access_log_statuses": dict(statuses), "learned": learned,
            "median": _medians(c.runs), "pooled": pooled,
            "contended_runs": sum(1 for s in c.runs if s["contended"])}


ROUTING_SOURCES = ("proxy/pipeline/balancer.py", "proxy/pipeline/cost.py", "proxy/pipeline/dispatch.py",
                   "proxy/upstream/state.py", "proxy/upstream/prefix.py", "proxy/config/sections.py",
                   "proxy/sim/runtime.py")


def source_fingerprint() -> dict[str, str | None]:
    """sha256 (12 hex) of the files that decide routing: the work tree may differ from the commit."""
    import hashlib

    out: dict[str, str | None] = {}
    for rel in ROUTING_SOURCES:
        try:
            out[rel] = hashlib.sha256((ROOT / rel).read_bytes()).hexdigest()[:12]
        except OSError:
            out[rel] = None
    return out


MEDIAN_KEYS = ("e2e_p50_s", "e2e_p95_s", "e2e_p99_s", "ttft_p50_ms", "ttft_p99_ms", "throughput_rps")


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    m: dict[str, Any] = {k: harness.med([r[k] for r in runs]) for k in MEDIAN_KEYS}
    for k in ("e2e_p50_s", "e2e_p95_s", "e2e_p99_s"):
        # the median is a lower bound if at least half of the seeds' values are
        m[k + "_lower_bound"] = sum(r[k + "_lower_bound"] for r in runs) * 2 >= len(runs) and bool(runs)
    m["errors"] = sum(r["errors"] for r in runs)
    m["unfinished"] = sum(r["unfinished"] for r in runs)
    m["requests"] = sum(r["requests"] for r in runs)
    shares: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        total = sum(b["requests"] for b in r["by_backend"]["backends"].values()) if "by_backend" in r else 0
        for name, b in (r.get("by_backend", {}).get("backends", {})).items():
            shares[name].append(b["requests"] / total if total else 0.0)
    m["backend_share"] = {k: statistics.fmean(v) for k, v in shares.items()}
    return m


def _sec(d: dict[str, Any], key: str) -> str:
    v = d[key]
    if v != v:
        return "-"
    return (">" if d.get(key + "_lower_bound") else "") + f"{v:.2f}s"


# ---------------------------------------------------------------------------------------------------
# report


def table_rows(cells: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in cells:
        m = c["median"]
        share = "/".join(f"{100 * v:.0f}" for v in m["backend_share"].values())
        mark = "*" if c.get("contended_runs") else ""
        rows.append([f"{100 * c['load']:.0f}%", c["policy"] + mark, _sec(m, "e2e_p50_s"), _sec(m, "e2e_p95_s"),
                     _sec(m, "e2e_p99_s"), f"{m['ttft_p50_ms']:.0f}ms", f"{m['ttft_p99_ms']:.0f}ms",
                     f"{m['throughput_rps']:.1f}", str(m["errors"]), str(m["unfinished"]), share])
    return rows


HEADER = ["load", "policy", "p50 e2e", "p95 e2e", "p99 e2e", "p50 ttft", "p99 ttft", "throughput(req/s)",
          "errors", "unfinished", "share % (by backend)"]


def print_table(title: str, rows: list[list[str]]) -> None:
    harness.print_aligned(title, HEADER, rows)
    if any(r[1].endswith("*") for r in rows):
        print(f"* other processes used more than {OTHER_CPU_LIMIT:g}% of a core during at least one of this cell's "
              "runs (see problems)")


def ratio(cells: list[dict[str, Any]], load: float, num: str, den: str) -> dict[str, Any] | None:
    a = next((c for c in cells if c["policy"] == num and abs(c["load"] - load) < 1e-9), None)
    b = next((c for c in cells if c["policy"] == den and abs(c["load"] - load) < 1e-9), None)
    if a is None or b is None:
        return None
    ma, mb = a["median"], b["median"]
    pa, pb = a["pooled"], b["pooled"]
    return {"numerator": ma["e2e_p99_s"], "denominator": mb["e2e_p99_s"],
            "ratio": ma["e2e_p99_s"] / mb["e2e_p99_s"],
            "numerator_lower_bound": ma["e2e_p99_s_lower_bound"],
            "denominator_lower_bound": mb["e2e_p99_s_lower_bound"],
            "per_seed": [x["e2e_p99_s"] / y["e2e_p99_s"] for x, y in zip(a["runs"], b["runs"])],
            "pooled_numerator": pa["e2e_p99_s"], "pooled_denominator": pb["e2e_p99_s"],
            "pooled_ratio": pa["e2e_p99_s"] / pb["e2e_p99_s"],
            "pooled_p95_ratio": pa["e2e_p95_s"] / pb["e2e_p95_s"]}


def print_ratio(label: str, r: dict[str, Any] | None, target: float) -> None:
    if r is None:
        print(f"  {label}: not measured")
        return
    caveat = ""
    if r["denominator_lower_bound"] and not r["numerator_lower_bound"]:
        caveat = "  (denominator is a lower bound: the true ratio is at most this)"
    elif r["numerator_lower_bound"]:
        caveat = "  (numerator is a lower bound)"
    seeds = ", ".join(f"{x:.2f}" for x in r["per_seed"])
    print(f"  {label}: {r['numerator']:.2f}s / {r['denominator']:.2f}s = {r['ratio']:.2f}   "
          f"target <= {target:g}  {'met' if r['ratio'] <= target else 'MISSED'}{caveat}\n"
          f"      per seed: {seeds}; all seeds' requests pooled: p99 {r['pooled_numerator']:.2f}s / "
          f"{r['pooled_denominator']:.2f}s = {r['pooled_ratio']:.2f}, p95 ratio {r['pooled_p95_ratio']:.2f}")


def fmt_learned(b: dict[str, Any]) -> str:
    """`decode/prefill (n=learned_from)`, then the decode speed at the smallest and largest in-flight count
    when the proxy learns it per in-flight count (decode_tps_by_inflight)."""
    def num(v: Any) -> str:
        return f"{v:.0f}" if isinstance(v, (int, float)) else "?"

    out = f"{num(b.get('decode_tps'))}/{num(b.get('prefill_tps'))} (n={b.get('learned_from', '?')})"
    by = b.get("decode_tps_by_inflight")
    pairs: list[tuple[Any, Any]] = []
    if isinstance(by, dict):
        pairs = sorted(by.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
    elif isinstance(by, list):
        pairs = list(enumerate(by, 1))
    if pairs:
        (k0, v0), (k1, v1) = pairs[0], pairs[-1]
        out += f" [decode@{k0} {num(v0)} .. @{k1} {num(v1)}]"
    return out


def print_learned(cells: list[dict[str, Any]], policies: tuple[str, ...] = ("least_cost",)) -> None:
    cells = [c for c in cells if c["policy"] in policies]
    if not cells:
        return
    print("\nwhat least_cost believed (GET /admin/backends; decode/prefill tokens/s):")
    for c in cells:
        for when, snap in c["learned"].items():
            if "error" in snap:
                print(f"  {c['label']:<22} {when:<12} {snap['error']}")
                continue
            bs = "  ".join(f"{n} {fmt_learned(b)}" for n, b in snap["backends"].items())
            print(f"  {c['label']:<22} {when:<12} {bs}")


# ---------------------------------------------------------------------------------------------------


WORKLOADS = ("mixed", "multiturn", "noshare")
PREFIX_WORKLOADS = ("multiturn", "noshare")


def parse_workloads(text: str, parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for w in (x.strip() for x in text.split(",")):
        if not w:
            continue
        names = list(PREFIX_WORKLOADS) if w == "prefix" else [w]
        for n in names:
            if n not in WORKLOADS:
                parser.error(f"unknown workload {n!r} (choose from {', '.join(WORKLOADS)}, or prefix)")
            if n not in out:
                out.append(n)
    if not out:
        parser.error("--workload names none")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_sim":
        return sim_main(argv[1:])
    import routing_prefix  # the prefix-cache scenario (multiturn, noshare); imports this module as `routing`

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mixed",
                        help="comma-separated: mixed (default: heterogeneous and homogeneous pools, heavy-tailed "
                             "single requests), multiturn (conversations and shared system prompts on four "
                             "runtimes with prefix caches), noshare (the same sizes, no shared prefix); "
                             "prefix = multiturn,noshare")
    parser.add_argument("--seeds", type=int, default=None,
                        help="runs per (policy, load) (default 3 for mixed, 2 for multiturn/noshare)")
    parser.add_argument("--requests", type=int, default=150, help="mixed: requests per run (default 150)")
    parser.add_argument("--loads", default=None,
                        help="fractions of pool capacity (default: mixed 0.6,0.8,0.95; multiturn 0.5,0.8; "
                             "noshare 0.8)")
    parser.add_argument("--policies", default=None,
                        help=f"comma-separated subset (mixed: {', '.join(POLICIES)}; multiturn: "
                             f"{', '.join(routing_prefix.POLICIES)}; noshare: the same, default "
                             f"{', '.join(routing_prefix.NOSHARE_POLICIES)}); names a workload does not know are "
                             "skipped for it")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: mixed 1 seed x 60 requests; multiturn/noshare 1 seed, 80%% load only, "
                             "short windows")
    parser.add_argument("--skip-homogeneous", action="store_true", help="skip the three-identical-backends check")
    parser.add_argument("--token-scale", type=float, default=0.25,
                        help="mixed: multiplies the max_tokens mix (default 0.25: 4-16 / 32-64 / 128-256 tokens, so "
                             "the default run fits ~4 minutes; 1.0 = 16-64 / 128-256 / 512-1024, ~4x longer)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"warm-up requests per proxy (default {WARMUP_REQUESTS} for mixed, "
                             f"{routing_prefix.WARMUP_REQUESTS} for multiturn/noshare)")
    parser.add_argument("--drain-cap", type=float, default=None,
                        help="seconds to wait after the last arrival before cancelling (default: mixed 30 x "
                             "token-scale, multiturn/noshare 30)")
    parser.add_argument("--max-window", type=float, default=60.0, help="mixed: cut a run's arrivals after this many s")
    parser.add_argument("--concurrency-cap", type=int, default=5000, help="client-side in-flight limit (default 5000)")
    parser.add_argument("--no-calibrate", action="store_true", help="skip the direct sim speed check")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the process logs")
    routing_prefix.add_arguments(parser)
    args = parser.parse_args(argv)
    workloads = parse_workloads(args.workload, parser)
    explicit_policies = None if args.policies is None else [p.strip() for p in args.policies.split(",") if p.strip()]
    if explicit_policies is not None:
        unknown = [p for p in explicit_policies if p not in POLICIES and p not in routing_prefix.POLICIES]
        if unknown or not explicit_policies:
            parser.error(f"unknown policy {unknown[0]!r}" if unknown else "--policies names none")
    explicit_loads = None
    if args.loads is not None:
        explicit_loads = [float(x) for x in args.loads.split(",") if x.strip()]
        if not explicit_loads or any(not 0 < x < 2 for x in explicit_loads):
            parser.error("loads must be in (0, 2)")
    harness.raise_nofile(65536)

    mixed = "mixed" in workloads
    loads: list[float] = []
    policies: list[str] = []
    mixed_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    mixed_warmup = args.warmup if args.warmup is not None else WARMUP_REQUESTS
    mixed_drain = args.drain_cap if args.drain_cap is not None else 30.0 * args.token_scale
    if mixed:
        if args.quick:
            args.requests = 60
        loads = explicit_loads or [0.6, 0.8, 0.95]
        policies = [p for p in (explicit_policies or POLICIES) if p in POLICIES]
        if mixed_seeds < 1 or args.requests < 1 or not policies:
            parser.error("mixed: --seeds and --requests must be positive and --policies name one of "
                         + ", ".join(POLICIES))
    mixed_args = argparse.Namespace(**{**vars(args), "seeds": mixed_seeds, "warmup": mixed_warmup,
                                      "drain_cap": mixed_drain})
    plan = None
    if any(w in PREFIX_WORKLOADS for w in workloads):
        plan = routing_prefix.prepare(args, parser, workloads, explicit_loads, explicit_policies)

    moments: dict[str, float] = {}
    cap: dict[str, Any] = {}
    cap_homo: dict[str, Any] = {}
    if mixed:
        moments = workload_moments(args.token_scale)
        cap = capacity(HETERO, moments)
        cap_homo = capacity(HOMO, moments)
        print(f"mixed workload: prompt chars median {moments['median_prompt_chars']:.0f}, mean "
              f"{moments['mean_prompt_chars']:.0f}, p99 {moments['p99_prompt_chars']}; max_tokens mix "
              + ", ".join(f"{100 * s:.0f}% {round(lo * args.token_scale)}-{round(hi * args.token_scale)}"
                          for s, lo, hi in MAX_TOKENS_MIX)
              + f" (mean {moments['mean_completion_tokens']:.1f}); streaming")
        for title, specs, c in (("heterogeneous", HETERO, cap), ("homogeneous", HOMO, cap_homo)):
            parts = ", ".join(f"{s.name} {s.tokens_per_second:g} tok/s x{s.max_batch} prefill "
                              f"{s.prefill_tokens_per_second:g}: {c['backends'][s.name]['rps']:.2f} req/s"
                              for s in specs)
            print(f"capacity {title}: {c['rps']:.2f} req/s ({parts}); without the TTFT/prefill correction "
                  f"{c['naive_rps']:.2f}")
        n_cells = len(loads) * len(policies) + (0 if args.skip_homogeneous else 2)
        print(f"{n_cells} proxies x ({mixed_warmup} warm-up + {mixed_seeds} x {args.requests} requests); drain cap "
              f"{mixed_drain:g} s", flush=True)

    started = dt.datetime.now(dt.timezone.utc)
    t_begin = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="splitstream-routing-"))
    problems: list[str] = []
    cells: list[dict[str, Any]] = []
    homo_cells: list[dict[str, Any]] = []
    calibration: dict[str, Any] = {}
    prefix_out: dict[str, Any] = {}
    loadavg0 = runinfo.loadavg()
    with harness.reported_session(tmp, args.keep_logs, problems) as session:
        if mixed:
            sims = Sims(tmp, "het", HETERO)
            try:
                if not args.no_calibrate:
                    calibration["heterogeneous"] = harness.run_async(calibrate(sims))
                    cal = calibration["heterogeneous"]
                    measured = sum(s.max_batch / (cap["backends"][s.name]["mean_service_s"] * cal[s.name]["ratio"])
                                   for s in HETERO)
                    calibration["heterogeneous_capacity_rps"] = measured
                    print("calibration (max_batch concurrent 64-token streams straight to each sim, measured/model): "
                          + ", ".join(f"{n} {v['measured_s']:.3f}/{v['model_s']:.3f}s ({v['ratio']:.2f})"
                                      for n, v in cal.items())
                          + f" -> measured capacity ~{measured:.2f} req/s", flush=True)
                for load in loads:
                    cells += run_level(tmp, sims, "", policies, load, cap, mixed_args, problems)
            finally:
                sims.close()
            if not args.skip_homogeneous:
                sims = Sims(tmp, "homo", HOMO)
                try:
                    homo_cells += run_level(tmp, sims, "homo-", ["least_conn", "least_cost"], 0.8, cap_homo,
                                            mixed_args, problems)
                finally:
                    sims.close()
        if plan is not None:
            routing_prefix.run(plan, tmp, problems, prefix_out)
    status = session.status
    wall = time.monotonic() - t_begin

    ratios: dict[str, Any] = {}
    if mixed:
        cells.sort(key=lambda c: (c["load"], POLICIES.index(c["policy"])))
        ratios = {
            "hetero_80_least_cost_over_least_conn_p99": ratio(cells, 0.8, "least_cost", "least_conn"),
            "hetero_80_least_cost_over_round_robin_p99": ratio(cells, 0.8, "least_cost", "round_robin"),
            "homo_80_least_cost_over_least_conn_p99": ratio(homo_cells, 0.8, "least_cost", "least_conn"),
        }
        if cells:
            print_table(f"heterogeneous pool (fast 1x / mid 0.5x / slow 0.25x), capacity {cap['rps']:.2f} req/s; "
                        f"medians over {mixed_seeds} seed(s)", table_rows(cells))
        if homo_cells:
            print_table(f"homogeneous pool (3 x fast), capacity {cap_homo['rps']:.2f} req/s", table_rows(homo_cells))
        print("\nratios of p99 end-to-end latency (medians over seeds):")
        print_ratio("80% load, least_cost / least_conn  ", ratios["hetero_80_least_cost_over_least_conn_p99"],
                    TARGETS["hetero_80_least_cost_over_least_conn_p99"])
        print_ratio("80% load, least_cost / round_robin ", ratios["hetero_80_least_cost_over_round_robin_p99"],
                    TARGETS["hetero_80_least_cost_over_round_robin_p99"])
        print_ratio("homogeneous 80%, least_cost / least_conn", ratios["homo_80_least_cost_over_least_conn_p99"],
                    TARGETS["homo_80_least_cost_over_least_conn_p99"])
        print_learned(cells + homo_cells)
    prefix_doc: dict[str, Any] | None = None
    if plan is not None:
        prefix_doc = routing_prefix.report(plan, prefix_out, problems)
    if problems:
        print("\nproblems:")
        for p in problems:
            print(f"  - {p}")
    print(f"\nwall time {wall:.0f} s")

    if cells or homo_cells or (prefix_doc and prefix_doc.get("cells")):
        machine = runinfo.machine_info("python")
        machine["loadavg_start"] = loadavg0
        machine["loadavg_end"] = runinfo.loadavg()
        machine["routing_sources_sha256"] = source_fingerprint()
        doc: dict[str, Any] = {
            "args": vars(args) | {"workloads": workloads},
            "machine": machine,
        }
        if mixed:
            doc.update({
                "args": doc["args"] | {"loads": loads, "policies": policies, "seeds": mixed_seeds,
                                       "warmup": mixed_warmup, "drain_cap": mixed_drain},
                "backends": {"heterogeneous": [asdict(s) for s in HETERO], "homogeneous": [asdict(s) for s in HOMO]},
                "workload": {"max_tokens_mix": MAX_TOKENS_MIX, "token_scale": args.token_scale,
                             "prompt_median_chars": PROMPT_MEDIAN_CHARS, "prompt_sigma": PROMPT_SIGMA,
                             "prompt_chars_range": [PROMPT_MIN_CHARS, PROMPT_MAX_CHARS], "moments": moments,
                             "warmup": {"requests": mixed_warmup, "load": WARMUP_LOAD,
                                        "max_tokens_cap": max(1, round(128 * args.token_scale))}},
                "capacity": {"heterogeneous": cap, "homogeneous": cap_homo, "calibration": calibration},
                "targets": TARGETS,
                "table": [dict(zip(HEADER, r)) for r in table_rows(cells)],
                "table_homogeneous": [dict(zip(HEADER, r)) for r in table_rows(homo_cells)],
                "ratios": ratios,
                "cells": cells,
                "homogeneous_cells": homo_cells,
            })
        if prefix_doc is not None:
            doc["prefix"] = prefix_doc
        doc["problems"] = problems
        runinfo.write_results("routing", started, wall, status == 0, doc)
    return status


if __name__ == "__main__":
    sys.modules.setdefault("routing", sys.modules["__main__"])  # routing_prefix imports this module by name
    sys.exit(main())
