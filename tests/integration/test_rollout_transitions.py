"""Safe transitions, webhooks and the manual promotion gate (issue 16, items 4 and 5).

Transitions are compare-and-sets against the bytes a decision was made from. On a real redis-server, a store
wrapper stops one writer between its read and its compare-and-set (an `asyncio.Event`, never a sleep) while the
other writes, so each interleaving of an operator's action with the leader's transition is forced, not hoped
for. A small aiohttp receiver records the webhooks. Clocks are FakeClocks and ticks are explicit, as in
`test_rollout.py`, whose rules and traffic helpers these tests share.
"""

from __future__ import annotations

import asyncio
import io
import random
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config.model import Route, Rollout, Webhook
from proxy.delivery import client as rollout_client
from proxy.delivery.controller import CAS_ATTEMPTS, LEASE_KEY, RolloutSettings
from proxy.delivery.state import KEY_PREFIX, RolloutState, decode, encode, initial_state, state_key
from proxy.delivery.webhooks import DELIVERED, DROPPED, FAILED, WEBHOOKS, WebhookSender, WebhookSettings
from proxy.observe.metrics import Metrics
from proxy.store.redis import RedisStore
from tests.conftest import FakeClock, ProxyHandle
from tests.integration.conftest import RedisServer
from tests.integration.test_rollout import (
    ADMIN,
    HEALTHY,
    INTERVAL,
    SAME_SPEED,
    TOKEN,
    Traffic,
    percent_of,
    rollout_block,
    rules,
    state_of,
    transitions,
)

FAST = WebhookSettings(attempts=3, timeout=5.0, backoff=0.01, drain=5.0)  # retries without waiting long


class RacingStore:
    """A RedisStore that, when asked, stops the next compare-and-set of a rollout state just before it is sent
    (after the writer read the state and decided), until the test lets it go; it records every outcome."""

    def __init__(self, inner: RedisStore) -> None:
        self.inner = inner
        self.outcomes: list[bool] = []  # compare-and-sets of rollout states, in order
        self.reached = asyncio.Event()
        self._release: asyncio.Event | None = None
        self.interfere = False  # another writer changes the state before each of ours

    def pause_next_write(self) -> asyncio.Event:
        """The event that lets the stopped write go; `reached` is set once a writer stops there."""
        self.reached = asyncio.Event()
        self._release = asyncio.Event()
        return self._release

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes, ttl: float) -> bool:
        if not key.startswith(KEY_PREFIX) or key == LEASE_KEY:
            return await self.inner.compare_and_set(key, expected, value, ttl)
        if self._release is not None:
            release, self._release = self._release, None
            self.reached.set()
            await release.wait()
        if self.interfere:
            theirs = decode(await self.inner.get(key))
            assert theirs is not None
            await self.inner.set(key, encode(replace(theirs, version=theirs.version + 1)), ttl)
        stored = await self.inner.compare_and_set(key, expected, value, ttl)
        self.outcomes.append(stored)
        return stored

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(key)

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        return await self.inner.set_if_absent(key, value, ttl)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.inner.set(key, value, ttl)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def set_many(self, values: Mapping[str, bytes], ttl: float) -> None:
        await self.inner.set_many(values, ttl)

    async def add_counts(self, increments: Mapping[str, Mapping[str, float]], ttl: float) -> None:
        await self.inner.add_counts(increments, ttl)

    async def read_counts(self, keys: Sequence[str]) -> list[dict[str, float]]:
        return await self.inner.read_counts(keys)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:  # anything else a newer Store has
        return getattr(self.inner, name)


