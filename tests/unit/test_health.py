"""`proxy.upstream.health.HealthChecker`: a round that fails unexpectedly is logged and probing goes on
(probing is what re-admits ejected backends). No sockets: no backend state, so nothing is probed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from proxy.config.loader import load_rules
from proxy.config.model import Snapshot
from proxy.observe.metrics import Metrics
from proxy.upstream.health import HealthChecker
from proxy.upstream.state import BackendStates


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
