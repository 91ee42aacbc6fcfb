"""Variant assignment for one request: find the sticky subject, then ask the store (one round trip).

The policy (weights, hashing, reassignment) is `pipeline/split.py`; this module only reads the subject
from the request and does the store I/O: SET-if-absent of the hash-drawn variant, with TTL, so replicas
that see a new subject at the same moment agree. Store failures fall back to that same hash draw.
`Splitter` holds what a decision needs (store, in-process memo, RNG, the weights in force, the metric) and
is called by `pipeline/handler.py`; subjects are hashed before they reach a key, and are never logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from random import Random

from aiohttp import web

from proxy.auth import bearer_token, hash_api_key
from proxy.config.model import Route, Sticky, Subject, Variant
from proxy.delivery.weights import RolloutWeights
from proxy.errors import StoreUnavailableError
from proxy.observe.metrics import Metrics
from proxy.pipeline import split
from proxy.pipeline.request import RequestView
from proxy.store.base import Store
from proxy.store.recent import RecentAssignments


class Splitter:
    """Chooses each request's variant. `rng` (per-request draws) and `recent` may be replaced by tests."""

    __slots__ = ("store", "recent", "rng", "weights", "metrics")

    def __init__(
        self, store: Store, recent: RecentAssignments | None, weights: RolloutWeights, metrics: Metrics,
        rng: Random | None = None,
    ) -> None:
        self.store = store
        self.recent = recent  # the shared store's recent answers, remembered in-process (None: embedded store)
        self.rng = rng or Random()
        self.weights = weights
        self.metrics = metrics

    async def choose(self, route: Route, headers: Mapping[str, str], view: RequestView) -> Variant:
        """The variant serving this request, drawn with the weights in force: a running rollout's
        (`delivery/weights.py`), else the rules'."""
        if route.sticky is None and len(route.variants) == 1:
            return route.variants[0]  # a plain `pool:` route: nothing to decide, nothing to count
        subject = find_subject(route.sticky, headers, view)
        variants = self.weights.variants_for(route)
        variant, source = await assign_variant(route, subject, self.store, self.rng, variants, self.recent)
        self.metrics.count_assignment(route.name, variant.name, source)
        return variant


def find_subject(sticky: Sticky | Subject | None, headers: Mapping[str, str], view: RequestView) -> str | None:
    """Who the request is for, per `split.sticky.by` (or `balance.by`); None when the route is not sticky or
    the request names no one (header absent or empty, no `user` string, no bearer key)."""
    if sticky is None:
        return None
    if sticky.by == "header":
        assert sticky.header is not None
        return headers.get(sticky.header) or None
    if sticky.by == "user":
        user = view.data.get("user")
        return user if isinstance(user, str) and user else None
    key = bearer_token(headers.get("Authorization", ""))
    # The subject is the key's SHA-256 and the store key hashes that again: neither the key nor the hash
    # client keys are checked against is ever stored.
    return hash_api_key(key) if key else None


async def assign_variant(
    route: Route,
    subject: str | None,
    store: Store,
    rng: Random,
    variants: tuple[Variant, ...] | None = None,
    memo: RecentAssignments | None = None,
) -> tuple[Variant, str]:
    """(variant, source) where source is split.STICKY, split.NEW or split.FALLBACK.

    `variants` are the route's with the weights in force (a rollout's), default the rules'. Without sticky,
    or without a subject, each request draws by weight (source NEW, nothing stored). `memo` remembers the
    shared store's recent answers in this process."""
    sticky = route.sticky
    variants = route.variants if variants is None else variants
    if sticky is None or subject is None:
        return split.draw(variants, rng.random()), split.NEW
    digest = split.subject_digest(subject)
    drawn = split.draw(variants, split.subject_unit(route.name, digest))
    key = split.sticky_key(route.name, digest)
    if memo is not None:
        remembered = memo.get(key)
        kept = split.kept_variant(variants, remembered) if remembered is not None else None
        if kept is not None:
            return kept, split.STICKY
    try:
        stored = await store.set_if_absent(key, drawn.name.encode(), sticky.ttl)
        if stored is None:
            if memo is not None:
                memo.put(key, drawn.name.encode(), sticky.ttl)
            return drawn, split.NEW
        kept = split.kept_variant(variants, stored)
        if kept is not None:
            if memo is not None:
                memo.put(key, stored, sticky.ttl)
            return kept, split.STICKY
        # Its variant was removed or set to weight 0 (by a reload, or a rollout rolled back or promoted):
        # the subject takes today's draw.
        await store.set(key, drawn.name.encode(), sticky.ttl)
        if memo is not None:
            memo.put(key, drawn.name.encode(), sticky.ttl)
        return drawn, split.NEW
    except StoreUnavailableError:
        return drawn, split.FALLBACK


SPLITTER = web.AppKey("SPLITTER", Splitter)
