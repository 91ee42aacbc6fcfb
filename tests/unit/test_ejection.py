"""Ejection policy: consecutive failures eject with a growing back-off; probes re-admit; fixed clock."""

from __future__ import annotations

from proxy.config.model import Backend, HealthSettings
from proxy.upstream.ejection import ejection_time, record_failure, record_probe, record_success, record_throttle
from proxy.upstream.state import BackendState

SETTINGS = HealthSettings(interval=5, unhealthy_interval=1, failures=3, ejection=10, max_ejection=35)


def state() -> BackendState:
    return BackendState(Backend("b", "http://h:1", "h", 1, ""))


def test_ejects_after_consecutive_failures_only() -> None:
    s = state()
    assert not record_failure(s, SETTINGS, 0.0)
    assert not record_failure(s, SETTINGS, 0.0)
    record_success(s)  # the streak starts over
    assert not record_failure(s, SETTINGS, 0.0) and not record_failure(s, SETTINGS, 0.0)
    assert record_failure(s, SETTINGS, 0.0)
    assert not s.is_available(5.0) and s.ejected_until == 10.0


def test_back_off_doubles_and_is_capped() -> None:
    assert [ejection_time(SETTINGS, n) for n in (1, 2, 3, 4)] == [10, 20, 35, 35]


def test_probe_readmits_only_after_ejection_time() -> None:
    s = state()
    for _ in range(3):
        record_failure(s, SETTINGS, 0.0)
    record_probe(s, True, SETTINGS, 5.0)
    assert not s.is_available(5.0)
    record_probe(s, True, SETTINGS, 10.0)
    assert s.is_available(10.0) and s.next_probe_at == 15.0
    for _ in range(3):  # fails again right away: the next ejection is longer
        record_failure(s, SETTINGS, 11.0)
    assert s.ejected_until == 31.0


def test_failed_probe_marks_unhealthy_and_probes_faster() -> None:
    s = state()
    record_probe(s, False, SETTINGS, 0.0)
    assert not s.is_available(0.0) and s.next_probe_at == 1.0
    record_probe(s, False, SETTINGS, 1.0)
    assert s.next_probe_at == 2.0


def test_throttle_is_not_a_failure() -> None:
    s = state()
    record_throttle(s, 2.0, 100.0)
    assert not s.is_available(101.0) and s.is_available(102.0)
    assert s.consecutive_failures == 0 and s.healthy
