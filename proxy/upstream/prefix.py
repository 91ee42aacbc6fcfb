"""What one runtime's prefix (KV) cache probably holds: the chained hashes of prompt blocks it was sent.

State only: how prompts are cut and hashed is `pipeline/prompt_blocks.py`, how a match is priced and how the
capacity is corrected is `pipeline/cost.py`.

Runtimes (vLLM's automatic prefix caching, SGLang's radix cache, llama.cpp's slot cache) keep the KV of
prompts they computed, evicting least recently used. This index mirrors that approximately: block hashes
in LRU order, bounded by the runtime's capacity in blocks. Each hash covers its block and every block before
it (a chain), so a hash present means that whole prefix was sent. A prompt's chain is remembered deepest
block first, its root last: a shared root is always at least as recent as any block after it, so eviction
takes leaves before the prefixes they extend, as the runtimes' own caches do, and what is held stays
prefix-closed — which lets `match` binary-search the chain instead of walking it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    """Chained block hashes one runtime was sent, least recently used first; at most `capacity` blocks."""

    __slots__ = ("_blocks", "capacity")

    def __init__(self, capacity: int) -> None:
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, chain: Sequence[int]) -> int:
        """How many leading blocks of `chain` are held (a binary search: what is held is prefix-closed)."""
        blocks = self._blocks
        if not chain or chain[0] not in blocks:
            return 0
        low, high = 1, len(chain)  # chain[:low] held; the answer is in [low, high]
        while low < high:
            mid = (low + high + 1) // 2
            if chain[mid - 1] in blocks:
                low = mid
            else:
                high = mid - 1
        return low

    def remember(self, chain: Sequence[int], capacity: int) -> None:
        """The runtime computed (and caches) `chain`: refresh it, root last, and evict beyond `capacity`."""
        self.capacity = capacity
        blocks = self._blocks
        move = blocks.move_to_end
        for block in reversed(chain):
            if block in blocks:
                move(block)
            else:
                blocks[block] = None
        excess = len(blocks) - capacity
        while excess > 0:
            blocks.popitem(last=False)
            excess -= 1

    def shrink(self, capacity: int) -> None:
        """A smaller capacity learned: drop the least recently used beyond it now."""
        self.capacity = capacity
        blocks = self._blocks
        while len(blocks) > capacity:
            blocks.popitem(last=False)
