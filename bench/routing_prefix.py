"""The prefix-cache scenario of bench/routing.py (`--workload multiturn`, `noshare`, or `prefix` for both).

Four equal simulated runtimes with prefix caches too small for the working set; one proxy per policy:
least_cost (prefix index on), least_cost_noprefix, least_conn, round_robin and consistent_hash on the
conversation id. Two workloads:

- multiturn: conversations of 3-8 turns (turn k's prompt = turn k-1's prompt + its answer + a new user
  message; a turn is sent when the previous answer arrived plus a think time) starting as a Poisson process,
  and a share of single requests that begin with one of four long shared system prompts. Only requests sent
  inside the measured window (after a ramp that lets the number of open conversations build up) count; no
  turn is sent after the window, so a run ends with the requests still in flight.
- noshare: single requests of the same sizes (drawn from the multiturn request mix) whose prompts share
  nothing, open-loop Poisson: what the prefix index costs when there is nothing to find.

Every text is random words seeded by (run, request): no run can hit blocks another run left in a runtime's
cache, and every run starts cold (the ramp warms it). The answer text is what the runtime streamed (chat
completions with `stream_options.include_usage`); the final usage chunk gives prompt_tokens and
`prompt_tokens_details.cached_tokens`, from which the hit ratio is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

import harness
import routing as R
from routing import MODEL, BackendSpec

POLICIES = ("least_cost", "least_cost_noprefix", "least_conn", "round_robin", "consistent_hash")
NOSHARE_POLICIES = ("least_cost", "least_cost_noprefix")
CONVERSATION_HEADER = "x-conversation-id"
# `balance:` per policy, best first; the later forms are what the rules loader took before prefix routing
# existed (consistent_hash has none: without its mapping it is skipped).
BALANCE_FORMS = {
    "least_cost": ("{policy: least_cost, prefix: true}", "least_cost"),
    "least_cost_noprefix": ("{policy: least_cost, prefix: false}", "least_cost"),
    "least_conn": ("least_conn",),
    "round_robin": ("round_robin",),
    "consistent_hash": (f'{{policy: consistent_hash, by: "header:{CONVERSATION_HEADER}"}}',),
}

# Runtimes: equal, prefill slow enough that a long uncached prompt dominates TTFT.
N_RUNTIMES = 4
DECODE_TPS = 100.0
PREFILL_TPS = 3000.0
MAX_BATCH = 8
TTFT_MS = 20.0
BATCH_SLOWDOWN = 0.03  # x1.21 per-token time with a full batch of 8
BLOCK_TOKENS = 16

# Workload (tokens are the sim's: ~4 characters each).
CHARS_PER_TOKEN = 4
TURNS = (3, 8)  # uniform
FIRST_PROMPT_TOKENS = (200, 600)
USER_TOKENS = (20, 250)  # each later turn's new user message
ANSWER_TOKENS = (32, 160)  # max_tokens of every request (the sim generates exactly that many)
SYSTEM_PROMPT_TOKENS = (1000, 1300, 1600, 2000)
SYSTEM_SHARE = 0.30  # of requests: singles that start with a shared system prompt
THINK_MEAN_S = 0.5  # exponential, capped at 4x the mean
WARMUP_REQUESTS = 20
WARMUP_LOAD = 0.3
WARMUP_MAX_TOKENS = 64
CACHE_FRACTION = 1 / 3  # each runtime's cache: this share of the open conversations' tokens at the top load

TARGETS = {  # (workload, load, numerator, denominator, metric) -> at most
    "multiturn_80_ttft_p50_least_cost_over_least_conn": 0.5,
    "multiturn_80_ttft_p99_least_cost_over_least_conn": 0.5,
    "multiturn_80_ttft_p50_least_cost_over_least_cost_noprefix": 0.6,
    "multiturn_80_ttft_p99_least_cost_over_least_cost_noprefix": 0.6,
    "multiturn_80_e2e_p99_least_cost_over_least_conn": 0.8,
    "noshare_80_ttft_p50_least_cost_over_least_cost_noprefix": 1.05,
    "noshare_80_ttft_p99_least_cost_over_least_cost_noprefix": 1.05,
    "noshare_80_e2e_p50_least_cost_over_least_cost_noprefix": 1.05,
    "noshare_80_e2e_p99_least_cost_over_least_cost_noprefix": 1.05,
}
METRIC_KEYS = {"ttft_p50": "ttft_p50_ms", "ttft_p99": "ttft_p99_ms", "e2e_p50": "e2e_p50_s", "e2e_p99": "e2e_p99_s"}


def answer_chars_per_token() -> float:
    """Characters per generated token: the sim's words with their trailing space (5.39 today)."""
    try:
        from proxy.sim.protocol import WORDS

        return statistics.fmean(len(w) for w in WORDS)
    except (ImportError, AttributeError, statistics.StatisticsError):
        return 5.4


ANSWER_CPT = answer_chars_per_token()


