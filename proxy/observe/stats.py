"""Per-variant request statistics, for the status pages, rollout analysis and the A/B report.

`RequestStats.record()` runs once per routed client request, from `observe/record.py` `Recorder.finish()`: O(1),
a few integer additions and one small tuple appended to a bounded ring — no sorting, no clock reads.
Readers (`proxy/ui`) call `snapshot()` at their own pace; percentiles are computed there. Shadow copies
never pass through `finish()`, so they are never counted here.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from aiohttp import web

from proxy.errors import UPSTREAM_FAILURE_CODES

WINDOW_SECONDS = 60  # the "recent" window: rates and percentiles cover at most this much time
RECENT_SAMPLES = 2048  # per variant; at high rates the ring covers less than the window (see `covered`)

# One finished request: (loop time it ended, seconds from first byte in to last byte out, seconds to the
# first streamed byte or None, whether it counts as an error). Plain tuples: the cheapest thing to append.
Sample = tuple[float, float, float | None, bool]


def is_variant_error(error: str | None) -> bool:
    """What the statistics call an error: a failure the variant's upstream is answerable for (`error` is the
    request's error code; see `proxy/errors.py` UPSTREAM_FAILURE_CODES). A client's own mistake, a refusal
    by the proxy, a runtime's 429 or a client that left is not."""
    return error is not None and error in UPSTREAM_FAILURE_CODES


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (0 < q <= 1) of already sorted values; None when there are none."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class VariantStats:
    """Counters since start plus a rolling window for one (route, variant).

    The window is two-fold: per-second buckets (a ring of WINDOW_SECONDS counters, reset lazily when a
    bucket's second comes round again) give exact request and error counts for rates; the sample ring keeps
    the raw recent requests that percentiles and statistical tests need."""

    __slots__ = ("requests", "errors", "prompt_tokens", "completion_tokens", "samples", "_second", "_count",
                 "_failed")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.samples: deque[Sample] = deque(maxlen=RECENT_SAMPLES)
        self._second = [-1] * WINDOW_SECONDS  # which second each bucket currently counts
        self._count = [0] * WINDOW_SECONDS
        self._failed = [0] * WINDOW_SECONDS

    def record(self, now: float, latency: float, ttft: float | None, is_error: bool, prompt_tokens: int | None,
               completion_tokens: int | None) -> None:
        self.requests += 1
        second = int(now)
        index = second % WINDOW_SECONDS
        if self._second[index] != second:
            self._second[index] = second
            self._count[index] = 0
            self._failed[index] = 0
        self._count[index] += 1
        if is_error:
            self.errors += 1
            self._failed[index] += 1
        if prompt_tokens:
            self.prompt_tokens += prompt_tokens
        if completion_tokens:
            self.completion_tokens += completion_tokens
        self.samples.append((now, latency, ttft, is_error))

    def window_counts(self, now: float) -> tuple[int, int]:
        """(requests, errors) that ended in the current second and the WINDOW_SECONDS - 1 before it."""
        oldest = int(now) - WINDOW_SECONDS
        requests = errors = 0
        for second, count, failed in zip(self._second, self._count, self._failed):
            if second > oldest:
                requests += count
                errors += failed
        return requests, errors

    def tail(self, count: int) -> list[Sample]:
        """The last `count` samples (fewer when the ring holds fewer), oldest first: a rollout step's requests
        are the last (requests now - requests when the step began)."""
        if count <= 0:
            return []
        found = list(itertools.islice(reversed(self.samples), count))
        found.reverse()
        return found

    def recent(self, since: float) -> list[Sample]:
        """The samples that ended at or after `since`, oldest first (the ring is in time order)."""
        found: list[Sample] = []
        for sample in reversed(self.samples):
            if sample[0] < since:
                break
            found.append(sample)
        found.reverse()
        return found


@dataclass(frozen=True, slots=True)
class VariantSnapshot:
    """One variant's numbers at one moment: counters since start, and the rolling window's rates and
    percentiles (None when the window holds no request). `samples` are the window's raw requests, for
    tests that need them (canary analysis); `covered` is the time those samples span, which is shorter
    than the window when more than RECENT_SAMPLES requests ended in it."""

    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    window_seconds: float
    window_requests: int
    window_errors: int
    rps: float
    error_rate: float | None
    latency_p50: float | None
    latency_p95: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    samples: tuple[Sample, ...]
    covered: float


class RequestStats:
    """All variants' statistics of one process, keyed route → variant (names from the rules: a closed set).

    Two plain dict lookups per request — no key tuple is built. Variants a reload removed keep their
    counters (they are history since start); readers pick the names they want to show."""

    __slots__ = ("_routes", "started")

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, VariantStats]] = {}
        self.started: float | None = None  # loop time of the first request or read: where rates begin

    def record(self, route: str, variant: str, now: float, latency: float, ttft: float | None, is_error: bool,
               prompt_tokens: int | None, completion_tokens: int | None) -> None:
        variants = self._routes.get(route)
        if variants is None:
            variants = self._routes[route] = {}
            if self.started is None:
                self.started = now - latency  # the first request began then
        stats = variants.get(variant)
        if stats is None:
            stats = variants[variant] = VariantStats()
        stats.record(now, latency, ttft, is_error, prompt_tokens, completion_tokens)

    def get(self, route: str, variant: str) -> VariantStats | None:
        return self._routes.get(route, {}).get(variant)

    def variants(self, route: str) -> dict[str, VariantStats]:
        """Every variant of `route` seen since start (a copy of the mapping, the live objects)."""
        return dict(self._routes.get(route, {}))

    def routes(self) -> Iterator[str]:
        return iter(list(self._routes))

    def snapshot(self, route: str, now: float) -> dict[str, VariantSnapshot]:
        """Every variant of `route` seen since start, as of `now` (loop time)."""
        if self.started is None:
            self.started = now
        return {name: self._variant_snapshot(stats, now) for name, stats in self._routes.get(route, {}).items()}

    def _variant_snapshot(self, stats: VariantStats, now: float) -> VariantSnapshot:
        # The bucket ring covers the current (partial) second and the WINDOW_SECONDS - 1 before it, and
        # nothing before the first request: rates over a young process are not diluted by time it never had.
        assert self.started is not None
        seconds = max(1.0, min(WINDOW_SECONDS - 1 + (now - int(now)), now - self.started))
        requests, errors = stats.window_counts(now)
        samples = stats.recent(now - seconds)
        latencies = sorted(s[1] for s in samples)
        ttfts = sorted(s[2] for s in samples if s[2] is not None)
        return VariantSnapshot(
            requests=stats.requests,
            errors=stats.errors,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            window_seconds=seconds,
            window_requests=requests,
            window_errors=errors,
            rps=requests / seconds,
            error_rate=errors / requests if requests else None,
            latency_p50=percentile(latencies, 0.5),
            latency_p95=percentile(latencies, 0.95),
            ttft_p50=percentile(ttfts, 0.5),
            ttft_p95=percentile(ttfts, 0.95),
            samples=tuple(samples),
            covered=now - samples[0][0] if samples else 0.0,
        )


STATS = web.AppKey("STATS", RequestStats)
