"""Per-request phase deadlines: absolute loop times for connect, first token, idle gaps and the total.

Built once per upstream exchange from the route's `Timeouts` (the request's snapshot) and the moment the
exchange started; every wait on the path takes one of these (aiohttp `ClientTimeout` semantics: every
phase is capped by the total). Used by dispatch, forward, relay and shadow copies alike.
"""

from __future__ import annotations

from proxy.config.model import Timeouts


class Deadlines:
    """Absolute loop times for each phase, all capped by the total."""

    __slots__ = ("timeouts", "total")

    def __init__(self, timeouts: Timeouts, started: float) -> None:
        self.timeouts = timeouts
        self.total = started + timeouts.total

    def connect(self, now: float) -> float:
        """Seconds (not a time) left to open a connection: asyncio.timeout takes a delay there."""
        return max(0.0, min(self.timeouts.connect, self.total - now))

    def first_token(self, now: float) -> float:
        return min(now + self.timeouts.first_token, self.total)

    def idle(self, now: float) -> float:
        return min(now + self.timeouts.idle, self.total)
