"""Circuit breaker for a remote store: after a failure, stop calling it for a cooldown, then probe once.

Pure state machine (h11 style): `now` comes in, decisions come out; no clock, no I/O, no logging. The
caller (`store/redis.py`) asks `admit(now)` before each call and reports how the call ended; the
return values of `failed`/`succeeded` say when an outage began or ended, so it can log once per outage.

    closed ──failure──▶ open (cooldown) ──cooldown over──▶ one probe admitted (half-open)
      ▲                   ▲                                     │
      └────success────────┼──────────────── success ────────────┤
                          └── failure: cooldown × 2 (capped) ───┘
"""

from __future__ import annotations

import enum


class Admission(enum.Enum):
    DENY = "deny"  # open: answer without calling the store
    PASS = "pass"  # closed: call it
    PROBE = "probe"  # half-open: this one call decides whether the store is back


class Breaker:
    """`base_cooldown` after the first failure, doubled after each failed probe up to `max_cooldown`."""

    __slots__ = ("base_cooldown", "max_cooldown", "cooldown", "open_until", "opened_at", "probing")

    def __init__(self, base_cooldown: float = 1.0, max_cooldown: float = 10.0) -> None:
        if base_cooldown <= 0 or max_cooldown < base_cooldown:
            raise ValueError("need 0 < base_cooldown <= max_cooldown")
        self.base_cooldown = base_cooldown
        self.max_cooldown = max_cooldown
        self.cooldown = base_cooldown
        self.open_until: float | None = None  # None = closed
        self.opened_at = 0.0
        self.probing = False  # a probe is in flight: everyone else is still denied

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def admit(self, now: float) -> Admission:
        if self.open_until is None:
            return Admission.PASS
        if self.probing or now < self.open_until:
            return Admission.DENY
        self.probing = True
        return Admission.PROBE

    def failed(self, now: float, admission: Admission) -> bool:
        """Record a failed call; True when this failure opened a closed breaker (an outage begins)."""
        if admission is Admission.PROBE:
            self.probing = False
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self.open_until = now + self.cooldown
            return False
        if self.open_until is None:
            self.cooldown = self.base_cooldown
            self.open_until = now + self.cooldown
            self.opened_at = now
            return True
        return False  # a call admitted before the outage was noticed: the cooldown already runs

    def succeeded(self, admission: Admission) -> bool:
        """Record a successful call; True when it closed an open breaker (the outage is over).

        Any answer proves the store is reachable, so a late success of a call admitted before the
        breaker opened closes it as well as the probe does."""
        if admission is Admission.PROBE:
            self.probing = False
        if self.open_until is None:
            return False
        self.open_until = None
        self.cooldown = self.base_cooldown
        return True

    def abandoned(self, admission: Admission) -> None:
        """The call ended without saying anything about the store (cancelled, local limit): let another probe."""
        if admission is Admission.PROBE:
            self.probing = False