class Receiver:
    """An HTTP endpoint that records the JSON bodies POSTed to it; the first `fail_first` attempts get a 503."""

    def __init__(self, fail_first: int = 0, status: int = 503, hang: bool = False) -> None:
        self.fail_first = fail_first
        self.status = status
        self.hang = hang  # never answer
        self.attempts = 0
        self.bodies: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self.entered = asyncio.Event()
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        self.entered.set()
        assert request.content_type == "application/json"
        body = await request.json()
        if self.hang:
            await asyncio.Event().wait()
        if self.attempts <= self.fail_first:
            return web.Response(status=self.status)
        self.bodies.append(body)
        self._arrived.set()
        return web.Response(status=204)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/hooks/rollouts?token=abc"

    @property
    def events(self) -> list[str]:
        return [body["event"] for body in self.bodies]

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        """Until `count` bodies have arrived (a safety timeout, not a pause: deliveries come in milliseconds)."""
        while len(self.bodies) < count:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), 10)
        return self.bodies


ReceiverFactory = Callable[..., Awaitable[Receiver]]


@pytest.fixture
def receiver(aiohttp_server: Any) -> ReceiverFactory:
    async def make(fail_first: int = 0, status: int = 503, hang: bool = False) -> Receiver:
        hooks = Receiver(fail_first, status, hang)
        app = web.Application()
        app.router.add_post("/hooks/rollouts", hooks.handle)
        hooks.server = await aiohttp_server(app)
        return hooks

    return make


def webhooks(*entries: tuple[str, str | None]) -> str:
    """rollout.webhooks in YAML flow style: (url, events or None for all)."""
    items = [f'{{url: "{url}"' + (f", events: {events}" if events else "") + "}" for url, events in entries]
    return "[" + ", ".join(items) + "]"


async def start(proxy: Any, text: str, clock: FakeClock, hooks: WebhookSettings = FAST,
                **options: Any) -> ProxyHandle:
    settings = RolloutSettings(clock=clock, tick=None, replica_id=options.pop("replica_id", None), webhooks=hooks)
    handle: ProxyHandle = await proxy(text, rollout_settings=settings, **options)
    handle.splitter.rng = random.Random(7)  # per-request draws: a fixed sequence
    return handle


async def post(session: aiohttp.ClientSession, handle: ProxyHandle, action: str) -> tuple[int, dict[str, Any]]:
    async with session.post(handle.url(f"/admin/rollouts/chat/{action}"), headers=ADMIN) as response:
        return response.status, await response.json()


async def first_of(reached: asyncio.Event, task: asyncio.Task[Any]) -> None:
    """Wait until the writer stopped before its compare-and-set (or fail if it finished without writing)."""
    stopped = asyncio.ensure_future(reached.wait())
    done, _ = await asyncio.wait({stopped, task}, return_when=asyncio.FIRST_COMPLETED)
    if stopped not in done:
        stopped.cancel()
        task.result()  # its exception, if it raised
        raise AssertionError("the writer finished without a compare-and-set")


class Fleet:
    """Two replicas on one Redis: `a` holds the lease and drives, `b` follows; each on its own RacingStore."""

    def __init__(self, a: ProxyHandle, b: ProxyHandle, a_store: RacingStore, b_store: RacingStore,
                 redis: RedisStore, clock: FakeClock, hooks: Receiver) -> None:
        self.a, self.b, self.a_store, self.b_store = a, b, a_store, b_store
        self.redis, self.clock, self.hooks = redis, clock, hooks

    async def stored(self) -> RolloutState:
        """The state as Redis holds it (the test's own view, not a replica's)."""
        rollout = self.a.rules.current.routes[0].rollout
        assert rollout is not None
        state = decode(await self.redis.get(state_key("chat", rollout.digest)))
        assert state is not None
        return state


