"""Issue 16: pooled statistics across replicas. Three real splitstream processes on one real redis-server,
traffic spread over them, simulated runtimes behind them.

The rollout leader judges everyone's evidence (the candidate's request count it reports is what the three
served, within one flush), every replica answers the same A/B report, and a Redis outage mid-rollout leaves
requests succeeding and the rollout holding where it was until Redis returns. The processes tick on their own
(every 2 s); tests send traffic until a condition holds and poll admin endpoints with bounded loops, never
asserting on time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import backend_url
from tests.integration.conftest import RedisServer, Served, ServedFactory

MESSAGES = [{"role": "user", "content": "hi"}]
REPLICAS = 3
POLL_SECONDS = 0.1  # between two reads of an admin endpoint in a bounded wait
WAIT_SECONDS = 30.0  # the bound of any wait: a few ticks (2 s each) and flushes (1 s) are plenty
FLUSH_SLACK = 1.5  # seconds: a replica flushes its numbers about every second
QUICK = {"ttft_ms": 5.0, "max_batch": 64}  # equally fast runtimes; their latency gates are set to 2x below


def rules(stable: Any, canary: Any, rollout: str) -> str:
    return f"""
backends:
  stable-1: {{url: "{backend_url(stable)}", kind: vllm}}
  canary-1: {{url: "{backend_url(canary)}", kind: vllm}}
pools:
  stable: {{backends: [stable-1], model: sim-model}}
  canary: {{backends: [canary-1], model: sim-model}}
health: {{failures: 1000}}  # failing answers stay answers (the variant's errors), never an ejection
routes:
  - name: chat
    match: {{model: my-model}}
    split:
      variants:
        - {{name: stable, pool: stable, weight: 100}}
        - {{name: canary, pool: canary, weight: 0}}
    retry: {{attempts: 1}}
    rollout: {{candidate: canary, baseline: stable, {rollout}, max_p95_ratio: 2, max_ttft_p95_ratio: 2}}
"""


async def fleet(served: ServedFactory, text: str, redis: RedisServer) -> list[Served]:
    return list(await asyncio.gather(*(served(text, "--redis", redis.url) for _ in range(REPLICAS))))


class Traffic:
    """Chat completions round-robin over the replicas; every answer counted by replica and variant, with the
    wall-clock time it was complete."""

    def __init__(self, session: aiohttp.ClientSession, replicas: list[Served]) -> None:
        self.session = session
        self.replicas = replicas
        self.answers: list[tuple[int, str, int, float]] = []  # (replica, variant, status, completed at)
        self._next = itertools.cycle(range(len(replicas)))

    async def one(self) -> None:
        index = next(self._next)
        body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 4}
        async with self.session.post(self.replicas[index].url("/v1/chat/completions"), json=body) as response:
            await response.read()
            self.answers.append((index, response.headers["x-splitstream-variant"], response.status, time.time()))

    async def batch(self, size: int = 3 * REPLICAS) -> None:
        await asyncio.gather(*(self.one() for _ in range(size)))

    def served(self, variant: str, before: float = float("inf")) -> Counter[int]:
        """Answers by replica from `variant` complete before `before`."""
        return Counter(replica for replica, name, _, at in self.answers if name == variant and at < before)


async def document(session: aiohttp.ClientSession, replica: Served, path: str) -> Any:
    async with session.get(replica.url(path)) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def until(what: str, check: Callable[[], Awaitable[bool]], traffic: Traffic | None = None) -> None:
    """Call `check` until it holds, sending a batch of traffic (or pausing briefly) between calls; bounded."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_SECONDS:g} s"
        if traffic is not None:
            await traffic.batch()
        else:
            await asyncio.sleep(POLL_SECONDS)


