"""`proxy.upstream.health.HealthChecker`: a round that fails unexpectedly is logged and probing goes on
(probing is what re-admits ejected backends); probe timeouts while the backend serves never eject, other
misses eject after `health.failures` in a row. No sockets: the probe is faked, the clock is the test's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from proxy.config.loader import load_rules
from proxy.config.model import Backend, HealthSettings, Pool, Snapshot
from proxy.observe.metrics import Metrics
from proxy.upstream import health
from proxy.upstream.ejection import record_success
from proxy.upstream.health import HealthChecker
from proxy.upstream.probe import Probe
from proxy.upstream.state import BackendState, BackendStates
from tests.conftest import FakeClock


async def test_a_failing_round_does_not_end_probing(caplog: pytest.LogCaptureFixture) -> None:
    snapshot = load_rules(Path(__file__).resolve().parents[2] / "rules", env={})
    calls = 0

    def current() -> Snapshot:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in one round")
        return snapshot

    metrics = Metrics()
    checker = HealthChecker(BackendStates(), current, lambda: 0.0, metrics.health_round)
    task = asyncio.create_task(checker.run())
    try:
        with caplog.at_level(logging.ERROR, logger="splitstream.health"):
            await asyncio.wait_for(checker.wait_round(), 30)  # the round that raised
            await asyncio.wait_for(checker.wait_round(), 30)  # ...and the next one ran all the same
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert calls >= 2
    assert any("health round failed" in r.getMessage() for r in caplog.records)
    rounds = metrics.registry.get_sample_value("splitstream_health_round_seconds_count")
    assert rounds is not None and rounds >= 2  # each round is timed, the failed one too


# -- probe outcomes through the checker (the probe itself is faked: no sockets) -------------------------------

BUSY = Backend("busy", "http://busy:8000", "busy", 8000, "", kind="llamacpp")
SETTINGS = HealthSettings(interval=5, unhealthy_interval=1, timeout=1, failures=2, ejection=10, max_ejection=60)


def checker_for(outcome: Probe, monkeypatch: pytest.MonkeyPatch) -> tuple[HealthChecker, BackendState, FakeClock]:
    """A checker over one backend whose every probe ends with `outcome`, on a clock the test moves."""

    async def fake_probe(backend: Backend, timeout: float = 1.0) -> Probe:
        assert timeout == SETTINGS.timeout  # the rules' probe timeout, not the module default
        return outcome

    monkeypatch.setattr(health, "probe", fake_probe)
    snapshot = Snapshot((BUSY,), (Pool("p", (BUSY,)),), (), health=SETTINGS)
    states = BackendStates()
    states.sync(snapshot.backends)
    clock = FakeClock(0.0)
    checker = HealthChecker(states, lambda: snapshot, clock, Metrics().health_round)
    return checker, states.get(BUSY), clock


async def rounds(checker: HealthChecker, state: BackendState, clock: FakeClock, n: int, serve: bool) -> None:
    """`n` probe rounds, each when its probe is due; with `serve`, a request is served before each."""
    for _ in range(n):
        clock.now = max(clock.now, state.next_probe_at)
        if serve:
            record_success(state)
        await checker.check_once()


async def test_probe_timeouts_while_serving_never_eject(monkeypatch: pytest.MonkeyPatch) -> None:
    checker, state, clock = checker_for(Probe.TIMED_OUT, monkeypatch)
    await rounds(checker, state, clock, 20, serve=True)
    assert state.is_available(clock()) and state.probe_misses == 0 and state.ejections_total == 0


async def test_probe_timeouts_without_traffic_eject_after_failures_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    checker, state, clock = checker_for(Probe.TIMED_OUT, monkeypatch)
    await rounds(checker, state, clock, 1, serve=False)
    assert state.is_available(clock())  # one miss of two: a busy box is given the benefit of the doubt
    await rounds(checker, state, clock, 1, serve=False)
    assert not state.is_available(clock()) and state.ejections_total == 1


async def test_failed_probes_eject_after_failures_misses_even_while_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    checker, state, clock = checker_for(Probe.FAILED, monkeypatch)
    await rounds(checker, state, clock, 1, serve=True)
    assert state.is_available(clock())
    await rounds(checker, state, clock, 1, serve=True)
    assert not state.is_available(clock()) and state.probe_misses == 2