@pytest.fixture
async def fleet(sim: Any, proxy: Any, redis_server: RedisServer, receiver: ReceiverFactory) -> Fleet:
    """Both replicas at step 1 (10 %) of [10, 50, 100] with enough traffic served for the leader's next tick
    to advance, the interval over; webhooks of both go to one receiver (`fleet.hooks`)."""
    _, stable = await sim(**HEALTHY)
    _, canary = await sim(**HEALTHY)
    hooks = await receiver()
    clock = FakeClock(1_000_000.0)
    block = rollout_block(steps="[10, 50, 100]", min_requests=20, max_p95_ratio=SAME_SPEED,
                          webhooks=webhooks((hooks.url, None)))
    text = rules(stable, canary, block)

    async def replica(name: str) -> tuple[ProxyHandle, RacingStore]:
        store = RacingStore(RedisStore(redis_server.url, timeout=5.0))
        return await start(proxy, text, clock, store=store, replica_id=name), store

    (a, a_store), (b, b_store) = await replica("replica-a"), await replica("replica-b")
    assert a.rollouts.is_leader and not b.rollouts.is_leader
    async with aiohttp.ClientSession() as session:
        await Traffic(session, a).until(lambda n: n["canary"] >= 20 and n["stable"] >= 20, size=20)
    clock.advance(INTERVAL)
    a_store.outcomes.clear()  # (its start)
    return Fleet(a, b, a_store, b_store, RedisStore(redis_server.url, timeout=5.0), clock, hooks)


# ------------------------------------------------------------------------------- forced interleavings


async def test_an_operator_abort_racing_a_leader_advance_ends_aborted(fleet: Fleet) -> None:
    """The leader reads and decides to advance; the operator aborts (on the other replica) before the leader's
    write: the leader's compare-and-set fails, it reads the aborted state, and leaves it so."""
    release = fleet.a_store.pause_next_write()
    tick = asyncio.create_task(fleet.a.rollouts.tick())
    await first_of(fleet.a_store.reached, tick)  # read, analysed, decided: advance — not yet written
    async with aiohttp.ClientSession() as session:
        status, body = await post(session, fleet.b, "abort")
    assert status == 200 and (body["status"], body["step"]) == ("aborted", 0)
    release.set()
    await tick

    assert fleet.a_store.outcomes == [False]  # its advance was refused, and never retried on the aborted state
    state = await fleet.stored()
    assert state.status == "aborted" and [e["action"] for e in state.history] == ["start", "abort"]
    assert state_of(fleet.a).status == "aborted" and percent_of(fleet.a) == 0.0  # the leader follows it at once
    assert transitions(fleet.a) == Counter({"start": 1}) and transitions(fleet.b) == Counter({"abort": 1})
    fleet.clock.advance(INTERVAL)
    await fleet.a.rollouts.tick()
    assert (await fleet.stored()) == state

    hooks = await fleet.hooks.wait_for(2)
    assert [(h["event"], h["replica"]) for h in hooks] == [("started", "replica-a"), ("aborted", "replica-b")]
    assert (hooks[1]["from_step"], hooks[1]["to_step"], hooks[1]["from_percent"], hooks[1]["percent"]) == \
        (0, 0, 10.0, 0.0)


@pytest.mark.parametrize(("action", "status"), [("abort", "aborted"), ("pause", "paused")])
async def test_the_leader_advancing_under_an_operator_action_keeps_both(fleet: Fleet, action: str,
                                                                        status: str) -> None:
    """The operator's replica reads and decides; the leader advances before its write: the operator's
    compare-and-set fails, it decides again from the advanced state, and both transitions are kept."""
    release = fleet.b_store.pause_next_write()
    async with aiohttp.ClientSession() as session:
        act = asyncio.create_task(post(session, fleet.b, action))
        await first_of(fleet.b_store.reached, act)
        await fleet.a.rollouts.tick()  # the leader's advance goes through meanwhile
        assert fleet.a_store.outcomes == [True] and percent_of(fleet.a) == 50.0
        release.set()
        code, body = await act
    assert code == 200 and (body["status"], body["step"]) == (status, 1)
    assert fleet.b_store.outcomes == [False, True]
    state = await fleet.stored()
    assert state.status == status and [e["action"] for e in state.history] == ["start", "advance", action]
    assert state.version == 3
    await fleet.a.rollouts.tick()
    assert state_of(fleet.a).status == status and percent_of(fleet.a) == (50.0 if action == "pause" else 0.0)

    hooks = await fleet.hooks.wait_for(3)
    assert [(h["event"], h["replica"], h["to_step"]) for h in hooks] == [
        ("started", "replica-a", 0), ("advanced", "replica-a", 1), (status, "replica-b", 1)]
    assert hooks[1]["reason"] == "ok" and hooks[1]["evidence"]["candidate_requests"] >= 20


