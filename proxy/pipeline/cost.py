"""Predicted token cost: how much work a request is, and how long it should take on each backend.

Pure policy over state objects (no I/O; time is passed in): `estimate` turns body size and max_tokens into
(prompt, completion) tokens using what was learned per model; `matched_tokens` says how much of the prompt a
backend's prefix cache probably holds (`matched_tokens`); `predicted_seconds` prices the rest at that backend's learned speeds
at the load it would run with (`upstream/speed.py`); `learn` folds a finished request's reported usage and
timings back into the model's and the backend's numbers. Called by `pipeline/dispatch.py`.

What a sample may teach is decided here. A runtime that reports its own timings (llama.cpp's `prompt_ms` /
`predicted_ms`) is believed; otherwise the time to first token is prefill only when the request did not
wait in the runtime's queue (it started among no more than `concurrency` of ours): time spent queued is not
prefill, and learning it as such once made a fast runtime look 100× slower than it was.
"""

from __future__ import annotations

from proxy.pipeline.prompt_blocks import BLOCK_BYTES
from proxy.upstream.state import BackendState, ModelStats

PRIOR_BYTES_PER_TOKEN = 4.0  # JSON-wrapped English text; corrected by the first usage report
PRIOR_COMPLETION_TOKENS = 256.0
EWMA_ALPHA = 0.1  # weight of a new sample: ~the last 10–20 requests dominate
# Learning a prefix cache's size from what the runtime reports (unless `cache_tokens` is configured): shrink
# when it held much less than the index predicted (the index remembers what the runtime evicted), grow when
# it held much more (the index evicted what the runtime kept). Answers are cached by runtimes but not known
# to the index, so "more" must be well beyond the prediction.
CACHE_SHRINK, CACHE_GROW = 0.9, 1.05
MIN_CACHE_TOKENS, MAX_CACHE_TOKENS = 1024.0, 1 << 24


class Estimate:
    """A request's predicted size in tokens and its prompt's block chain; computed once, priced per backend."""

    __slots__ = ("prompt_tokens", "completion_tokens", "chain", "bytes_per_token")

    def __init__(self, prompt_tokens: float, completion_tokens: float, chain: list[int] | None = None,
                 bytes_per_token: float = PRIOR_BYTES_PER_TOKEN) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.chain = chain  # None: prefixes are not priced; empty: a prompt under one block
        self.bytes_per_token = bytes_per_token


def new_model_stats() -> ModelStats:
    return ModelStats(PRIOR_BYTES_PER_TOKEN, PRIOR_COMPLETION_TOKENS)


def estimate(stats: ModelStats, body_bytes: int, max_tokens: int | None, is_embedding: bool,
             chain: list[int] | None = None) -> Estimate:
    """Prompt tokens from the body size; completion from what this model usually writes, capped by max_tokens."""
    prompt = body_bytes / stats.bytes_per_token
    if is_embedding:
        return Estimate(prompt, 0.0, chain, stats.bytes_per_token)
    completion = stats.completion_tokens if max_tokens is None else min(float(max_tokens), stats.completion_tokens)
    return Estimate(prompt, max(1.0, completion), chain, stats.bytes_per_token)


def block_tokens(est: Estimate) -> float:
    return BLOCK_BYTES / est.bytes_per_token


def matched_tokens(state: BackendState, est: Estimate) -> float:
    """Prompt tokens `state`'s prefix index says its cache holds for this request (whole blocks matched),
    never the whole prompt: the prediction that is checked against what the runtime reports."""
    if not est.chain:
        return 0.0
    matched = state.prefix.match(est.chain)
    if matched == 0:
        return 0.0
    return min(est.prompt_tokens - 1.0, matched * block_tokens(est))


def remember_prefix(state: BackendState, est: Estimate) -> None:
    """The picked runtime will compute (and cache) this prompt: its index learns the chain."""
    if est.chain:
        capacity = int(state.cache_capacity / block_tokens(est))
        state.prefix.remember(est.chain, max(1, capacity))


def predicted_seconds(state: BackendState, est: Estimate, matched: float = 0.0) -> float:
    """Time this request would take on `state` once it runs: its prompt less what the prefix cache probably
    holds (`matched` tokens, scaled by how often such matches held there) and its completion, at the speeds of
    a runtime running one more sequence than now (up to its batch slots)."""
    running = float(min(state.inflight + 1, state.backend.concurrency))
    computed = max(est.prompt_tokens - matched * state.prefix_hit_ratio, 1.0)
    return computed * state.prefill.seconds_per_token(running) + est.completion_tokens * state.decode.seconds_per_token(running)