def sim_tokens(chars: int, messages: int) -> int:
    return max(1, chars // CHARS_PER_TOKEN) + 4 * messages  # proxy/sim/protocol.py chat_prompt_tokens


def reusable_tokens(reusable_chars: int, prompt_chars: int, messages: int) -> int:
    return min(reusable_chars // CHARS_PER_TOKEN, sim_tokens(prompt_chars, messages))


# ---------------------------------------------------------------------------------------------------
# workload


@dataclass(frozen=True)
class Turn:
    user_chars: int  # the first turn's prompt, or the new user message of a later turn
    max_tokens: int
    think_s: float  # after this turn's answer, before the next turn


@dataclass(frozen=True)
class Conversation:
    idx: int
    start: float
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Single:
    idx: int
    offset: float
    system: int  # index into SYSTEM_PROMPT_TOKENS, or -1: one distinct user message (noshare, warm-up)
    user_chars: int
    max_tokens: int


def draw_conversation(rng: random.Random, idx: int, start: float, think_mean: float) -> Conversation:
    n = rng.randint(*TURNS)
    turns = []
    for k in range(n):
        tokens = rng.randint(*(FIRST_PROMPT_TOKENS if k == 0 else USER_TOKENS))
        think = min(4 * think_mean, rng.expovariate(1 / think_mean)) if think_mean > 0 else 0.0
        turns.append(Turn(tokens * CHARS_PER_TOKEN, rng.randint(*ANSWER_TOKENS), think))
    return Conversation(idx, start, tuple(turns))


def draw_system_single(rng: random.Random, idx: int, offset: float) -> Single:
    return Single(idx, offset, rng.randrange(len(SYSTEM_PROMPT_TOKENS)),
                  rng.randint(*USER_TOKENS) * CHARS_PER_TOKEN, rng.randint(*ANSWER_TOKENS))


def turn_prompts(c: Conversation) -> list[tuple[int, int, int]]:
    """Per turn: (prompt chars, messages, reusable chars = what the previous turns' prompt and answer hold),
    with each answer estimated as max_tokens x the sim's characters per token."""
    out = []
    chars = 0
    for k, t in enumerate(c.turns):
        reusable = chars
        chars += t.user_chars
        out.append((chars, 2 * k + 1, reusable))
        chars += round(t.max_tokens * ANSWER_CPT)
    return out


def mean_turns() -> float:
    return (TURNS[0] + TURNS[1]) / 2


def rates(rate: float, system_share: float) -> tuple[float, float]:
    """(conversations/s, system-prompt singles/s) giving `rate` requests/s with `system_share` singles."""
    return rate * (1 - system_share) / mean_turns(), rate * system_share


def schedule_multiturn(seed: int, rate: float, stop: float, think_mean: float,
                       system_share: float) -> tuple[list[Conversation], list[Single]]:
    """Conversation starts and system-prompt singles as two Poisson processes over [0, stop). Separate RNG
    streams for arrivals and sizes: a seed gives the same conversations at any load (scaled in time)."""
    conv_rate, single_rate = rates(rate, system_share)
    convs: list[Conversation] = []
    arrivals, sizes = random.Random(f"mt-conv-arrivals-{seed}"), random.Random(f"mt-conv-sizes-{seed}")
    t = arrivals.expovariate(conv_rate) if conv_rate > 0 else math.inf
    while t < stop:
        convs.append(draw_conversation(sizes, len(convs), t, think_mean))
        t += arrivals.expovariate(conv_rate)
    singles: list[Single] = []
    arrivals, sizes = random.Random(f"mt-sys-arrivals-{seed}"), random.Random(f"mt-sys-sizes-{seed}")
    t = arrivals.expovariate(single_rate) if single_rate > 0 else math.inf
    while t < stop:
        singles.append(draw_system_single(sizes, len(singles), t))
        t += arrivals.expovariate(single_rate)
    return convs, singles


@dataclass
class Mix:
    """The multiturn request mix, sampled once (seed 7): sizes for the moments, capacity and noshare."""

    requests: list[tuple[int, int, int, int]]  # (prompt chars, messages, reusable chars, max_tokens)
    conversations: list[Conversation]
    system_share: float


def sample_mix(think_mean: float, system_share: float, n_conversations: int = 6000) -> Mix:
    rng = random.Random(7)
    convs = [draw_conversation(rng, i, 0.0, think_mean) for i in range(n_conversations)]
    reqs = [(chars, msgs, reuse, t.max_tokens) for c in convs for (chars, msgs, reuse), t in
            zip(turn_prompts(c), c.turns)]
    n_single = round(len(reqs) * system_share / (1 - system_share)) if system_share < 1 else 0
    for i in range(n_single):
        s = draw_system_single(rng, i, 0.0)
        sys_chars = SYSTEM_PROMPT_TOKENS[s.system] * CHARS_PER_TOKEN
        reqs.append((sys_chars + s.user_chars, 2, sys_chars, s.max_tokens))
    return Mix(reqs, convs, system_share)


def schedule_noshare(seed: int, rate: float, stop: float, mix: Mix, max_tokens_cap: int | None = None,
                     count: int | None = None) -> list[Single]:
    """Poisson singles over [0, stop) (at most `count`), each the size of a request drawn from the multiturn
    mix; every prompt is one distinct user message."""
    arrivals, sizes = random.Random(f"ns-arrivals-{seed}"), random.Random(f"ns-sizes-{seed}")
    out: list[Single] = []
    t = arrivals.expovariate(rate)
    while t < stop and (count is None or len(out) < count):
        chars, _, _, mt = mix.requests[sizes.randrange(len(mix.requests))]
        out.append(Single(len(out), t, -1, chars, mt if max_tokens_cap is None else min(mt, max_tokens_cap)))
        t += arrivals.expovariate(rate)
    return out


def moments(mix: Mix) -> dict[str, float]:
    toks = sorted(sim_tokens(c, m) for c, m, _, _ in mix.requests)
    reuse = sum(reusable_tokens(r, c, m) for c, m, r, _ in mix.requests)
    return {
        "requests_sampled": len(toks),
        "mean_prompt_tokens": statistics.fmean(toks),
        "p50_prompt_tokens": toks[len(toks) // 2],
        "p99_prompt_tokens": toks[int(0.99 * len(toks))],
        "max_prompt_tokens": toks[-1],
        "mean_completion_tokens": statistics.fmean(mt for _, _, _, mt in mix.requests),
        "mean_turns": statistics.fmean(len(c.turns) for c in mix.conversations),
        "reusable_token_share": reuse / sum(toks),
    }


def capacity(specs: tuple[BackendSpec, ...], m: dict[str, float]) -> dict[str, Any]:
    """Requests/s the pool sustains with no cache hit: per runtime max_batch / the mean time a request holds a
    slot, (ttft + prompt / prefill + (completion - 1) / decode) x the full batch's slowdown (the sim slows
    prefill and decode alike; at saturation every slot is busy). `all_hits_rps`: the same if every reusable
    token were a hit (for reading the numbers, never for the load)."""
    per: dict[str, Any] = {}
    for s in specs:
        full = 1 + R.slowdown(s) * (s.max_batch - 1)
        decode = (m["mean_completion_tokens"] - 1) / s.tokens_per_second
        service = (s.ttft_ms / 1e3 + m["mean_prompt_tokens"] / s.prefill_tokens_per_second + decode) * full
        hit = (s.ttft_ms / 1e3 + m["mean_prompt_tokens"] * (1 - m["reusable_token_share"])
               / s.prefill_tokens_per_second + decode) * full
        per[s.name] = {"mean_service_s": service, "rps": s.max_batch / service, "all_hits_rps": s.max_batch / hit}
    return {"backends": per, "rps": sum(p["rps"] for p in per.values()),
            "all_hits_rps": sum(p["all_hits_rps"] for p in per.values())}


def working_set(mix: Mix, conv_rate: float, load_slow: float, think_mean: float) -> dict[str, Any]:
    """Open conversations and the tokens they keep (prompt + answer of their latest turn) in steady state,
    by Little's law over the sampled conversations; a turn's latency is estimated uncached and unqueued."""
    durations, held = [], []
    for c in mix.conversations:
        d = h = 0.0
        for k, ((chars, msgs, _), t) in enumerate(zip(turn_prompts(c), c.turns)):
            ptok = sim_tokens(chars, msgs)
            latency = (TTFT_MS / 1e3 + ptok / PREFILL_TPS + (t.max_tokens - 1) / DECODE_TPS) * load_slow
            span = latency + (t.think_s if k + 1 < len(c.turns) else 0.0)
            d += span
            h += span * (ptok + t.max_tokens * ANSWER_CPT / CHARS_PER_TOKEN)
        durations.append(d)
        held.append(h)
    system = sum(SYSTEM_PROMPT_TOKENS)
    return {"conversation_s_mean": statistics.fmean(durations),
            "conversation_s_p90": sorted(durations)[int(0.9 * len(durations))],
            "open_conversations": conv_rate * statistics.fmean(durations),
            "conversation_tokens": conv_rate * statistics.fmean(held), "system_prompt_tokens": system,
            "tokens": conv_rate * statistics.fmean(held) + system,
            "_durations": durations}


def ramp_fill(durations: list[float], ramp: float) -> float:
    """Open conversations after `ramp` seconds as a share of steady state: E[min(D, ramp)] / E[D]."""
    return statistics.fmean(min(d, ramp) for d in durations) / statistics.fmean(durations)


# ---------------------------------------------------------------------------------------------------
# text: random words, seeded per (run, request), so no two runs and no two conversations share a prefix

_VOCAB: list[str] = []


def vocab() -> list[str]:
    if not _VOCAB:
        rng = random.Random("vocab")
        letters = "abcdefghijklmnopqrstuvwxyz"
        _VOCAB.extend("".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(2048))
    return _VOCAB


def text(key: str, chars: int) -> str:
    if chars <= 0:
        return ""
    rng = random.Random(key)
    words = rng.choices(vocab(), k=chars // 5 + 8)
    out = " ".join(words)
    while len(out) < chars:
        out += " " + " ".join(rng.choices(vocab(), k=chars // 5 + 8))
    return out[:chars]


def nonce(*parts: Any) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:10]


def body(messages: list[dict[str, str]], max_tokens: int) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True,
                         "stream_options": {"include_usage": True}, "temperature": 0})


# ---------------------------------------------------------------------------------------------------
# load


@dataclass
class PRes:
    rid: str
    conv: str
    kind: str  # first (a conversation's first turn) | turn (a later turn) | system | single
    turn: int
    prompt_chars: int
    reusable_chars: int
    messages: int
    max_tokens: int
    intended: float  # offset in the run it was due
    sent: float = 0.0  # offset it was sent at
    measured: bool = False
    backend: str | None = None  # the proxy's x-splitstream-backend
    ttft: float | None = None
    e2e: float | None = None
    error: str | None = None
    unfinished: bool = False
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # None: the usage had no prompt_tokens_details.cached_tokens
    completion_tokens: int | None = None

    @property
    def reusable_tokens(self) -> int:
        return reusable_tokens(self.reusable_chars, self.prompt_chars, self.messages)


async def fire(session: aiohttp.ClientSession, url: str, data: bytes, res: PRes, started: dict[str, float],
               base: float) -> str | None:
    """One streamed chat completion; returns the answer text, or None when it failed."""
    t0 = time.perf_counter()
    started[res.rid] = t0
    res.sent = t0 - base
    parts: list[str] = []
    done = False
    try:
        async with session.post(url, data=data, headers={"Content-Type": "application/json", "X-Request-Id": res.rid,
                                                         CONVERSATION_HEADER: res.conv}) as resp:
            res.backend = resp.headers.get("x-splitstream-backend")
            if resp.status != 200:
                await resp.read()
                res.error = f"HTTP {resp.status}"
                return None
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                now = time.perf_counter()
                if res.ttft is None:
                    res.ttft = now - t0
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    res.e2e = now - t0
                    done = True
                    continue
                try:
                    ev = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
                for ch in ev.get("choices") or ():
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        parts.append(piece)
                usage = ev.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens")
                    res.completion_tokens = usage.get("completion_tokens")
                    details = usage.get("prompt_tokens_details")
                    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                        res.cached_tokens = details["cached_tokens"]
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        res.error = type(exc).__name__
        return None
    if res.ttft is None:
        res.error = "no data chunk"
    elif not done:
        res.error = "missing [DONE]"
    return None if res.error else "".join(parts)


async def run_load(url: str, convs: list[Conversation], singles: list[Single], key: str, tag: str,
                   ramp: float, stop: float, drain_cap: float) -> dict[str, Any]:
    """Conversations (closed loop within each) and singles (open loop) until `stop`; then wait up to
    `drain_cap` for the requests in flight. Requests sent in [ramp, stop) are `measured`."""
    results: list[PRes] = []
    started: dict[str, float] = {}
    counts = Counter[str]()
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        base_loop = loop.time() + 0.05
        base_perf = time.perf_counter() + 0.05

        async def until(offset: float) -> None:
            delay = base_loop + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

        async def conversation(c: Conversation) -> None:
            cid = f"{tag}.c{c.idx}"
            messages = [{"role": "user", "content": text(f"{key}/c{c.idx}/0", c.turns[0].user_chars)}]
            chars = c.turns[0].user_chars
            reusable = 0
            due = c.start
            for k, t in enumerate(c.turns):
                if due >= stop:
                    counts["turns_after_window"] += len(c.turns) - k
                    return
                await until(due)
                res = PRes(f"{cid}.t{k}", cid, "first" if k == 0 else "turn", k, chars, reusable, len(messages),
                           t.max_tokens, due)
                results.append(res)
                answer = await fire(session, url, body(messages, t.max_tokens), res, started, base_perf)
                if answer is None:
                    counts["turns_dropped_after_error"] += len(c.turns) - k - 1
                    return
                if k + 1 < len(c.turns):
                    new = text(f"{key}/c{c.idx}/{k + 1}", c.turns[k + 1].user_chars)
                    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": new}]
                    reusable = chars + len(answer)
                    chars = reusable + len(new)
                    due = loop.time() - base_loop + t.think_s

        async def single(s: Single) -> None:
            await until(s.offset)
            cid = f"{tag}.x{s.idx}"
            user = text(f"{key}/x{s.idx}", s.user_chars)
            if s.system >= 0:
                system = text(f"{key}/system{s.system}", SYSTEM_PROMPT_TOKENS[s.system] * CHARS_PER_TOKEN)
                messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
                res = PRes(cid, cid, "system", 0, len(system) + len(user), len(system), 2, s.max_tokens, s.offset)
            else:
                messages = [{"role": "user", "content": user}]
                res = PRes(cid, cid, "single", 0, len(user), 0, 1, s.max_tokens, s.offset)
            results.append(res)
            await fire(session, url, body(messages, s.max_tokens), res, started, base_perf)

        tasks = [asyncio.create_task(conversation(c)) for c in convs]
        tasks += [asyncio.create_task(single(s)) for s in singles]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, base_loop + stop + drain_cap - loop.time()))
        cutoff = time.perf_counter()
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        r.measured = ramp <= r.sent < stop
        if r.e2e is None and r.error is None:
            r.unfinished = True
            r.e2e = cutoff - started.get(r.rid, cutoff)
    return {"results": results, "counts": dict(counts), "unfinished": sum(r.unfinished for r in results),
            "max_fire_lag_ms": max((r.sent - r.intended for r in results), default=0.0) * 1e3}


# ---------------------------------------------------------------------------------------------------
# summaries


def summarize(results: list[PRes], window: float) -> dict[str, Any]:
    meas = [r for r in results if r.measured]
    ok = [r for r in meas if r.error is None and not r.unfinished]
    e2e = [r.e2e for r in meas if r.error is None and r.e2e is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    floor_unfinished = min((r.e2e for r in meas if r.unfinished and r.e2e is not None), default=math.inf)
    with_usage = [r for r in ok if r.prompt_tokens]
    with_cached = [r for r in with_usage if r.cached_tokens is not None]
    prompt_sum = sum(r.prompt_tokens or 0 for r in with_cached)
    out: dict[str, Any] = {
        "requests": len(meas), "completed": len(ok), "errors": sum(1 for r in meas if r.error),
        "error_kinds": dict(Counter(r.error for r in meas if r.error)),
        "unfinished": sum(1 for r in meas if r.unfinished),
        "offered_rps_measured": len(meas) / window if window > 0 else float("nan"),
        "e2e_p50_s": harness.pct(e2e, 50), "e2e_p95_s": harness.pct(e2e, 95), "e2e_p99_s": harness.pct(e2e, 99),
        "ttft_p50_ms": harness.pct(ttft, 50) * 1e3, "ttft_p99_ms": harness.pct(ttft, 99) * 1e3,
        "ttft_p50_ms_by_kind": {k: harness.pct([r.ttft for r in ok if r.kind == k and r.ttft is not None], 50) * 1e3
                                for k in ("first", "turn", "system", "single")
                                if any(r.kind == k for r in ok)},
        "requests_by_kind": dict(Counter(r.kind for r in meas)),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in with_usage),
        "cached_tokens": sum(r.cached_tokens or 0 for r in with_cached),
        "usage_missing": len(ok) - len(with_usage),
        "cached_tokens_all_requests": sum(r.cached_tokens or 0 for r in results),
        "cached_reported": len(with_cached),
        "hit_ratio": (sum(r.cached_tokens or 0 for r in with_cached) / prompt_sum) if prompt_sum else float("nan"),
        "reusable_ratio": (sum(r.reusable_tokens for r in with_usage) / sum(r.prompt_tokens or 0 for r in with_usage)
                           if with_usage else float("nan")),
    }
    for key in ("e2e_p50_s", "e2e_p95_s", "e2e_p99_s"):
        out[key + "_lower_bound"] = bool(out[key] >= floor_unfinished)
    per: dict[str, dict[str, Any]] = {}
    for r in meas:
        d = per.setdefault(str(r.backend), {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "_ttft": []})
        d["requests"] += 1
        d["prompt_tokens"] += r.prompt_tokens or 0
        d["cached_tokens"] += r.cached_tokens or 0
        if r.ttft is not None and r.error is None and not r.unfinished:
            d["_ttft"].append(r.ttft)
    for d in per.values():
        d["hit_ratio"] = d["cached_tokens"] / d["prompt_tokens"] if d["prompt_tokens"] else float("nan")
        d["ttft_p50_ms"] = harness.pct(d.pop("_ttft"), 50) * 1e3
    out["by_backend"] = dict(sorted(per.items()))
    return out


MEDIAN_KEYS = ("e2e_p50_s", "e2e_p95_s", "e2e_p99_s", "ttft_p50_ms", "ttft_p99_ms", "offered_rps_measured")


def medians(runs: list[dict[str, Any]], backends: list[str]) -> dict[str, Any]:
    m: dict[str, Any] = {k: harness.med([r[k] for r in runs]) for k in MEDIAN_KEYS}
    for k in ("e2e_p50_s", "e2e_p95_s", "e2e_p99_s"):
        m[k + "_lower_bound"] = sum(r[k + "_lower_bound"] for r in runs) * 2 >= len(runs) and bool(runs)
    for k in ("errors", "unfinished", "requests", "prompt_tokens", "cached_tokens", "cached_reported"):
        m[k] = sum(r[k] for r in runs)
    m["hit_ratio"] = m["cached_tokens"] / m["prompt_tokens"] if m["cached_reported"] and m["prompt_tokens"] \
        else float("nan")
    m["reusable_ratio"] = harness.med([r["reusable_ratio"] for r in runs])
    shares: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        total = sum(b["requests"] for b in r["by_backend"].values())
        for name in backends:
            shares[name].append(r["by_backend"].get(name, {}).get("requests", 0) / total if total else 0.0)
    m["backend_share"] = {k: statistics.fmean(v) for k, v in shares.items()}
    return m


# ---------------------------------------------------------------------------------------------------
# plan and run


@dataclass
class Plan:
    workloads: list[str]
    seeds: int
    loads: dict[str, list[float]]
    policies: dict[str, list[str]]
    warmup: int
    drain_cap: float
    window: float
    ramp: float
    noshare_ramp: float
    think: float
    system_share: float
    cache_fraction: float
    report_timings: bool
    calibrate: bool
    concurrency_cap: int
    specs: tuple[BackendSpec, ...]
    mix: Mix
    moments: dict[str, float]
    capacity: dict[str, Any]
    working_set: dict[str, Any]
    sim_missing: list[str]
    warnings: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multiturn / noshare (bench/routing_prefix.py)")
    g.add_argument("--window", type=float, default=None,
                   help="measured seconds per run (default 10, --quick 6); multiturn sends no turn after it")
    g.add_argument("--ramp", type=float, default=None,
                   help="multiturn: seconds of traffic before the measured window (default: the estimated mean "
                        "conversation length at the top load, rounded up; --quick: half that)")
    g.add_argument("--think", type=float, default=THINK_MEAN_S,
                   help=f"mean think time between a turn's answer and the next turn, s (default {THINK_MEAN_S:g})")
    g.add_argument("--system-share", type=float, default=SYSTEM_SHARE,
                   help=f"share of requests that are shared-system-prompt singles (default {SYSTEM_SHARE:g})")
    g.add_argument("--cache-fraction", type=float, default=CACHE_FRACTION,
                   help="each runtime's prefix cache as a share of the open conversations' tokens at the top load "
                        "(default 1/3; the shared system prompts come on top of those)")
    g.add_argument("--report-timings", action="store_true", help="SimConfig.report_timings on the runtimes")


def prepare(args: argparse.Namespace, parser: argparse.ArgumentParser, workloads: list[str],
            explicit_loads: list[float] | None, explicit_policies: list[str] | None) -> Plan:
    chosen = [w for w in workloads if w in ("multiturn", "noshare")]
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    window = args.window if args.window is not None else (6.0 if args.quick else 10.0)
    if seeds < 1 or window <= 0 or not 0 <= args.system_share < 1 or not 0 < args.cache_fraction <= 4:
        parser.error("multiturn/noshare: --seeds >= 1, --window > 0, --system-share in [0, 1), "
                     "--cache-fraction in (0, 4]")
    loads = {"multiturn": explicit_loads or ([0.8] if args.quick else [0.5, 0.8]),
             "noshare": explicit_loads or [0.8]}
    policies = {}
    for w, default in (("multiturn", POLICIES), ("noshare", NOSHARE_POLICIES)):
        policies[w] = [p for p in (explicit_policies or default) if p in POLICIES]
        if w in chosen and not policies[w]:
            parser.error(f"{w}: --policies names none of {', '.join(POLICIES)}")
    known = R.sim_fields()
    sim_missing = [f for f in ("prefix_cache_tokens", "prefix_block_tokens", "batch_slowdown", "report_timings")
                   if f not in known]

    mix = sample_mix(args.think, args.system_share)
    m = moments(mix)
    base = tuple(BackendSpec(f"r{i}", DECODE_TPS, PREFILL_TPS, MAX_BATCH, TTFT_MS, 0, BATCH_SLOWDOWN, BLOCK_TOKENS)
                 for i in range(1, N_RUNTIMES + 1))
    cap = capacity(base, m)
    top = max(loads["multiturn"] if "multiturn" in chosen else loads["noshare"])
    conv_rate, _ = rates(top * cap["rps"], args.system_share)
    running = max(1.0, MAX_BATCH * top)
    ws = working_set(mix, conv_rate, 1 + R.slowdown(base[0]) * (running - 1), args.think)
    durations = ws.pop("_durations")
    cache = max(BLOCK_TOKENS, int(ws["conversation_tokens"] * args.cache_fraction) // BLOCK_TOKENS * BLOCK_TOKENS)
    specs = tuple(BackendSpec(s.name, s.tokens_per_second, s.prefill_tokens_per_second, s.max_batch, s.ttft_ms,
                              cache, s.batch_slowdown, s.block_tokens) for s in base)
    ramp = args.ramp if args.ramp is not None else math.ceil(ws["conversation_s_mean"]) * (
        0.5 if args.quick else 1.0)
    ws["ramp_fill"] = ramp_fill(durations, ramp)
    plan = Plan(chosen, seeds, loads, policies, args.warmup if args.warmup is not None else
                (10 if args.quick else WARMUP_REQUESTS), args.drain_cap if args.drain_cap is not None else 30.0,
                window, ramp, min(2.0, ramp), args.think, args.system_share, args.cache_fraction,
                args.report_timings, not args.no_calibrate, args.concurrency_cap, specs, mix, m, cap, ws,
                sim_missing)
    if sim_missing:
        plan.warnings.append(
            f"SimConfig has no {', '.join(sim_missing)} yet: the runtimes run without them (no prefix cache: every "
            "hit ratio is 0 and the prefix policies cannot show a gain; no batch slowdown: the capacity model "
            "drops it)")

    # print the sizes
    print(f"prefix scenario ({', '.join(chosen)}): {N_RUNTIMES} equal runtimes, decode {DECODE_TPS:g} tok/s per "
          f"stream, prefill {PREFILL_TPS:g} tok/s, TTFT base {TTFT_MS:g} ms, max_batch {MAX_BATCH}, batch_slowdown "
          f"{BATCH_SLOWDOWN:g}{' (not in this sim)' if 'batch_slowdown' in sim_missing else ''}, prefix cache "
          f"{cache} tokens each (blocks of {BLOCK_TOKENS}){' (not in this sim)' if 'prefix_cache_tokens' in sim_missing else ''}")
    print(f"  conversations: {TURNS[0]}-{TURNS[1]} turns; first prompt {FIRST_PROMPT_TOKENS[0]}-"
          f"{FIRST_PROMPT_TOKENS[1]} tokens; each later turn adds the answer ({ANSWER_TOKENS[0]}-{ANSWER_TOKENS[1]} "
          f"tokens, ~{ANSWER_CPT / CHARS_PER_TOKEN:.2f} prompt tokens each when sent back) and a new user message "
          f"({USER_TOKENS[0]}-{USER_TOKENS[1]} tokens); think time exp. mean {args.think:g} s")
    print(f"  {100 * args.system_share:.0f}% of requests: singles starting with one of {len(SYSTEM_PROMPT_TOKENS)} "
          f"shared system prompts ({'/'.join(map(str, SYSTEM_PROMPT_TOKENS))} tokens) + a user message")
    print(f"  request mix: prompt tokens mean {m['mean_prompt_tokens']:.0f}, p50 {m['p50_prompt_tokens']}, p99 "
          f"{m['p99_prompt_tokens']}, max {m['max_prompt_tokens']}; completion mean "
          f"{m['mean_completion_tokens']:.0f}; reusable prefix share {100 * m['reusable_token_share']:.0f}% of "
          "prompt tokens (the upper bound of the hit ratio)")
    print(f"  capacity (no cache hits): {cap['rps']:.2f} req/s ({cap['backends']['r1']['rps']:.2f} per runtime, "
          f"slot {cap['backends']['r1']['mean_service_s']:.2f} s); if every reusable token hit: "
          f"{cap['all_hits_rps']:.2f} req/s")
    print(f"  at {100 * top:.0f}%: {conv_rate:.2f} conversations/s, mean length ~{ws['conversation_s_mean']:.1f} s "
          f"(p90 {ws['conversation_s_p90']:.1f} s), ~{ws['open_conversations']:.0f} open, working set "
          f"~{ws['tokens']:.0f} tokens ({ws['conversation_tokens']:.0f} conversations + {ws['system_prompt_tokens']} "
          f"system prompts); cache per runtime = {args.cache_fraction:.2f} of the conversations' tokens")
    n_cells = sum(len(policies[w]) * len(loads[w]) for w in chosen)
    per_run = {"multiturn": ramp + window + 3, "noshare": plan.noshare_ramp + window + 3}
    est = sum(len(policies[w]) * len(loads[w]) * (seeds * per_run[w] + 6) for w in chosen)
    print(f"  runs: ramp {ramp:g} s (open conversations reach ~{100 * ws['ramp_fill']:.0f}% of steady state) + "
          f"measured window {window:g} s (noshare: ramp {plan.noshare_ramp:g} s); {n_cells} proxies x ({plan.warmup} "
          f"warm-up + {seeds} seed(s)); drain cap {plan.drain_cap:g} s; estimated ~{est / 60:.0f} min", flush=True)
    for w in plan.warnings:
        print(f"  WARNING: {w}", flush=True)
    return plan


@dataclass
class PCell:
    label: str
    workload: str
    policy: str
    load: float
    rate: float
    rules: str = ""
    balance: str = ""
    cache_tokens_told: bool = False
    fallback: str | None = None  # why the rules differ from the intended ones
    proxy: harness.Proc | None = None
    port: int = 0
    url: str = ""
    warmup: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    raw: list[list[PRes]] = field(default_factory=list)
    learned: dict[str, Any] = field(default_factory=dict)
    prefix_metrics: dict[str, Any] = field(default_factory=dict)


def resolve_rules(tmp: Path, sims: R.Sims, c: PCell) -> bool:
    """The first form of rules the loader takes: the intended `balance` with `cache_tokens`, then without
    `cache_tokens`, then the older balance forms. False: none (the cell is skipped)."""
    first_error = None
    forms = BALANCE_FORMS[c.policy]
    for i, balance in enumerate(forms):
        for cache in (True, False):
            text_ = R.rules_text(sims, balance, cache)
            errors = R.check_rules(tmp, text_)
            if not errors:
                c.rules, c.balance, c.cache_tokens_told = text_, balance, cache
                if i or not cache:
                    c.fallback = (f"rules loader refused `balance: {forms[0]}` with cache_tokens ({first_error}); "
                                  f"running `balance: {balance}`{'' if cache else ' without cache_tokens'}")
                return True
            if first_error is None:
                first_error = next((e for e in errors if "bench.yaml" in e), errors[0])[-300:]
    c.fallback = f"rules loader refused every form ({first_error}): skipped"
    return False


PREFIX_METRICS = ("splitstream_prefix_predicted_tokens_total", "splitstream_prefix_reported_cached_tokens_total")


def prefix_counters(port: int) -> dict[str, dict[str, float]]:
    out = {}
    for name in PREFIX_METRICS:
        try:
            out[name] = harness.metric_by(port, name, "backend")
        except OSError:
            out[name] = {}
    return out


def run_level(tmp: Path, sims: R.Sims, plan: Plan, workload: str, load: float,
              problems: list[str]) -> list[dict[str, Any]]:
    rate = load * plan.capacity["rps"]
    tagw = "mt" if workload == "multiturn" else "ns"
    cells = [PCell(f"{tagw}-L{round(100 * load)}-{p}", workload, p, load, rate) for p in plan.policies[workload]]
    live = []
    for c in cells:
        if resolve_rules(tmp, sims, c):
            live.append(c)
        if c.fallback:
            problems.append(f"{c.label}: {c.fallback}")
            print(f"  WARNING {c.label}: {c.fallback}", flush=True)
    conv_rate, single_rate = rates(rate, plan.system_share)
    print(f"  [{workload} {100 * load:.0f}%] {rate:.2f} req/s"
          + (f" ({conv_rate:.2f} conversations/s + {single_rate:.2f} system-prompt singles/s)"
             if workload == "multiturn" else " (distinct single prompts)")
          + "; proxies: " + ", ".join(c.policy for c in live), flush=True)
    try:
        for c in live:
            c.proxy, c.port = R.start_proxy(tmp, c.label, sims, c.policy, c.rules)
            c.url = f"http://127.0.0.1:{c.port}/v1/chat/completions"
        warm = schedule_noshare(424242, WARMUP_LOAD * plan.capacity["rps"], math.inf, plan.mix, WARMUP_MAX_TOKENS,
                                count=plan.warmup)
        warm_stop = (warm[-1].offset if warm else 0.0) + 1.0
        for c in live:
            w = harness.run_async(run_load(c.url, [], warm, nonce(c.label, "warm"), "warm", 0.0, warm_stop, 30.0))
            c.warmup = summarize(w["results"], warm_stop)
            c.learned["end of warm"] = R.learned_snapshot(c.port)
            if c.warmup["errors"] or c.warmup["unfinished"]:
                problems.append(f"{c.label}: warm-up had {c.warmup['errors']} errors {c.warmup['error_kinds']}, "
                                f"{c.warmup['unfinished']} unfinished")
        for seed in range(1, plan.seeds + 1):
            if workload == "multiturn":
                ramp = plan.ramp
                convs, singles = schedule_multiturn(seed, rate, ramp + plan.window, plan.think, plan.system_share)
            else:
                ramp = plan.noshare_ramp
                convs, singles = [], schedule_noshare(seed, rate, ramp + plan.window, plan.mix)
            k = (seed - 1) % max(1, len(live))
            for c in live[k:] + live[:k]:
                time.sleep(0.2)
                sims.check()
                assert c.proxy is not None
                c.proxy.check()
                c.runs.append(measure(c, sims, convs, singles, seed, ramp, plan, problems))
    finally:
        for c in live:
            if c.proxy is not None:
                c.proxy.stop()
    return [finish(c, sims, plan, problems) for c in cells]


def measure(c: PCell, sims: R.Sims, convs: list[Conversation], singles: list[Single], seed: int, ramp: float,
            plan: Plan, problems: list[str]) -> dict[str, Any]:
    assert c.proxy is not None
    before = prefix_counters(c.port)
    ticks0 = (c.proxy.cpu_ticks(), sims.cpu_ticks(), harness.self_cpu_ticks(), harness.machine_ticks()[0])
    t0 = time.monotonic()
    r = harness.run_async(run_load(c.url, convs, singles, nonce(c.label, seed), f"s{seed}", ramp,
                                   ramp + plan.window, plan.drain_cap))
    wall = time.monotonic() - t0
    ticks1 = (c.proxy.cpu_ticks(), sims.cpu_ticks(), harness.self_cpu_ticks(), harness.machine_ticks()[0])
    after = prefix_counters(c.port)
    s = summarize(r["results"], plan.window)
    s.update(seed=seed, wall_s=wall, ramp_s=ramp, window_s=plan.window, offered_rps=c.rate,
             conversations=len(convs), singles=len(singles), sent_total=len(r["results"]),
             max_fire_lag_ms=r["max_fire_lag_ms"], **r["counts"],
             prefix_metrics={name: {b: after[name].get(b, 0.0) - before[name].get(b, 0.0) for b in after[name]}
                             for name in PREFIX_METRICS},
             cpu_pct={k: 100.0 * (b - a) / harness.CLK_TCK / wall
                      for k, a, b in zip(("proxy", "sims", "client", "machine"), ticks0, ticks1)})
    cpu = s["cpu_pct"]
    cpu["other"] = max(0.0, cpu["machine"] - cpu["proxy"] - cpu["sims"] - cpu["client"])
    s["contended"] = cpu["other"] > R.OTHER_CPU_LIMIT
    if s["contended"]:
        problems.append(f"{c.label} seed {seed}: other processes used {cpu['other']:.0f}% of a core during the "
                        f"run (this benchmark {cpu['machine'] - cpu['other']:.0f}%): its numbers are suspect")
    if s["errors"]:
        problems.append(f"{c.label} seed {seed}: {s['errors']} errors {s['error_kinds']}")
    if s["max_fire_lag_ms"] > 100:
        problems.append(f"{c.label} seed {seed}: a request went out {s['max_fire_lag_ms']:.0f} ms late (client "
                        "event loop busy)")
    c.raw.append(r["results"])
    c.learned[f"end of s{seed}"] = R.learned_snapshot(c.port)
    hit = "n/a" if s["hit_ratio"] != s["hit_ratio"] else f"{100 * s['hit_ratio']:.0f}%"
    print(f"    {c.label:<28} seed {seed}: {s['requests']} measured of {s['sent_total']} sent, "
          f"{s['offered_rps_measured']:.1f} req/s, wall {wall:4.1f}s  ttft p50/p99 {s['ttft_p50_ms']:4.0f}/"
          f"{s['ttft_p99_ms']:5.0f} ms  e2e p99 {R._sec(s, 'e2e_p99_s')}  hit {hit}  err {s['errors']} unfin "
          f"{s['unfinished']}  cpu% proxy {cpu['proxy']:.0f} sims {cpu['sims']:.0f} client {cpu['client']:.0f} "
          f"other {cpu['other']:.0f}", flush=True)
    return s


def finish(c: PCell, sims: R.Sims, plan: Plan, problems: list[str]) -> dict[str, Any]:
    names = [s.name for s in plan.specs]
    out: dict[str, Any] = {"label": c.label, "workload": c.workload, "policy": c.policy, "load": c.load,
                           "offered_rps": c.rate, "balance": c.balance, "cache_tokens_told": c.cache_tokens_told,
                           "fallback": c.fallback, "skipped": c.proxy is None}
    if c.proxy is None:
        return out
    levels, samples = R.other_log_lines(c.proxy.log)
    if samples:
        problems.append(f"{c.label}: proxy logged {dict(levels)}; first: {samples[0][:300]}")
    for run, results in zip(c.runs, c.raw):
        run["detail"] = {"fields": ["request_id", "kind", "turn", "backend", "prompt_chars", "reusable_chars",
                                    "max_tokens", "sent_s", "measured", "ttft_s", "e2e_s", "prompt_tokens",
                                    "cached_tokens", "error", "unfinished"],
                         "rows": [[r.rid, r.kind, r.turn, r.backend, r.prompt_chars, r.reusable_chars, r.max_tokens,
                                   round(r.sent, 4), r.measured, None if r.ttft is None else round(r.ttft, 4),
                                   None if r.e2e is None else round(r.e2e, 4), r.prompt_tokens, r.cached_tokens,
                                   r.error, r.unfinished] for r in results]}
    predicted = sum(sum(run["prefix_metrics"][PREFIX_METRICS[0]].values()) for run in c.runs)
    reported = sum(sum(run["prefix_metrics"][PREFIX_METRICS[1]].values()) for run in c.runs)
    metrics_present = any(run["prefix_metrics"][n] for run in c.runs for n in PREFIX_METRICS)
    pooled = summarize([r for results in c.raw for r in results], plan.window * len(c.runs))
    out.update(warmup=c.warmup, runs=c.runs, learned=c.learned, median=medians(c.runs, names), pooled=pooled,
               contended_runs=sum(1 for s in c.runs if s["contended"]),
               proxy_prefix_metrics={"present": metrics_present, "predicted_tokens": predicted,
                                     "reported_cached_tokens": reported})
    return out


def run(plan: Plan, tmp: Path, problems: list[str], out: dict[str, Any]) -> None:
    """Start the runtimes, calibrate, run every (workload, load) level; cells land in out['cells'] as they
    finish (so an aborted run still reports what it measured)."""
    problems.extend(plan.warnings)
    out.setdefault("cells", [])
    sims = R.Sims(tmp, "pfx", plan.specs, plan.report_timings)
    try:
        if plan.calibrate:
            cal = harness.run_async(R.calibrate(sims))
            service = plan.capacity["backends"]["r1"]["mean_service_s"]
            measured = sum(s.max_batch / (service * cal[s.name]["ratio"]) for s in plan.specs)
            out["calibration"] = {"backends": cal, "capacity_rps": measured}
            print("  calibration (max_batch concurrent 64-token streams straight to each runtime, measured/model): "
                  + ", ".join(f"{n} {v['measured_s']:.3f}/{v['model_s']:.3f}s ({v['ratio']:.2f})"
                              for n, v in cal.items())
                  + f" -> capacity ~{measured:.2f} req/s", flush=True)
        for workload in plan.workloads:
            for load in plan.loads[workload]:
                out["cells"] += run_level(tmp, sims, plan, workload, load, problems)
    finally:
        sims.close()


# ---------------------------------------------------------------------------------------------------
# report


def _cell(cells: list[dict[str, Any]], workload: str, load: float, policy: str) -> dict[str, Any] | None:
    return next((c for c in cells if c["workload"] == workload and c["policy"] == policy
                 and abs(c["load"] - load) < 1e-9 and not c.get("skipped") and c.get("runs")), None)


def ratio(cells: list[dict[str, Any]], workload: str, load: float, num: str, den: str,
          metric: str) -> dict[str, Any] | None:
    a, b = _cell(cells, workload, load, num), _cell(cells, workload, load, den)
    if a is None or b is None:
        return None
    key = METRIC_KEYS[metric]
    ma, mb = a["median"][key], b["median"][key]
    return {"numerator": ma, "denominator": mb, "ratio": ma / mb if mb else float("nan"),
            "numerator_lower_bound": bool(a["median"].get(key + "_lower_bound")),
            "denominator_lower_bound": bool(b["median"].get(key + "_lower_bound")),
            "per_seed": [x[key] / y[key] if y[key] else float("nan") for x, y in zip(a["runs"], b["runs"])],
            "pooled_ratio": a["pooled"][key] / b["pooled"][key] if b["pooled"][key] else float("nan"),
            "fallback": bool(a.get("fallback") or b.get("fallback"))}


def _fmt(v: float, unit: str) -> str:
    if v != v:
        return "-"
    return f"{v:.0f}ms" if unit == "ms" else f"{v:.2f}s"


HEADER = ["load", "policy", "req/s", "p50 ttft", "p99 ttft", "p50 e2e", "p99 e2e", "hit", "reusable", "errors",
          "unfinished", "share % (r1/r2/r3/r4)"]


def table_rows(cells: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in cells:
        mark = ("!" if c.get("fallback") else "") + ("*" if c.get("contended_runs") else "")
        if c.get("skipped") or not c.get("runs"):
            rows.append([f"{100 * c['load']:.0f}%", c["policy"] + mark, "skipped"] + [""] * (len(HEADER) - 3))
            continue
        m = c["median"]
        hit = "n/a" if m["hit_ratio"] != m["hit_ratio"] else f"{100 * m['hit_ratio']:.0f}%"
        reuse = "-" if m["reusable_ratio"] != m["reusable_ratio"] else f"{100 * m['reusable_ratio']:.0f}%"
        rows.append([f"{100 * c['load']:.0f}%", c["policy"] + mark, f"{m['offered_rps_measured']:.1f}",
                     _fmt(m["ttft_p50_ms"], "ms"), _fmt(m["ttft_p99_ms"], "ms"), R._sec(m, "e2e_p50_s"),
                     R._sec(m, "e2e_p99_s"), hit, reuse, str(m["errors"]), str(m["unfinished"]),
                     "/".join(f"{100 * v:.0f}" for v in m["backend_share"].values())])
    return rows


def print_table(title: str, rows: list[list[str]]) -> None:
    harness.print_aligned(title, HEADER, rows)


def print_ratio_grid(cells: list[dict[str, Any]], load: float) -> None:
    """Every policy's TTFT p50/p99 and e2e p99 over least_conn's and least_cost_noprefix's (medians over seeds)."""
    print(f"\nmultiturn {100 * load:.0f}%: ratios (medians over seeds)   ttft p50 / ttft p99 / e2e p99")
    for p in POLICIES:
        if _cell(cells, "multiturn", load, p) is None:
            continue
        parts = []
        for den in ("least_conn", "least_cost_noprefix"):
            if p == den:
                parts.append(f"vs {den}: -")
                continue
            rs = [ratio(cells, "multiturn", load, p, den, k) for k in ("ttft_p50", "ttft_p99", "e2e_p99")]
            parts.append(f"vs {den}: " + " / ".join("-" if r is None else f"{r['ratio']:.2f}" for r in rs))
        print(f"  {p:<20} " + "    ".join(parts))


def print_target(name: str, r: dict[str, Any] | None, target: float) -> None:
    if r is None:
        print(f"  {name}: not measured")
        return
    seeds = ", ".join(f"{x:.2f}" for x in r["per_seed"])
    caveat = "  (a policy fell back to other rules: not the comparison the target means)" if r["fallback"] else ""
    if r["numerator_lower_bound"] or r["denominator_lower_bound"]:
        caveat += "  (a lower bound is involved)"
    print(f"  {name}: {r['ratio']:.2f}  target <= {target:g}  {'met' if r['ratio'] <= target else 'MISSED'}"
          f"   per seed {seeds}; pooled {r['pooled_ratio']:.2f}{caveat}")


def report(plan: Plan, out: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    cells: list[dict[str, Any]] = out.get("cells", [])
    order = {p: i for i, p in enumerate(POLICIES)}
    cells.sort(key=lambda c: (plan.workloads.index(c["workload"]), c["load"], order[c["policy"]]))
    cap = plan.capacity
    for w in plan.workloads:
        wc = [c for c in cells if c["workload"] == w]
        if wc:
            print_table(f"{w}: {N_RUNTIMES} equal runtimes with {plan.specs[0].cache_tokens}-token prefix caches, "
                        f"capacity {cap['rps']:.2f} req/s without hits; medians over {plan.seeds} seed(s) of the "
                        f"measured {plan.window:g} s", table_rows(wc))
    if cells:
        print("hit = cached / prompt tokens from the answers' usage (n/a: the runtime reported no cached_tokens); "
              "reusable = share of prompt tokens an earlier request of the run already sent (upper bound); "
              "! = rules fell back (see problems); * = contended run")
    for load in plan.loads.get("multiturn", []) if "multiturn" in plan.workloads else []:
        print_ratio_grid(cells, load)
    targets: dict[str, Any] = {}
    for name, limit in TARGETS.items():
        w, pct, metric_a, metric_b, rest = name.split("_", 4)
        metric = f"{metric_a}_{metric_b}"
        num, den = rest.split("_over_")
        if w not in plan.workloads:
            continue
        targets[name] = {"target": limit, **(ratio(cells, w, int(pct) / 100, num, den, metric) or {})}
    if targets:
        print("\ntargets at 80% load (medians over seeds):")
        for name, limit in TARGETS.items():
            if name in targets:
                t = targets[name]
                print_target(name.replace("_over_", " / "), t if "ratio" in t else None, limit)
    print("\nproxy prefix metrics (sum over runs, ramp included: predicted by the proxy / cached as the runtimes "
          "reported to the proxy / cached as the answers told the client):")
    for c in cells:
        if c.get("skipped") or not c.get("runs"):
            continue
        pm = c["proxy_prefix_metrics"]
        client = sum(r["cached_tokens_all_requests"] for r in c["runs"])
        if pm["present"]:
            print(f"  {c['label']:<30} {pm['predicted_tokens']:.0f} / {pm['reported_cached_tokens']:.0f} / {client}")
        else:
            print(f"  {c['label']:<30} (no splitstream_prefix_* series on /metrics) / - / {client}")
    R.print_learned([c for c in cells if c.get("learned")], ("least_cost", "least_cost_noprefix"))
    return {
        "workloads": plan.workloads, "seeds": plan.seeds, "loads": plan.loads, "policies": plan.policies,
        "window_s": plan.window, "ramp_s": plan.ramp, "noshare_ramp_s": plan.noshare_ramp,
        "warmup": {"requests": plan.warmup, "load": WARMUP_LOAD, "max_tokens_cap": WARMUP_MAX_TOKENS},
        "drain_cap_s": plan.drain_cap,
        "backends": [asdict(s) for s in plan.specs], "sim_missing_fields": plan.sim_missing,
        "workload": {"turns": TURNS, "first_prompt_tokens": FIRST_PROMPT_TOKENS, "user_tokens": USER_TOKENS,
                     "answer_tokens": ANSWER_TOKENS, "system_prompt_tokens": SYSTEM_PROMPT_TOKENS,
                     "system_share": plan.system_share, "think_mean_s": plan.think,
                     "answer_chars_per_token": ANSWER_CPT, "moments": plan.moments},
        "capacity": plan.capacity, "calibration": out.get("calibration"), "working_set": plan.working_set,
        "cache_fraction": plan.cache_fraction, "targets": targets,
        "table": [dict(zip(HEADER, r)) for r in table_rows(cells)],
        "cells": cells,
    }
