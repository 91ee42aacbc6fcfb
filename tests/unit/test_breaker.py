"""Unit tests for `proxy.store.breaker`: the circuit breaker's transitions on a fixed `now`."""

from __future__ import annotations

import pytest

from proxy.store.breaker import Admission, Breaker


def test_closed_passes_and_a_failure_opens_once() -> None:
    b = Breaker(1.0, 8.0)
    assert b.admit(0.0) is Admission.PASS
    assert b.failed(0.0, Admission.PASS) is True  # the outage begins: log it
    assert b.is_open
    assert b.failed(0.01, Admission.PASS) is False  # calls admitted before it opened fail too: no new log
    assert b.open_until == 1.0  # and they do not extend the cooldown


def test_cooldown_then_one_probe_at_a_time() -> None:
    b = Breaker(1.0, 8.0)
    b.failed(0.0, Admission.PASS)
    assert b.admit(0.999) is Admission.DENY
    assert b.admit(1.0) is Admission.PROBE
    assert b.admit(1.0) is Admission.DENY  # the probe is in flight; everyone else still falls back
    assert b.admit(50.0) is Admission.DENY


@pytest.mark.parametrize(("probes", "cooldown"), [(1, 2.0), (2, 4.0), (3, 8.0), (4, 8.0), (10, 8.0)])
def test_failed_probes_double_the_cooldown_up_to_the_cap(probes: int, cooldown: float) -> None:
    b = Breaker(1.0, 8.0)
    now = 0.0
    b.failed(now, Admission.PASS)
    for _ in range(probes):
        assert b.open_until is not None
        now = b.open_until
        assert b.admit(now) is Admission.PROBE
        assert b.failed(now, Admission.PROBE) is False  # still the same outage: no log
    assert b.cooldown == cooldown and b.open_until == now + cooldown


def test_successful_probe_closes_and_resets_the_cooldown() -> None:
    b = Breaker(1.0, 8.0)
    b.failed(0.0, Admission.PASS)
    b.failed(1.0, b.admit(1.0))
    assert b.admit(3.0) is Admission.PROBE
    assert b.succeeded(Admission.PROBE) is True  # the outage ends: log it
    assert not b.is_open and b.cooldown == 1.0
    assert b.admit(3.0) is Admission.PASS
    assert b.succeeded(Admission.PASS) is False


def test_a_late_success_closes_an_open_breaker() -> None:
    b = Breaker(1.0, 8.0)
    b.failed(0.0, Admission.PASS)
    assert b.succeeded(Admission.PASS) is True  # Redis answered after all: it is reachable
    assert b.admit(0.1) is Admission.PASS


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    b = Breaker(1.0, 8.0)
    b.failed(0.0, Admission.PASS)
    assert b.admit(1.0) is Admission.PROBE
    b.abandoned(Admission.PROBE)  # e.g. the client went away mid-call
    assert b.is_open
    assert b.admit(1.0) is Admission.PROBE
    b.abandoned(Admission.PASS)  # a non-probe call abandoning changes nothing
    assert b.admit(1.0) is Admission.DENY


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Breaker(0.0, 1.0)
    with pytest.raises(ValueError):
        Breaker(2.0, 1.0)
