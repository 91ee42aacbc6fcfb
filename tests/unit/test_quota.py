"""Unit tests for `proxy.store.quota`: the GCRA rates and leased slots of `QuotaTable` on a hand-moved clock."""

from __future__ import annotations

import pytest

from proxy.store.quota import Adjust, Claim, QuotaBatch, QuotaTable, Rate, Slot, Verdict
from tests.conftest import FakeClock

# 10 requests a minute (one every 6 s) and 100 tokens a minute (one every 0.6 s).
REQUESTS = Rate("t:req", 60.0, 10.0, 1.0)


def tokens(cost: float) -> Rate:
    return Rate("t:tok", 60.0, 100.0, cost)


def make() -> tuple[QuotaTable, FakeClock]:
    clock = FakeClock()
    return QuotaTable(clock=clock), clock


def claim(table: QuotaTable, *rates: Rate, slot: Slot | None = None) -> Verdict:
    [verdict] = table.apply(QuotaBatch(claims=(Claim(rates, slot),)))
    return verdict


def adjust(table: QuotaTable, key: str, delta: float) -> None:
    assert table.apply(QuotaBatch(adjusts=(Adjust(key, 60.0, 100.0, delta),))) == []


# ------------------------------------------------------------------------------------------------ rates


def test_a_burst_up_to_the_limit_then_refusal_with_the_exact_wait() -> None:
    table, _ = make()
    verdicts = [claim(table, REQUESTS) for _ in range(10)]
    assert all(v.admitted and v.refused == -1 and v.retry_after == 0.0 for v in verdicts)
    assert [v.remaining for v in verdicts] == [(float(n),) for n in range(9, -1, -1)]
    refused = claim(table, REQUESTS)
    assert not refused.admitted and refused.refused == 0
    assert refused.retry_after == pytest.approx(6.0)  # the oldest unit comes back one interval later
    assert refused.remaining == (0.0,) and refused.reset == pytest.approx((60.0,))


def test_refill_is_smooth_and_the_retry_after_is_honest() -> None:
    table, clock = make()
    for _ in range(10):
        claim(table, REQUESTS)
    wait = claim(table, REQUESTS).retry_after
    clock.advance(wait - 0.001)
    assert not claim(table, REQUESTS).admitted  # a moment early: still refused
    clock.advance(0.001)
    assert claim(table, REQUESTS).admitted  # exactly at Retry-After: admitted
    assert not claim(table, REQUESTS).admitted
    clock.advance(18.0)  # three intervals: three units, no more (no window boundary to burst across)
    assert [claim(table, REQUESTS).admitted for _ in range(4)] == [True, True, True, False]
    clock.advance(600.0)  # long idle: full again, but never beyond the limit
    assert claim(table, REQUESTS).remaining == (9.0,)


def test_a_refused_rate_leaves_the_claims_other_rates_untouched() -> None:
    table, _ = make()
    verdict = claim(table, REQUESTS, tokens(150.0))  # more tokens than the limit: refused, all or nothing
    assert not verdict.admitted and verdict.refused == 1
    assert verdict.remaining == (10.0, 100.0)  # what is left if nothing is taken
    assert claim(table, REQUESTS).remaining == (9.0,)  # the request rate was not charged


def test_refused_is_the_first_failing_rate_and_the_wait_the_longest() -> None:
    table, _ = make()
    once = Rate("t:once", 60.0, 1.0, 1.0)
    assert claim(table, tokens(90.0), once).admitted  # tokens 54 s ahead, `once` 60 s ahead
    verdict = claim(table, REQUESTS, tokens(20.0), once)
    assert verdict.refused == 1  # tokens: 6 s to wait; once: 60 s
    assert verdict.retry_after == pytest.approx(60.0)
    assert claim(table, REQUESTS).remaining == (9.0,)


@pytest.mark.parametrize(("costs", "remaining", "reset"), [
    ((30.0,), (70.0,), (18.0,)),
    ((30.0, 30.0), (40.0,), (36.0,)),
    ((99.5,), (0.0,), (59.7,)),  # half a unit left: floored
    ((100.0,), (0.0,), (60.0,)),
    ((0.0,), (100.0,), (0.0,)),  # a free claim: full, nothing to reset
])
def test_remaining_is_whole_units_and_reset_is_seconds_until_full(
    costs: tuple[float, ...], remaining: tuple[float, ...], reset: tuple[float, ...]
) -> None:
    table, _ = make()
    for cost in costs:
        verdict = claim(table, tokens(cost))
    assert verdict.admitted and verdict.remaining == remaining and verdict.reset == pytest.approx(reset)


