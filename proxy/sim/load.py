"""A simulated client population: a mixed, bounded load against splitstream (`splitstream load`).

Feeds the dashboards in the compose demo and in tests: sticky subjects (`x-user-id`), streams and whole
answers, and a share of repeated temperature-0 prompts that a route cache can answer. Prompts are made of
filler words, and nothing of a request or an answer is printed: only counts (status class, variant).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
import orjson

# Prompts are filler words: the load needs sizes and repetition, not meaning.
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
REPEATED_PROMPTS = 8  # distinct temperature-0 prompts that repeat (a route cache answers all but the first)
# Applications open every conversation with their own system prompt: a few long shared ones, so the runtimes'
# prefix caches (and least_cost's prefix index, and the dashboards' prefix panels) see real reuse.
SYSTEM_PROMPTS = tuple(
    "You are assistant " + str(n) + ". " + " ".join(_WORDS[(n + i) % len(_WORDS)] for i in range(240))
    for n in range(3)
)
REPORT_EVERY = 10.0  # seconds between summary lines when the load runs until stopped


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """What to send. `count` 0 = until cancelled; `rate` 0 = as fast as `concurrency` allows."""

    urls: tuple[str, ...]  # OpenAI base URLs (…/v1), taken in turn
    model: str
    count: int = 0
    rate: float = 5.0  # requests per second
    concurrency: int = 8
    users: int = 50  # distinct sticky subjects
    stream_share: float = 0.5
    repeat_share: float = 0.2  # requests with temperature 0 and one of REPEATED_PROMPTS prompts
    max_tokens: int = 16
    seed: int | None = None


@dataclass(slots=True)
class LoadSummary:
    """Counts only: answers by status class (or `error` when no answer came) and by variant header."""

    sent: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_variant: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> bytes:
        return orjson.dumps({"sent": self.sent, "by_status": dict(self.by_status),
                             "by_variant": dict(self.by_variant)})


def plan_request(config: LoadConfig, index: int, rng: random.Random) -> tuple[dict[str, Any], dict[str, str]]:
    """Body and headers of request `index`: its subject, its system prompt (one of a few), whether it streams,
    and whether it repeats."""
    if rng.random() < config.repeat_share:
        prompt = rng.randrange(REPEATED_PROMPTS)
        words = [_WORDS[(prompt + i) % len(_WORDS)] for i in range(12)]
        temperature = 0.0
        system = SYSTEM_PROMPTS[prompt % len(SYSTEM_PROMPTS)]
    else:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 64))]
        temperature = 0.8
        system = rng.choice(SYSTEM_PROMPTS)
    body: dict[str, Any] = {
        "model": config.model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": " ".join(words)}],
        "max_tokens": rng.randint(1, config.max_tokens) if temperature else config.max_tokens,
        "temperature": temperature,
        "stream": rng.random() < config.stream_share,
    }
    headers = {"x-user-id": f"user-{rng.randrange(config.users)}"} if config.users > 0 else {}
    return body, headers


async def _send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str],
                summary: LoadSummary) -> None:
    try:
        async with session.post(f"{url.rstrip('/')}/chat/completions", data=orjson.dumps(body),
                                headers={"Content-Type": "application/json", "Authorization": "Bearer splitstream-load", **headers}) as response:
            async for _ in response.content.iter_any():
                pass  # read the whole answer (a stream to its end) and keep none of it
            summary.by_status[f"{response.status // 100}xx"] += 1
            summary.by_variant[response.headers.get("x-splitstream-variant", "none")] += 1
    except (aiohttp.ClientError, TimeoutError):
        summary.by_status["error"] += 1


async def run_load(config: LoadConfig, out: TextIO | None = None) -> LoadSummary:
    """Send the load; with `count` 0 run until cancelled, writing a summary line every REPORT_EVERY seconds."""
    rng = random.Random(config.seed)
    summary = LoadSummary()
    slots = asyncio.Semaphore(config.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    started = loop.time()
    reported = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            index = 0
            while config.count == 0 or index < config.count:
                if config.rate > 0:  # pacing to a schedule, so a slow answer does not slow the others
                    await asyncio.sleep(max(0.0, started + index / config.rate - loop.time()))
                await slots.acquire()
                body, headers = plan_request(config, index, rng)
                task = asyncio.create_task(_send(session, config.urls[index % len(config.urls)], body, headers,
                                                 summary))
                task.add_done_callback(lambda _: slots.release())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                index += 1
                summary.sent = index
                if out is not None and time.monotonic() - reported >= REPORT_EVERY:
                    reported = time.monotonic()
                    print(summary.as_json().decode(), file=out, flush=True)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return summary


async def main(config: LoadConfig) -> None:
    """`splitstream load`: run the load, then print its summary line."""
    summary = await run_load(config, sys.stdout)
    print(summary.as_json().decode(), flush=True)
