"""least_cost with the prefix index and load-dependent speeds, against simulated runtimes that keep a prefix
cache and report cached tokens (and, like llama.cpp, their own timings), through the openai SDK.

A conversation's next turn goes to the runtime that served turn one although another is emptier; with
`prefix: false` load decides. Two proxies with no shared state both
route by what they each sent. `consistent_hash` keeps a conversation id on one backend. A runtime's own
timings keep its queue time out of the learned prefill speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import backend_url

CACHE = 200_000  # the simulated runtimes' prefix caches, in tokens: everything in these tests fits


class Holder:
    """A pacer that holds the next `hold(n)` requests a runtime starts until `release()`, and lets every other
    request through at once: real requests in flight on one backend, with no sleeps."""

    def __init__(self) -> None:
        self._to_hold = 0
        self._held: set[str] = set()
        self._release = asyncio.Event()
        self._holding = asyncio.Condition()

    def hold(self, n: int) -> int:
        """Hold the next `n` requests; returns how many will have been held in all (for `held`)."""
        self._to_hold += n
        return len(self._held) + self._to_hold

    async def held(self, total: int) -> None:
        async with self._holding:
            await self._holding.wait_for(lambda: len(self._held) >= total)

    def release(self) -> None:
        self._release.set()

    def rearm(self) -> None:
        """Released requests are done: hold again from the next one."""
        self._held.clear()
        self._release = asyncio.Event()

    async def __call__(self, request_id: str, index: int) -> None:
        if index == 0 and self._to_hold > 0 and request_id not in self._held:
            self._to_hold -= 1
            self._held.add(request_id)
            async with self._holding:
                self._holding.notify_all()
        if request_id in self._held:
            await self._release.wait()


def rules(a: TestServer, b: TestServer, *, concurrency: int = 4) -> str:
    return f"""
backends:
  a: {{url: "{backend_url(a)}", kind: vllm, concurrency: {concurrency}}}
  b: {{url: "{backend_url(b)}", kind: vllm, concurrency: {concurrency}}}
pools:
  both: {{backends: [a, b], model: "sim-model"}}
routes:
  - {{name: prefix, match: {{model: "with-prefix"}}, pool: both, balance: {{policy: least_cost, prefix: true}}}}
  - {{name: plain, match: {{model: "without-prefix"}}, pool: both, balance: {{policy: least_cost, prefix: false}}}}
  - name: hashed
    match: {{model: "hashed"}}
    pool: both
    balance: {{policy: consistent_hash, by: "header:x-conversation-id"}}
"""


def system_prompt(topic: str) -> dict[str, str]:
    return {"role": "system", "content": f"You answer questions about {topic}. " + "Be precise and brief. " * 600}


class Conversation:
    """A chat whose every turn resends the whole history (system prompt, questions, answers)."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, topic: str) -> None:
        self.client = client
        self.model = model
        self.messages: list[dict[str, str]] = [system_prompt(topic)]

    async def turn(self, question: str, max_tokens: int = 8) -> tuple[str, int]:
        """(backend that answered, cached prompt tokens it reported)."""
        self.messages.append({"role": "user", "content": question})
        raw = await self.client.chat.completions.with_raw_response.create(
            model=self.model, messages=self.messages, max_tokens=max_tokens)  # type: ignore[arg-type]
        answer = raw.parse()
        self.messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})
        details = answer.usage.prompt_tokens_details if answer.usage is not None else None
        return raw.headers["x-splitstream-backend"], (details.cached_tokens or 0) if details is not None else 0


async def start_held(handle: Any, n: int, holder: Holder) -> list[asyncio.Future[Any]]:
    """`n` small requests that the holder's runtime holds: the test sends them when that runtime is the
    balancer's choice."""
    total = holder.hold(n)
    session = aiohttp.ClientSession()
    body = {"model": "with-prefix", "messages": [{"role": "user", "content": "hold"}], "max_tokens": 16}

    async def one() -> int:
        async with session.post(handle.url("/v1/chat/completions"), json=body) as r:
            await r.read()
            return r.status

    futures = [asyncio.ensure_future(one()) for _ in range(n)]
    await holder.held(total)
    futures.append(asyncio.ensure_future(_close_after(session, futures[:])))
    return futures


async def _close_after(session: aiohttp.ClientSession, futures: list[asyncio.Future[Any]]) -> int:
    try:
        await asyncio.gather(*futures)
    finally:
        await session.close()
    return 200


@pytest.fixture
async def holder() -> AsyncIterator[Holder]:
    """Released at teardown, before the proxy's (a failed assertion must not leave requests held)."""
    made = Holder()
    yield made
    made.release()


async def two_sims(sim: Any, holder: Holder | None = None) -> tuple[Holder, Any, TestServer, Any, TestServer]:
    holder = holder or Holder()
    runtime_a, a = await sim(pacer=holder, prefix_cache_tokens=CACHE)
    runtime_b, b = await sim(prefix_cache_tokens=CACHE)
    return holder, runtime_a, a, runtime_b, b


