"""Client feedback joined to the variant that served the request: a bounded request-id map and totals.

`remember()` runs once per routed request from `observe/record.py` `Recorder.finish()`: one OrderedDict insert and,
past `max_requests`, one eviction (O(1)). `score()` serves POST /v1/feedback (`pipeline/feedback.py`): it finds
the request, replaces an earlier score for the same request, and keeps per-(route, variant) count, sum and
sum of squares for the A/B report. Per process, like `observe/stats.py`: ids and numbers, never text.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web

# ~100 bytes per remembered request: 64 Ki requests cost a few MiB. Feedback for older ones gets a 404.
DEFAULT_MAX_REQUESTS = 65_536


@dataclass(slots=True)
class FeedbackTotals:
    """Scores of one (route, variant): enough for a mean, a variance and a Welch test."""

    count: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, score: float, sign: int = 1) -> None:
        self.count += sign
        self.total += sign * score
        self.squares += sign * score * score

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def variance(self) -> float | None:
        """Sample (n-1) variance; None below two scores."""
        if self.count < 2:
            return None
        mean = self.total / self.count
        return max(0.0, (self.squares - self.count * mean * mean) / (self.count - 1))


class FeedbackLedger:
    """request id → (route, variant, score or None) for the last `max_requests` routed requests.

    Entries are tuples of strings and floats on purpose: the collector stops tracking such tuples, so
    tens of thousands of entries add nothing to the cost of a full garbage collection (lists would)."""

    __slots__ = ("_served", "_totals", "_max")

    def __init__(self, max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
        self._served: OrderedDict[str, tuple[str, str, float | None]] = OrderedDict()
        self._totals: dict[tuple[str, str], FeedbackTotals] = {}
        self._max = max_requests

    def remember(self, request_id: str, route: str, variant: str) -> None:
        served = self._served
        served[request_id] = (route, variant, None)
        if len(served) > self._max:
            served.popitem(last=False)

    def score(self, request_id: str, score: float) -> tuple[str, str] | None:
        """Record `score` for the request (replacing an earlier one); its (route, variant), None if unknown."""
        entry = self._served.get(request_id)
        if entry is None:
            return None
        route, variant, previous = entry
        totals = self._totals.setdefault((route, variant), FeedbackTotals())
        if previous is not None:
            totals.add(previous, -1)
        totals.add(score)
        self._served[request_id] = (route, variant, score)  # same key: keeps its place in the order
        return route, variant

    def totals(self, route: str) -> dict[str, FeedbackTotals]:
        return {variant: totals for (name, variant), totals in self._totals.items() if name == route}


FEEDBACK = web.AppKey("FEEDBACK", FeedbackLedger)
