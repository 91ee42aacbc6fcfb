"""Cost prediction and learning: estimates from body size, speed curves learned from reported usage and
timings (queue time kept apart from prefill), prefix-cache pricing and its correction from cached tokens."""

from __future__ import annotations

import pytest

from proxy.config.model import Backend
from proxy.pipeline.balancer import pick_backend
from proxy.pipeline.cost import (
    MIN_CACHE_TOKENS,
    PRIOR_BYTES_PER_TOKEN,
    Estimate,
    Outcome,
    block_tokens,
    estimate,
    learn,
    learn_prefix,
    matched_tokens,
    new_model_stats,
    predicted_seconds,
    remember_prefix,
)
from proxy.pipeline.prompt_blocks import BLOCK_BYTES
from proxy.upstream.state import DEFAULT_CACHE_TOKENS, BackendState

NOW = 1000.0


def backend_state(concurrency: int = 1, cache_tokens: int = 0, name: str = "b") -> BackendState:
    return BackendState(Backend(name, f"http://{name}:1", name, 1, "", concurrency=concurrency,
                                cache_tokens=cache_tokens))


def outcome(prompt: int, completion: int, ttft: float | None, duration: float, **kw: object) -> Outcome:
    return Outcome(prompt * 3, prompt, completion, ttft, duration, **kw)  # type: ignore[arg-type]


def test_estimate_bounds_completion_by_max_tokens() -> None:
    stats = new_model_stats()
    big = estimate(stats, 16_000, 1024, False)
    small = estimate(stats, 80, 16, False)
    assert big.prompt_tokens == 16_000 / PRIOR_BYTES_PER_TOKEN and big.completion_tokens == 256
    assert small.completion_tokens == 16
    assert estimate(stats, 400, None, True).completion_tokens == 0.0  # embeddings only prefill


def test_learning_converges_to_reported_numbers() -> None:
    stats, state = new_model_stats(), backend_state()
    for _ in range(50):  # 3 bytes per token, 41-token answers, 1000 tok/s prefill, 100 tok/s decode
        learn(stats, state, outcome(1000, 41, ttft=1.0, duration=1.4), NOW)
    assert stats.bytes_per_token == pytest.approx(3.0)
    assert stats.completion_tokens == pytest.approx(41.0)
    assert state.prefill_tps == pytest.approx(1000.0, rel=0.01)
    assert state.decode_tps == pytest.approx(100.0, rel=0.01)
    est = estimate(stats, 3000, None, False)
    assert predicted_seconds(state, est) == pytest.approx(1.41, rel=0.01)


def test_non_stream_learning_splits_by_current_prefill_speed() -> None:
    stats, state = new_model_stats(), backend_state()
    state.prefill_tps = 1000.0
    learn(stats, state, outcome(100, 50, ttft=None, duration=0.6), NOW)
    assert state.decode.samples == 1 and state.prefill.samples == 0
    assert 1 / state.decode.seconds_per_token(1) > 30.0  # moved from the 30 tok/s prior towards 100


def test_slower_backend_is_priced_higher() -> None:
    fast, slow = backend_state(), backend_state()
    slow.decode_tps = fast.decode_tps / 2
    est = estimate(new_model_stats(), 400, 200, False)
    assert predicted_seconds(slow, est) > 1.9 * predicted_seconds(fast, est)


def test_time_queued_in_the_runtime_is_not_learned_as_prefill() -> None:
    """A request that started 5th on a 4-slot runtime waited there: its long TTFT says nothing of prefill."""
    stats, state = new_model_stats(), backend_state(concurrency=4)
    for _ in range(20):
        learn(stats, state, outcome(1000, 11, ttft=1.0, duration=1.1, started_among=1), NOW)
    before = state.prefill_tps
    for _ in range(50):  # 9 s in the queue, then the same 1 s prefill
        learn(stats, state, outcome(1000, 11, ttft=10.0, duration=10.1, started_among=5, running=4.0), NOW)
    assert state.prefill_tps == pytest.approx(before)
    assert state.decode.samples == 70  # what followed the first token is still decode


def test_the_runtimes_own_timings_are_believed_over_the_ttft() -> None:
    """llama.cpp's prompt_ms / predicted_ms: queue time is excluded even for a request that queued."""
    stats, state = new_model_stats(), backend_state(concurrency=4)
    for _ in range(50):
        learn(stats, state, outcome(1000, 100, ttft=9.0, duration=10.0, started_among=6, running=4.0,
                                    prefill_ms=1000.0, decode_ms=2000.0), NOW)
    assert state.prefill.tokens_per_second(4) == pytest.approx(1000.0, rel=0.02)
    assert state.decode.tokens_per_second(4) == pytest.approx(50.0, rel=0.02)


def test_cached_prompt_tokens_are_not_prefill() -> None:
    stats, state = new_model_stats(), backend_state()
    for _ in range(50):  # 900 of 1000 prompt tokens came from the cache: 100 computed in 0.1 s
        learn(stats, state, outcome(1000, 11, ttft=0.1, duration=0.2, cached_tokens=900), NOW)
    assert state.prefill_tps == pytest.approx(1000.0, rel=0.02)


