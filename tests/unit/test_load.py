"""`splitstream load` request planning: shares, repetition and subjects from a seeded RNG (no sockets)."""

from __future__ import annotations

import math
import random

import orjson

from proxy.sim.load import REPEATED_PROMPTS, LoadConfig, LoadSummary, plan_request

N = 2000


def within_five_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))


def test_plan_mixes_streams_repeats_and_subjects() -> None:
    config = LoadConfig(urls=("http://127.0.0.1:1/v1",), model="m", users=20, stream_share=0.3, repeat_share=0.25)
    rng = random.Random(7)
    plans = [plan_request(config, i, rng) for i in range(N)]
    bodies = [body for body, _ in plans]
    assert within_five_sigma(sum(b["stream"] for b in bodies), N, 0.3)
    repeated = [b for b in bodies if b["temperature"] == 0]
    assert within_five_sigma(len(repeated), N, 0.25)
    # repeats are few distinct prompts (a route cache answers all but the first of each)
    assert len({orjson.dumps(b["messages"]) for b in repeated}) <= REPEATED_PROMPTS
    assert all(b["model"] == "m" and 1 <= b["max_tokens"] <= config.max_tokens for b in bodies)
    assert {h["x-user-id"] for _, h in plans} == {f"user-{i}" for i in range(20)}


def test_no_subject_header_without_users() -> None:
    config = LoadConfig(urls=("http://127.0.0.1:1/v1",), model="m", users=0)
    assert plan_request(config, 0, random.Random(1))[1] == {}


def test_summary_holds_counts_only() -> None:
    summary = LoadSummary(sent=3)
    summary.by_status["2xx"] += 2
    summary.by_variant["canary"] += 1
    assert orjson.loads(summary.as_json()) == {"sent": 3, "by_status": {"2xx": 2}, "by_variant": {"canary": 1}}
