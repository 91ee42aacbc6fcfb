"""Prompt blocks and the per-backend prefix index: canonical rendering, chained hashes, LRU bounds, eviction
of leaves before the prefixes they extend, and a binary-searched match equal to the walk it replaces."""

from __future__ import annotations

import json
import random

import orjson

from proxy.pipeline.prompt_blocks import BLOCK_BYTES, MAX_BLOCKS, chain, prompt_chain, render
from proxy.upstream.prefix import PrefixIndex

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 60}


def turns(n: int) -> list[dict[str, str]]:
    messages = [SYSTEM]
    for i in range(n):
        messages.append({"role": "user", "content": f"question {i}: " + "why is the sky blue? " * 20})
        messages.append({"role": "assistant", "content": f"answer {i}: " + "because of scattering. " * 20})
    return messages


def test_a_conversations_next_turn_extends_the_previous_chain() -> None:
    one = prompt_chain("chat", {"messages": turns(1)})
    two = prompt_chain("chat", {"messages": turns(3)})
    assert len(one) >= 4 and len(two) > len(one)
    assert two[: len(one)] == one  # every whole block of turn one is a prefix of turn three


def test_rendering_ignores_whitespace_key_order_around_and_other_fields() -> None:
    messages = turns(2)
    compact = orjson.loads(orjson.dumps({"model": "a", "messages": messages, "stream": True}))
    spaced = json.loads(json.dumps({"temperature": 0, "messages": messages, "model": "b"}, indent=2))
    assert prompt_chain("chat", compact) == prompt_chain("chat", spaced)


def test_a_different_system_prompt_shares_nothing_and_tools_come_first() -> None:
    base = prompt_chain("chat", {"messages": turns(1)})
    other = prompt_chain("chat", {"messages": [{"role": "system", "content": "Be terse. " * 200}, *turns(1)[1:]]})
    assert base[0] != other[0]
    with_tools = prompt_chain("chat", {"messages": turns(1), "tools": [{"type": "function", "name": "f" * 600}]})
    assert with_tools[0] != base[0]


def test_each_api_renders_its_prompt_and_scoring_endpoints_none() -> None:
    assert render("completions", {"prompt": "abc"}) == b"abc"
    assert render("messages", {"system": "s", "messages": [{"role": "user", "content": "hi"}]}) is not None
    assert render("responses", {"instructions": "i", "input": "hi"}) is not None
    assert render("embeddings", {"input": "hi"}) is None
    assert prompt_chain("chat", {"messages": [{"role": "user", "content": "short"}]}) == []  # under one block


def test_chain_is_bounded() -> None:
    assert len(chain(b"x" * BLOCK_BYTES * (MAX_BLOCKS + 10))) == MAX_BLOCKS
    assert len(chain(b"x" * (BLOCK_BYTES * 3 + 7))) == 3


def test_the_index_is_an_lru_bounded_by_its_capacity() -> None:
    index = PrefixIndex(8)
    index.remember([1, 2, 3, 4], 8)
    index.remember([10, 11, 12, 13], 8)
    index.remember([1, 2], 8)  # turn one's root is used again: now the most recent
    index.remember([20, 21, 22], 8)
    assert len(index) == 8
    assert index.match([1, 2, 3, 4]) == 2  # its old leaves went first, its root (used again) stayed
    assert index.match([10, 11, 12, 13]) == 3  # the older conversation lost its deepest leaf first
    assert index.match([20, 21, 22]) == 3


def test_a_smaller_capacity_evicts_the_least_recent() -> None:
    index = PrefixIndex(100)
    index.remember(list(range(50)), 100)
    index.shrink(10)
    assert len(index) == 10 and index.match(list(range(50))) == 10


def test_binary_search_match_equals_walking_the_chain() -> None:
    rng = random.Random(7)
    index = PrefixIndex(200)
    chains = [[c * 1000 + i for i in range(rng.randrange(1, 40))] for c in range(40)]
    for _ in range(300):
        c = rng.choice(chains)
        index.remember(c[: rng.randrange(1, len(c) + 1)], 200)
    for c in chains:
        walked = 0
        while walked < len(c) and c[walked] in index._blocks:
            walked += 1
        assert index.match(c) == walked
