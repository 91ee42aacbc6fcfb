"""Predicted token cost: how much work a request is, and how long it should take on each backend.

Pure policy over state objects (no I/O, no clock): `estimate` turns body size and max_tokens into
(prompt, completion) tokens using what was learned per model; `predicted_seconds` prices them at one
backend's learned prefill/decode speed; `learn` folds a finished request's reported usage and timings
back into the model's and the backend's numbers (EWMA). Called by `pipeline/dispatch.py`.
"""

from __future__ import annotations

from proxy.upstream.state import BackendState, ModelStats

PRIOR_BYTES_PER_TOKEN = 4.0  # JSON-wrapped English text; corrected by the first usage report
PRIOR_COMPLETION_TOKENS = 256.0
EWMA_ALPHA = 0.1  # weight of a new sample: ~the last 10–20 requests dominate
# Samples outside these bounds are measurement noise (cache hits, clock granularity), not speed.
MIN_TPS, MAX_TPS = 0.1, 1e7


class Estimate:
    """A request's predicted size in tokens; computed once per request, priced per backend."""

    __slots__ = ("prompt_tokens", "completion_tokens")

    def __init__(self, prompt_tokens: float, completion_tokens: float) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


def new_model_stats() -> ModelStats:
    return ModelStats(PRIOR_BYTES_PER_TOKEN, PRIOR_COMPLETION_TOKENS)


def estimate(stats: ModelStats, body_bytes: int, max_tokens: int | None, is_embedding: bool) -> Estimate:
    """Prompt tokens from the body size; completion from what this model usually writes, capped by max_tokens."""
    prompt = body_bytes / stats.bytes_per_token
    if is_embedding:
        return Estimate(prompt, 0.0)
    completion = stats.completion_tokens if max_tokens is None else min(float(max_tokens), stats.completion_tokens)
    return Estimate(prompt, max(1.0, completion))


def predicted_seconds(state: BackendState, est: Estimate) -> float:
    """Time this backend would need for the request alone: prefill at its prompt speed, then decode."""
    return est.prompt_tokens / state.prefill_tps + est.completion_tokens / state.decode_tps


def learn(
    stats: ModelStats,
    state: BackendState,
    body_bytes: int,
    prompt_tokens: int,
    completion_tokens: int,
    ttft: float | None,
    duration: float,
) -> None:
    """Fold one finished request into the model's size statistics and the backend's speeds.

    With a TTFT (streams), prefill speed = prompt / TTFT and decode speed = completion / (duration - TTFT).
    Without one, the prefill share is priced at the current prefill speed and the rest is decode.
    """
    n = stats.samples
    if prompt_tokens > 0:
        stats.bytes_per_token = _ewma(stats.bytes_per_token, body_bytes / prompt_tokens, n)
    if completion_tokens > 0:
        stats.completion_tokens = _ewma(stats.completion_tokens, float(completion_tokens), n)
    stats.samples += 1
    n = state.completed
    prefill_time = ttft if ttft is not None else prompt_tokens / state.prefill_tps
    if ttft is not None and prompt_tokens > 0 and ttft > 0:
        state.prefill_tps = _ewma(state.prefill_tps, _bounded(prompt_tokens / ttft), n)
    decode_time = duration - prefill_time
    if completion_tokens > 1 and decode_time > 0:
        state.decode_tps = _ewma(state.decode_tps, _bounded(completion_tokens / decode_time), n)
    state.completed += 1


def _ewma(current: float, sample: float, samples_before: int) -> float:
    """Running mean for the first samples (the prior is a guess), then an EWMA that follows change."""
    alpha = max(EWMA_ALPHA, 1.0 / (samples_before + 1))
    return current + alpha * (sample - current)


def _bounded(tps: float) -> float:
    return min(MAX_TPS, max(MIN_TPS, tps))
