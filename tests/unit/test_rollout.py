"""Pure parts of progressive delivery: the verdict (`analysis.py`), the transitions (`state.py`), the effective
weights and how sticky subjects meet them (`weights.py`, `pipeline/assignment.py`), and the rule validation
of `rollout:` blocks (loader and JSON Schema). Fixed numbers, fixed times, no sockets."""

from __future__ import annotations

import random
import re
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from proxy.config.loader import load_rules
from proxy.config.model import Balance, Pool, Rollout, Route, Sticky, Variant
from proxy.config.schema import RULES_SCHEMA
from proxy.delivery.analysis import (
    ERROR_RATE,
    FAIL,
    INCONCLUSIVE,
    LATENCY,
    PASS,
    SHADOW_STATUS,
    TOO_FEW_REQUESTS,
    TTFT,
    Analysis,
    ShadowPairs,
    Window,
    analyse,
    judge,
    step_spans,
)
from proxy.delivery.state import (
    ABORTED,
    ADVANCE,
    HOLD,
    PAUSED,
    PROMOTE,
    PROMOTED,
    ROLLBACK,
    ROLLED_BACK,
    RUNNING,
    RolloutState,
    candidate_percent,
    decode,
    effective_variants,
    encode,
    initial_state,
    next_state,
    operator_action,
)
from proxy.delivery.weights import RolloutWeights
from proxy.errors import RolloutConflictError
from proxy.observe.histogram import BOUNDS, bucket_of, counts_of
from proxy.observe.stats import Pooled, VariantTotals
from proxy.pipeline.assignment import assign_variant
from proxy.store.memory import MemoryStore
from tests.unit.test_loader import BASE, load_errors, write

ROLLOUT = Rollout(candidate="canary", baseline="stable", steps=(5.0, 25.0, 100.0), interval=60.0, min_requests=100,
                  digest="d1")
NOW = 10_000.0


def timings(value: float, n: int) -> tuple[float, ...]:
    """n distinct timings spread over 1 % above `value` (distinct, so ranks mean something)."""
    return tuple(value * (1 + 0.01 * i / n) for i in range(n))


def window(requests: int, errors: int = 0, latency: float = 0.1, ttft: float | None = None) -> Window:
    ok = requests - errors
    return Window(requests, errors, counts_of(timings(latency, ok)),
                  counts_of(timings(ttft, ok)) if ttft is not None else {})


# ------------------------------------------------------------------------------------------ analysis


@pytest.mark.parametrize(
    ("candidate", "baseline", "verdict", "reason"),
    [
        (window(99), window(5000), INCONCLUSIVE, TOO_FEW_REQUESTS),  # below min_requests on one side
        (window(200), window(99), INCONCLUSIVE, TOO_FEW_REQUESTS),
        (window(200), window(2000), PASS, "ok"),  # the same numbers on both sides
        (window(200, errors=40), window(2000, errors=10), FAIL, ERROR_RATE),  # 20 % vs 0.5 %
        (window(300, errors=2), window(2000, errors=2), PASS, "ok"),  # 0.7 % vs 0.1 %: within the 1-point delta
        (window(200, latency=0.3), window(2000, latency=0.1), FAIL, LATENCY),  # 3x slower
        (window(200, latency=0.11), window(2000, latency=0.1), PASS, "ok"),  # slower for sure, but only 1.1x
        (window(200, ttft=0.06), window(2000, ttft=0.02), FAIL, TTFT),
    ],
    ids=["few candidate", "few baseline", "same", "errors", "errors within delta", "slow", "slow under the gate",
         "slow first token"],
)
def test_verdicts(candidate: Window, baseline: Window, verdict: str, reason: str) -> None:
    result = analyse(ROLLOUT, candidate, baseline)
    assert (result.verdict, result.reason) == (verdict, reason)
    assert result.numbers["candidate_requests"] == candidate.requests


