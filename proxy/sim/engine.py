"""The simulated runtime's engine: what a real runtime does on its GPU, seen from outside. When a request runs
(batch slots), what it need not compute (prefix cache), how long each token takes (pacing, batch slowdown) and
its account for the answer (`SequenceState`). No HTTP, no wire shapes: `sim/runtime.py` drives one per runtime.
Simulated times are computed and accounted even when a custom pacer does the waiting, so `timings` stay exact.
"""

from __future__ import annotations

import asyncio
from typing import Final

from proxy.sim import protocol as wire
from proxy.sim.batch import BatchSlots, slowdown_factor
from proxy.sim.config import Pacer, SimConfig, SimStats
from proxy.sim.prefix_cache import PrefixCache
from proxy.sim.sequence import SequenceState, prefill_seconds

__all__ = ["MAX_SEGMENTS", "SEGMENT_TOKENS", "Engine"]

# A non-streamed answer under batch slowdown sleeps per segment of decode, re-reading the batch each time:
# at least this many tokens a segment, and at most about this many segments, so it stays a few sleeps.
SEGMENT_TOKENS: Final = 8
MAX_SEGMENTS: Final = 10


class Engine:
    """Slots, prefix cache and pacing of one simulated runtime. A generation goes `sequence` (on arrival),
    `slots.acquire`, `admit`, `pace`/`pace_all`, `leave` (in `finally`), then `remember` once answered."""

    __slots__ = ("slots", "cache", "_stats", "_pacer", "_live", "_reports", "_timings", "_slowdown", "_ttft",
                 "_gap", "_pps", "_cache_tokens")

    def __init__(self, config: SimConfig, stats: SimStats, pacer: Pacer | None) -> None:
        self.slots = BatchSlots(config.max_batch, stats)
        self.cache: PrefixCache | None = None
        if config.prefix_cache_tokens > 0:
            self.cache = PrefixCache(config.prefix_cache_tokens, config.prefix_block_tokens)
        self._stats = stats
        self._pacer = pacer
        self._live: set[SequenceState] = set()  # generations holding a slot, tracked only with the cache on
        self._timings = config.report_timings
        self._reports = self.cache is not None or config.report_timings  # answers say more than OpenAI's usage
        self._slowdown = config.batch_slowdown
        self._ttft = config.ttft_ms / 1000.0
        self._gap = 1.0 / config.tokens_per_second if config.tokens_per_second > 0 else 0.0
        self._pps = config.prefill_tokens_per_second
        self._cache_tokens = config.prefix_cache_tokens

    # ---- a generation's account, slot and cache

    def sequence(self, job: wire.Generation) -> SequenceState:
        """The request's account, made on arrival. The job reads it only when its answer reports the cache or
        timings: otherwise the bodies stay exactly as they are without those options."""
        state = SequenceState(job.prompt_tokens, self.cache is not None, self._timings)
        if self._reports:
            job.sequence = state
        return state

    def admit(self, job: wire.Generation, state: SequenceState) -> None:
        """Just after the batch slot is granted, when a runtime starts computing the prompt: look it up in the
        prefix cache (which holds its blocks from now on)."""
        cache = self.cache
        if cache is not None:
            state.cached_tokens = cache.admit(job.prompt_text(), job.prompt_tokens)
            self._live.add(state)

    def leave(self, state: SequenceState) -> None:
        self.slots.release()
        self._live.discard(state)

    def remember(self, job: wire.Generation) -> None:
        """A completed answer's blocks go in the cache too (vLLM caches generated tokens), so the conversation's
        next turn, which repeats prompt and answer, finds both."""
        if self.cache is not None:
            self.cache.insert_text(job.context_text())

    def kv_cache_usage(self) -> float:
        """vLLM's `kv_cache_usage_perc` (0..1): tokens the running sequences hold over the cache's size."""
        if self._cache_tokens <= 0:
            return 0.0
        return min(1.0, sum(state.held_tokens() for state in self._live) / self._cache_tokens)

    # ---- pacing

    def factor(self) -> float:
        """The batch slowdown of the moment (1.0 without it)."""
        return slowdown_factor(self._slowdown, self._stats.running) if self._slowdown else 1.0

    def prefill_delay(self, state: SequenceState) -> float:
        """Time to the first token: the uncached prompt at prefill speed, slowed as the batch slows decode
        (a new prompt's prefill competes with the running sequences)."""
        delay = prefill_seconds(self._ttft, state.prompt_tokens, state.cached_tokens, self._pps) * self.factor()
        state.prefill_s += delay
        return delay

    async def pace(self, rid: str, index: int, state: SequenceState) -> None:
        """Wait before token `index`: the custom pacer if any, else TTFT before token 0, a gap after, each at
        the batch's slowdown of the moment (the running count changes while a stream runs)."""
        if index == 0:
            delay = self.prefill_delay(state)
        else:
            delay = self._gap * self.factor() if self._slowdown else self._gap
            state.decode_s += delay
        if self._pacer is not None:
            await self._pacer(rid, index)
        elif delay > 0:
            await asyncio.sleep(delay)
        state.generated = index + 1

    async def pace_all(self, job: wire.Generation, state: SequenceState) -> None:
        """Pace a whole non-streamed generation. Without batch slowdown it is one sleep, not n; with it, the
        prefill and then at most ~MAX_SEGMENTS decode segments, each at the batch's slowdown when it starts."""
        n = len(job.tokens)
        if self._pacer is not None:
            for i in range(n):
                await self.pace(job.rid, i, state)
            return
        if not self._slowdown:
            decode = self._gap * (n - 1)
            state.decode_s += decode
            delay = self.prefill_delay(state) + decode
            if delay > 0:
                await asyncio.sleep(delay)
            state.generated = n
            return
        await self.pace(job.rid, 0, state)
        step = max(SEGMENT_TOKENS, -(-(n - 1) // MAX_SEGMENTS))
        while state.generated < n:
            k = min(step, n - state.generated)
            delay = self._gap * k * self.factor()
            state.decode_s += delay
            if delay > 0:
                await asyncio.sleep(delay)
            state.generated += k
