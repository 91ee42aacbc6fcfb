"""Rollouts end to end: real proxies, simulated runtimes, a real redis-server for replicas and restarts.

The controller runs on a FakeClock with its loop off (`tick=None`): each test calls `tick()` where a real
proxy would tick on its own, and moves the clock past an interval instead of waiting for it. Traffic is sent
until the variants have served what the analysis needs (counted from the responses), never for a time.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.delivery import client as rollout_client
from proxy.delivery.controller import LEASE_KEY, RolloutSettings
from proxy.delivery.state import RolloutState
from proxy.store.redis import RedisStore
from tests.conftest import ProxyHandle, backend_url
from tests.conftest import FakeClock
from tests.integration.conftest import RedisServer

MESSAGES = [{"role": "user", "content": "hi"}]
TOKEN = "rollout-admin-token"
ADMIN = {"X-Splitstream-Admin": "1"}  # what the admin guard wants on POSTs (no plain form can send it)
INTERVAL = 60.0
MAX_BATCHES = 60  # a safety stop for `send_until`; the conditions are met after a few batches
# Runtimes with a fixed 50 ms answer, so a busy test machine's scheduling noise stays small beside it; the
# latency gate of tests with two equally fast runtimes allows for that noise (the slow one is 3x). Batches
# stay small where timings are compared: answers relayed at the same instant wait for each other.
HEALTHY = {"ttft_ms": 50.0, "max_batch": 64}
SAME_SPEED = 2.0


def rules(stable: Any, canary: Any, rollout: str, sticky: str = "", canary_url: str | None = None,
          extra: str = "") -> str:
    """Route `chat` (model my-model): variants stable and canary, each on its own runtime; the file's weights
    (100/0) are what a route without its rollout would do."""
    return f"""
backends:
  stable-1: {{url: "{backend_url(stable)}", kind: vllm}}
  canary-1: {{url: "{canary_url or backend_url(canary)}", kind: vllm}}
pools:
  stable: {{backends: [stable-1], model: sim-model}}
  canary: {{backends: [canary-1], model: sim-model}}