def test_the_numbers_behind_a_failure() -> None:
    # 95 % of each side's successful requests in one bucket, the rest in the next: each p95 is exactly the upper
    # bound of its 95 % bucket, ten buckets (one decade / 2) apart, so the ratio is exact.
    slow, fast = bucket_of(0.3), bucket_of(0.1)
    candidate = Window(200, 40, {slow: 152.0, slow + 1: 8.0})  # 160 successful: the 152nd is the p95
    baseline = Window(2000, 10, {fast: 1891.0, fast + 1: 99.0})  # 1990: the 1891st (0.95 × 1990, rounded up)
    result = analyse(ROLLOUT, candidate, baseline)
    assert result.verdict == FAIL and result.reason == ERROR_RATE  # the first failed test names it
    numbers = result.numbers
    assert numbers["candidate_error_rate"] == 0.2 and numbers["baseline_error_rate"] == 0.005
    assert isinstance(numbers["error_p"], float) and numbers["error_p"] < 1e-10
    assert (numbers["candidate_latency_p95"], numbers["baseline_latency_p95"]) == (BOUNDS[slow], BOUNDS[fast])
    assert numbers["latency_p95_ratio"] == BOUNDS[slow] / BOUNDS[fast] == pytest.approx(10 ** 0.5, rel=1e-12)


def test_an_early_look_needs_stronger_evidence() -> None:
    # 4.5 % vs 1 % errors on 200 vs 2000: z = (0.045 - 0.01 - 0.01) / sqrt(.045·.955/200 + .01·.99/2000)
    # = 0.025 / 0.014823 = 1.6866, p = 0.0458: fails at 95 %, not at the early level (0.005).
    candidate, baseline = window(200, errors=9), window(2000, errors=20)
    full = analyse(ROLLOUT, candidate, baseline)
    early = analyse(ROLLOUT, candidate, baseline, early=True)
    assert full.verdict == FAIL and early.verdict == PASS
    assert isinstance(full.numbers["error_p"], float) and abs(full.numbers["error_p"] - 0.0458) < 5e-4
    assert early.numbers["alpha"] == pytest.approx(0.005)


def test_a_window_is_the_pooled_numbers_of_its_variant() -> None:
    totals = VariantTotals(requests=3.0, errors=1.0, latency={50: 2.0}, ttft={40: 1.0})
    assert Window.of(totals) == Window(3, 1, {50: 2.0}, {40: 1.0})
    assert Window.of(VariantTotals()) == Window()


def test_a_step_judges_the_fleet_since_it_began_and_at_100_percent_the_baseline_before_it() -> None:
    assert step_spans(NOW, NOW - 500, 25.0, 60.0, NOW + 90) == ((NOW, NOW + 90), (NOW, NOW + 90))
    assert step_spans(NOW, NOW - 500, 100.0, 60.0, NOW + 90) == ((NOW, NOW + 90), (NOW - 560, NOW + 90))
    assert step_spans(NOW, NOW, 100.0, 60.0, NOW + 90) == ((NOW, NOW + 90), (NOW - 60, NOW + 90))  # blue-green
    candidate = Pooled(NOW, NOW + 90, {"canary": VariantTotals(requests=200.0, errors=40.0)}, frozenset({"a", "b"}))
    baseline = Pooled(NOW, NOW + 90, {"stable": VariantTotals(requests=2000.0, errors=10.0)}, frozenset({"b", "c"}))
    result = judge(ROLLOUT, candidate, baseline)
    assert (result.verdict, result.reason) == (FAIL, ERROR_RATE)
    assert result.numbers["candidate_requests"] == 200 and result.numbers["baseline_errors"] == 10
    assert result.numbers["replicas"] == 3 and list(result.numbers)[-1] == "replicas"  # printed last
    empty = Pooled(NOW, NOW + 90, {}, frozenset())
    assert judge(ROLLOUT, empty, empty).reason == TOO_FEW_REQUESTS


def test_shadow_status_mismatch_fails_the_candidate() -> None:
    quiet = ShadowPairs(pairs=200, shadow_failed=2, primary_failed=1)
    failing = ShadowPairs(pairs=200, shadow_failed=30, primary_failed=1)
    few = ShadowPairs(pairs=50, shadow_failed=30, primary_failed=0)  # below min(min_requests, 100) pairs
    assert analyse(ROLLOUT, window(200), window(2000), quiet).verdict == PASS
    assert (analyse(ROLLOUT, window(200), window(2000), failing).reason) == SHADOW_STATUS
    assert analyse(ROLLOUT, window(200), window(2000), few).verdict == PASS


# ------------------------------------------------------------------------------------------ transitions


def verdict(kind: str) -> Analysis:
    return Analysis(kind, {PASS: "ok", FAIL: ERROR_RATE, INCONCLUSIVE: TOO_FEW_REQUESTS}[kind], {"n": 1})