async def test_a_state_that_keeps_changing_is_a_409_for_operators_and_the_next_tick_for_the_leader(
    fleet: Fleet,
) -> None:
    fleet.b_store.interfere = fleet.a_store.interfere = True  # someone else writes before each of our writes
    async with aiohttp.ClientSession() as session:
        status, body = await post(session, fleet.b, "pause")
        assert status == 409 and body["error"]["code"] == "rollout_conflict"
        assert f"changed {CAS_ATTEMPTS} times" in body["error"]["message"]
        assert fleet.b_store.outcomes == [False] * CAS_ATTEMPTS
        await fleet.a.rollouts.tick()  # the leader gives up for this tick
        assert fleet.a_store.outcomes == [False] * CAS_ATTEMPTS and percent_of(fleet.a) == 10.0
        fleet.a_store.interfere = False
        await fleet.a.rollouts.tick()  # and advances at the next
    assert fleet.a_store.outcomes[-1] is True and percent_of(fleet.a) == 50.0
    assert transitions(fleet.a) == Counter({"start": 1, "advance": 1}) and not transitions(fleet.b)


# ----------------------------------------------------------------------------------------- webhooks


async def test_a_receiver_gets_every_transition_once_in_order_and_a_failed_attempt_is_retried(
    sim: Any, proxy: Any, receiver: ReceiverFactory
) -> None:
    _, stable = await sim(**HEALTHY)
    _, canary = await sim(**HEALTHY)
    everything = await receiver(fail_first=1)  # its first attempt gets a 503
    finals = await receiver()
    clock = FakeClock(1_000_000.0)
    hooks = webhooks((everything.url, None), (finals.url, "[promoted, rolled_back]"))
    handle = await start(proxy, rules(stable, canary, rollout_block(steps="[50, 100]", min_requests=20,
                                                                    max_p95_ratio=SAME_SPEED, webhooks=hooks)), clock)
    async with aiohttp.ClientSession() as session:
        traffic = Traffic(session, handle)
        for percent in (50.0, 100.0):
            await traffic.until(lambda n: n["canary"] >= 20 and (n["stable"] >= 20 or percent == 100.0), size=20)
            clock.advance(INTERVAL)
            await handle.rollouts.tick()
    assert state_of(handle).status == "promoted"

    bodies = await everything.wait_for(3)
    assert everything.events == ["started", "advanced", "promoted"] and everything.attempts == 4
    assert len({body["id"] for body in bodies}) == 3
    started, advanced, promoted = bodies
    assert (started["from_step"], started["to_step"], started["percent"], started["by"]) == (None, 0, 50.0, "analysis")
    assert (advanced["from_step"], advanced["to_step"], advanced["from_percent"], advanced["percent"]) == \
        (0, 1, 50.0, 100.0)
    assert advanced["evidence"]["candidate_requests"] >= 20 and advanced["evidence"]["baseline_requests"] >= 20
    assert (promoted["action"], promoted["status"], promoted["percent"], promoted["version"]) == \
        ("promote", "promoted", 100.0, 3)
    assert {k: promoted[k] for k in ("route", "candidate", "baseline", "steps")} == \
        {"route": "chat", "candidate": "canary", "baseline": "stable", "steps": [50.0, 100.0]}
    assert promoted["at"].endswith("Z") and promoted["replica"] == handle.rollouts.replica_id
    assert [body["event"] for body in await finals.wait_for(1)] == ["promoted"]
    await handle.server.app[WEBHOOKS].flushed()
    assert delivered(handle) == Counter({("started", DELIVERED): 1, ("advanced", DELIVERED): 1,
                                         ("promoted", DELIVERED): 2})


