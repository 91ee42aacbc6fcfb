"""The simulated runtime's engine parts as pure functions and small classes: the prefix cache (LRU, chained
blocks, the cached-token rule), the batch slowdown curve, the prefill formula, llama.cpp's timings, and the
canonical prompt text each API renders for the cache. No sockets (tests/integration/test_sim*.py serve them).
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from proxy.sim import messages, responses
from proxy.sim import protocol as wire
from proxy.sim.batch import slowdown_factor
from proxy.sim.config import SimConfig
from proxy.sim.prefix_cache import PrefixCache, block_hashes, cached_tokens
from proxy.sim.sequence import SequenceState, prefill_seconds

CONFIG = SimConfig(default_max_tokens=8)
BLOCK = 16 * 4  # characters of a 16-token block


def test_lru_is_bounded_and_evicts_the_least_recently_used() -> None:
    cache = PrefixCache(capacity_tokens=4 * 16, block_tokens=16)  # 4 blocks
    assert cache.capacity_blocks == 4
    cache.insert([1, 2, 3])  # touched last to first: 3 is the oldest, 1 the newest
    cache.insert([4, 5])
    assert len(cache) == 4
    assert 3 not in cache and all(h in cache for h in (1, 2, 4, 5))
    cache.insert([2])  # refreshed: now the newest
    cache.insert([6])  # evicts the oldest, 1
    assert 1 not in cache and all(h in cache for h in (2, 4, 5, 6))


def test_match_stops_at_the_first_missing_block() -> None:
    cache = PrefixCache(capacity_tokens=1024, block_tokens=16)
    cache.insert([1, 2, 4])
    assert cache.match([1, 2, 3, 4]) == 2
    assert cache.match([9, 1, 2]) == 0
    assert cache.match([]) == 0


def test_a_prompt_longer_than_the_cache_keeps_its_head() -> None:
    # Touching blocks tail first makes a long prompt lose its tail, not the head every match starts from.
    cache = PrefixCache(capacity_tokens=4 * 16, block_tokens=16)
    hashes = list(range(100, 110))
    cache.insert(hashes)
    assert cache.match(hashes) == 4


def test_block_hashes_are_chained_over_full_blocks_only() -> None:
    a = block_hashes("a" * BLOCK + "b" * BLOCK + "tail", BLOCK)
    assert len(a) == 2  # the partial tail is not a block
    assert block_hashes("a" * BLOCK + "b" * BLOCK, BLOCK) == a
    assert block_hashes("a" * BLOCK + "c" * BLOCK, BLOCK)[0] == a[0]
    changed_head = block_hashes("x" + "a" * (BLOCK - 1) + "b" * BLOCK, BLOCK)
    assert set(changed_head).isdisjoint(a)  # a different first block changes every later hash
    assert block_hashes("short", BLOCK) == []


@pytest.mark.parametrize(
    ("prompt_tokens", "matched_blocks", "block_tokens", "cached"),
    [
        (100, 0, 16, 0),
        (100, 3, 16, 48),
        (48, 3, 16, 47),  # never the whole prompt: one token is always computed
        (10, 3, 16, 9),
        (1, 1, 16, 0),
    ],
)
def test_cached_tokens_never_cover_the_whole_prompt(
    prompt_tokens: int, matched_blocks: int, block_tokens: int, cached: int
) -> None:
    assert cached_tokens(prompt_tokens, matched_blocks, block_tokens) == cached


def test_admit_reports_a_repeat_and_counts_queries_and_hits() -> None:
    cache = PrefixCache(capacity_tokens=4096, block_tokens=16)
    text = "p" * (BLOCK * 3)  # three full blocks
    assert cache.admit(text, 48) == 0
    assert cache.admit(text, 48) == 47
    assert cache.admit("q" * (BLOCK * 3), 48) == 0
    assert (cache.queried_tokens, cache.hit_tokens) == (3 * 48, 47)
    cache.insert_text(text + "answer" * 20)
    assert cache.admit(text + "answer" * 20 + "next", 60) == 59


def test_a_cache_smaller_than_a_block_holds_nothing() -> None:
    cache = PrefixCache(capacity_tokens=8, block_tokens=16)
    text = "p" * BLOCK
    cache.admit(text, 16)
    assert (len(cache), cache.admit(text, 16)) == (0, 0)


@pytest.mark.parametrize("running", [0, 1, 2, 5, 64])
def test_no_slowdown_is_full_speed_at_any_batch(running: int) -> None:
    assert slowdown_factor(0.0, running) == 1.0


@pytest.mark.parametrize(
    ("slowdown", "running", "factor"),
    [(1.0, 1, 1.0), (1.0, 2, 2.0), (1.0, 8, 8.0), (0.5, 3, 2.0), (0.05, 11, 1.5), (1.0, 0, 1.0)],
)
def test_slowdown_factor_grows_with_the_running_count(slowdown: float, running: int, factor: float) -> None:
    assert slowdown_factor(slowdown, running) == pytest.approx(factor)


def test_prefill_counts_only_uncached_prompt_tokens() -> None:
    assert prefill_seconds(0.02, 1000, 0, 20000.0) == pytest.approx(0.02 + 1000 / 20000)
    assert prefill_seconds(0.02, 1000, 600, 20000.0) == pytest.approx(0.02 + 400 / 20000)
    assert prefill_seconds(0.02, 1000, 999, 20000.0) == pytest.approx(0.02 + 1 / 20000)
    assert prefill_seconds(0.02, 1000, 600, 0.0) == 0.02  # no prefill speed: the prompt does not matter


def test_timings_are_llama_cpp_shaped() -> None:
    state = SequenceState(prompt_tokens=100, cached_tokens=64, prefill_s=0.018, decode_s=0.5, generated=11)
    assert state.timings() == {
        "cache_n": 64,
        "prompt_n": 36,
        "prompt_ms": pytest.approx(18.0),
        "prompt_per_second": pytest.approx(2000.0),
        "predicted_n": 11,
        "predicted_ms": pytest.approx(500.0),
        "predicted_per_second": pytest.approx(22.0),
    }
    idle = SequenceState(prompt_tokens=5).timings()  # a sim that never sleeps: no division by zero
    assert (idle["prompt_per_second"], idle["predicted_per_second"]) == (0.0, 0.0)
    assert SequenceState(prompt_tokens=5, generated=2).held_tokens() == 7


def chat_job(messages_: list[dict[str, Any]], **extra: Any) -> wire.Job:
    return wire.Job(chat=True, model="m", rid="r", created=0, prompt_tokens=wire.chat_prompt_tokens(messages_),
                    tokens=["a ", "b "], source=messages_, **extra)


def test_chat_next_turn_extends_the_last_context() -> None:
    first: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    ]
    job = chat_job(first)
    assert job.prompt_text() == "<|system|>be brief\n<|user|>hi\n"
    following = [*first, {"role": "assistant", "content": "a b "}, {"role": "user", "content": "more"}]
    assert chat_job(following).prompt_text().startswith(job.context_text())


def test_completion_next_prompt_extends_the_last_context() -> None:
    job = wire.Job(chat=False, model="m", rid="r", created=0, prompt_tokens=3, tokens=["x "], source=["ab", "cd"])
    assert (job.prompt_text(), job.context_text()) == ("abcd", "abcdx ")


def test_message_next_turn_extends_the_last_context() -> None:
    body: dict[str, Any] = {"model": "sim-model", "max_tokens": 4, "system": "sys",
                            "messages": [{"role": "user", "content": "q"}]}
    job = messages.parse(body, CONFIG, random.Random(1))
    answer = [{"type": "text", "text": "".join(job.tokens)}]
    body["messages"] = [*body["messages"], {"role": "assistant", "content": answer},
                        {"role": "user", "content": "again"}]
    assert messages.parse(body, CONFIG, random.Random(1)).prompt_text().startswith(job.context_text())


def test_response_follow_up_and_resent_conversation_extend_the_last_context() -> None:
    store = responses.ResponseStore()
    first = responses.parse({"model": "sim-model", "input": "q", "instructions": "sys"}, CONFIG,
                            random.Random(1), store)
    context = first.context_text()
    first.complete()
    follow = responses.parse({"model": "sim-model", "input": "more", "previous_response_id": first.rid}, CONFIG,
                             random.Random(1), store)
    assert follow.prompt_text().startswith(context)
    answer = "".join(first.tokens)
    resent = responses.parse(
        {"model": "sim-model", "instructions": "sys", "input": [
            {"role": "user", "content": "q"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": answer}]},
            {"role": "user", "content": "more"},
        ]}, CONFIG, random.Random(1), store)
    assert resent.prompt_text().startswith(context)


def test_bodies_say_nothing_more_without_a_sequence_that_reports() -> None:
    job = chat_job([{"role": "user", "content": "hi"}], include_usage=True)
    plain = orjson.loads(job.body())
    assert set(plain) == {"id", "object", "created", "model", "choices", "usage"}
    assert set(plain["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    job.sequence = SequenceState(job.prompt_tokens)  # attached, but reporting neither
    assert job.body() == orjson.dumps(plain)
    job.sequence = SequenceState(job.prompt_tokens, reports_cache=True, reports_timings=True, cached_tokens=3)
    told = orjson.loads(job.body())
    assert told["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    assert told["timings"]["cache_n"] == 3
