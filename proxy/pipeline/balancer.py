"""Which backend of a pool takes a request: pure policy over backend state, no I/O, no clocks of its own.

`least_cost` picks the backend where the request would finish soonest per unit of weight: its predicted
seconds there (`cost.py`: uncached prompt and completion at the speeds that runtime has while running one
more sequence), plus the wait for a batch slot when all are taken, plus the time it takes from the streams
already running there (each slows as the batch grows) [+ the runtime's foreign queue and KV pressure]. So
a fast runtime packed with streams loses to an idle slower one once packing it would cost more than the
speed gains, and a runtime holding the request's prefix wins only while its queue does not eat the saving.
`least_conn` counts requests in flight per unit of weight (nginx, LiteLLM least-busy); `round_robin` walks
weighted turns; `consistent_hash` keeps a key (a conversation id) on one backend by rendezvous hashing.
Ties go to the earlier backend in the pool. Unavailable backends (unhealthy, ejected, throttled) and full
ones (max_inflight) are not picked, except in panic: when fewer than `health.panic_threshold` % of a pool's
backends are healthy, health is disregarded and every backend not throttled by its runtime's Retry-After is
a candidate (Envoy's panic routing), because a pool left with no backend is a certain outage, and probes
that find most of a pool dead (a loaded box answering /health late) are more likely wrong than the traffic
that still works. Called by `pipeline/dispatch.py`; state from `upstream/state.py`, prices from `cost.py`.
"""

from __future__ import annotations

import hashlib
import math
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
# A runtime's KV cache above this share in use (its /metrics, with runtime_load) is short of room: it will evict
# cached prefixes and may preempt sequences, so its price rises linearly to double when full.
KV_PRESSURE_START = 0.8


def queued_seconds(state: BackendState) -> float:
    """Predicted wait before a new request starts: none while the runtime has a free batch slot
    (`concurrency`); else it is (n − slots + 1)-th in the runtime's queue, and a slot frees every
    (mean work in flight / slots). With concurrency 1 this is the whole in-flight load."""
    slots = state.backend.concurrency
    n = state.inflight
    if n < slots:
        return 0.0
    return (n - slots + 1) * state.predicted_load / (n * slots)


def slowdown_seconds(state: BackendState) -> float:
    """What a newcomer costs the requests already running there: each running stream's remaining tokens
    (about half of those predicted) slow by the decode curve's step per extra sequence. Zero when the batch
    is full (the newcomer waits instead) or when the runtime batches for free (slope 0)."""
    n = state.inflight
    if n == 0 or n >= state.backend.concurrency:
        return 0.0
    return state.decode.b * 0.5 * state.inflight_tokens


def foreign_requests(state: BackendState, now: float) -> float:
    """Requests the runtime reports beyond our own in flight (other replicas, other clients), if fresh."""
    if now - state.runtime_sampled_at > RUNTIME_METRICS_MAX_AGE:
        return 0.0
    return max(0.0, state.runtime_waiting + state.runtime_running - state.inflight)


def kv_pressure(state: BackendState, now: float) -> float:
    """0 while the runtime's KV cache has room; up to 1 as it fills (fresh /metrics only)."""
    if now - state.runtime_sampled_at > RUNTIME_METRICS_MAX_AGE:
        return 0.0
    return max(0.0, state.runtime_kv_usage - KV_PRESSURE_START) / (1.0 - KV_PRESSURE_START)


def least_cost_score(state: BackendState, cost: float, now: float, runtime_load: bool) -> float:
    """Predicted seconds until this request is done there, plus what it costs the others, per unit of weight."""
    load = cost + queued_seconds(state) + slowdown_seconds(state) + state.inflight * TIE_BREAK_SECONDS
    if runtime_load:
        load += foreign_requests(state, now) * cost / state.backend.concurrency
        load *= 1.0 + kv_pressure(state, now)
    return load / state.backend.weight


def pick_backend(
    states: Sequence[BackendState],
    costs: Sequence[float],
    policy: str,
    turn: int,
    now: float,
    runtime_load: bool = False,
    panic: bool = False,
    key: str | None = None,
) -> int | None:
    """Index into `states` of the backend to use, or None when none is available with room.

    `costs[i]` is the request's predicted seconds on `states[i]`; `turn` is a per-pool request counter;
    `panic` (see `in_panic`, decided over the whole pool) disregards health; `key`: consistent_hash's
    (a request without one goes by least_cost).
    """
    if policy == "round_robin":
        return _round_robin(states, turn, now, panic)
    if policy == "consistent_hash" and key is not None:
        return _rendezvous(states, key, now, panic)
    best: int | None = None
    best_score = 0.0
    least_conn = policy == "least_conn"
    for i, state in enumerate(states):
        if not takes_requests(state, now, panic) or not has_room(state):
            continue
        if least_conn:
            score = state.inflight / state.backend.weight
        else:
            score = least_cost_score(state, costs[i], now, runtime_load)
        if best is None or score < best_score:
            best, best_score = i, score
    return best


def _rendezvous(states: Sequence[BackendState], key: str, now: float, panic: bool) -> int | None:
    """Highest random weight (rendezvous) hashing: each key ranks the backends the same way everywhere, so
    every replica sends one conversation to one backend, and a backend leaving moves only its own keys.
    Weighted as -weight / ln(u) (u uniform in (0, 1) from the hash); the best one available with room."""
    best: int | None = None
    best_score = 0.0
    for i, state in enumerate(states):
        if not takes_requests(state, now, panic) or not has_room(state):
            continue
        digest = hashlib.blake2b(f"{key}\x00{state.backend.name}".encode(), digest_size=8).digest()
        unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
        score = -state.backend.weight / math.log(unit)
        if best is None or score > best_score:
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