health: {{failures: 1000}}  # failing answers stay answers (counted per variant), never an ejection
routes:
  - name: chat
    match: {{model: my-model}}
    split:
      {sticky}
      variants:
        - {{name: stable, pool: stable, weight: 100}}
        - {{name: canary, pool: canary, weight: 0}}
    retry: {{attempts: 1}}
    {rollout}
{extra}
"""


def rollout_block(steps: str = "[10, 25, 50, 100]", min_requests: int = 30, **extra: object) -> str:
    more = "".join(f", {key}: {value}" for key, value in extra.items())
    return (f"rollout: {{candidate: canary, baseline: stable, steps: {steps}, interval: {INTERVAL:g}s, "
            f"min_requests: {min_requests}{more}}}")


async def start(proxy: Any, text: str, clock: FakeClock, seed: int = 7, **options: Any) -> ProxyHandle:
    settings = RolloutSettings(clock=clock, tick=None, replica_id=options.pop("replica_id", None))
    handle: ProxyHandle = await proxy(text, rollout_settings=settings, **options)
    handle.splitter.rng = random.Random(seed)  # per-request draws: a fixed sequence
    return handle


def state_of(handle: ProxyHandle) -> RolloutState:
    state = handle.weights.state_of("chat")
    assert state is not None
    return state


def percent_of(handle: ProxyHandle) -> float | None:
    return handle.weights.percent_of("chat")


def transitions(handle: ProxyHandle) -> Counter[str]:
    counts: Counter[str] = Counter()
    for family in handle.metrics.registry.collect():
        if family.name == "splitstream_rollout_transitions":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["route"] == "chat":
                    counts[sample.labels["action"]] += int(sample.value)
    return counts


class Traffic:
    """Sends chat completions and counts the answers by variant (and which subjects went where)."""

    def __init__(self, session: aiohttp.ClientSession, handle: ProxyHandle) -> None:
        self.session = session
        self.handle = handle
        self.served: Counter[str] = Counter()
        self.by_subject: dict[str, str] = {}
        self._subjects = 0

    async def one(self, subject: str | None = None, stream: bool = False) -> tuple[str, int]:
        body = {"model": "my-model", "messages": MESSAGES, "max_tokens": 4, "stream": stream}
        headers = {"x-user-id": subject} if subject is not None else {}
        async with self.session.post(self.handle.url("/v1/chat/completions"), json=body, headers=headers) as r:
            await r.read()
            variant = r.headers["x-splitstream-variant"]
        self.served[variant] += 1
        if subject is not None:
            self.by_subject[subject] = variant
        return variant, r.status

    async def batch(self, size: int = 40, sticky: bool = False) -> None:
        subjects = [self._next_subject() if sticky else None for _ in range(size)]
        await asyncio.gather(*(self.one(subject) for subject in subjects))

    def _next_subject(self) -> str:
        self._subjects += 1
        return f"user-{self._subjects}"

    async def until(self, done: Callable[[Counter[str]], bool], sticky: bool = False,
                    size: int = 40) -> Counter[str]:
        """Batches of `size` until `done(served since this call)`; returns that count."""
        before = Counter(self.served)
        for _ in range(MAX_BATCHES):
            if done(self.served - before):
                return self.served - before
            await self.batch(size, sticky=sticky)
        raise AssertionError(f"traffic never satisfied the condition: {self.served - before}")


# ---------------------------------------------------------------------------------------------- tests


async def test_a_healthy_candidate_is_promoted_through_every_step(sim: Any, proxy: Any) -> None:
    _, stable = await sim(**HEALTHY)
    _, canary = await sim(**HEALTHY)
    clock = FakeClock(1_000_000.0)
    handle = await start(proxy, rules(stable, canary, rollout_block(max_p95_ratio=SAME_SPEED)), clock)
    controller = handle.rollouts
    assert state_of(handle).status == "running" and percent_of(handle) == 10.0  # started with the app
    async with aiohttp.ClientSession() as session:
        traffic = Traffic(session, handle)
        for percent in (10.0, 25.0, 50.0, 100.0):
            assert percent_of(handle) == percent
            await traffic.until(lambda n: n["canary"] >= 30 and (n["stable"] >= 30 or percent == 100.0), size=20)
            await controller.tick()  # mid-interval: nothing to act on
            assert percent_of(handle) == percent
            clock.advance(INTERVAL)
            await controller.tick()
        assert state_of(handle).status == "promoted", state_of(handle).history[-1]
        assert percent_of(handle) == 100.0
        before = Counter(traffic.served)
        await traffic.batch()
        assert traffic.served - before == Counter({"canary": 40})
    history = state_of(handle).history
    assert [entry["action"] for entry in history] == ["start", "advance", "advance", "advance", "promote"]
    assert all(entry["numbers"]["candidate_requests"] >= 30 for entry in history[1:])
    assert transitions(handle) == Counter({"start": 1, "advance": 3, "promote": 1})
    assert handle.metrics.rollout_step.labels("chat")._value.get() == 100.0


async def test_a_failing_candidate_is_rolled_back_at_its_first_step(sim: Any, proxy: Any) -> None:
    _, stable = await sim(max_batch=64)
    _, canary = await sim(fail_rate=0.2, seed=3, max_batch=64)  # the error test is decisive: it is the reason
    clock = FakeClock(1_000_000.0)
    sticky = 'sticky: {by: "header:x-user-id", ttl: 1h}'
    handle = await start(proxy, rules(stable, canary, rollout_block(), sticky=sticky), clock, admin_token=TOKEN)
    async with aiohttp.ClientSession() as session:
        traffic = Traffic(session, handle)
        # Mid-interval the evidence becomes decisive: the next tick rolls back without waiting for the end.
        await traffic.until(lambda n: n["canary"] >= 80, sticky=True)
        await handle.rollouts.tick()
        state = state_of(handle)
        assert state.status == "rolled_back" and percent_of(handle) == 0.0
        rollback = state.history[-1]
        assert rollback["action"] == "rollback" and rollback["step"] == 0 and rollback["reason"] == "error_rate"
        assert rollback["numbers"]["candidate_requests"] == traffic.served["canary"]  # what it served, reported
        assert 0.1 < rollback["numbers"]["candidate_error_rate"] < 0.35
        assert rollback["numbers"]["baseline_errors"] == 0

        # Sticky subjects the candidate had are reassigned: a rolled-back candidate gets nothing at all.
        on_canary = sorted(s for s, v in traffic.by_subject.items() if v == "canary")
        served = await asyncio.gather(*(traffic.one(subject) for subject in on_canary))
        assert {variant for variant, _ in served} == {"stable"}

        # What operators see: the CLI against the admin API prints the rollback and its numbers.
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(rollout_client.run, "status", "chat", handle.url(""), TOKEN, False, out, err)
        assert code == 0, err.getvalue()
        text = out.getvalue()
        assert "chat: rolled_back, candidate canary at 0%" in text
        assert f"rollback -> 10% (error_rate) candidate_requests={traffic.served['canary']}" in text
    assert transitions(handle) == Counter({"start": 1, "rollback": 1})


async def test_a_slow_candidate_is_rolled_back(sim: Any, proxy: Any) -> None:
    _, stable = await sim(**HEALTHY)  # 50 ms an answer
    _, canary = await sim(**dict(HEALTHY, ttft_ms=150))  # 150 ms: 3x
    clock = FakeClock(1_000_000.0)
    handle = await start(proxy, rules(stable, canary, rollout_block(steps="[50, 100]")), clock)
    async with aiohttp.ClientSession() as session:
        traffic = Traffic(session, handle)
        # Small batches: a busy machine answering dozens of requests at the same instant would delay the
        # last of them (stable's) by the time it takes to relay the others, which is not the runtime's speed.
        await traffic.until(lambda n: n["canary"] >= 30 and n["stable"] >= 30, size=10)
        clock.advance(INTERVAL)
        await handle.rollouts.tick()
    state = state_of(handle)
    assert state.status == "rolled_back" and percent_of(handle) == 0.0, state.history[-1]
    numbers = state.history[-1]["numbers"]
    assert state.history[-1]["reason"] == "latency_p95" and numbers["candidate_errors"] == 0
    assert numbers["latency_p95_ratio"] > 1.2 and numbers["latency_p"] < 0.05


async def test_too_little_traffic_holds_the_step(sim: Any, proxy: Any) -> None:
    _, stable = await sim()
    _, canary = await sim()
    clock = FakeClock(1_000_000.0)
    handle = await start(proxy, rules(stable, canary, rollout_block(steps="[10, 100]", min_requests=200)), clock)
    controller = handle.rollouts
    async with aiohttp.ClientSession() as session:
        await Traffic(session, handle).batch(40)
    due = state_of(handle).due
    for held in (1, 2):
        clock.advance(INTERVAL)
        await controller.tick()
        state = state_of(handle)
        assert (state.status, state.step, percent_of(handle)) == ("running", 0, 10.0)
        assert state.due == due + held * INTERVAL  # the interval is extended, the window keeps growing
        assert state.history[-1]["action"] == "hold" and state.history[-1]["reason"] == "too_few_requests"
        assert state.history[-1]["numbers"]["baseline_requests"] + state.history[-1]["numbers"][
            "candidate_requests"] == 40
    assert transitions(handle) == Counter({"start": 1, "hold": 2})


async def test_two_replicas_on_one_redis_agree_and_a_restart_resumes(
    sim: Any, proxy: Any, redis_server: RedisServer
) -> None:
    _, stable = await sim(**HEALTHY)
    _, canary = await sim(**HEALTHY)
    clock = FakeClock(1_000_000.0)
    text = rules(stable, canary, rollout_block(steps="[10, 50, 100]", max_p95_ratio=SAME_SPEED))

    async def replica(name: str) -> ProxyHandle:
        return await start(proxy, text, clock, store=RedisStore(redis_server.url, timeout=5.0), replica_id=name)

    a, b = await replica("replica-a"), await replica("replica-b")
    assert a.rollouts.is_leader and not b.rollouts.is_leader  # one lease, one driver
    assert redis_server.command(b"GET", LEASE_KEY.encode()) == b"$9\r\nreplica-a\r\n"
    assert state_of(a) == state_of(b) and percent_of(b) == 10.0
    async with aiohttp.ClientSession() as session:
        await Traffic(session, a).until(lambda n: n["canary"] >= 30 and n["stable"] >= 30)
        clock.advance(INTERVAL)
        await b.rollouts.tick()  # the follower decides nothing, however due the step is
        assert percent_of(b) == 10.0 and state_of(b).step == 0
        await a.rollouts.tick()
        assert percent_of(a) == 50.0
        await b.rollouts.tick()  # and follows at its next tick
        assert percent_of(b) == 50.0 and state_of(b) == state_of(a)
        assert not b.rollouts.is_leader
        assert b.metrics.rollout_step.labels("chat")._value.get() == 50.0

        # An operator pauses through the follower; the leader sees it and holds still, due or not.
        async with session.post(b.url("/admin/rollouts/chat/pause"), headers=ADMIN) as response:
            assert response.status == 200 and (await response.json())["status"] == "paused"
        clock.advance(2 * INTERVAL)
        await a.rollouts.tick()
        assert state_of(a).status == "paused" and percent_of(a) == 50.0

    await a.server.close()  # replica a stops and hands the lease back
    c = await replica("replica-c")  # a new replica on the same Redis: the stored step, the same state
    assert c.rollouts.is_leader
    assert state_of(c) == state_of(b) and state_of(c).status == "paused" and percent_of(c) == 50.0
    await b.rollouts.tick()
    assert not b.rollouts.is_leader
    assert transitions(a) + transitions(b) + transitions(c) == Counter({"start": 1, "advance": 1, "pause": 1})


async def test_blue_green_waits_for_a_healthy_candidate_then_switches_at_once(sim: Any, proxy: Any) -> None:
    """`steps: [100]` added to a running route: the candidate takes everything once it answers its probe,
    and is judged against what the baseline served before the switch."""
    from tests.processes import free_port

    _, blue = await sim(**HEALTHY)
    _, green = await sim(**HEALTHY)
    clock = FakeClock(1_000_000.0)
    handle = await start(proxy, rules(blue, green, ""), clock, watch_rules=False)
    controller = handle.rollouts
    async with aiohttp.ClientSession() as session:
        traffic = Traffic(session, handle)
        await traffic.until(lambda n: n["stable"] >= 40, size=20)  # blue serves everything, as the weights say
        assert percent_of(handle) is None

        dead = f"http://127.0.0.1:{free_port()}"
        switch = rollout_block(steps="[100]", max_p95_ratio=SAME_SPEED)
        await reload(handle, rules(blue, green, switch, canary_url=dead))
        await controller.tick()
        assert handle.weights.state_of("chat") is None and percent_of(handle) == 0.0  # pending
        before = Counter(traffic.served)
        await traffic.batch()
        assert traffic.served - before == Counter({"stable": 40})

        await reload(handle, rules(blue, green, switch))  # the same block, and green is up
        await controller.tick()
        assert state_of(handle).status == "running" and percent_of(handle) == 100.0
        await traffic.until(lambda n: n["canary"] >= 30, size=20)
        assert traffic.served["stable"] == 80
        clock.advance(INTERVAL)
        await controller.tick()
        promoted = state_of(handle)
        assert promoted.status == "promoted", promoted.history[-1]
        assert promoted.history[-1]["numbers"]["baseline_requests"] == 80  # blue's requests before the switch

        # An edit elsewhere in the rules keeps the rollout; an edit of its block starts a new one.
        await reload(handle, rules(blue, green, switch, extra="server: {max_queue: 100}"))
        await controller.tick()
        assert state_of(handle) == promoted
        await reload(handle, rules(blue, green, rollout_block(steps="[50, 100]", max_p95_ratio=SAME_SPEED)))
        await controller.tick()
        assert state_of(handle).status == "running" and percent_of(handle) == 50.0
    assert transitions(handle) == Counter({"start": 2, "promote": 1})


async def reload(handle: ProxyHandle, text: str) -> None:
    (handle.rules_dir / "rules.yaml").write_text(text)
    outcome = await handle.reloader.reload("test")
    assert outcome.result == "success", outcome


async def test_operators_steer_a_rollout_through_the_admin_api_and_the_cli(sim: Any, proxy: Any) -> None:
    _, stable = await sim()
    _, canary = await sim()
    clock = FakeClock(1_000_000.0)
    handle = await start(proxy, rules(stable, canary, rollout_block()), clock, admin_token=TOKEN)
    url = handle.url("")
    auth = {"Authorization": f"Bearer {TOKEN}", **ADMIN}

    async def call(method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with session.request(method, handle.url(path), headers=auth if headers is None else headers) as r:
            return r.status, await r.json()

    def cli(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = rollout_client.run(args[0], args[1] if len(args) > 1 else None, url, TOKEN, False, out, err)
        return code, out.getvalue(), err.getvalue()

    async with aiohttp.ClientSession() as session:
        assert (await call("GET", "/admin/rollouts", {}))[0] == 401  # guarded like every /admin endpoint
        assert (await call("POST", "/admin/rollouts/chat/pause", {}))[0] == 401
        status, listing = await call("GET", "/admin/rollouts")
        assert status == 200 and listing["leader"] is True
        [document] = listing["rollouts"]
        assert (document["route"], document["status"], document["step"], document["percent"]) == \
            ("chat", "running", 0, 10.0)
        assert document["steps"] == [10.0, 25.0, 50.0, 100.0] and document["history"][0]["action"] == "start"

        code, out, _ = await asyncio.to_thread(cli, "pause", "chat")
        assert code == 0 and out.startswith("chat: paused, candidate canary at 10% (step 1/4")
        code, _, err = await asyncio.to_thread(cli, "pause", "chat")
        assert code == 1 and err.startswith("409: Cannot pause a rollout that is paused")
        assert (await call("POST", "/admin/rollouts/chat/resume"))[1]["status"] == "running"
        status, body = await call("POST", "/admin/rollouts/chat/resume")
        assert status == 409 and body["error"]["code"] == "rollout_conflict"
        status, body = await call("POST", "/admin/rollouts/chat/promote")
        assert status == 200 and (body["status"], body["percent"]) == ("promoted", 100.0)
        assert percent_of(handle) == 100.0  # applied on this replica at once
        status, body = await call("POST", "/admin/rollouts/chat/abort")
        assert status == 409 and "edit its rollout block" in body["error"]["message"]
        status, body = await call("GET", "/admin/rollouts/nope")
        assert status == 404 and body["error"]["code"] == "rollout_not_found"
        assert (await call("POST", "/admin/rollouts/chat/explode"))[0] == 404

        status, page = await call("GET", "/admin/overview")  # the status page's rollout section, as JSON
        [row] = page["rollouts"]
        assert (row["route"], row["status"], row["percent"], row["last"]["action"]) == ("chat", "promoted", 100.0,
                                                                                       "promote")
        async with session.get(handle.url("/ui/"), headers=auth) as response:
            html = await response.text()
        assert 'data-rollout="chat"' in html and "promoted" in html
    code, out, _ = await asyncio.to_thread(cli, "status")
    assert code == 0 and out.splitlines()[0].startswith("chat: promoted, candidate canary at 100%")
    assert rollout_client.run("status", None, "http://127.0.0.1:1", TOKEN, False, io.StringIO(), io.StringIO()) == 1
    assert transitions(handle) == Counter({"start": 1, "pause": 1, "resume": 1, "promote": 1})


async def test_with_redis_down_weights_stay_and_operator_actions_are_refused(
    sim: Any, proxy: Any, redis_server: RedisServer
) -> None:
    _, stable = await sim()
    _, canary = await sim()
    clock = FakeClock(1_000_000.0)
    handle = await start(proxy, rules(stable, canary, rollout_block()), clock,
                         store=RedisStore(redis_server.url, timeout=5.0))
    assert percent_of(handle) == 10.0
    redis_server.stop()
    clock.advance(INTERVAL)
    await handle.rollouts.tick()  # no store: nothing moves, nothing breaks
    assert percent_of(handle) == 10.0 and state_of(handle).status == "running"
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/admin/rollouts/chat/pause"), headers=ADMIN) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "rollout_store_unavailable"
        async with session.get(handle.url("/admin/rollouts/chat")) as response:  # this replica's last view
            assert response.status == 200 and (await response.json())["status"] == "running"
        variant, status = await Traffic(session, handle).one()
        assert status == 200 and variant in ("stable", "canary")  # requests never depend on the rollout's store
