"""Ejection policy: consecutive failures eject with a growing back-off; probes eject only after `failures`
misses in a row (a timeout while the backend serves is no miss) and re-admit; fixed clock."""

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


def test_probes_eject_only_after_failures_misses_in_a_row() -> None:
    s = state()
    record_probe(s, False, SETTINGS, 0.0)
    record_probe(s, False, SETTINGS, 1.0)
    assert s.is_available(1.0) and s.probe_misses == 2  # two of three: still serving
    assert s.next_probe_at == 2.0  # ...but probed at the unhealthy pace to confirm quickly
    record_probe(s, True, SETTINGS, 2.0)  # the streak is broken
    assert s.probe_misses == 0 and s.next_probe_at == 7.0
    for now in (7.0, 8.0):
        record_probe(s, False, SETTINGS, now)
    assert s.is_available(8.0)
    record_probe(s, False, SETTINGS, 9.0)  # the third miss in a row
    assert not s.is_available(9.0) and s.ejections_total == 1 and s.ejected_until == 19.0
    assert s.next_probe_at == 10.0
    record_probe(s, False, SETTINGS, 10.0)  # misses while out keep it out, and do not eject it again
    assert s.ejections_total == 1 and s.next_probe_at == 11.0


def test_probe_ejected_backend_is_readmitted_by_a_probe_after_its_ejection_time() -> None:
    s = state()
    for now in (0.0, 1.0, 2.0):
        record_probe(s, False, SETTINGS, now)
    record_probe(s, True, SETTINGS, 5.0)
    assert not s.is_available(5.0)  # ejected until 12
    record_probe(s, True, SETTINGS, 12.0)
    assert s.is_available(12.0) and s.probe_misses == 0 and s.next_probe_at == 17.0


def test_a_probe_timeout_while_the_backend_serves_is_no_miss() -> None:
    s = state()
    for round_number in range(10):  # a loaded box: /health answers late, our requests are served
        record_success(s)
        record_probe(s, False, SETTINGS, float(round_number), timed_out=True)
    assert s.probe_misses == 0 and s.is_available(10.0) and s.ejections_total == 0
    assert s.next_probe_at == 14.0  # no miss streak: the healthy pace


def test_a_probe_timeout_without_traffic_since_the_last_probe_is_a_miss() -> None:
    s = state()
    record_success(s)  # served before the previous probe: no news since
    record_probe(s, True, SETTINGS, 0.0)
    for now in (1.0, 2.0, 3.0):
        record_probe(s, False, SETTINGS, now, timed_out=True)
    assert not s.is_available(3.0) and s.ejections_total == 1


def test_an_excused_timeout_neither_counts_nor_breaks_a_streak() -> None:
    s = state()
    record_probe(s, False, SETTINGS, 0.0, timed_out=True)
    record_probe(s, False, SETTINGS, 1.0, timed_out=True)
    record_success(s)
    record_probe(s, False, SETTINGS, 2.0, timed_out=True)  # served since the last probe: excused
    assert s.probe_misses == 2 and s.is_available(2.0)
    record_probe(s, False, SETTINGS, 3.0, timed_out=True)  # nothing served since: the third miss
    assert not s.is_available(3.0)


def test_an_explicit_probe_failure_counts_even_while_the_backend_serves() -> None:
    s = state()
    for now in (0.0, 1.0, 2.0):  # /health says 503 (or refuses): the runtime itself says it is not ready
        record_success(s)
        record_probe(s, False, SETTINGS, now)
    assert not s.is_available(2.0) and s.probe_misses == 3


def test_passive_ejection_is_unchanged_by_probe_misses() -> None:
    s = state()
    record_probe(s, False, SETTINGS, 0.0)
    assert not record_failure(s, SETTINGS, 0.0) and not record_failure(s, SETTINGS, 0.0)
    assert record_failure(s, SETTINGS, 0.0)  # `failures` failed requests, as before
    assert s.probe_misses == 1


def test_throttle_is_not_a_failure() -> None:
    s = state()
    record_throttle(s, 2.0, 100.0)
    assert not s.is_available(101.0) and s.is_available(102.0)
    assert s.consecutive_failures == 0 and s.healthy