def test_a_refused_claim_reports_what_is_left_before_it() -> None:
    table, _ = make()
    claim(table, tokens(70.0))
    verdict = claim(table, tokens(40.0))
    assert not verdict.admitted and verdict.remaining == (30.0,) and verdict.reset == pytest.approx((42.0,))
    assert verdict.retry_after == pytest.approx(6.0)


@pytest.mark.parametrize(("period", "limit", "cost"), [
    (3600.0, 7, 1), (86_400.0, 13, 1), (60.0, 1_000_000, 4000), (86_400.0, 100_000, 1000), (60.0, 60, 0.1),
])
def test_an_exact_burst_fits_on_a_unix_time_clock(period: float, limit: int, cost: float) -> None:
    # Absolute times near 1.8e9 s keep only ~2e-7 s in a double: kept as plain TATs, each of these bursts
    # would lose its last unit. The table keeps (anchor, ahead), so all of them fit exactly.
    clock = FakeClock(1_796_216_861.318_09)
    table = QuotaTable(clock=clock)
    rate = Rate("k", period, float(limit), cost)
    claims = min(round(limit / cost), 200)
    fill = Adjust("k", period, float(limit), limit - claims * cost)  # charge the rest up front
    assert table.apply(QuotaBatch(adjusts=(fill,))) == []
    verdicts = table.apply(QuotaBatch(claims=tuple(Claim((rate,)) for _ in range(claims + 1))))
    assert [v.admitted for v in verdicts] == [True] * claims + [False]


def test_claims_in_one_batch_are_answered_in_order() -> None:
    table, _ = make()
    rate = Rate("k", 60.0, 3.0, 1.0)
    verdicts = table.apply(QuotaBatch(claims=tuple(Claim((rate,)) for _ in range(5))))
    assert [v.admitted for v in verdicts] == [True, True, True, False, False]
    assert [v.remaining for v in verdicts] == [(2.0,), (1.0,), (0.0,), (0.0,), (0.0,)]


def test_a_claim_without_limits_is_admitted() -> None:
    table, _ = make()
    assert claim(table) == Verdict(True, -1, 0.0, (), (), 0)


@pytest.mark.parametrize("make_bad", [
    lambda: Rate("k", 0.0, 1.0, 1.0),
    lambda: Rate("k", 60.0, 0.0, 1.0),
    lambda: Rate("k", 60.0, 1.0, -1.0),
    lambda: Rate("k", 60.0, float("inf"), 1.0),
    lambda: Rate("k", 60.0, 1.0, float("nan")),
    lambda: Adjust("k", 60.0, 1.0, float("inf")),
    lambda: Slot("s", 1, "a", 0.0),
])
def test_numbers_that_would_break_the_arithmetic_are_refused_where_made(make_bad: object) -> None:
    assert callable(make_bad)
    with pytest.raises(ValueError):
        make_bad()


# ---------------------------------------------------------------------------------------------- adjusts


def test_giving_back_makes_room_at_once() -> None:
    table, _ = make()
    assert claim(table, tokens(80.0)).admitted  # predicted 80 tokens
    assert not claim(table, tokens(30.0)).admitted
    adjust(table, "t:tok", -50.0)  # the answer used only 30
    verdict = claim(table, tokens(30.0))
    assert verdict.admitted and verdict.remaining == (40.0,)


def test_charging_more_is_debt_that_refuses_until_repaid() -> None:
    table, clock = make()
    assert claim(table, tokens(10.0)).admitted  # predicted 10 tokens
    adjust(table, "t:tok", 150.0)  # the answer used 160: 60 over the limit
    refused = claim(table, tokens(10.0))
    assert not refused.admitted and refused.remaining == (0.0,)
    assert refused.reset == pytest.approx((96.0,)) and refused.retry_after == pytest.approx(42.0)
    clock.advance(41.9)
    assert not claim(table, tokens(10.0)).admitted
    clock.advance(0.1)
    assert claim(table, tokens(10.0)).admitted


