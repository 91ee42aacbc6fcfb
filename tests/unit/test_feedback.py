"""Feedback pieces by themselves: the ledger (joins, replacements, deltas for pooled totals, the pending
batch), request ids (128 random bits, nothing predictable), the `feedback:` rule block, and the join writer
against a store that answers and one that does not."""

from __future__ import annotations

import math
import re
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

import orjson
import pytest

from proxy.config.loader import RulesError, load_rules
from proxy.config.model import DEFAULT_FEEDBACK_TTL, FeedbackRule, RulesHolder
from proxy.errors import StoreUnavailableError
from proxy.observe.feedback import FeedbackLedger
from proxy.pipeline.cache_policy import tenant_of
from proxy.pipeline.feedback import JOIN_PREFIX, JoinWriter
from proxy.pipeline.middleware import RequestIds
from proxy.store import MemoryStore
from tests.conftest import FakeClock

TENANT = tenant_of("Bearer k1", False)


# ----------------------------------------------------------------------------------------------- ledger


def test_a_remembered_request_is_joined_with_its_tenant() -> None:
    ledger = FeedbackLedger()
    ledger.remember("id-1", "chat", "canary", TENANT)
    assert ledger.lookup("id-1") == ("chat", "canary", TENANT, None)
    assert ledger.lookup("id-2") is None
    joined = ledger.lookup("id-1")
    assert joined is not None
    ledger.record("id-1", joined, 0.5)
    assert ledger.lookup("id-1") == ("chat", "canary", TENANT, 0.5)


def test_the_ledger_is_bounded_oldest_first() -> None:
    ledger = FeedbackLedger(max_requests=3)
    for i in range(5):
        ledger.remember(f"id-{i}", "chat", "stable", TENANT)
    assert [ledger.lookup(f"id-{i}") is not None for i in range(5)] == [False, False, True, True, True]
    ledger.record("from-the-store", ("chat", "canary", TENANT, None), 1.0)  # joined elsewhere: kept here too
    assert ledger.lookup("from-the-store") is not None and ledger.lookup("id-2") is None


def test_deltas_count_a_request_once_and_a_replacement_as_a_change() -> None:
    ledger = FeedbackLedger()
    ledger.remember("a", "chat", "stable", TENANT)
    ledger.remember("b", "chat", "canary", TENANT)
    assert ledger.drain_deltas() == {}
    ledger.record("a", ("chat", "stable", TENANT, None), 2.0)
    ledger.record("b", ("chat", "canary", TENANT, None), 1.0)
    assert ledger.drain_deltas() == {("chat", "stable"): (1, 2.0, 4.0), ("chat", "canary"): (1, 1.0, 1.0)}
    assert ledger.drain_deltas() == {}  # drained
    ledger.record("a", ("chat", "stable", TENANT, None), 3.0)  # replaces 2.0 (this ledger's own)
    assert ledger.drain_deltas() == {("chat", "stable"): (0, 1.0, 5.0)}


def test_a_replacement_booked_on_another_replica_adds_only_the_difference() -> None:
    """Replica A booked 2.0; the store told replica B so when B got 5.0: the fleet's sums say one score, 5.0."""
    a, b = FeedbackLedger(), FeedbackLedger()
    joined = ("chat", "canary", TENANT, None)
    a.remember("r", "chat", "canary", TENANT)
    a.record("r", joined, 2.0)  # previous: this ledger's own (none)
    b.record("r", joined, 5.0, previous=2.0)
    pooled = [sum(x) for x in zip(a.drain_deltas()[("chat", "canary")], b.drain_deltas()[("chat", "canary")])]
    assert pooled == [1, 5.0, 25.0]
    assert b.lookup("r") == ("chat", "canary", TENANT, 5.0)


def test_pending_joins_are_batched_and_bounded() -> None:
    ledger = FeedbackLedger()
    ledger.remember("before", "chat", "stable", TENANT)
    assert ledger.take_pending() == []  # nothing is kept until a writer is attached
    woken: list[int] = []
    ledger.share(batch=2, limit=3, on_batch=lambda: woken.append(1))
    ledger.remember("x", "chat", "stable", TENANT)
    assert woken == []
    ledger.remember("y", "chat", "canary", "anonymous")
    assert woken == [1]
    ledger.remember("z", "chat", "stable", TENANT)
    ledger.remember("dropped", "chat", "stable", TENANT)  # the writer is 3 behind
    assert ledger.dropped == 1 and ledger.lookup("dropped") is not None  # still joined here
    assert ledger.take_pending() == [("x", ("chat", "stable", TENANT, None)), ("y", ("chat", "canary", "anonymous", None)),
                                     ("z", ("chat", "stable", TENANT, None))]
    assert ledger.take_pending() == []


# ------------------------------------------------------------------------------------------ request ids


