"""Which backend of a pool takes a request: pure policy over backend state, no I/O, no clocks of its own.

`least_cost` picks the backend where the request would finish soonest per unit of weight: (its predicted
seconds there + the wait before it starts [+ the runtime's foreign queue]) / weight. A runtime decodes up to
`concurrency` requests at once at full speed, so there is no wait while it has a free slot; beyond that the
in-flight work is spread over its slots. A slow backend or one full of long generations gets less. `least_conn` counts requests in flight
per unit of weight (nginx, LiteLLM least-busy); `round_robin` walks weighted turns. Ties go to the earlier
backend in the pool. Unavailable backends (unhealthy, ejected, throttled) and full ones (max_inflight) are
not picked, except in panic: when fewer than `health.panic_threshold` % of a pool's backends are healthy,
health is disregarded and every backend not throttled by its runtime's Retry-After is a candidate (Envoy's
panic routing), because a pool left with no backend is a certain outage, and probes that find most of a
pool dead (a loaded box answering /health late) are more likely wrong than the traffic that still works.
Called by `pipeline/dispatch.py`; state from `upstream/state.py`, prices from `cost.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.upstream.state import BackendState

# Runtime metrics older than this many seconds are ignored: a stale queue depth misleads more than none.
RUNTIME_METRICS_MAX_AGE = 3.0


def has_room(state: BackendState) -> bool:
    limit = state.backend.max_inflight
    return limit == 0 or state.inflight < limit


def in_panic(pool: Sequence[BackendState], now: float, threshold: float) -> bool:
    """Fewer than `threshold` percent of the pool's backends are healthy (0 never panics). Throttled backends
    count as healthy: a Retry-After is the runtime pacing us, not failing."""
    if threshold <= 0 or not pool:
        return False
    healthy = sum(1 for state in pool if state.is_healthy(now))
    return healthy * 100 < threshold * len(pool)


def takes_requests(state: BackendState, now: float, panic: bool = False) -> bool:
    """May be given a request now (room aside): available, or in panic merely not throttled, since even a
    pool in panic must not override a runtime's own Retry-After."""
    return now >= state.throttled_until if panic else state.is_available(now)


# Among backends that would start the request at once, prefer the emptier one (ties only: negligible otherwise).
TIE_BREAK_SECONDS = 1e-6


def queued_seconds(state: BackendState) -> float:
    """Predicted wait before a new request starts decoding: none while the runtime has a free batch slot
    (`concurrency`), else the in-flight work spread over its slots. With concurrency 1 this is the whole
    in-flight load, as for a runtime that serves one request at a time."""
    slots = state.backend.concurrency
    return state.predicted_load / slots if state.inflight >= slots else 0.0


def foreign_requests(state: BackendState, now: float) -> float:
    """Requests the runtime reports beyond our own in flight (other replicas, other clients), if fresh."""
    if now - state.runtime_sampled_at > RUNTIME_METRICS_MAX_AGE:
        return 0.0
    return max(0.0, state.runtime_waiting + state.runtime_running - state.inflight)


def pick_backend(
    states: Sequence[BackendState],
    costs: Sequence[float],
    policy: str,
    turn: int,
    now: float,
    runtime_load: bool = False,
    panic: bool = False,
) -> int | None:
    """Index into `states` of the backend to use, or None when none is available with room.

    `costs[i]` is the request's predicted seconds on `states[i]`; `turn` is a per-pool request counter;
    `panic` (see `in_panic`, decided over the whole pool) disregards health.
    """
    if policy == "round_robin":
        return _round_robin(states, turn, now, panic)
    best: int | None = None
    best_score = 0.0
    for i, state in enumerate(states):
        if not takes_requests(state, now, panic) or not has_room(state):
            continue
        if policy == "least_cost":
            load = costs[i] + queued_seconds(state) + state.inflight * TIE_BREAK_SECONDS
            if runtime_load:
                load += foreign_requests(state, now) * costs[i] / state.backend.concurrency
        else:
            load = float(state.inflight)
        score = load / state.backend.weight
        if best is None or score < best_score:
            best, best_score = i, score
    return best


def _round_robin(states: Sequence[BackendState], turn: int, now: float, panic: bool) -> int | None:
    """Weighted turns: backend i owns weight_i consecutive slots of each cycle (weights rounded, min 1)."""
    if not states:
        return None
    slots = [max(1, round(s.backend.weight)) for s in states]
    position = turn % sum(slots)
    index = 0
    for index, width in enumerate(slots):
        if position < width:
            break
        position -= width
    for offset in range(len(states)):
        i = (index + offset) % len(states)
        if takes_requests(states[i], now, panic) and has_room(states[i]):
            return i
    return None
