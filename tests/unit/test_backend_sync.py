"""Unit tests for `BackendStates.sync` across reloads: kept backends keep their state, removed ones drain
and are forgotten when their last lease is released, and gauges never see a name twice."""

from __future__ import annotations

import math

import pytest

from proxy.config.model import Backend
from proxy.upstream.state import BackendStates


def backend(name: str, port: int, weight: float = 1.0) -> Backend:
    return Backend(name=name, url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port, base_path="",
                   weight=weight)


A, B = backend("a", 8001), backend("b", 8002)


def names(states: BackendStates) -> list[str]:
    return sorted(s.backend.name for s in states)


def test_kept_backend_keeps_its_state_and_takes_the_new_settings() -> None:
    states = BackendStates()
    states.sync([A, B])
    state = states.get(A)
    state.decode_tps = 123.0  # learned
    heavier = backend("a", 8001, weight=3.0)
    states.sync([heavier])
    assert states.get(heavier) is state and state.decode_tps == pytest.approx(123.0) and state.backend.weight == 3.0


def test_idle_removed_backend_is_forgotten_at_once() -> None:
    states = BackendStates()
    states.sync([A, B])
    states.sync([A])
    assert names(states) == ["a"]


def test_busy_removed_backend_drains_then_is_forgotten_on_the_last_release() -> None:
    states = BackendStates()
    states.sync([A, B])
    first, second = states.get(B).lease(1.0), states.get(B).lease(2.0)
    states.sync([A])
    assert names(states) == ["a", "b"]
    assert states.get(B).next_probe_at == math.inf  # not configured: the health checker must not wait on it
    first.release()
    assert names(states) == ["a", "b"]
    second.release()
    second.release()  # idempotent: forgetting happens once
    assert names(states) == ["a"]
    states.sync([A])  # later syncs are unaffected
    assert names(states) == ["a"]


def test_backend_added_back_while_draining_stays() -> None:
    states = BackendStates()
    states.sync([A, B])
    state = states.get(B)
    lease = state.lease(1.0)
    states.sync([A])
    states.sync([A, B])
    assert state.next_probe_at == 0.0  # configured again: probed at the next round
    lease.release()
    assert states.get(B) is state and names(states) == ["a", "b"]


def test_a_request_on_old_rules_picking_a_removed_backend_does_not_resurrect_it() -> None:
    states = BackendStates()
    states.sync([A, B])
    states.sync([A])  # b idle: forgotten
    lease = states.get(B).lease(1.0)  # a request still holding the old snapshot picks b
    assert names(states) == ["a", "b"]
    lease.release()
    assert names(states) == ["a"]


def test_states_without_any_sync_are_kept() -> None:
    states = BackendStates()
    states.get(A).lease(1.0).release()
    assert names(states) == ["a"]


def test_samples_have_one_entry_per_name_while_an_old_url_drains() -> None:
    states = BackendStates()
    states.sync([A])
    old = states.get(A).lease(2.0)
    moved = backend("a", 9001)  # same name, new url: a new identity
    states.sync([moved])
    states.get(moved).healthy = True
    states.get(A).healthy = False  # the draining one's health must not hide the configured one's
    new = states.get(moved).lease(1.0)
    assert states.samples(0.0) == [("a", 2, 3.0, True)]
    old.release()
    new.release()
    assert states.samples(0.0) == [("a", 0, 0.0, True)]
