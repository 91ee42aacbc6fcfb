"""Unit tests for `proxy.pipeline.split` (pure policy), `pipeline/assignment.py` on the embedded store,
and the `split.sticky` block as the loader turns it into `Route.sticky`. No sockets, no sleeps."""

from __future__ import annotations

import math
import random
import re
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from proxy.config.loader import load_rules
from proxy.config.model import DEFAULT_STICKY_TTL, Pool, Route, Sticky, Variant
from proxy.auth import hash_api_key
from proxy.errors import StoreUnavailableError
from proxy.pipeline import split
from proxy.pipeline.assignment import assign_variant, find_subject
from proxy.pipeline.request import parse
from proxy.store.memory import MemoryStore

POOL = Pool(name="p", backends=())
_PATTERN = re.compile("m")


def variants(*weights: float) -> tuple[Variant, ...]:
    return tuple(Variant(name=f"v{i}", pool=POOL, weight=w) for i, w in enumerate(weights))


def route(*weights: float, sticky: Sticky | None = Sticky(by="header", header="x-user-id", ttl=60.0),
          name: str = "chat") -> Route:
    return Route(name=name, models=("m",), model_pattern=_PATTERN,
                 endpoints=(), variants=variants(*weights), sticky=sticky)


def five_sigma(n: int, p: float) -> tuple[float, float]:
    """The range n draws with probability p land in, 5 standard deviations either side of the mean."""
    sd = math.sqrt(n * p * (1 - p))
    return n * p - 5 * sd, n * p + 5 * sd


# ---------------------------------------------------------------------------------------------- draw


@pytest.mark.parametrize(("weights", "unit", "expected"), [
    ((90, 10), 0.0, "v0"),
    ((90, 10), 0.8999, "v0"),
    ((90, 10), 0.9, "v1"),
    ((90, 10), 0.99999, "v1"),
    ((0, 100), 0.0, "v1"),  # weight 0 never wins, not even at the bottom of the range
    ((100, 0), 0.99999, "v0"),
    ((50, 0, 50), 0.5, "v2"),
    ((1, 1, 1, 1), 0.74, "v2"),
    ((1,), 0.5, "v0"),
    ((1, 2), math.nextafter(1.0, 0.0), "v1"),  # the largest unit below 1
])
def test_draw_picks_by_cumulative_weight(weights: tuple[float, ...], unit: float, expected: str) -> None:
    assert split.draw(variants(*weights), unit).name == expected


def test_draw_never_picks_a_zero_weight_variant() -> None:
    vs = variants(0, 3, 0, 1, 0)
    picked = {split.draw(vs, i / 10_000).name for i in range(10_000)}
    assert picked == {"v1", "v3"}


def test_growing_the_last_variant_only_moves_subjects_into_it() -> None:
    before, after = variants(90, 10), variants(70, 30)
    units = [i / 1000 for i in range(1000)]
    moved = [(split.draw(before, u).name, split.draw(after, u).name) for u in units]
    assert all(a == b or b == "v1" for a, b in moved)
    assert all(b == "v1" for a, b in moved if a == "v1")


def test_per_request_draws_follow_the_weights() -> None:
    rng = random.Random(20261126)
    n = 20_000
    counts = Counter(split.draw(variants(90, 10), rng.random()).name for _ in range(n))
    low, high = five_sigma(n, 0.1)
    assert low <= counts["v1"] <= high


# ------------------------------------------------------------------------------------ subject hashing


def test_subject_units_are_deterministic_per_route_and_spread_by_weight() -> None:
    n = 20_000
    digests = [split.subject_digest(f"user-{i}") for i in range(n)]
    assert split.subject_unit("chat", digests[0]) == split.subject_unit("chat", digests[0])
    units = [split.subject_unit("chat", d) for d in digests]
    assert all(0.0 <= u < 1.0 for u in units)
    canary = sum(split.draw(variants(90, 10), u).name == "v1" for u in units)
    low, high = five_sigma(n, 0.1)
    assert low <= canary <= high
    # Another route draws independently: about 10% of its canary subjects are also this route's canary.
    other = [split.draw(variants(90, 10), split.subject_unit("other", d)).name == "v1" for d in digests]
    both = sum(1 for u, o in zip(units, other) if o and split.draw(variants(90, 10), u).name == "v1")
    low, high = five_sigma(n, 0.01)
    assert low <= both <= high


def test_keys_carry_a_digest_never_the_subject() -> None:
    digest = split.subject_digest("alice@example.com")
    key = split.sticky_key("chat", digest)
    assert key == f"splitstream:sticky:chat:{digest}" and len(digest) == 32
    assert "alice" not in key


@pytest.mark.parametrize(("weights", "stored", "expected"), [
    ((90, 10), b"v1", "v1"),
    ((90, 10), b"v0", "v0"),
    ((90, 0), b"v1", None),  # weight set to 0 by a reload: reassign
    ((90, 10), b"gone", None),  # variant removed by a reload: reassign
    ((90, 10), b"\xff", None),  # garbage from elsewhere: reassign, never raise
])
def test_kept_variant(weights: tuple[float, ...], stored: bytes, expected: str | None) -> None:
    kept = split.kept_variant(variants(*weights), stored)
    assert (kept.name if kept else None) == expected


# --------------------------------------------------------------------------------------------- subjects


def view(**fields: Any) -> Any:
    return parse("chat", orjson.dumps({"model": "m", **fields}))


def test_subject_from_header_is_case_insensitive_and_empty_means_none() -> None:
    sticky = Sticky(by="header", header="x-user-id")
    assert find_subject(sticky, CIMultiDict({"X-User-Id": "u1"}), view()) == "u1"
    assert find_subject(sticky, CIMultiDict({"X-User-Id": ""}), view()) is None
    assert find_subject(sticky, CIMultiDict(), view()) is None
    assert find_subject(None, CIMultiDict({"X-User-Id": "u1"}), view()) is None