async def test_a_rollback_is_announced_with_its_evidence(sim: Any, proxy: Any, receiver: ReceiverFactory) -> None:
    _, stable = await sim(max_batch=64)
    _, canary = await sim(fail_rate=0.2, seed=3, max_batch=64)
    hooks = await receiver()
    clock = FakeClock(1_000_000.0)
    block = rollout_block(webhooks=webhooks((hooks.url, "[rolled_back]")))
    handle = await start(proxy, rules(stable, canary, block), clock)
    async with aiohttp.ClientSession() as session:
        await Traffic(session, handle).until(lambda n: n["canary"] >= 80)
    await handle.rollouts.tick()
    assert state_of(handle).status == "rolled_back"
    [body] = await hooks.wait_for(1)
    assert (body["event"], body["action"], body["reason"], body["from_percent"], body["percent"]) == \
        ("rolled_back", "rollback", "error_rate", 10.0, 0.0)
    assert body["evidence"]["candidate_errors"] > 0 and body["evidence"]["baseline_errors"] == 0


def delivered(handle: ProxyHandle) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for family in handle.metrics.registry.collect():
        if family.name == "splitstream_rollout_webhooks":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[(sample.labels["event"], sample.labels["result"])] += int(sample.value)
    return counts


ROUTE = Route(name="chat", models=("m",), model_pattern=re.compile("m"), endpoints=(), variants=(),
              rollout=Rollout(candidate="canary", baseline="stable", steps=(50.0, 100.0), digest="d"))


def with_hooks(*urls: str) -> Route:
    assert ROUTE.rollout is not None
    return replace(ROUTE, rollout=replace(ROUTE.rollout, webhooks=tuple(Webhook(url) for url in urls)))


def counted(metrics: Metrics) -> Counter[str]:
    counts: Counter[str] = Counter()
    for family in metrics.registry.collect():
        if family.name == "splitstream_rollout_webhooks":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["result"]] += int(sample.value)
    return counts


async def test_the_sender_gives_up_on_a_4xx_retries_5xx_and_drops_what_it_cannot_queue(
    receiver: ReceiverFactory,
) -> None:
    rejecting = await receiver(fail_first=100, status=404)
    failing = await receiver(fail_first=100, status=500)
    metrics = Metrics()
    sender = WebhookSender(metrics, replace(FAST, queue=2))
    state = initial_state(ROUTE.rollout, 1000.0)  # type: ignore[arg-type]
    sender.announce(with_hooks(rejecting.url, failing.url), None, state, "start", "r1")
    sender.announce(with_hooks(rejecting.url), None, state, "start", "r1")  # the queue holds 2: dropped
    assert sender.pending == 2 and counted(metrics) == Counter({DROPPED: 1})
    await sender.start()
    await sender.close()  # drains: each delivery runs out of attempts
    assert (rejecting.attempts, failing.attempts) == (1, FAST.attempts)  # a 404 is final, a 500 is retried
    assert counted(metrics) == Counter({DROPPED: 1, FAILED: 2})
    sender.announce(with_hooks(rejecting.url), None, state, "start", "r1")  # closed: nothing more goes out
    assert counted(metrics)[DROPPED] == 2 and rejecting.attempts == 1