def at(entry: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(entry["at"].replace("Z", "+00:00")).timestamp()


async def started(session: aiohttp.ClientSession, replicas: list[Served]) -> None:
    """Every replica applies the first step's weights (its own tick read the started state), not only sees it
    stored: a replica that has not yet ticked would send the candidate nothing."""
    async def applied(replica: Served) -> bool:
        async with session.get(replica.url("/metrics")) as response:
            text = await response.text()
        line = next((x for x in text.splitlines() if x.startswith('splitstream_rollout_step{route="chat"}')), "")
        return bool(line) and float(line.rsplit(" ", 1)[1]) > 0

    async def running() -> bool:
        statuses = [(await document(session, r, "/admin/rollouts/chat"))["status"] for r in replicas]
        return statuses == ["running"] * REPLICAS and all([await applied(r) for r in replicas])
    await until("every replica follows the started rollout", running)


# ---------------------------------------------------------------------------------------------- tests


async def test_a_failing_candidate_is_rolled_back_on_the_evidence_of_all_three(
    sim: Any, served: ServedFactory, redis_server: RedisServer
) -> None:
    _, stable = await sim(**QUICK)
    _, canary = await sim(**QUICK, fail_rate=0.2, seed=11)
    wanted = 60  # min_requests: neither side is judged before the traffic below has stopped
    replicas = await fleet(served, rules(stable, canary, f"steps: [50, 100], interval: 2s, min_requests: {wanted}"),
                           redis_server)
    async with aiohttp.ClientSession() as session:
        await started(session, replicas)
        traffic = Traffic(session, replicas)
        # Until both variants have served `wanted`: the analysis can only decide once the traffic has stopped.
        while min(sum(traffic.served("canary").values()), sum(traffic.served("stable").values())) < wanted:
            await traffic.batch()
        stopped = time.time()

        async def rolled_back() -> bool:
            return (await document(session, replicas[0], "/admin/rollouts/chat"))["status"] == "rolled_back"
        await until("the rollback", rolled_back)
        rollback = (await document(session, replicas[1], "/admin/rollouts/chat"))["history"][-1]
        assert (rollback["action"], rollback["reason"], rollback["step"]) == ("rollback", "error_rate", 0)
        numbers = rollback["numbers"]
        served_by = traffic.served("canary")
        # Counted from all three (more than any one served), exactly what they served but what the last flush
        # before the decision had not carried yet.
        assert numbers["replicas"] == REPLICAS and len(served_by) == REPLICAS
        assert numbers["candidate_requests"] > max(served_by.values())
        settled = sum(traffic.served("canary", before=min(stopped, at(rollback) - FLUSH_SLACK)).values())
        assert settled <= numbers["candidate_requests"] <= sum(served_by.values()), (numbers, served_by)
        assert numbers["baseline_errors"] == 0 and numbers["candidate_errors"] > 0

        # The A/B report: every replica answers the same numbers, which are what the three served.
        async def reports() -> list[Any]:
            return [await document(session, r, "/admin/experiments/chat") for r in replicas]

        async def agreed() -> bool:
            first, *others = await reports()
            return first["replicas"] == REPLICAS and all(o["variants"] == first["variants"] for o in others)
        await until("the same report on every replica", agreed)
        report = (await reports())[2]
        rows = {row["name"]: row for row in report["variants"]}
        sent = Counter(variant for _, variant, _, _ in traffic.answers)
        assert {name: row["requests"] for name, row in rows.items()} == dict(sent)
        failed = Counter(variant for _, variant, status, _ in traffic.answers if status >= 500)
        assert rows["canary"]["errors"] == failed["canary"] > 0 and rows["stable"]["errors"] == 0
        assert rows["canary"]["latency"]["n"] == sent["canary"] - failed["canary"]
        assert rows["canary"]["vs_baseline"]["error_rate_p"] < 0.05


async def test_a_healthy_candidate_is_promoted_through_every_step(
    sim: Any, served: ServedFactory, redis_server: RedisServer
) -> None:
    _, stable = await sim(**QUICK)
    _, canary = await sim(**QUICK)
    replicas = await fleet(served, rules(stable, canary, "steps: [25, 50, 100], interval: 1s, min_requests: 20"),
                           redis_server)
    async with aiohttp.ClientSession() as session:
        await started(session, replicas)
        traffic = Traffic(session, replicas)

        async def promoted() -> bool:
            return (await document(session, replicas[2], "/admin/rollouts/chat"))["status"] == "promoted"
        await until("the promotion", promoted, traffic)
        history = (await document(session, replicas[2], "/admin/rollouts/chat"))["history"]
    # (Redis came back empty, so the step's evidence began again: holds for too few requests may appear.)
    moves = [entry["action"] for entry in history if entry["action"] != "hold"]
    assert moves == ["start", "advance", "advance", "promote"], history  # resumed, never restarted
    for entry in history[1:]:
        assert entry["numbers"]["replicas"] == REPLICAS and entry["numbers"]["candidate_requests"] >= 20
    assert {status for _, _, status, _ in traffic.answers} == {200}


async def test_with_redis_down_requests_succeed_and_the_rollout_holds_until_it_returns(
    sim: Any, served: ServedFactory, redis_server: RedisServer
) -> None:
    _, stable = await sim(**QUICK)
    _, canary = await sim(**QUICK)
    # 3 s steps: the outage below begins well before the second step is due
    replicas = await fleet(served, rules(stable, canary, "steps: [25, 50, 100], interval: 3s, min_requests: 20"),
                           redis_server)
    async with aiohttp.ClientSession() as session:
        await started(session, replicas)
        traffic = Traffic(session, replicas)

        async def followed() -> bool:  # every replica applies the second step's weights (its ticks follow)
            for replica in replicas:
                async with session.get(replica.url("/metrics")) as response:
                    if 'splitstream_rollout_step{route="chat"} 50.0' not in await response.text():
                        return False
            return True
        await until("every replica at the second step", followed, traffic)

        # Redis goes away, and comes back empty (no persistence): the leader restores the rollout's state.
        redis_server.stop()
        down = time.time()
        await traffic.batch()

        async def holding() -> bool:  # every replica answers its last view, with no evidence to judge
            views = [await document(session, r, "/admin/rollouts/chat") for r in replicas]
            return all(v["step"] == 1 and v["status"] == "running" and v["evidence"] == {"available": False}
                       for v in views)
        await until("every replica sees the outage", holding, traffic)
        # Several intervals and ticks of traffic without the store: the step never advances on partial evidence.
        while time.time() < down + 5.0:
            await traffic.batch()
            assert (await document(session, replicas[1], "/admin/rollouts/chat"))["step"] == 1
        back = time.time()
        redis_server.start()

        async def promoted() -> bool:
            return (await document(session, replicas[2], "/admin/rollouts/chat"))["status"] == "promoted"
        await until("the promotion once Redis answers", promoted, traffic)
        history = (await document(session, replicas[2], "/admin/rollouts/chat"))["history"]
    # (Redis came back empty, so the step's evidence began again: holds for too few requests may appear.)
    moves = [entry["action"] for entry in history if entry["action"] != "hold"]
    assert moves == ["start", "advance", "advance", "promote"], history  # resumed, never restarted
    assert not [entry for entry in history if down < at(entry) < back]  # nothing moved while Redis was down
    assert {status for _, _, status, _ in traffic.answers} == {200}  # and no request failed
    assert all("dropping this replica's batches" in r.log for r in replicas)  # each noticed, and said so once
    assert any("the store had lost its state; restored step 1" in r.log for r in replicas)  # not restarted