def test_subject_from_body_user() -> None:
    sticky = Sticky(by="user")
    assert find_subject(sticky, CIMultiDict(), view(user="alice")) == "alice"
    assert find_subject(sticky, CIMultiDict(), view(user="")) is None
    assert find_subject(sticky, CIMultiDict(), view(user=42)) is None
    assert find_subject(sticky, CIMultiDict(), view()) is None


def test_subject_from_api_key_is_its_hash() -> None:
    sticky = Sticky(by="api_key")
    headers = CIMultiDict({"Authorization": "Bearer sk-secret-1"})
    subject = find_subject(sticky, headers, view())
    assert subject == hash_api_key("sk-secret-1") and "sk-secret" not in (subject or "")
    assert find_subject(sticky, CIMultiDict({"Authorization": "Basic abc"}), view()) is None
    assert find_subject(sticky, CIMultiDict({"Authorization": "Bearer "}), view()) is None
    assert find_subject(sticky, CIMultiDict(), view()) is None


# ----------------------------------------------------------------------------------------- assignment


class DownStore(MemoryStore):
    """The embedded store, failing every call as Redis does when it is down."""

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        raise StoreUnavailableError("down")


async def test_assignment_stores_then_keeps_and_reassigns_removed_variants() -> None:
    store, rng = MemoryStore(), random.Random(1)
    r = route(50, 50)
    subjects = [f"u{i}" for i in range(200)]
    first = {s: await assign_variant(r, s, store, rng) for s in subjects}
    assert {source for _, source in first.values()} == {split.NEW}
    again = {s: await assign_variant(r, s, store, rng) for s in subjects}
    assert all(again[s] == (first[s][0], split.STICKY) for s in subjects)
    # A reload to 100/0: v0 subjects keep v0 (sticky); v1 subjects (now weight 0) move to v0 as new.
    reloaded = route(100, 0)
    after = {s: await assign_variant(reloaded, s, store, rng) for s in subjects}
    for s in subjects:
        expected = (reloaded.variants[0], split.STICKY if first[s][0].name == "v0" else split.NEW)
        assert after[s] == expected
    assert {s: (await assign_variant(reloaded, s, store, rng))[1] for s in subjects} == dict.fromkeys(subjects, "sticky")


async def test_weight_changes_keep_existing_subjects_until_their_ttl() -> None:
    store, rng = MemoryStore(), random.Random(1)
    subjects = [f"u{i}" for i in range(300)]
    for s in subjects:
        assert await assign_variant(route(100, 0), s, store, rng) == (route(100, 0).variants[0], split.NEW)
    canary = route(10, 90)
    results = [await assign_variant(canary, s, store, rng) for s in subjects]
    assert all(v.name == "v0" and source == split.STICKY for v, source in results)
    fresh = Counter([(await assign_variant(canary, f"new{i}", store, rng))[0].name for i in range(300)])
    low, high = five_sigma(300, 0.9)
    assert low <= fresh["v1"] <= high


async def test_store_failure_falls_back_to_the_same_hash_draw() -> None:
    r = route(70, 30)
    stored = {s: (await assign_variant(r, s, MemoryStore(), random.Random(1)))[0] for s in map(str, range(100))}
    for s, variant in stored.items():
        assert await assign_variant(r, s, DownStore(), random.Random(1)) == (variant, split.FALLBACK)


async def test_no_sticky_or_no_subject_draws_per_request_and_stores_nothing() -> None:
    store = MemoryStore()
    rng = random.Random(7)
    n = 2000
    plain = Counter([await assign_variant(route(90, 10, sticky=None), "u1", store, rng) for _ in range(n)])
    anonymous = Counter([await assign_variant(route(90, 10), None, store, rng) for _ in range(n)])
    low, high = five_sigma(n, 0.1)
    for counts in (plain, anonymous):
        assert {source for _, source in counts} == {split.NEW}
        assert low <= sum(c for (v, _), c in counts.items() if v.name == "v1") <= high
    assert len(store) == 0


# ------------------------------------------------------------------------------------------- loading


def load_sticky(tmp_path: Path, sticky_yaml: str) -> Sticky | None:
    (tmp_path / "r.yaml").write_text(textwrap.dedent(f"""\
        backends:
          b: {{url: "http://127.0.0.1:9"}}
        pools:
          p: {{backends: [b]}}
          q: {{backends: [b]}}
        routes:
          - name: chat
            match: {{model: m}}
            split:
              variants: [{{name: a, pool: p, weight: 9}}, {{name: c, pool: q, weight: 1}}]
        {textwrap.indent(sticky_yaml, "      ")}
          - name: plain
            match: {{model: other}}
            pool: p
        """))
    snapshot = load_rules(tmp_path, env={})
    assert snapshot.routes[1].sticky is None
    return snapshot.routes[0].sticky


@pytest.mark.parametrize(("sticky_yaml", "expected"), [
    ('sticky: {by: "header:X-User-Id", ttl: 1h}', Sticky(by="header", header="x-user-id", ttl=3600.0)),
    ("sticky: {by: body:user, ttl: 30m}", Sticky(by="user", ttl=1800.0)),
    ("sticky: {by: api_key}", Sticky(by="api_key", ttl=DEFAULT_STICKY_TTL)),
    ("sticky: {by: none, ttl: 1h}", None),
    ("", None),
])
def test_loader_builds_route_sticky(tmp_path: Path, sticky_yaml: str, expected: Sticky | None) -> None:
    assert load_sticky(tmp_path, sticky_yaml) == expected