async def test_a_receiver_that_never_answers_holds_up_no_transition(
    sim: Any, proxy: Any, receiver: ReceiverFactory
) -> None:
    """Announcing is a put on a queue: transitions go on while a delivery hangs, and what is still queued or in
    flight when the app stops (after its drain) is dropped and counted."""
    _, stable = await sim()
    _, canary = await sim()
    hanging = await receiver(hang=True)
    clock = FakeClock(1_000_000.0)
    block = rollout_block(webhooks=webhooks((hanging.url, None)))
    handle = await start(proxy, rules(stable, canary, block), clock, hooks=replace(FAST, attempts=1, drain=0.05))
    await hanging.entered.wait()  # "started" is in flight, and stays so
    async with aiohttp.ClientSession() as session:
        assert (await post(session, handle, "pause"))[0] == 200
        assert (await post(session, handle, "resume"))[0] == 200
    await handle.rollouts.tick()
    sender = handle.server.app[WEBHOOKS]
    assert sender.pending == 2 and hanging.attempts == 1 and state_of(handle).status == "running"
    await sender.close()
    assert counted(handle.metrics) == Counter({DROPPED: 3})


# ------------------------------------------------------------------------------------ confirm_promotion


async def test_confirm_promotion_holds_the_last_step_until_an_operator_promotes(
    sim: Any, proxy: Any, receiver: ReceiverFactory
) -> None:
    _, stable = await sim(**HEALTHY)
    _, canary = await sim(**HEALTHY)
    hooks = await receiver()
    clock = FakeClock(1_000_000.0)
    block = rollout_block(steps="[50, 100]", min_requests=20, max_p95_ratio=SAME_SPEED, confirm_promotion="true",
                          webhooks=webhooks((hooks.url, "[held, promoted]")))
    handle = await start(proxy, rules(stable, canary, block), clock, admin_token=TOKEN)
    url = handle.url("")

    def cli(action: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = rollout_client.run(action, "chat", url, TOKEN, False, out, err)
        return code, out.getvalue(), err.getvalue()

    async with aiohttp.ClientSession() as session:
        traffic = Traffic(session, handle)
        for percent in (50.0, 100.0):
            await traffic.until(lambda n: n["canary"] >= 20 and (n["stable"] >= 20 or percent == 100.0), size=20)
            clock.advance(INTERVAL)
            await handle.rollouts.tick()
        waiting = state_of(handle)
        assert (waiting.status, waiting.step, percent_of(handle)) == ("awaiting_promotion", 1, 100.0)
        assert (waiting.history[-1]["action"], waiting.history[-1]["reason"]) == ("hold", "awaiting_promotion")
        for _ in range(3):  # however long it waits: no promotion, and no new decision either
            clock.advance(INTERVAL)
            await handle.rollouts.tick()
        assert state_of(handle) == waiting

        code, out, _ = await asyncio.to_thread(cli, "status")
        assert code == 0 and out.startswith("chat: awaiting_promotion, candidate canary at 100% (step 2/2")
        assert "`splitstream rollout promote chat` promotes it" in out.splitlines()[0]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(handle.url("/admin/rollouts/chat"), headers=auth) as response:
            document = await response.json()
        assert (document["status"], document["confirm_promotion"], document["due"]) == \
            ("awaiting_promotion", True, None)
        async with session.get(handle.url("/ui/"), headers=auth) as response:
            html = await response.text()
        assert "awaiting promotion" in html and "splitstream rollout promote chat" in html

        code, out, _ = await asyncio.to_thread(cli, "promote")
        assert code == 0 and out.startswith("chat: promoted, candidate canary at 100%")
    assert [e["action"] for e in state_of(handle).history] == ["start", "advance", "hold", "promote"]
    assert state_of(handle).history[-1]["by"] == "operator"
    held, promoted = await hooks.wait_for(2)
    assert (held["event"], held["reason"], held["status"], held["percent"]) == \
        ("held", "awaiting_promotion", "awaiting_promotion", 100.0)
    assert (promoted["event"], promoted["by"]) == ("promoted", "operator")
    assert transitions(handle) == Counter({"start": 1, "advance": 1, "hold": 1, "promote": 1})