def test_a_healthy_rollout_walks_every_step_then_promotes() -> None:
    state = initial_state(ROLLOUT, NOW)
    assert (state.status, state.step, state.since, state.due, state.version) == (RUNNING, 0, NOW, NOW + 60, 1)
    assert candidate_percent(state, ROLLOUT) == 5.0
    assert next_state(state, ROLLOUT, verdict(PASS), NOW + 59) is None  # not due yet
    now = NOW
    for expected in (25.0, 100.0):
        now += 60
        decided = next_state(state, ROLLOUT, verdict(PASS), now)
        assert decided is not None and decided[1] == ADVANCE
        state = decided[0]
        assert candidate_percent(state, ROLLOUT) == expected and (state.since, state.due) == (now, now + 60)
    decided = next_state(state, ROLLOUT, verdict(PASS), now + 60)
    assert decided is not None and decided[1] == PROMOTE
    state = decided[0]
    assert state.status == PROMOTED and candidate_percent(state, ROLLOUT) == 100.0
    assert [entry["action"] for entry in state.history] == ["start", "advance", "advance", "promote"]
    assert next_state(state, ROLLOUT, verdict(FAIL), now + 120) is None  # finished: nothing moves it


def test_failure_rolls_back_at_once_even_mid_interval_or_paused() -> None:
    state = initial_state(ROLLOUT, NOW)
    decided = next_state(state, ROLLOUT, verdict(FAIL), NOW + 1)
    assert decided is not None and decided[1] == ROLLBACK
    assert decided[0].status == ROLLED_BACK and candidate_percent(decided[0], ROLLOUT) == 0.0
    assert decided[0].history[-1]["numbers"] == {"n": 1} and decided[0].history[-1]["step"] == 0
    paused = operator_action(state, ROLLOUT, "pause", NOW + 1)
    assert next_state(paused, ROLLOUT, verdict(PASS), NOW + 600) is None  # paused: no advance
    decided = next_state(paused, ROLLOUT, verdict(FAIL), NOW + 2)
    assert decided is not None and decided[0].status == ROLLED_BACK


def test_too_little_traffic_holds_and_extends_the_interval() -> None:
    state = initial_state(ROLLOUT, NOW)
    decided = next_state(state, ROLLOUT, verdict(INCONCLUSIVE), NOW + 60)
    assert decided is not None and decided[1] == HOLD
    held = decided[0]
    assert (held.step, held.since, held.due, held.status) == (0, NOW, NOW + 120, RUNNING)
    assert next_state(held, ROLLOUT, verdict(PASS), NOW + 119) is None


@pytest.mark.parametrize(
    ("status", "action", "after"),
    [(RUNNING, "pause", PAUSED), (PAUSED, "resume", RUNNING), (RUNNING, "promote", PROMOTED),
     (PAUSED, "promote", PROMOTED), (RUNNING, "abort", ABORTED), (PAUSED, "abort", ABORTED)],
)
def test_operator_actions(status: str, action: str, after: str) -> None:
    state = replace(initial_state(ROLLOUT, NOW), status=status)
    changed = operator_action(state, ROLLOUT, action, NOW + 5)
    assert changed.status == after and changed.version == state.version + 1
    assert changed.history[-1]["action"] == action and changed.history[-1]["by"] == "operator"
    if action == "resume":
        assert changed.due == NOW + 5 + 60


@pytest.mark.parametrize(("status", "action"), [(RUNNING, "resume"), (PAUSED, "pause"), (PROMOTED, "abort"),
                                                (ROLLED_BACK, "resume"), (ABORTED, "promote")])
def test_operator_actions_the_status_forbids(status: str, action: str) -> None:
    with pytest.raises(RolloutConflictError):
        operator_action(replace(initial_state(ROLLOUT, NOW), status=status), ROLLOUT, action, NOW)


def test_state_round_trips_and_garbage_reads_as_none() -> None:
    state = operator_action(initial_state(ROLLOUT, NOW), ROLLOUT, "pause", NOW + 1)
    assert decode(encode(state)) == state
    for raw in (None, b"", b"{", b"[]", b'{"status": "exploded", "step": 0, "since": 0, "due": 0, "version": 1, '
                b'"history": []}'):
        assert decode(raw) is None


# --------------------------------------------------------------------------------------------- weights


