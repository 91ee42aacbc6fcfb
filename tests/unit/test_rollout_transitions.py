"""Pure parts of safe transitions, webhooks and the promotion gate: the `awaiting_promotion` status
(`state.py`), states stored before versions, the webhook document and events (`webhooks.py`), and the
validation of `rollout.webhooks` / `rollout.confirm_promotion` (loader and JSON Schema). No sockets."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import yaml
from jsonschema import Draft202012Validator

from proxy.config.loader import load_rules
from proxy.config.model import WEBHOOK_EVENTS, Pool, Rollout, Route, Variant, Webhook
from proxy.config.schema import RULES_SCHEMA
from proxy.delivery.analysis import FAIL, INCONCLUSIVE, PASS, Analysis
from proxy.delivery.state import (
    ACTIONS,
    AWAITING_PROMOTION,
    HOLD,
    PAUSED,
    PROMOTE,
    PROMOTED,
    ROLLBACK,
    ROLLED_BACK,
    RUNNING,
    RolloutState,
    candidate_percent,
    decode,
    encode,
    initial_state,
    next_state,
    operator_action,
)
from proxy.delivery.webhooks import EVENTS, transition_document
from proxy.errors import RolloutConflictError
from tests.unit.test_loader import load_errors
from tests.unit.test_rollout import SPLIT, rules_with

GATED = Rollout(candidate="canary", baseline="stable", steps=(25.0, 100.0), interval=60.0, min_requests=100,
                confirm_promotion=True, digest="d1")
NOW = 10_000.0


def verdict(kind: str) -> Analysis:
    return Analysis(kind, {PASS: "ok", FAIL: "error_rate", INCONCLUSIVE: "too_few_requests"}[kind], {"n": 1})


def at_last_step(rollout: Rollout = GATED) -> RolloutState:
    decided = next_state(initial_state(rollout, NOW), rollout, verdict(PASS), NOW + 60)
    assert decided is not None and decided[0].step == 1
    return decided[0]


# ------------------------------------------------------------------------------------- the gate


def test_the_last_step_passes_into_awaiting_promotion_and_stays_there() -> None:
    state = at_last_step()
    decided = next_state(state, GATED, verdict(PASS), NOW + 120)
    assert decided is not None and decided[1] == HOLD
    waiting = decided[0]
    assert (waiting.status, waiting.step, candidate_percent(waiting, GATED)) == (AWAITING_PROMOTION, 1, 100.0)
    assert waiting.is_active and waiting.version == state.version + 1
    assert (waiting.history[-1]["action"], waiting.history[-1]["reason"]) == (HOLD, AWAITING_PROMOTION)
    assert waiting.history[-1]["numbers"] == {"n": 1}
    for kind in (PASS, INCONCLUSIVE):  # however long it waits, no decision but a failure's
        assert next_state(waiting, GATED, verdict(kind), NOW + 10_000) is None
    failed = next_state(waiting, GATED, verdict(FAIL), NOW + 121)
    assert failed is not None and (failed[0].status, failed[1]) == (ROLLED_BACK, ROLLBACK)


def test_an_operator_promotes_pauses_or_aborts_a_waiting_rollout() -> None:
    waiting = next_state(at_last_step(), GATED, verdict(PASS), NOW + 120)
    assert waiting is not None
    promoted = operator_action(waiting[0], GATED, "promote", NOW + 130)
    assert promoted.status == PROMOTED and promoted.history[-1]["by"] == "operator"
    assert operator_action(waiting[0], GATED, "abort", NOW + 130).status == "aborted"
    paused = operator_action(waiting[0], GATED, "pause", NOW + 130)
    resumed = operator_action(paused, GATED, "resume", NOW + 140)  # a fresh interval, then the gate again
    assert (resumed.status, resumed.due) == (RUNNING, NOW + 200)
    again = next_state(resumed, GATED, verdict(PASS), NOW + 200)
    assert again is not None and again[0].status == AWAITING_PROMOTION
    with pytest.raises(RolloutConflictError, match="Cannot resume a rollout that is awaiting promotion"):
        operator_action(waiting[0], GATED, "resume", NOW + 130)


def test_without_the_gate_the_last_step_promotes_and_a_waiting_rollout_is_released() -> None:
    open_gate = replace(GATED, confirm_promotion=False)
    decided = next_state(at_last_step(open_gate), open_gate, verdict(PASS), NOW + 120)
    assert decided is not None and (decided[0].status, decided[1]) == (PROMOTED, PROMOTE)
    waiting = next_state(at_last_step(), GATED, verdict(PASS), NOW + 120)
    assert waiting is not None
    # The gate removed from the rules (the digest ignores it): the next analysis decides as usual.
    held = next_state(waiting[0], open_gate, verdict(INCONCLUSIVE), NOW + 121)
    assert held is not None and (held[0].status, held[1]) == (RUNNING, HOLD)
    released = next_state(waiting[0], open_gate, verdict(PASS), NOW + 121)
    assert released is not None and (released[0].status, released[1]) == (PROMOTED, PROMOTE)


def test_a_paused_rollout_is_not_gated_early() -> None:
    paused = operator_action(at_last_step(), GATED, "pause", NOW + 61)
    assert paused.status == PAUSED and next_state(paused, GATED, verdict(PASS), NOW + 600) is None


# ---------------------------------------------------------------------------------------- versions


def test_a_state_stored_before_versions_reads_as_version_0_and_every_transition_counts() -> None:
    old = orjson.dumps({"status": "running", "step": 1, "since": NOW, "due": NOW + 60, "history": []})
    state = decode(old)
    assert state is not None and (state.status, state.step, state.version) == (RUNNING, 1, 0)
    paused = operator_action(state, GATED, "pause", NOW + 1)
    assert paused.version == 1 and decode(encode(paused)) == paused
    assert decode(b'"running"') is None and decode(b"7") is None


# ---------------------------------------------------------------------------------------- webhooks


def test_every_action_has_its_event() -> None:
    assert set(EVENTS) == set(ACTIONS)
    assert sorted(EVENTS.values()) == sorted(WEBHOOK_EVENTS)


def route_with(rollout: Rollout) -> Route:
    variants = (Variant("stable", Pool("p-stable", ()), 100.0), Variant("canary", Pool("p-canary", ()), 0.0))
    return Route(name="chat", models=("m",), model_pattern=re.compile("m"), endpoints=(), variants=variants,
                 rollout=rollout)


def test_the_webhook_document_of_a_start_an_advance_and_a_rollback() -> None:
    route = route_with(GATED)
    started = initial_state(GATED, NOW)
    document = transition_document(route, None, started, "start", "replica-1")
    assert document == {
        "id": "chat:d1:1", "route": "chat", "event": "started", "action": "start", "status": "running",
        "candidate": "canary", "baseline": "stable", "steps": [25.0, 100.0], "from_step": None, "to_step": 0,
        "from_percent": 0.0, "percent": 25.0, "reason": "ok", "by": "analysis", "evidence": {}, "version": 1,
        "at": "1970-01-01T02:46:40.000Z", "replica": "replica-1",
    }
    advanced = at_last_step()
    document = transition_document(route, started, advanced, "advance", "replica-1")
    assert (document["event"], document["from_step"], document["to_step"], document["from_percent"],
            document["percent"], document["evidence"]) == ("advanced", 0, 1, 25.0, 100.0, {"n": 1})
    rolled_back = next_state(advanced, GATED, verdict(FAIL), NOW + 61)
    assert rolled_back is not None
    document = transition_document(route, advanced, rolled_back[0], ROLLBACK, "replica-2")
    assert (document["event"], document["reason"], document["from_percent"], document["percent"],
            document["id"]) == ("rolled_back", "error_rate", 100.0, 0.0, "chat:d1:3")
    assert orjson.loads(orjson.dumps(document)) == document  # JSON as it is sent


# -------------------------------------------------------------------------------------- validation


def test_webhooks_and_the_gate_load_and_leave_the_digest_alone(tmp_path: Path) -> None:
    plain = load_rules(rules_with(tmp_path / "plain", "{candidate: canary, baseline: stable}"), env={})
    text = ('{candidate: canary, baseline: stable, confirm_promotion: true, webhooks: ['
            '{url: "https://hooks.example.com/services/T0/B0/x?token=1"}, '
            '{url: "http://10.0.0.7:9000/rollouts", events: [promoted, rolled_back]}]}')
    gated = load_rules(rules_with(tmp_path / "gated", text), env={})
    before, after = plain.routes[1].rollout, gated.routes[1].rollout
    assert before is not None and after is not None
    assert (before.confirm_promotion, before.webhooks) == (False, ())
    assert after.confirm_promotion is True
    assert after.webhooks == (Webhook("https://hooks.example.com/services/T0/B0/x?token=1", WEBHOOK_EVENTS),
                              Webhook("http://10.0.0.7:9000/rollouts", ("promoted", "rolled_back")))
    assert after.digest == before.digest  # adding a gate or a webhook does not start the rollout afresh


WEBHOOK = "{{candidate: canary, baseline: stable, webhooks: {hooks}}}"


@pytest.mark.parametrize(
    ("hooks", "expected", "structural"),
    [
        ('[{url: "ftp://x/hook"}]',
         "c.yaml:8: route 'chat': rollout.webhooks[0].url 'ftp://x/hook' must start with http:// or https://", True),
        ('[{url: "http://user:secret@x/hook"}]',
         "c.yaml:8: route 'chat': rollout.webhooks[0].url 'http://***@x/hook' must not contain credentials (a "
         "token in its path or query is fine)", False),
        ('[{url: "http://x:99999/hook"}]', "c.yaml:8: route 'chat': rollout.webhooks[0].url 'http://x:99999/hook' "
         "has an invalid port", False),
        ('[{url: "http://x/hook#top"}]',
         "c.yaml:8: route 'chat': rollout.webhooks[0].url 'http://x/hook#top' must not have a fragment", False),
        ("[{events: [promoted]}]", "c.yaml:8: route 'chat': rollout.webhooks[0].url is required", True),
        ('[{url: "http://x/h", events: [promote]}]',
         "c.yaml:8: route 'chat': rollout.webhooks[0].events[0] must be one of started, advanced, held, promoted, "
         "rolled_back, paused, resumed, aborted, got 'promote' (did you mean 'promoted'?)", True),
        ('[{url: "http://x/h", events: []}]', "c.yaml:8: route 'chat': rollout.webhooks[0].events must be a "
         "non-empty list of started, advanced, held, promoted, rolled_back, paused, resumed, aborted; got an "
         "empty list", True),
        ('[{url: "http://x/h", events: [held, held]}]',
         "c.yaml:8: route 'chat': rollout.webhooks[0].events[1]: 'held' is listed twice", True),
        ('[{url: "http://x/h", evnts: [held]}]',
         "c.yaml:8: unknown key 'evnts' in rollout.webhooks[0] of route 'chat' (did you mean 'events'?)", True),
        ('{url: "http://x/h"}',
         "c.yaml:8: route 'chat': rollout.webhooks must be a list of {url, events} entries, got a mapping", True),
        ('["http://x/h"]', "c.yaml:8: route 'chat': rollout.webhooks[0] must be a mapping with url and events, got "
         "'http://x/h'", True),
    ],
    ids=["scheme", "credentials", "port", "fragment", "no url", "unknown event", "no events", "event twice",
         "typo", "not a list", "not a mapping"],
)
def test_broken_webhooks_report_file_and_line(tmp_path: Path, hooks: str, expected: str, structural: bool) -> None:
    rollout = WEBHOOK.format(hooks=hooks)
    rules = rules_with(tmp_path, rollout)
    errors = load_errors(rules)
    assert errors == (f"{rules}/{expected}",)
    schema_ok = Draft202012Validator(RULES_SCHEMA).is_valid(yaml.safe_load(SPLIT.format(rollout=rollout)))
    assert schema_ok is not structural


def test_confirm_promotion_is_true_or_false(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, "{candidate: canary, baseline: stable, confirm_promotion: maybe}")
    assert load_errors(rules) == (f"{rules}/c.yaml:8: route 'chat': rollout.confirm_promotion must be true or "
                                  "false, got 'maybe'",)