async def test_a_conversations_turns_follow_its_cache_where_load_alone_would_not(
        sim: Any, proxy: Any, holder: Holder) -> None:
    """(That an idle runtime wins over the holder once the holder's queue costs more than the prefill saved is
    priced in tests/unit/test_cost.py: simulated runtimes that answer at once never queue long enough.)"""
    holder, runtime_a, a, runtime_b, b = await two_sims(sim, holder)
    handle = await proxy(rules(a, b, concurrency=2))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)
    cached_talk = Conversation(client, "with-prefix", "geology")
    plain_talk = Conversation(client, "without-prefix", "botany")
    assert (await cached_talk.turn("What is basalt?"))[0] == "a"  # idle pool: ties go to the first
    assert (await plain_talk.turn("What is moss?"))[0] == "a"
    held = await start_held(handle, 1, holder)  # a is busy with one request, a batch slot is still free
    backend, cached = await cached_talk.turn("And granite?")
    assert backend == "a" and cached > 1000  # its history is in a's cache: worth sharing a with one request
    backend, cached = await plain_talk.turn("And ferns?")
    assert backend == "b" and cached == 0  # without the index, load decides: the emptier runtime
    holder.release()
    assert all(status == 200 for status in await asyncio.gather(*held))


async def test_two_proxies_without_shared_state_both_follow_what_they_sent(
        sim: Any, proxy: Any, holder: Holder) -> None:
    holder, runtime_a, a, runtime_b, b = await two_sims(sim, holder)
    first, second = await proxy(rules(a, b)), await proxy(rules(a, b))
    for n, (handle, topic) in enumerate([(first, "rivers"), (second, "glaciers")], start=1):
        client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)
        talk = Conversation(client, "with-prefix", topic)
        assert (await talk.turn("Where do they start?"))[0] == "a"
        held = await start_held(handle, 1, holder)
        for question in ("How long are they?", "What lives in them?"):
            backend, cached = await talk.turn(question)
            assert backend == "a" and cached > 1000, (n, question)
        holder.release()
        assert all(status == 200 for status in await asyncio.gather(*held))
        holder.rearm()
    for handle in (first, second):
        async with aiohttp.ClientSession() as session, session.get(handle.url("/metrics")) as r:
            text = await r.text()
        predicted = _sample(text, 'splitstream_prefix_predicted_tokens_total{backend="a"}')
        reported = _sample(text, 'splitstream_prefix_reported_cached_tokens_total{backend="a"}')
        assert predicted > 1000 and reported >= predicted * 0.9  # the index's predictions held


def _sample(text: str, series: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(series + " "))
    return float(line.split()[-1])


async def test_consistent_hash_keeps_each_conversation_on_one_backend(sim: Any, proxy: Any) -> None:
    _, _, a, _, b = await two_sims(sim)
    handle = await proxy(rules(a, b))
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)
    seen: dict[str, set[str]] = {}
    for round_ in range(3):
        for i in range(12):
            conversation = f"conv-{i}"
            raw = await client.chat.completions.with_raw_response.create(
                model="hashed", messages=[{"role": "user", "content": f"turn {round_}"}], max_tokens=2,
                extra_headers={"x-conversation-id": conversation})
            seen.setdefault(conversation, set()).add(raw.headers["x-splitstream-backend"])
    assert all(len(backends) == 1 for backends in seen.values())
    assert set().union(*seen.values()) == {"a", "b"}  # and the conversations spread over both


async def test_the_runtimes_own_timings_keep_queue_time_out_of_prefill(sim: Any, proxy: Any) -> None:
    """Six 4k-token prompts at once on a runtime that runs one at a time: the last waits 5 prefills in its
    queue. With llama.cpp-style timings the learned prefill speed is the runtime's, not prompt / TTFT."""
    runtime, server = await sim(prefill_tokens_per_second=40_000.0, max_batch=1, report_timings=True)
    handle = await proxy(f"""
backends:
  a: {{url: "{backend_url(server)}", kind: llamacpp, concurrency: 1}}
pools:
  p: {{backends: [a], model: "sim-model"}}
routes:
  - {{name: main, match: {{model: "m"}}, pool: p}}
""")
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)

    async def ask(i: int) -> None:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"{i} " + "lorem ipsum dolor " * 900}], max_tokens=4,
            stream=True)
        [chunk async for chunk in stream]

    await asyncio.gather(*(ask(i) for i in range(6)))
    state = next(s for s in handle.backends if s.backend.name == "a")
    assert state.prefill.samples == 6  # every request taught prefill, the queued ones too
    assert 0.8 * 40_000 < state.prefill_tps < 1.2 * 40_000


async def test_admin_backends_shows_the_learned_curves_and_the_prefix_cache(sim: Any, proxy: Any) -> None:
    _, _, a, _, b = await two_sims(sim)
    handle = await proxy(rules(a, b), admin_token="t" * 32)
    client = openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)
    talk = Conversation(client, "with-prefix", "volcanoes")
    for question in ("Why do they erupt?", "Which is the tallest?"):
        await talk.turn(question)
    async with aiohttp.ClientSession() as session, session.get(
            handle.url("/admin/backends"), headers={"Authorization": "Bearer " + "t" * 32}) as r:
        assert r.status == 200
        rows = {row["name"]: row for row in (await r.json())["backends"]}
    row = rows["a"]
    assert set(row["decode_tps_by_inflight"]) == {"1", "2", "3", "4"}
    assert row["prefix_cache"]["blocks"] > 0 and row["prefix_cache"]["configured"] is False