class Outcome:
    """What one finished request says about its backend: reported usage, timings, how crowded it ran."""

    __slots__ = ("body_bytes", "prompt_tokens", "completion_tokens", "cached_tokens", "prefill_ms", "decode_ms",
                 "ttft", "duration", "started_among", "running")

    def __init__(self, body_bytes: int, prompt_tokens: int, completion_tokens: int, ttft: float | None,
                 duration: float, *, cached_tokens: int | None = None, prefill_ms: float | None = None,
                 decode_ms: float | None = None, started_among: int = 1, running: float = 1.0) -> None:
        self.body_bytes = body_bytes
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cached_tokens = cached_tokens
        self.prefill_ms = prefill_ms
        self.decode_ms = decode_ms
        self.ttft = ttft  # from the request's start at this backend; None for whole answers
        self.duration = duration
        self.started_among = started_among  # our requests there when it was picked, itself included
        self.running = running  # sequences running there on average while it ran, itself included


def learn(stats: ModelStats, state: BackendState, outcome: Outcome, now: float) -> None:
    """Fold one finished request into the model's size statistics and the backend's speed curves.

    Prefill: the runtime's `prompt_ms` when reported, else the TTFT when the request did not queue in the
    runtime, over the prompt tokens it had to compute (cached ones excluded). Decode: `predicted_ms` when
    reported, else what followed the first token (streams) or the rest after the predicted prefill (whole
    answers that did not queue)."""
    o = outcome
    n = stats.samples
    if o.prompt_tokens > 0:
        stats.bytes_per_token = _ewma(stats.bytes_per_token, o.body_bytes / o.prompt_tokens, n)
    if o.completion_tokens > 0:
        stats.completion_tokens = _ewma(stats.completion_tokens, float(o.completion_tokens), n)
    stats.samples += 1
    slots = state.backend.concurrency
    queued = o.started_among > slots
    start_running = float(min(o.started_among, slots))
    computed = max(1, o.prompt_tokens - (o.cached_tokens or 0))
    prefill_time: float | None = None
    if o.prefill_ms is not None:
        prefill_time = o.prefill_ms / 1000.0
    elif o.ttft is not None and not queued:
        prefill_time = o.ttft
    if prefill_time is not None and o.prompt_tokens > 0:
        state.prefill.add(start_running, computed, prefill_time, now)
    if o.decode_ms is not None:
        state.decode.add(o.running, o.completion_tokens, o.decode_ms / 1000.0, now)
    elif o.completion_tokens > 1:
        if o.ttft is not None:
            state.decode.add(o.running, o.completion_tokens - 1, o.duration - o.ttft, now)
        elif not queued:
            before = computed * state.prefill.seconds_per_token(start_running)
            state.decode.add(o.running, o.completion_tokens, o.duration - before, now)
    state.completed += 1


def learn_prefix(state: BackendState, est: Estimate, matched: float, reported: int) -> None:
    """Compare the cached tokens the index matched for a request with what its runtime reported: how often
    its matches hold there (`prefix_hit_ratio`), and, unless configured, how large its cache really is."""
    if matched > 0:
        ratio = state.prefix_hit_ratio
        state.prefix_hit_ratio = ratio + EWMA_ALPHA * (min(1.0, reported / matched) - ratio)
    if state.backend.cache_tokens:
        return
    block = block_tokens(est)
    if matched > 0 and reported < 0.5 * matched:
        state.cache_tokens = max(MIN_CACHE_TOKENS, state.cache_tokens * CACHE_SHRINK)
        state.prefix.shrink(max(1, int(state.cache_tokens / block)))
    elif reported > 2.0 * matched + 2.0 * block:
        state.cache_tokens = min(MAX_CACHE_TOKENS, state.cache_tokens * CACHE_GROW)


def _ewma(current: float, sample: float, samples_before: int) -> float:
    """Running mean for the first samples (the prior is a guess), then an EWMA that follows change."""
    alpha = max(EWMA_ALPHA, 1.0 / (samples_before + 1))
    return current + alpha * (sample - current)