def test_request_ids_are_128_random_bits() -> None:
    ids = RequestIds()
    drawn = [ids.next() for _ in range(5000)]  # crosses several 256-id refills
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in drawn)
    assert len(set(drawn)) == len(drawn)
    # nothing shared between consecutive ids (a prefix-and-counter scheme would share most characters)
    same = sum(x == y for a, b in zip(drawn, drawn[1:]) for x, y in zip(a, b))
    assert same / (32 * (len(drawn) - 1)) < 0.08  # 1/16 expected by chance
    ones = sum(bin(int(i, 16)).count("1") for i in drawn)
    assert abs(ones / (128 * len(drawn)) - 0.5) < 0.01


def test_two_id_sources_and_a_forked_child_never_share_ids() -> None:
    first, second = RequestIds(), RequestIds()
    assert first.next() != second.next()
    before = first.next()
    first._forget()  # what the at-fork hook does in a child: the parent's unused bytes are dropped
    assert first.next() != before


def test_an_id_is_cheap() -> None:
    ids = RequestIds()
    rounds = 20_000
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            ids.next()
        best = min(best, (time.perf_counter() - start) / rounds)
    assert best < 2e-6, f"{best * 1e6:.2f} µs an id"  # ~0.15 µs here; generous for slow CI machines


# ----------------------------------------------------------------------------------------- rule block

RULES = """\
backends:
  b1: {url: "http://127.0.0.1:8000"}
pools:
  p1: {backends: [b1]}
routes:
  - name: rated
    match: {model: rated}
    pool: p1
%s
  - name: plain
    match: {model: plain}
    pool: p1
"""


def load(tmp_path: Path, block: str) -> RulesHolder:
    (tmp_path / "rules.yaml").write_text(RULES % textwrap.indent(block, "    "))
    return RulesHolder(load_rules(tmp_path, env={}))


def test_the_feedback_block_sets_range_and_ttl(tmp_path: Path) -> None:
    rated, plain = load(tmp_path, "feedback: {min: -1, max: 1, ttl: 10m}").current.routes
    assert rated.feedback == FeedbackRule(min=-1.0, max=1.0, ttl=600.0)
    assert plain.feedback == FeedbackRule() and plain.feedback.ttl == DEFAULT_FEEDBACK_TTL
    assert [rated.feedback.clamp(s) for s in (-5.0, 0.25, 7.0)] == [-1.0, 0.25, 1.0]
    assert [plain.feedback.clamp(s) for s in (-5.0, 7.0)] == [-5.0, 7.0]
    assert FeedbackRule(min=0).clamp(-3.0) == 0.0 and FeedbackRule(min=0).clamp(1e9) == 1e9


@pytest.mark.parametrize(("block", "message"), [
    ("feedback: {min: 1, max: 1}", "feedback.max must be greater than feedback.min"),
    ("feedback: {min: 0, max: .inf}", "feedback.max must be a finite number, got inf"),
    ("feedback: {min: yes}", "feedback.min must be a finite number"),
    ("feedback: {ttl: 0s}", "feedback.ttl"),
    ("feedback: {maximum: 1}", "unknown key 'maximum' in feedback of route 'rated' (did you mean 'max'?)"),
    ("feedback: 5", "feedback must be a mapping"),
])
def test_a_broken_feedback_block_is_reported_at_its_line(tmp_path: Path, block: str, message: str) -> None:
    with pytest.raises(RulesError) as caught:
        load(tmp_path, block)
    assert any(error.startswith(f"{tmp_path / 'rules.yaml'}:9:") and message in error
               for error in caught.value.errors), caught.value.errors


# ---------------------------------------------------------------------------------------- join writer


class DeadStore(MemoryStore):
    """A store whose batched writes fail like a Redis that does not answer."""

    async def set_many(self, values: Mapping[str, bytes], ttl: float) -> None:
        raise StoreUnavailableError("down")


async def test_the_writer_stores_each_join_for_its_routes_ttl(tmp_path: Path) -> None:
    rules = load(tmp_path, "feedback: {ttl: 10s}")
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    ledger = FeedbackLedger()
    writer = JoinWriter(ledger, store, rules, batch=2)
    ledger.remember("r1", "rated", "v", TENANT)
    ledger.remember("p1", "plain", "v", "anonymous")
    ledger.remember("p2", "plain", "w", TENANT)
    await writer.flush()
    assert writer.written == 3 and writer.lost == 0
    assert orjson.loads(await store.get(JOIN_PREFIX + "r1") or b"") == ["rated", "v", TENANT]
    assert orjson.loads(await store.get(JOIN_PREFIX + "p1") or b"") == ["plain", "v", "anonymous"]
    clock.advance(11)
    assert await store.get(JOIN_PREFIX + "r1") is None  # feedback.ttl: 10s
    assert await store.get(JOIN_PREFIX + "p2") is not None  # the default hour
    await writer.flush()  # nothing new: no write
    assert writer.written == 3


async def test_a_store_that_does_not_answer_costs_the_batch_not_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = FeedbackLedger()
    writer = JoinWriter(ledger, DeadStore(), load(tmp_path, ""))
    for i in range(3):
        ledger.remember(f"r{i}", "rated", "v", TENANT)
        await writer.flush()
    assert (writer.written, writer.lost) == (0, 3)
    assert len([r for r in caplog.records if "feedback joins not written" in r.message]) == 1  # once per outage
    assert ledger.lookup("r0") is not None  # still joined on this replica
