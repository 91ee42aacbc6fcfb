"""Backend health policy: passive ejection from request outcomes, re-admission from active probes.

Pure functions over `BackendState` with an explicit `now` (Envoy's outlier detection, simplified):
`failures` consecutive failed requests eject a backend for `ejection` seconds, doubling with every
ejection in a row up to `max_ejection`; a probe that succeeds after the ejection time re-admits it; a
request served well resets the streak. Active probes eject too, but only after `failures` misses in a
row: one slow `/health` on a loaded box is not a death, and a probe that timed out
while the backend kept answering our requests is no miss at all. A pool whose backends are all out still
routes to them (panic, `pipeline/balancer.py`). The I/O (probes) lives in `upstream/health.py`.
"""

from __future__ import annotations

from proxy.config.model import HealthSettings
from proxy.upstream.state import BackendState


def ejection_time(settings: HealthSettings, ejections: int) -> float:
    """Back-off for the n-th ejection in a row (n >= 1)."""
    return min(settings.max_ejection, settings.ejection * 2.0 ** max(0, ejections - 1))


def eject(state: BackendState, settings: HealthSettings, now: float) -> None:
    state.ejections += 1
    state.ejections_total += 1
    state.healthy = False
    state.ejected_until = now + ejection_time(settings, state.ejections)
    state.next_probe_at = state.ejected_until  # no use probing before it may be re-admitted


def record_failure(state: BackendState, settings: HealthSettings, now: float) -> bool:
    """A request failed on this backend (connect, 5xx, reset, timeout). True when it got ejected now."""
    state.consecutive_failures += 1
    if state.healthy and state.consecutive_failures >= settings.failures:
        eject(state, settings, now)
        return True
    return False


def record_success(state: BackendState) -> None:
    """A request was served: the failure streak and the ejection back-off start over, and the next probe
    knows the backend answered since the last one (see `record_probe`)."""
    state.consecutive_failures = 0
    state.ejections = 0
    state.served += 1


def record_throttle(state: BackendState, retry_after: float, now: float) -> None:
    """The runtime said 429 with Retry-After: no new requests to it until then (not a failure)."""
    state.throttled_until = max(state.throttled_until, now + retry_after)


def record_probe(
    state: BackendState, ok: bool, settings: HealthSettings, now: float, *, timed_out: bool = False
) -> None:
    """Apply an active probe's result and schedule the next probe.

    A failed probe is a miss, and `settings.failures` misses in a row eject: the probe path can be slow or
    flaky while the runtime itself serves. A probe that timed out while the backend answered a request
    since the previous probe, or holds one of ours now (a long stream), is no miss: it is busy, not dead.
    An explicit failure (refused, 5xx) counts whatever the traffic does, since the runtime itself said it
    is not ready. While misses pile up, probes come at `unhealthy_interval`, so a dead backend is confirmed
    in seconds rather than `failures` intervals.
    """
    busy = state.served != state.served_at_probe or state.inflight > 0  # answered since, or working now
    state.served_at_probe = state.served
    if ok:
        state.probe_misses = 0
        if not state.healthy and now >= state.ejected_until:
            state.healthy = True  # re-admitted; `ejections` stays until a request succeeds
            state.consecutive_failures = 0
    elif not (timed_out and busy):
        state.probe_misses += 1
        if state.healthy and state.probe_misses >= settings.failures:
            eject(state, settings, now)
    calm = state.healthy and state.probe_misses == 0
    state.next_probe_at = now + (settings.interval if calm else settings.unhealthy_interval)
