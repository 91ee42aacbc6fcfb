"""A rollout's state and its transitions, as tables and pure functions (h11 `_state.py` style).

Times are wall-clock seconds so replicas agree; the state is stored as JSON under `state_key(route, digest)`.
Called by `delivery/controller.py` (I/O) and `delivery/weights.py`; nothing here awaits or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import orjson

from proxy.config.model import Rollout, Variant
from proxy.delivery.analysis import FAIL, INCONCLUSIVE, PASS, Analysis
from proxy.errors import RolloutConflictError

#   status              candidate %    automatic transitions                 operator actions
#   running             steps[step]    advance | hold | rollback | promote   pause, promote, abort
#   paused              steps[step]    rollback (a decisive failure only)    resume, promote, abort
#   awaiting_promotion  steps[-1]      rollback (a decisive failure only)    pause, promote, abort
#   promoted            100            -                                     -
#   rolled_back         0              -                                     -
#   aborted             0              -                                     -
# `awaiting_promotion` (rollout.confirm_promotion): the last step passed and waits for an operator's promote;
# entered by a hold whose reason says so. No state yet (the candidate has not answered its probe) or an
# unreadable one: candidate 0 %.
RUNNING = "running"
PAUSED = "paused"
AWAITING_PROMOTION = "awaiting_promotion"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
ABORTED = "aborted"
STATUSES = (RUNNING, PAUSED, AWAITING_PROMOTION, PROMOTED, ROLLED_BACK, ABORTED)

# splitstream_rollout_transitions_total{action}
START = "start"
ADVANCE = "advance"
HOLD = "hold"
ROLLBACK = "rollback"
PROMOTE = "promote"
PAUSE = "pause"
RESUME = "resume"
ABORT = "abort"
ACTIONS = (START, ADVANCE, HOLD, ROLLBACK, PROMOTE, PAUSE, RESUME, ABORT)
OPERATOR_ACTIONS = (PAUSE, RESUME, PROMOTE, ABORT)

# action -> (statuses it applies to, status after)
_OPERATOR_TABLE: dict[str, tuple[tuple[str, ...], str]] = {
    PAUSE: ((RUNNING, AWAITING_PROMOTION), PAUSED),
    RESUME: ((PAUSED,), RUNNING),
    PROMOTE: ((RUNNING, PAUSED, AWAITING_PROMOTION), PROMOTED),
    ABORT: ((RUNNING, PAUSED, AWAITING_PROMOTION), ABORTED),
}

HISTORY_LIMIT = 50  # decisions kept in the stored state (a held step adds one per interval)
KEY_PREFIX = "splitstream:rollout:"
CANDIDATE_UNHEALTHY = "candidate_unhealthy"


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Where one rollout stands. `since`: when the current step began; `due`: when its analysis ends (the
    step's interval, extended by holds); `version` grows with every transition, so no two transitions
    store the same bytes (writers compare-and-set the bytes they read, `delivery/controller.py`)."""

    status: str
    step: int
    since: float
    due: float
    version: int = 0
    history: tuple[dict[str, Any], ...] = ()

    @property
    def is_active(self) -> bool:
        return self.status in (RUNNING, PAUSED, AWAITING_PROMOTION)


def state_key(route: str, digest: str) -> str:
    return f"{KEY_PREFIX}{route}:{digest}"


def candidate_percent(state: RolloutState | None, rollout: Rollout) -> float:
    if state is None or state.status in (ROLLED_BACK, ABORTED):
        return 0.0
    if state.status == PROMOTED:
        return 100.0
    return rollout.steps[min(state.step, len(rollout.steps) - 1)]


def effective_variants(variants: tuple[Variant, ...], rollout: Rollout, percent: float) -> tuple[Variant, ...]:
    """The split the rollout asks for: candidate `percent`, baseline the rest, every other variant 0.

    Ordered others, baseline, candidate: the candidate holds the top of the draw, so a growing step only
    moves subjects into it (and the hash fallback used while the store is down agrees step after step)."""
    by_name = {variant.name: variant for variant in variants}
    others = tuple(replace(v, weight=0.0) for v in variants if v.name not in (rollout.candidate, rollout.baseline))
    baseline = replace(by_name[rollout.baseline], weight=100.0 - percent)
    candidate = replace(by_name[rollout.candidate], weight=percent)
    return (*others, baseline, candidate)


def _entry(at: float, action: str, step: int, percent: float, reason: str, by: str,
           numbers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"at": at, "action": action, "step": step, "percent": percent, "reason": reason, "by": by,
            "numbers": numbers or {}}