def make_route(*names_weights: tuple[str, float], rollout: Rollout | None = ROLLOUT,
               sticky: Sticky | None = Sticky(by="user", ttl=3600.0)) -> Route:
    variants = tuple(Variant(name, Pool(f"pool-{name}", ()), weight) for name, weight in names_weights)
    return Route(name="chat", models=("m",), model_pattern=re.compile("m"), endpoints=(), variants=variants,
                 sticky=sticky, rollout=rollout)


def test_effective_variants_put_the_candidate_last_with_the_step() -> None:
    route = make_route(("canary", 10), ("old", 5), ("stable", 85))
    assert [(v.name, v.weight) for v in effective_variants(route.variants, ROLLOUT, 25.0)] == \
        [("old", 0.0), ("stable", 75.0), ("canary", 25.0)]


def test_weights_follow_state_and_reloads_cost_one_rebuild() -> None:
    weights = RolloutWeights()
    route = make_route(("stable", 90), ("canary", 10))
    assert [v.weight for v in weights.variants_for(route)] == [100.0, 0.0]  # no state yet: candidate 0
    state = next_state(initial_state(ROLLOUT, NOW), ROLLOUT, verdict(PASS), NOW + 60)
    assert state is not None
    weights.apply(route, state[0])
    first = weights.variants_for(route)
    assert [v.weight for v in first] == [75.0, 25.0] and weights.variants_for(route) is first  # cached
    reloaded = replace(route, balance=Balance("round_robin"))  # same rollout block: same state, rebuilt once
    assert [v.weight for v in weights.variants_for(reloaded)] == [75.0, 25.0]
    edited = replace(route, rollout=replace(ROLLOUT, interval=120.0, digest="d2"))  # a new rollout: from 0
    assert [v.weight for v in weights.variants_for(edited)] == [100.0, 0.0]
    plain = replace(route, rollout=None)
    assert weights.variants_for(plain) is plain.variants
    assert weights.retain(set()) == ["chat"]


async def test_sticky_subjects_keep_their_variant_until_the_candidate_is_rolled_back() -> None:
    """Growing steps move new subjects only; a rolled-back candidate (0 %) reassigns its subjects."""
    route = make_route(("stable", 50), ("canary", 50))
    store, rng, weights = MemoryStore(), random.Random(1), RolloutWeights()
    state = initial_state(ROLLOUT, NOW)  # 5 %
    subjects = [f"user-{i}" for i in range(400)]

    async def served(step_state: RolloutState) -> dict[str, str]:
        weights.apply(route, step_state)
        variants = weights.variants_for(route)
        return {s: (await assign_variant(route, s, store, rng, variants))[0].name for s in subjects}

    at_5 = await served(state)
    on_canary = {s for s, v in at_5.items() if v == "canary"}
    assert 0 < len(on_canary) < 60
    advanced = next_state(state, ROLLOUT, verdict(PASS), NOW + 60)
    assert advanced is not None
    assert await served(advanced[0]) == at_5  # 25 %: every assigned subject keeps its variant
    newcomers = {f"new-{i}" for i in range(400)}
    subjects += sorted(newcomers)
    at_25 = await served(advanced[0])
    assert sum(1 for s in newcomers if at_25[s] == "canary") > len(on_canary)  # new subjects follow 25 %
    rolled_back = next_state(advanced[0], ROLLOUT, verdict(FAIL), NOW + 61)
    assert rolled_back is not None
    after = await served(rolled_back[0])
    assert set(after.values()) == {"stable"}  # the candidate gets nothing, its subjects included


# ----------------------------------------------------------------------------------------- validation

SPLIT = """\
routes:
  - name: chat
    match: {{model: chat-model}}
    split:
      variants:
        - {{name: stable, pool: p1, weight: 90}}
        - {{name: canary, pool: p1, weight: 10}}
    rollout: {rollout}
"""


def rules_with(tmp_path: Path, rollout: str) -> Path:
    return write(tmp_path / "rules", {"00-base.yaml": BASE, "c.yaml": SPLIT.format(rollout=rollout)})


