"""One generation's account while it runs: prompt tokens the prefix cache held, the simulated prefill and decode
time, tokens generated so far; and the pure formula of its prefill time. `sim/runtime.py` fills it as it paces;
the wire layers (`sim/protocol.py`, `sim/responses.py`, `sim/messages.py`) read it to report cached tokens and
llama.cpp's `timings`. No clock, no I/O: times are what the sim computed, so waiting for a slot never counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SequenceState", "prefill_seconds"]


def prefill_seconds(base_s: float, prompt_tokens: int, cached_tokens: int, prefill_tokens_per_second: float) -> float:
    """Time to the first token before batch slowdown: a fixed base plus the prompt tokens the cache did not hold
    at prefill speed (0: the prompt length does not matter)."""
    if prefill_tokens_per_second <= 0:
        return base_s
    return base_s + (prompt_tokens - cached_tokens) / prefill_tokens_per_second


def _per_second(n: int, ms: float) -> float:
    return n * 1000.0 / ms if ms > 0 else 0.0  # llama.cpp divides by zero here; JSON has no infinity


@dataclass(slots=True, eq=False)
class SequenceState:
    """What the runtime knows of one request from its batch slot on. `reports_cache` / `reports_timings`: what
    its answer says about it (the config's options), so the wire layers need not read the config."""

    prompt_tokens: int
    reports_cache: bool = False
    reports_timings: bool = False
    cached_tokens: int = 0
    prefill_s: float = 0.0  # simulated, after the slot was granted: never the queue wait
    decode_s: float = 0.0
    generated: int = 0

    def held_tokens(self) -> int:
        """KV-cache tokens the sequence holds while it runs: its prompt and what it generated so far."""
        return self.prompt_tokens + self.generated

    def timings(self) -> dict[str, Any]:
        """llama.cpp server's `timings`: prompt tokens computed and cached, prefill and decode time and rates."""
        prompt_n = self.prompt_tokens - self.cached_tokens
        prompt_ms = self.prefill_s * 1000.0
        predicted_ms = self.decode_s * 1000.0
        return {
            "cache_n": self.cached_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_second": _per_second(prompt_n, prompt_ms),
            "predicted_n": self.generated,
            "predicted_ms": predicted_ms,
            "predicted_per_second": _per_second(self.generated, predicted_ms),
        }
