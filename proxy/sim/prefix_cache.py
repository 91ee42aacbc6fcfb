"""The simulated runtime's prefix (KV) cache, as vLLM's automatic prefix caching and llama.cpp's slot cache look
from outside: the leading full blocks of a prompt that an earlier request computed are not computed again.
Holds chained block hashes in a bounded LRU, never text; pure (no clock, no I/O). `sim/runtime.py` calls
`admit` once per generation when it gets its batch slot, and `insert_text` with the answer once complete.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

__all__ = ["CHARS_PER_TOKEN", "PrefixCache", "block_hashes", "cached_tokens"]

CHARS_PER_TOKEN: Final = 4  # the sim's token counts are ~4 characters a token (sim/protocol.py chat_prompt_tokens)


def block_hashes(text: str, block_chars: int) -> list[int]:
    """The chained hashes of the full blocks of `text`. Each hash covers its block and the previous hash, so
    equal hashes mean equal prefixes (vLLM hashes the parent block's hash with the block's tokens). A trailing
    partial block is left out: only full blocks are cached. Python's `hash` is enough: the cache lives and dies
    with the process that seeds it."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        hashes.append(previous)
    return hashes


def cached_tokens(prompt_tokens: int, matched_blocks: int, block_tokens: int) -> int:
    """Prompt tokens served from the cache: the matched blocks, but never the whole prompt (at least one token
    is computed to produce the first output, as vLLM does)."""
    return max(0, min(prompt_tokens - 1, matched_blocks * block_tokens))


class PrefixCache:
    """At most `capacity_tokens // block_tokens` blocks, least recently used first out. Counts what it was asked
    and what it held, in tokens (vLLM's `prefix_cache_queries` and `prefix_cache_hits`)."""

    __slots__ = ("block_tokens", "capacity_blocks", "queried_tokens", "hit_tokens", "_block_chars", "_blocks")

    def __init__(self, capacity_tokens: int, block_tokens: int) -> None:
        if block_tokens < 1:
            raise ValueError("prefix_block_tokens must be >= 1")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        self.queried_tokens = 0
        self.hit_tokens = 0
        self._block_chars = block_tokens * CHARS_PER_TOKEN
        self._blocks: OrderedDict[int, None] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._blocks

    def hashes(self, text: str) -> list[int]:
        return block_hashes(text, self._block_chars)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks are held; a chain is only as good as its first missing link."""
        blocks = self._blocks
        matched = 0
        for h in hashes:
            if h not in blocks:
                break
            matched += 1
        return matched

    def insert(self, hashes: Sequence[int]) -> None:
        """Hold (or refresh) every block, then evict the least recently used beyond capacity. Blocks are touched
        last to first, so a prompt's head is its most recent block: under pressure a long prompt loses its tail
        first and a shared head (a system prompt) stays, as vLLM frees a finished request's blocks tail first."""
        blocks = self._blocks
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    def admit(self, text: str, prompt_tokens: int) -> int:
        """A prompt being computed: its cached tokens (counted as queries and hits), then its blocks are held."""
        hashes = self.hashes(text)
        cached = cached_tokens(prompt_tokens, self.match(hashes), self.block_tokens)
        self.queried_tokens += prompt_tokens
        self.hit_tokens += cached
        self.insert(hashes)
        return cached

    def insert_text(self, text: str) -> None:
        """A completed conversation (prompt and answer): the next turn, which repeats it, finds it held."""
        self.insert(self.hashes(text))