def test_decode_speed_is_learned_as_a_function_of_the_streams_running() -> None:
    """A CPU runtime: 4 streams share what 1 gets alone. The curve predicts each load, and a new request on a
    runtime already running 3 is priced at 4 running."""
    stats, state = new_model_stats(), backend_state(concurrency=4)
    for i in range(200):
        running = 1 + i % 4  # 100 tok/s alone, 100/r each with r running
        learn(stats, state, outcome(100, 101, ttft=0.05, duration=0.05 + running, running=float(running)), NOW)
    for r in (1, 2, 3, 4):
        assert state.decode.tokens_per_second(r) == pytest.approx(100.0 / r, rel=0.05)
    est = Estimate(1.0, 100.0)
    idle = predicted_seconds(state, est)
    state.inflight = 3
    assert predicted_seconds(state, est) == pytest.approx(4 * idle, rel=0.1)
    state.inflight = 9  # beyond its slots it runs at 4 (and waits: the balancer's queued_seconds)
    assert predicted_seconds(state, est) == pytest.approx(4 * idle, rel=0.1)


def test_stale_beliefs_give_way_to_new_evidence() -> None:
    stats, state = new_model_stats(), backend_state()
    for _ in range(100):  # slow for a while (a noisy neighbour)
        learn(stats, state, outcome(100, 101, ttft=0.1, duration=10.1), NOW)
    assert state.decode_tps == pytest.approx(10.0, rel=0.05)
    for _ in range(3):  # an hour later, recovered: three requests at 100 tok/s
        learn(stats, state, outcome(100, 101, ttft=0.1, duration=1.1), NOW + 3600)
    assert state.decode_tps > 90.0


# -- prefixes --------------------------------------------------------------------------------------------


def conversation_estimate(blocks: int, extra: int = 0) -> Estimate:
    """A prompt of `blocks` whole blocks (chain 1..blocks) and `extra` more, at 4 bytes per token."""
    tokens = (blocks * BLOCK_BYTES + extra) / 4.0
    return Estimate(tokens, 50.0, list(range(1, blocks + 1)), 4.0)


def test_the_backend_that_holds_the_prefix_is_cheaper_when_loads_are_equal() -> None:
    a, b = backend_state(concurrency=8, name="a"), backend_state(concurrency=8, name="b")
    remember_prefix(a, conversation_estimate(30))  # turn one went to a
    turn_two = conversation_estimate(40)
    assert matched_tokens(a, turn_two) == pytest.approx(30 * block_tokens(turn_two))
    assert matched_tokens(b, turn_two) == 0.0
    costs = [predicted_seconds(s, turn_two, matched_tokens(s, turn_two)) for s in (a, b)]
    assert costs[0] < costs[1]
    assert pick_backend([a, b], costs, "least_cost", 0, NOW) == 0


def test_an_idle_backend_beats_the_prefix_holder_when_its_queue_is_long() -> None:
    a, b = backend_state(concurrency=2, name="a"), backend_state(concurrency=2, name="b")
    remember_prefix(a, conversation_estimate(30))
    turn_two = conversation_estimate(40)
    a.inflight, a.predicted_load = 6, 60.0  # both slots busy, 4 more queued: ~25 s before it would start
    costs = [predicted_seconds(s, turn_two, matched_tokens(s, turn_two)) for s in (a, b)]
    assert costs[0] < costs[1]  # the prefix still makes a's own work cheaper ...
    assert pick_backend([a, b], costs, "least_cost", 0, NOW) == 1  # ... but not worth the queue


def test_learning_corrects_a_too_large_cache_from_reported_cached_tokens() -> None:
    """The index believes the runtime holds what it was sent; the runtime reports holding far less: the
    learned capacity shrinks (and the index with it) until predictions hold."""
    state = backend_state()
    est = conversation_estimate(64)
    assert state.cache_capacity == DEFAULT_CACHE_TOKENS
    for _ in range(30):
        learn_prefix(state, est, matched=64 * block_tokens(est), reported=0)
    assert state.cache_capacity < DEFAULT_CACHE_TOKENS / 10
    assert state.cache_capacity >= MIN_CACHE_TOKENS
    assert len(state.prefix) <= state.cache_capacity / block_tokens(est)
    assert state.prefix_hit_ratio < 0.1  # and matches are trusted less meanwhile


def test_a_configured_cache_size_is_kept_and_the_hit_ratio_still_learned() -> None:
    state = backend_state(cache_tokens=20_000)
    est = conversation_estimate(8)
    for _ in range(30):
        learn_prefix(state, est, matched=1000.0, reported=500)
    assert state.cache_capacity == 20_000
    assert state.prefix_hit_ratio == pytest.approx(0.5, abs=0.05)


def test_a_too_small_cache_grows_when_the_runtime_held_much_more() -> None:
    state = backend_state()
    state.cache_tokens = 4096.0
    est = conversation_estimate(8)
    learn_prefix(state, est, matched=0.0, reported=3000)
    assert state.cache_capacity > 4096.0


def test_the_index_is_bounded_by_the_capacity() -> None:
    state = backend_state(cache_tokens=10 * BLOCK_BYTES // 4)  # ten blocks at 4 bytes per token
    for start in range(0, 100, 5):
        remember_prefix(state, Estimate(1.0, 1.0, list(range(start, start + 5)), 4.0))
    assert len(state.prefix) == 10
