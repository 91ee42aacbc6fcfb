"""Live per-backend state: requests in flight and their predicted load, held as leases.

State only: which backend to pick is `pipeline/balancer.py`'s decision. Counters change only through
`Lease` (taken when a backend is picked, released exactly once in a `finally`), with no await between
read and write, so they are always back to zero when traffic stops. State is keyed by backend identity
(name, url) so a reload that keeps a backend keeps its counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from proxy.config.model import Backend


class BackendState:
    """Mutable counters for one backend (gauges read them at scrape time)."""

    __slots__ = ("backend", "inflight", "predicted_load", "healthy")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.inflight = 0
        self.predicted_load = 0.0
        self.healthy = True

    def lease(self, cost: float) -> Lease:
        self.inflight += 1
        self.predicted_load += cost
        return Lease(self, cost)


class Lease:
    """One request's claim on a backend; `release()` is idempotent (aiohttp `Connection.release`)."""

    __slots__ = ("state", "cost", "released")

    def __init__(self, state: BackendState, cost: float) -> None:
        self.state = state
        self.cost = cost
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        state = self.state
        state.inflight -= 1
        state.predicted_load -= self.cost
        if state.inflight == 0:
            state.predicted_load = 0.0  # no float drift left behind once idle


class BackendStates:
    """All backends' state by identity; `sync` keeps entries for backends still configured."""

    __slots__ = ("_states",)

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], BackendState] = {}

    def get(self, backend: Backend) -> BackendState:
        state = self._states.get(backend.identity)
        if state is None:
            state = self._states[backend.identity] = BackendState(backend)
        return state

    def sync(self, backends: Iterable[Backend]) -> None:
        """Adopt a new snapshot's backends; removed ones are forgotten once nothing is in flight on them."""
        wanted = {b.identity: b for b in backends}
        for identity, state in list(self._states.items()):
            if identity in wanted:
                state.backend = wanted[identity]
            elif state.inflight == 0:
                del self._states[identity]
        for backend in wanted.values():
            self.get(backend)

    def __iter__(self) -> Iterator[BackendState]:
        return iter(list(self._states.values()))

    def samples(self) -> list[tuple[str, int, float, bool]]:
        """(name, in flight, predicted load, healthy) per backend, for the scrape-time gauges."""
        return [(s.backend.name, s.inflight, s.predicted_load, s.healthy) for s in self._states.values()]

    @property
    def total_inflight(self) -> int:
        return sum(s.inflight for s in self._states.values())
