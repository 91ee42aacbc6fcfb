#!/usr/bin/env python3
"""Screenshots of the status pages for the README: docs/ui-{overview,backends,shadow,cache}.png.

Builds a small scene in this process — simulated runtimes (a slower canary that sometimes fails, a shadow
candidate, a dead backend that gets ejected), a proxy with a split route, a shadow, a result cache and one
refused reload — sends a few hundred requests, then photographs each page in headless Chromium (the
system `chromium`, driven by Playwright). Run on demand, not in CI:

    .venv/bin/python bench/screenshots.py                  # writes docs/ui-*.png
    .venv/bin/python bench/screenshots.py --narrow /tmp    # also 320 px wide copies into /tmp (layout check)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.config.reloader import RELOADER  # noqa: E402
from proxy.app import build_app  # noqa: E402
from proxy.config.loader import load_rules  # noqa: E402
from proxy.pipeline.shadow import SHADOWS  # noqa: E402
from proxy.sim.runtime import SimConfig, SimRuntime  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = (("overview", "/ui/"), ("backends", "/ui/backends"), ("shadow", "/ui/shadow"), ("cache", "/ui/cache"))


async def start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    return runner, port


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rules(ports: dict[str, int]) -> str:
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    return f"""
backends:
  gpu-a:    {{url: "{url['gpu-a']}", kind: vllm, weight: 2, max_inflight: 32}}
  gpu-b:    {{url: "{url['gpu-b']}", kind: vllm, max_inflight: 32}}
  canary-1: {{url: "{url['canary-1']}", kind: vllm}}
  next-1:   {{url: "{url['next-1']}", kind: vllm}}
  embed-1:  {{url: "{url['embed-1']}", kind: openai}}
  embed-2:  {{url: "{url['embed-2']}", kind: openai}}
pools:
  llama-stable: {{backends: [gpu-a, gpu-b], model: sim-model}}
  llama-canary: {{backends: [canary-1], model: sim-model}}
  llama-next:   {{backends: [next-1], model: sim-model}}
  embedders:    {{backends: [embed-1, embed-2], model: sim-embed}}
health: {{failures: 3, ejection: 60s}}
routes:
  - name: chat
    match: {{model: "llama*"}}
    split:
      variants:
        - {{name: stable, pool: llama-stable, weight: 80}}
        - {{name: canary, pool: llama-canary, weight: 20}}
    shadow: [{{pool: llama-next, sample: 0.5}}]
    cache: {{ttl: 10m}}
    retry: {{attempts: 1}}
  - name: embeddings
    match: {{model: "text-embedding-*"}}
    pool: embedders
    cache: {{ttl: 1h}}
"""


async def traffic(base: str, count: int, rng: random.Random, workers: int = 16) -> None:
    """`count` requests from `workers` clients in parallel: 4 in 5 chat (60 % streamed, a quarter of them
    repeated temperature-0 prompts), 1 in 5 embeddings. Prompts are filler words."""
    words = "alpha bravo charlie delta echo foxtrot golf hotel".split()
    turns = iter(range(count))

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        if i % 5 == 4:
            path = "/v1/embeddings"
            body: dict[str, Any] = {"model": "text-embedding-3", "input": rng.choice(words)}
        else:
            path = "/v1/chat/completions"
            content = " ".join(rng.choices(words, k=rng.randint(3, 30)))
            body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": content}],
                    "max_tokens": rng.randint(4, 24), "stream": rng.random() < 0.6}
            if rng.random() < 0.25:
                body["temperature"] = 0
                body["messages"] = [{"role": "user", "content": rng.choice(words)}]
        async with session.post(base + path, json=body) as response:
            await response.read()

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in turns:
            await one(session, i)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--narrow", type=Path, default=None, help="also write 320 px wide shots here")
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()

    sims = {
        "gpu-a": SimConfig(tokens_per_second=900, ttft_ms=18, seed=1),
        "gpu-b": SimConfig(tokens_per_second=600, ttft_ms=25, seed=2),
        "canary-1": SimConfig(tokens_per_second=500, ttft_ms=40, fail_rate=0.04, seed=3),
        "next-1": SimConfig(tokens_per_second=700, ttft_ms=30, seed=4),
        "embed-1": SimConfig(models=("sim-embed",), tokens_per_second=0, ttft_ms=4, seed=5),
    }
    runners = []
    ports: dict[str, int] = {}
    for name, config in sims.items():
        runner, ports[name] = await start(SimRuntime(config).build_app())
        runners.append(runner)
    ports["embed-2"] = closed_port()  # nothing listens: connect errors, then an ejection

    rules_dir = Path(tempfile.mkdtemp(prefix="splitstream-shots-"))
    (rules_dir / "rules.yaml").write_text(rules(ports))
    app = build_app(load_rules(rules_dir, env={}, generation=1), rules_dir=rules_dir,
                    admin_token="", rules_env={}, watch_rules=False)
    runner, port = await start(app)
    runners.append(runner)
    base = f"http://127.0.0.1:{port}"
    try:
        await traffic(base, args.requests, random.Random(7))
        await app[SHADOWS].idle()
        # A refused edit, so the overview shows how a reload error looks (the running rules stay).
        (rules_dir / "zz-typo.yaml").write_text("routes:\n  - name: extra\n    match: {model: other}\n    pool: llama-nxt\n")
        await app[RELOADER].reload("watch")
        background = asyncio.create_task(traffic(base, 10**9, random.Random(8), 8))  # live numbers in flight
        try:
            await shoot(base, args.out, 1280, "")
            if args.narrow is not None:
                await shoot(base, args.narrow, 320, "-320")
        finally:
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
    finally:
        for r in reversed(runners):
            await r.cleanup()


async def shoot(base: str, out: Path, width: int, suffix: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": width, "height": 720})
        for name, path in PAGES:
            await page.goto(base + path)
            target = out / f"ui-{name}{suffix}.png"
            await page.screenshot(path=str(target), full_page=True)
            print(target)
        await browser.close()


if __name__ == "__main__":
    asyncio.run(main())