def test_giving_back_more_than_was_taken_stops_at_full() -> None:
    table, _ = make()
    claim(table, tokens(20.0))
    adjust(table, "t:tok", -500.0)
    assert len(table) == 0  # full again: the key is simply dropped
    assert claim(table, tokens(100.0)).admitted  # not a credit beyond the limit
    assert not claim(table, tokens(1.0)).admitted


def test_giving_back_on_an_absent_key_does_nothing() -> None:
    table, _ = make()
    adjust(table, "t:tok", -10.0)
    assert len(table) == 0
    assert claim(table, tokens(1.0)).remaining == (99.0,)


def test_adjusts_apply_before_the_batchs_claims() -> None:
    table, _ = make()
    claim(table, tokens(100.0))
    [verdict] = table.apply(QuotaBatch(claims=(Claim((tokens(50.0),)),),
                                       adjusts=(Adjust("t:tok", 60.0, 100.0, -50.0),)))
    assert verdict.admitted


# ------------------------------------------------------------------------------------------------ slots


def lease(name: str, ttl: float = 30.0) -> Slot:
    return Slot("t:conc", 2, name, ttl)


def test_a_slot_admits_up_to_its_limit_and_a_release_frees_one() -> None:
    table, _ = make()
    assert [claim(table, slot=lease(n)).in_use for n in ("a", "b")] == [1, 2]
    full = claim(table, REQUESTS, slot=lease("c"))
    assert not full.admitted and full.refused == 1 and full.retry_after == 1.0 and full.in_use == 2
    assert claim(table, REQUESTS).remaining == (9.0,)  # the full slot charged no request
    assert table.apply(QuotaBatch(releases=(("t:conc", "a"), ("t:conc", "a"), ("t:none", "x")))) == []
    assert claim(table, slot=lease("c")).in_use == 2


def test_a_full_slot_waits_as_long_as_a_refused_rate_says() -> None:
    table, _ = make()
    claim(table, slot=Slot("s", 1, "a", 30.0))
    claim(table, Rate("r", 60.0, 1.0, 1.0))
    verdict = claim(table, Rate("r", 60.0, 1.0, 1.0), slot=Slot("s", 1, "b", 30.0))
    assert verdict.refused == 0 and verdict.retry_after == pytest.approx(60.0)


def test_unrenewed_leases_expire_and_renewed_ones_stay() -> None:
    table, clock = make()
    claim(table, slot=lease("a"))
    claim(table, slot=lease("b"))
    clock.advance(20.0)
    table.apply(QuotaBatch(renewals=(("t:conc", "a", 30.0),)))
    clock.advance(10.0)  # b's expiry: gone; a lives until 50
    verdict = claim(table, slot=lease("c"))
    assert verdict.admitted and verdict.in_use == 2
    clock.advance(20.0)  # a's renewed expiry
    assert claim(table, slot=lease("d")).in_use == 2  # c and d


def test_a_renewal_does_not_bring_back_a_released_or_expired_lease() -> None:
    table, clock = make()
    claim(table, slot=lease("a", ttl=10.0))
    clock.advance(10.0)
    table.apply(QuotaBatch(renewals=(("t:conc", "a", 30.0), ("t:none", "x", 30.0))))
    assert claim(table, slot=lease("b")).in_use == 1
    table.apply(QuotaBatch(releases=(("t:conc", "b"),)))
    table.apply(QuotaBatch(renewals=(("t:conc", "b", 30.0),)))
    assert claim(table, slot=lease("c")).in_use == 1


def test_slot_with_zero_limit_refuses_everything() -> None:
    table, _ = make()
    verdict = claim(table, slot=Slot("s", 0, "a", 30.0))
    assert not verdict.admitted and verdict.refused == 0 and verdict.in_use == 0


# ------------------------------------------------------------------------------------------------ bound


def test_keys_are_bounded_least_recently_used_first() -> None:
    clock = FakeClock()
    table = QuotaTable(max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        claim(table, Rate(key, 60.0, 2.0, 1.0))
    claim(table, Rate("a", 60.0, 2.0, 1.0))  # a used again: b is now the least recently used
    claim(table, slot=Slot("s", 5, "x", 30.0))
    assert len(table) == 3
    assert claim(table, Rate("b", 60.0, 2.0, 1.0)).remaining == (1.0,)  # b was dropped: full again
    assert not claim(table, Rate("a", 60.0, 2.0, 1.0)).admitted  # a kept its two claims
    table.clear()
    assert len(table) == 0


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError):
        QuotaTable(max_keys=0)
