"""The simulated runtime's knobs (`SimConfig`), its live counters (`SimStats`) and the custom pacer hook (`Pacer`):
what tests, the CLI and the benchmarks set and read. Plain data; `sim/runtime.py` re-exports all three, and
`sim/engine.py` and `sim/runtime.py` read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Pacer", "SimConfig", "SimStats"]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Knobs of one simulated runtime; the defaults look like a small model on one GPU."""

    models: tuple[str, ...] = ("sim-model",)
    tokens_per_second: float = 50.0  # decode speed per running request; 0 = no delay between tokens
    ttft_ms: float = 20.0  # base time to first token
    prefill_tokens_per_second: float = 20000.0  # TTFT grows by uncached prompt tokens / this (0 = no growth)
    max_batch: int = 16  # requests generating at once; the rest wait FIFO (vLLM "waiting")
    fail_rate: float = 0.0  # share of requests answered 500 with the API's error body
    stream_fail_rate: float = 0.0  # share of streams cut mid-way (transport aborted after some chunks)
    # Completion length when the request has no max_tokens; for Anthropic Messages (whose max_tokens is a
    # required cap) the natural answer length, stopping with `end_turn`.
    default_max_tokens: int = 32
    max_context: int = 0  # prompt + max_tokens above this is refused as vLLM does (400); 0 = no limit
    embedding_dim: int = 8
    seed: int | None = None  # RNG seed for failure draws and non-deterministic text
    # Prefix (KV) cache in tokens, as vLLM's automatic prefix caching: a prompt's leading full blocks computed
    # before are not computed again, and answers report them. 0 = none (every prompt computed in full).
    prefix_cache_tokens: int = 0
    prefix_block_tokens: int = 16  # the cache's block (vLLM's block_size): only whole blocks are reused
    # Each sequence's prefill and decode run 1 + this x (running - 1) times slower: 0 = perfect batching (a GPU
    # below saturation), 1.0 = every running sequence shares one fixed throughput (a CPU).
    batch_slowdown: float = 0.0
    report_timings: bool = False  # chat and completions answers carry llama.cpp's `timings`

    def validate(self) -> None:
        """ValueError naming the first knob out of range (the runtime checks at start, the CLI before it)."""
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not self.models:
            raise ValueError("at least one model is required")
        if self.prefix_cache_tokens < 0:
            raise ValueError("prefix_cache_tokens must be >= 0")
        if self.prefix_block_tokens < 1:
            raise ValueError("prefix_block_tokens must be >= 1")
        if self.batch_slowdown < 0:
            raise ValueError("batch_slowdown must be >= 0")


@dataclass(slots=True)
class SimStats:
    """Live counters; tests read them to observe what the proxy did to the upstream."""

    requests: int = 0  # JSON requests received (every POST: inference, pooling, count_tokens)
    running: int = 0
    waiting: int = 0
    completed: int = 0  # generations and pooling requests answered in full
    failed: int = 0  # injected 500s
    cut: int = 0  # injected stream cuts
    cancelled: int = 0  # client (the proxy) went away before the response was complete


class Pacer(Protocol):
    """Awaited before emitting token `index` (0-based) of request `request_id`; replaces all sleeping."""

    async def __call__(self, request_id: str, index: int) -> None: ...
