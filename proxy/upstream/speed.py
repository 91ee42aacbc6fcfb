"""A runtime's learned speed as a function of its load: seconds per token of one sequence = a + b·(r − 1).

State only (what was observed, decayed); which samples to believe is `pipeline/cost.py`'s policy.

No runtime runs a sequence at full speed while others share its batch: on a CPU every slot shares the cores
(b ≈ a: the aggregate rate stays flat), on a GPU decode is memory-bound and slows less steeply (b ≪ a).
So each curve is a line in r, the number of sequences running beside the new one, fitted by weighted least
squares over decayed samples (weight: the sample's tokens, so a 1000-token answer outweighs a 3-token one
and the fit is the ratio of times to tokens, not a mean of noisy ratios; at most the last `MAX_EVIDENCE`
tokens count, like an EWMA). A weak prior (the configured
guess at r = 1, slope 0: today's "full speed while a slot is free") keeps the fit defined before the
runtime ran at several loads, and the evidence decays with time (`HALF_LIFE`) so that a runtime whose
speed changed — a recovered GPU, a neighbour gone — is believed again once it serves, and one that has not
served for a long while is priced at the prior again rather than at an old verdict.
"""

from __future__ import annotations

import math

HALF_LIFE = 300.0  # seconds for the weight of a sample to halve
PRIOR_TOKENS = 1.0  # the prior counts as one token of evidence at r = 1: any real sample outweighs it
MAX_EVIDENCE = 20000.0  # tokens (default): older evidence is scaled down beyond this, so the curve follows change
SLOPE_PRIOR_WEIGHT = 32.0  # ridge weight pulling the slope to 0 while loads barely varied
MIN_SECONDS_PER_TOKEN = 1e-7
MAX_SECONDS_PER_TOKEN = 10.0


class SpeedCurve:
    """One runtime's seconds per token (prefill or decode) at r sequences running: `a + b·(r − 1)`."""

    __slots__ = ("a", "b", "samples", "_prior", "_max", "_w", "_x", "_y", "_xx", "_xy", "_at")

    def __init__(self, prior_tokens_per_second: float, max_evidence: float = MAX_EVIDENCE) -> None:
        self._prior = 1.0 / prior_tokens_per_second
        self._max = max_evidence
        self.a = self._prior
        self.b = 0.0
        self.samples = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0  # decayed weighted sums of the evidence
        self._at = -math.inf  # time of the last sample (the decay's reference)

    def seconds_per_token(self, running: float) -> float:
        """Predicted seconds per token for a sequence among `running` (itself included, ≥ 1)."""
        return self.a + self.b * (running - 1.0)

    def tokens_per_second(self, running: float) -> float:
        return 1.0 / self.seconds_per_token(running)

    def add(self, running: float, tokens: float, seconds: float, now: float) -> None:
        """One observation: `tokens` took `seconds` while on average `running` sequences ran (itself included)."""
        if tokens <= 0 or seconds <= 0:
            return
        spt = min(MAX_SECONDS_PER_TOKEN, max(MIN_SECONDS_PER_TOKEN, seconds / tokens))
        keep = 1.0
        if self._at > -math.inf:
            keep = 0.5 ** (max(0.0, now - self._at) / HALF_LIFE)
        if self._w * keep + tokens > self._max:
            keep = max(0.0, self._max - tokens) / self._w
        if keep < 1.0:
            self._w *= keep
            self._x *= keep
            self._y *= keep
            self._xx *= keep
            self._xy *= keep
        self._at = now
        x = max(0.0, running - 1.0)
        w = tokens
        self._w += w
        self._x += w * x
        self._y += w * spt
        self._xx += w * x * x
        self._xy += w * x * spt
        self.samples += 1
        self._fit()

    def _fit(self) -> None:
        """Ridge least squares of spt = a + b·x with the prior as pseudo-evidence at x = 0, slope ≥ 0."""
        w, x, y = self._w + PRIOR_TOKENS, self._x, self._y + PRIOR_TOKENS * self._prior
        xx, xy = self._xx + SLOPE_PRIOR_WEIGHT, self._xy
        det = w * xx - x * x
        b = (w * xy - x * y) / det if det > 0 else 0.0
        if b < 0.0:  # more load never makes a runtime faster: noise, or a load we never saw
            b = 0.0
        a = (y - b * x) / w
        if a < b:
            # Aggregate throughput r / (a + b·(r − 1)) falls with r when a < b: no runtime gets slower in total
            # for running more (at worst, on a CPU, it stays flat: a = b). Samples taken only at high loads
            # can extrapolate there (to a ≈ 0, "infinitely fast alone"); fit the flat-throughput line instead.
            b = (y + self._xy) / (w + 2.0 * x + self._xx)
            a = b
        self.a = min(MAX_SECONDS_PER_TOKEN, max(MIN_SECONDS_PER_TOKEN, a))
        self.b = b

    def table(self, up_to: int) -> dict[str, float]:
        """Tokens per second at 1..`up_to` running, for the admin API (keys are strings: JSON)."""
        return {str(r): round(self.tokens_per_second(r), 3) for r in range(1, up_to + 1)}
