"""Which backend of a pool takes a request: pure policy over backend state, no I/O, no clocks.

`least_cost` picks the least predicted load per unit of weight, `least_conn` the fewest requests in flight
per unit of weight, `round_robin` walks the backends in weighted turns. Ties go to the earlier backend in
the pool. Backends at their `max_inflight` are skipped; when all are, the caller gets None (and answers
429). Called by `pipeline/handler.py`; state comes from `upstream/state.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.upstream.state import BackendState

# Predicted cost in token units: prefill is cheap per token next to decode (one forward pass per output
# token), so a prompt token counts this fraction of a completion token.
PREFILL_WEIGHT = 0.1
BYTES_PER_TOKEN = 4.0
DEFAULT_COMPLETION_TOKENS = 256


def predict_cost(body_bytes: int, max_tokens: int | None) -> float:
    """Token-cost estimate from the body size and max_tokens; no tokenizer on the hot path."""
    completion = min(max_tokens, DEFAULT_COMPLETION_TOKENS) if max_tokens else DEFAULT_COMPLETION_TOKENS
    return body_bytes / BYTES_PER_TOKEN * PREFILL_WEIGHT + completion


def has_room(state: BackendState) -> bool:
    limit = state.backend.max_inflight
    return limit == 0 or state.inflight < limit


def pick_backend(states: Sequence[BackendState], policy: str, turn: int) -> BackendState | None:
    """The backend to use, or None when every backend is full. `turn` is a per-pool request counter."""
    if policy == "round_robin":
        return _round_robin(states, turn)
    best: BackendState | None = None
    best_score = 0.0
    for state in states:
        if not has_room(state):
            continue
        load = state.predicted_load if policy == "least_cost" else float(state.inflight)
        score = load / state.backend.weight
        if best is None or score < best_score:
            best, best_score = state, score
    return best


def _round_robin(states: Sequence[BackendState], turn: int) -> BackendState | None:
    """Weighted turns: backend i owns weight_i consecutive slots of each cycle (weights rounded, min 1)."""
    slots = [max(1, round(s.backend.weight)) for s in states]
    position = turn % sum(slots)
    start = 0
    for index, width in enumerate(slots):
        if position < start + width:
            break
        start += width
    for offset in range(len(states)):
        state = states[(index + offset) % len(states)]
        if has_room(state):
            return state
    return None