def test_a_valid_rollout_block_and_its_digest(tmp_path: Path) -> None:
    rules = rules_with(tmp_path, "{candidate: canary, baseline: stable, steps: [1, 5, 25, 50, 100], interval: 5m, "
                                 "min_requests: 200, max_error_rate_delta: 0.01, max_p95_ratio: 1.2, "
                                 "max_ttft_p95_ratio: 1.2, confidence: 0.95}")
    route = load_rules(rules, env={}).routes[1]
    assert route.rollout is not None
    assert replace(route.rollout, digest="") == Rollout(candidate="canary", baseline="stable")  # the defaults
    same = rules_with(tmp_path / "again", "{candidate: canary, baseline: stable, interval: 300s}")
    assert load_rules(same, env={}).routes[1].rollout == route.rollout  # same values, same digest
    other = rules_with(tmp_path / "other", "{candidate: canary, baseline: stable, interval: 10m}")
    assert load_rules(other, env={}).routes[1].rollout.digest != route.rollout.digest  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("rollout", "expected", "structural"),
    [
        ("{candidate: canry, baseline: stable}",
         "c.yaml:8: route 'chat': rollout.candidate 'canry' is not a variant of this route's split (variants: "
         "stable, canary) (did you mean 'canary'?)", False),
        ("{candidate: canary}", "c.yaml:8: route 'chat': rollout.baseline is required", True),
        ("{candidate: canary, baseline: canary}",
         "c.yaml:8: route 'chat': rollout.baseline must be another variant than rollout.candidate", False),
        ("{candidate: canary, baseline: stable, steps: [5, 2, 100]}",
         "c.yaml:8: route 'chat': rollout.steps must increase, got 2 after 5", False),
        ("{candidate: canary, baseline: stable, steps: [5, 50]}",
         "c.yaml:8: route 'chat': rollout.steps must end at 100 (the candidate takes all traffic), got 50", False),
        ("{candidate: canary, baseline: stable, steps: [0, 100]}",
         "c.yaml:8: route 'chat': rollout.steps[0] must be a percentage in (0, 100], got 0", True),
        ("{candidate: canary, baseline: stable, steps: []}",
         "c.yaml:8: route 'chat': rollout.steps must be a non-empty list of percentages, got an empty list", True),
        ("{candidate: canary, baseline: stable, interval: soon}",
         "c.yaml:8: route 'chat': rollout.interval: ...", True),
        ("{candidate: canary, baseline: stable, confidence: 1.5}",
         "c.yaml:8: route 'chat': rollout.confidence must be < 1, got 1.5", True),
        ("{candidate: canary, baseline: stable, max_p95_ratio: 0.9}",
         "c.yaml:8: route 'chat': rollout.max_p95_ratio must be a number >= 1, got 0.9", True),
        ("{candidate: canary, baseline: stable, min_requests: 0}",
         "c.yaml:8: route 'chat': rollout.min_requests must be an integer > 0, got 0", True),
        ("{candidate: canary, baseline: stable, stpes: [100]}",
         "c.yaml:8: unknown key 'stpes' in rollout of route 'chat' (did you mean 'steps'?)", True),
        ("[canary, stable]", "c.yaml:8: route 'chat': rollout must be a mapping, got a list", True),
    ],
    ids=["unknown candidate", "no baseline", "same variant", "steps decrease", "steps end short", "step zero",
         "no steps", "bad interval", "confidence", "ratio below 1", "min_requests", "typo", "not a mapping"],
)
def test_broken_rollout_blocks_report_file_and_line(tmp_path: Path, rollout: str, expected: str,
                                                    structural: bool) -> None:
    rules = rules_with(tmp_path, rollout)
    errors = load_errors(rules)
    assert len(errors) == 1, errors
    wanted = f"{rules}/{expected}"
    assert errors[0].startswith(wanted[:-3]) if wanted.endswith("...") else errors[0] == wanted
    # The schema sees shapes only; names of variants, order and the final 100 are the loader's to check.
    schema_ok = Draft202012Validator(RULES_SCHEMA).is_valid(yaml.safe_load(SPLIT.format(rollout=rollout)))
    assert schema_ok is not structural


def test_a_rollout_needs_a_split(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        routes:
          - name: single
            match: {model: x}
            pool: p1
            rollout: {candidate: a, baseline: b}
        """)
    errors = load_errors(write(tmp_path / "rules", {"00-base.yaml": BASE, "c.yaml": text}))
    assert errors == (f"{tmp_path}/rules/c.yaml:5: route 'single': rollout needs a split (candidate and baseline "
                      "variants), not a single pool",)
