"""The split weights this process applies to routes with a rollout, and the rollout state they come from.

The request path calls `variants_for(route)`: one dict lookup and an identity check when nothing changed.
`delivery/controller.py` calls `apply` after reading each rollout's state; a reload hands requests new
`Route` objects, which are rebuilt here on first use from the state already known for the same rollout
block (a new block has no state yet: candidate 0 % until the controller starts it). No awaits, no clocks.
"""

from __future__ import annotations

from aiohttp import web

from proxy.config.model import Route, Variant
from proxy.delivery.state import RolloutState, candidate_percent, effective_variants


class _Applied:
    __slots__ = ("route", "digest", "state", "percent", "variants")

    def __init__(self, route: Route, digest: str, state: RolloutState | None, percent: float,
                 variants: tuple[Variant, ...]) -> None:
        self.route = route
        self.digest = digest
        self.state = state
        self.percent = percent
        self.variants = variants


class RolloutWeights:
    """Per route name: the route object the weights were built for, its rollout state, percent, variants."""

    __slots__ = ("_applied",)

    def __init__(self) -> None:
        self._applied: dict[str, _Applied] = {}

    def variants_for(self, route: Route) -> tuple[Variant, ...]:
        """The variants (with effective weights) that serve `route` now; the hot path."""
        applied = self._applied.get(route.name)
        if applied is not None and applied.route is route:
            return applied.variants
        if route.rollout is None:
            return route.variants
        known = applied.state if applied is not None and applied.digest == route.rollout.digest else None
        return self.apply(route, known).variants

    def apply(self, route: Route, state: RolloutState | None) -> _Applied:
        assert route.rollout is not None
        percent = candidate_percent(state, route.rollout)
        variants = effective_variants(route.variants, route.rollout, percent)
        applied = self._applied[route.name] = _Applied(route, route.rollout.digest, state, percent, variants)
        return applied

    def state_of(self, route: str) -> RolloutState | None:
        applied = self._applied.get(route)
        return applied.state if applied is not None else None

    def percent_of(self, route: str) -> float | None:
        applied = self._applied.get(route)
        return applied.percent if applied is not None else None

    def retain(self, routes: set[str]) -> list[str]:
        """Forget routes that no longer have a rollout; returns their names."""
        gone = [name for name in self._applied if name not in routes]
        for name in gone:
            del self._applied[name]
        return gone


WEIGHTS = web.AppKey("WEIGHTS", RolloutWeights)
