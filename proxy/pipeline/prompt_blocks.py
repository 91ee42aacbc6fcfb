"""A prompt as a chain of block hashes: what `upstream/prefix.py` remembers per backend and matches against.

Pure: no I/O, no state. The prompt is rendered canonically — the parts a runtime's chat template puts first
(tools, system prompt or instructions), then the conversation — with orjson from what the request view
already parsed, so two clients that send the same conversation with different whitespace or key order
around it share blocks, and a conversation's next turn (the same messages plus an answer and a new
question) renders as the previous turn's bytes followed by more. The rendering is cut into fixed blocks;
hash i covers blocks 0..i (each block's hash folded into the previous one), so a match of hash i means the
whole prefix matched. Only whole blocks count: the rest is priced as uncached.
"""

from __future__ import annotations

from typing import Any

import orjson

BLOCK_BYTES = 512  # ~128 tokens of English JSON: coarse enough to hash a 16k-token prompt in microseconds
MAX_BLOCKS = 256  # 128 KiB (~32k tokens) of prompt: hashing more costs more than what it could still decide


def render(endpoint: str, data: dict[str, Any]) -> bytes | None:
    """The prompt's canonical bytes in the order a runtime's template computes them; None: nothing to cache."""
    if endpoint == "chat":
        parts: Any = (data.get("tools"), data.get("messages"))
    elif endpoint == "completions":
        prompt = data.get("prompt")
        if isinstance(prompt, str):
            return prompt.encode()
        parts = prompt
    elif endpoint == "responses":
        parts = (data.get("instructions"), data.get("tools"), data.get("input"))
    elif endpoint == "messages":
        parts = (data.get("system"), data.get("tools"), data.get("messages"))
    else:
        return None
    try:
        return orjson.dumps(parts)
    except orjson.JSONEncodeError:  # parsed by orjson, so only what it cannot write back (a huge integer)
        return None


def chain(rendered: bytes) -> list[int]:
    """The chained hashes of `rendered`'s whole blocks (at most MAX_BLOCKS): Python's own SipHash of each
    block, folded into the previous block's hash, ~0.8 µs per KiB here (faster than zlib's CRC-32 on blocks
    this size). 64 bits: a collision, which would misprice one request, is not a practical concern. The
    hashes are per process (PYTHONHASHSEED), as the index is."""
    count = min(len(rendered) // BLOCK_BYTES, MAX_BLOCKS)
    hashes = [0] * count
    h = 0
    start = 0
    for i in range(count):
        h = hash((h, rendered[start:start + BLOCK_BYTES]))
        hashes[i] = h
        start += BLOCK_BYTES
    return hashes


def prompt_chain(endpoint: str, data: dict[str, Any], body_bytes: int = BLOCK_BYTES) -> list[int]:
    """The request's block chain; empty for endpoints that generate nothing or prompts under one block. A body
    under one block holds no whole block of prompt (the compact rendering is, but for a few bytes, no longer than the JSON it came
    from), so most small requests skip the rendering altogether."""
    if body_bytes < BLOCK_BYTES:
        return []
    rendered = render(endpoint, data)
    return chain(rendered) if rendered is not None else []
