"""Balancer policies over hand-built backend state (no I/O, deterministic)."""

from __future__ import annotations

import pytest

from proxy.config.model import Backend
from proxy.pipeline.balancer import pick_backend, predict_cost
from proxy.upstream.state import BackendState, BackendStates


def states(*specs: tuple[float, int, float, int]) -> list[BackendState]:
    """(weight, inflight, load, max_inflight) per backend."""
    out = []
    for i, (weight, inflight, load, limit) in enumerate(specs):
        state = BackendState(Backend(f"b{i}", f"http://h{i}:1", f"h{i}", 1, "", weight=weight, max_inflight=limit))
        state.inflight, state.predicted_load = inflight, load
        out.append(state)
    return out


@pytest.mark.parametrize(
    ("policy", "specs", "expected"),
    [
        ("least_cost", [(1, 1, 500.0, 0), (1, 5, 100.0, 0)], "b1"),  # fewer tokens beats fewer requests
        ("least_conn", [(1, 1, 500.0, 0), (1, 5, 100.0, 0)], "b0"),
        ("least_cost", [(1, 0, 100.0, 0), (4, 0, 300.0, 0)], "b1"),  # load per unit of weight
        ("least_conn", [(1, 1, 0.0, 0), (1, 1, 0.0, 0)], "b0"),  # ties go to the first
        ("least_cost", [(1, 2, 0.0, 2), (1, 9, 900.0, 0)], "b1"),  # full backends are skipped
    ],
)
def test_pick(policy: str, specs: list[tuple[float, int, float, int]], expected: str) -> None:
    chosen = pick_backend(states(*specs), policy, 0)
    assert chosen is not None and chosen.backend.name == expected


def test_all_full_is_none() -> None:
    assert pick_backend(states((1, 1, 0.0, 1), (1, 3, 0.0, 3)), "least_cost", 0) is None
    assert pick_backend(states((1, 1, 0.0, 1)), "round_robin", 5) is None


def test_weighted_round_robin_turns() -> None:
    pool = states((1, 0, 0.0, 0), (2, 0, 0.0, 0))
    picks = [pick_backend(pool, "round_robin", turn).backend.name for turn in range(6)]  # type: ignore[union-attr]
    assert picks == ["b0", "b1", "b1", "b0", "b1", "b1"]


def test_predicted_cost_grows_with_prompt_and_max_tokens() -> None:
    assert predict_cost(40_000, 1024) > predict_cost(200, 16)
    assert predict_cost(400, None) == predict_cost(400, 10_000)  # unknown length is capped, not infinite


def test_lease_release_is_idempotent_and_returns_to_zero() -> None:
    backends = BackendStates()
    state = backends.get(Backend("b", "http://h:1", "h", 1, ""))
    a, b = state.lease(10.5), state.lease(3.25)
    a.release(); a.release()
    assert state.inflight == 1 and state.predicted_load == pytest.approx(3.25)
    b.release()
    assert (state.inflight, state.predicted_load) == (0, 0.0)
