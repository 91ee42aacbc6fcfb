"""Cost prediction and learning: estimates from body size, speeds learned from reported usage."""

from __future__ import annotations

import pytest

from proxy.config.model import Backend
from proxy.pipeline.cost import PRIOR_BYTES_PER_TOKEN, estimate, learn, new_model_stats, predicted_seconds
from proxy.upstream.state import BackendState


def backend_state() -> BackendState:
    return BackendState(Backend("b", "http://h:1", "h", 1, ""))


def test_estimate_bounds_completion_by_max_tokens() -> None:
    stats = new_model_stats()
    big = estimate(stats, 16_000, 1024, False)
    small = estimate(stats, 80, 16, False)
    assert big.prompt_tokens == 16_000 / PRIOR_BYTES_PER_TOKEN and big.completion_tokens == 256
    assert small.completion_tokens == 16
    assert estimate(stats, 400, None, True).completion_tokens == 0.0  # embeddings only prefill


def test_learning_converges_to_reported_numbers() -> None:
    stats, state = new_model_stats(), backend_state()
    for _ in range(50):  # 3 bytes per token, 40-token answers, 1000 tok/s prefill, 100 tok/s decode
        learn(stats, state, body_bytes=3000, prompt_tokens=1000, completion_tokens=40, ttft=1.0, duration=1.4)
    assert stats.bytes_per_token == pytest.approx(3.0)
    assert stats.completion_tokens == pytest.approx(40.0)
    assert state.prefill_tps == pytest.approx(1000.0)
    assert state.decode_tps == pytest.approx(100.0)
    est = estimate(stats, 3000, None, False)
    assert predicted_seconds(state, est) == pytest.approx(1.4)


def test_non_stream_learning_splits_by_current_prefill_speed() -> None:
    stats, state = new_model_stats(), backend_state()
    state.prefill_tps = 1000.0
    learn(stats, state, body_bytes=400, prompt_tokens=100, completion_tokens=50, ttft=None, duration=0.6)
    assert state.decode_tps == pytest.approx(100.0)  # (0.6 - 100/1000) s for 50 tokens


def test_slower_backend_is_priced_higher() -> None:
    fast, slow = backend_state(), backend_state()
    slow.decode_tps = fast.decode_tps / 2
    est = estimate(new_model_stats(), 400, 200, False)
    assert predicted_seconds(slow, est) > 1.9 * predicted_seconds(fast, est)