def _record(state: RolloutState, entry: dict[str, Any], **changes: Any) -> RolloutState:
    history = (*state.history, entry)[-HISTORY_LIMIT:]
    return replace(state, version=state.version + 1, history=history, **changes)


def initial_state(rollout: Rollout, now: float) -> RolloutState:
    """Step 0 begins now (the caller has checked that the candidate answers its health probe)."""
    state = RolloutState(RUNNING, 0, now, now + rollout.interval)
    return _record(state, _entry(now, START, 0, rollout.steps[0], "ok", "analysis"))


def next_state(
    state: RolloutState, rollout: Rollout, analysis: Analysis, now: float
) -> tuple[RolloutState, str] | None:
    """The automatic transition after one evaluation, or None. Before `due` only a FAIL acts (the caller
    passes an early analysis); at `due`: FAIL → rollback, INCONCLUSIVE → hold, PASS → advance or promote
    (with `confirm_promotion`, the last step's PASS is a hold that awaits an operator's promote instead)."""
    if not state.is_active:
        return None
    percent = candidate_percent(state, rollout)
    if analysis.verdict == FAIL:
        entry = _entry(now, ROLLBACK, state.step, percent, analysis.reason, "analysis", analysis.numbers)
        return _record(state, entry, status=ROLLED_BACK), ROLLBACK
    if state.status == PAUSED or now < state.due:
        return None
    if state.status == AWAITING_PROMOTION and rollout.confirm_promotion:
        return None  # an operator's promote, or a decisive failure, is what moves it now
    if analysis.verdict == INCONCLUSIVE:
        return hold(state, rollout, now, analysis.reason, analysis.numbers), HOLD
    assert analysis.verdict == PASS
    if state.step + 1 >= len(rollout.steps) and rollout.confirm_promotion:
        entry = _entry(now, HOLD, state.step, percent, AWAITING_PROMOTION, "analysis", analysis.numbers)
        return _record(state, entry, status=AWAITING_PROMOTION), HOLD
    if state.step + 1 >= len(rollout.steps):
        entry = _entry(now, PROMOTE, state.step, 100.0, analysis.reason, "analysis", analysis.numbers)
        return _record(state, entry, status=PROMOTED), PROMOTE
    step = state.step + 1
    entry = _entry(now, ADVANCE, step, rollout.steps[step], analysis.reason, "analysis", analysis.numbers)
    return _record(state, entry, step=step, since=now, due=now + rollout.interval), ADVANCE


def hold(state: RolloutState, rollout: Rollout, now: float, reason: str,
         numbers: dict[str, Any] | None = None) -> RolloutState:
    """Stay at the step for another interval; the window keeps growing (it starts at `since`). (Running again
    if it was awaiting a promotion the rules no longer ask for.)"""
    entry = _entry(now, HOLD, state.step, candidate_percent(state, rollout), reason, "analysis", numbers)
    return _record(state, entry, status=RUNNING, due=now + rollout.interval)


def operator_action(state: RolloutState, rollout: Rollout, action: str, now: float) -> RolloutState:
    """pause | resume | promote | abort as an operator asked; RolloutConflictError when the status forbids it.

    Resuming gives the step a fresh interval (its window still starts at `since`)."""
    allowed, status = _OPERATOR_TABLE[action]
    if state.status not in allowed:
        raise RolloutConflictError(f"Cannot {action} a rollout that is {state.status.replace('_', ' ')}"
                                   + ("; edit its rollout block to start a new one." if not state.is_active else "."))
    changes: dict[str, Any] = {"status": status}
    if action == RESUME:
        changes["due"] = now + rollout.interval
    percent = {PROMOTE: 100.0, ABORT: 0.0}.get(action, candidate_percent(state, rollout))
    return _record(state, _entry(now, action, state.step, percent, "operator", "operator"), **changes)


def encode(state: RolloutState) -> bytes:
    return orjson.dumps({"status": state.status, "step": state.step, "since": state.since, "due": state.due,
                         "version": state.version, "history": list(state.history)})


def decode(raw: bytes | None) -> RolloutState | None:
    """The stored state, or None when absent or not one we can read (then the rollout starts afresh). A
    state written before versions were stored reads as version 0."""
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
        state = RolloutState(status=str(data["status"]), step=int(data["step"]), since=float(data["since"]),
                             due=float(data["due"]), version=int(data.get("version", 0)),
                             history=tuple(dict(entry) for entry in data["history"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return state if state.status in STATUSES and state.step >= 0 else None
