"""Per-variant request statistics, pooled across replicas: the numbers, their time buckets and store keys.

`RequestStats.record()` runs once per routed client request that is evidence about its variant (`observe/
record.py` `Recorder.finish()`): a clock read and a few dict and float additions into this replica's open
batch for (route, variant, 10-second bucket) — no I/O, no sorting. `observe/pooled.py` drains the batch about
once a second into the shared store, where every replica adds to the same time-bucketed counters, and reads
windows back; the pure functions here say which keys hold a window and what their fields mean. Shadow copies
never pass through `finish()`, so they are never counted here. Numbers only: never prompt or completion text.

Store layout (one hash per route and bucket, every variant's numbers in it, plus one fleet hash per bucket):
  splitstream:stats:{size}:{start}:route:{route}  fields `{variant}|{code}` (codes: `_CODES`, `l{i}`, `t{i}`)
  splitstream:stats:{size}:{start}:fleet          fields `replica|{id}` (flushes: the heartbeat), `route|{name}`
Buckets come in three sizes (TIERS): 10 s (kept an hour), 5 min and 1 h (kept HORIZON, a day); each flush adds
to all three, and a window reads the largest buckets that fit whole and smaller ones at its edges (`cover`):
at most ~80 hashes for a day, ~40 for an hour. Redis keeps ~1.5 KB a hash: ~1 MB a route.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from proxy.errors import UPSTREAM_FAILURE_CODES
from proxy.observe.histogram import BOUNDS

FINE = 10  # seconds per fine bucket: the resolution of a window's start (a rollout step's)
COARSE = 300  # 30 fine buckets
HOUR = 3600  # 12 coarse ones
FINE_REACH = 3600.0  # a window starting further back starts at the coarse bucket holding its start
HORIZON = 86400.0  # the longest window anything reads (the A/B report); older evidence has expired
# (bucket size, how far back windows read it): each size is a multiple of the one before.
TIERS: tuple[tuple[int, float], ...] = ((FINE, FINE_REACH), (COARSE, HORIZON), (HOUR, HORIZON))
KEY_PREFIX = "splitstream:stats:"

Span = tuple[float, float]  # [start, end] in wall-clock seconds (the fleet's clock: replicas agree on it)
Fields = dict[str, float]

# Field codes after `{variant}|`: requests, upstream-attributable errors, prompt and completion tokens; sums and
# sums of squares of successful requests' latency and TTFT; feedback count, sum and sum of squares; rescued
# requests (errors a route's fallback pool answered for the client). `l{i}` and `t{i}` count successful
# requests in latency and TTFT bucket i (`observe/histogram.py`).
_CODES = ("n", "e", "p", "c", "ls", "lq", "ts", "tq", "fn", "fs", "fq", "r")
_ATTRIBUTE = dict(zip(_CODES, ("requests", "errors", "prompt_tokens", "completion_tokens", "latency_sum",
                               "latency_squares", "ttft_sum", "ttft_squares", "feedback_count", "feedback_sum",
                               "feedback_squares", "rescued")))


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


# --------------------------------------------------------------------------------------------- numbers


@dataclass(slots=True)
class VariantTotals:
    """One variant's numbers summed over buckets and replicas. Timings (histograms, sums) are of successful
    requests only: a failure is fast and would flatter its variant. Counts are floats as the store keeps them."""

    requests: float = 0.0
    errors: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    latency: dict[int, float] = field(default_factory=dict)
    latency_sum: float = 0.0
    latency_squares: float = 0.0
    ttft: dict[int, float] = field(default_factory=dict)
    ttft_sum: float = 0.0
    ttft_squares: float = 0.0
    feedback_count: float = 0.0
    feedback_sum: float = 0.0
    feedback_squares: float = 0.0
    rescued: float = 0.0  # of `errors`: answered by a route's fallback pool instead

    def add(self, code: str, value: float) -> None:
        """Add one stored field (its code after `{variant}|`); codes this version does not know are skipped."""
        name = _ATTRIBUTE.get(code)
        if name is not None:
            setattr(self, name, getattr(self, name) + value)
        elif code[:1] in ("l", "t") and code[1:].isdigit():
            histogram = self.latency if code[0] == "l" else self.ttft
            index = int(code[1:])
            histogram[index] = histogram.get(index, 0.0) + value


@dataclass(frozen=True, slots=True)
class Fleet:
    """Who flushed into a span: the replicas that heartbeat in it, and the routes that served in it."""

    replicas: frozenset[str] = frozenset()
    routes: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Pooled:
    """One route's numbers over one span, summed over every replica that flushed into it: per variant, and
    which replicas contributed (heartbeat in the span). `start`..`end`: the buckets read."""

    start: float
    end: float
    variants: dict[str, VariantTotals]
    replicas: frozenset[str]

    def of(self, variant: str) -> VariantTotals:
        return self.variants.get(variant) or VariantTotals()


@dataclass(frozen=True, slots=True)
class Reading:
    """What one read of the store found: each route's numbers per span asked for, and each span's fleet."""

    routes: dict[str, list[Pooled]]
    fleet: list[Fleet]


# ------------------------------------------------------------------------------------------------ keys


def keep(size: int, reach: float) -> float:
    """A bucket's TTL: it outlives every window that may read it (the last flush into it comes `size` after it
    begins, a minute of slack for late flushes and clocks)."""
    return reach + size + 60.0


def route_key(size: int, start: int, route: str) -> str:
    return f"{KEY_PREFIX}{size}:{start}:route:{route}"


def fleet_key(size: int, start: int) -> str:
    return f"{KEY_PREFIX}{size}:{start}:fleet"


def cover(span: Span, now: float) -> list[tuple[int, int]]:
    """(size, start) of the buckets that together hold `span`: the fine bucket holding its start (so a window
    starts at most FINE early) through the one holding its end, the largest bucket that fits whole at each
    point. A start further back than a size's reach is moved back to the start of the next size's bucket
    holding it (those buckets are kept only so long); one older than HORIZON is clamped to it."""
    start, end = max(span[0], now - HORIZON), span[1]
    at = int(start // FINE) * FINE
    for (_, reach), (larger, _) in zip(TIERS, TIERS[1:]):
        if at < now - reach:
            at = at // larger * larger
    stop = int(end // FINE) * FINE + FINE
    buckets = []
    while at < stop:
        size = next(size for size, _ in reversed(TIERS) if at % size == 0 and at + size <= stop)
        buckets.append((size, at))
        at += size
    return buckets


def fleet_of(buckets: Sequence[tuple[int, int]], read: Mapping[str, Mapping[str, float]]) -> Fleet:
    """The replicas and routes the fleet hashes of `buckets` name."""
    replicas: set[str] = set()
    routes: set[str] = set()
    for size, start in buckets:
        for name in read.get(fleet_key(size, start), {}):
            kind, _, who = name.partition("|")
            if kind == "replica":
                replicas.add(who)
            elif kind == "route":
                routes.add(who)
    return Fleet(frozenset(replicas), frozenset(routes))


def pool(route: str, buckets: Sequence[tuple[int, int]], read: Mapping[str, Mapping[str, float]],
         fleet: Fleet) -> Pooled:
    """Sum what `read` (key -> fields, as the store answered) holds for `route` in `buckets` (from `cover`)."""
    variants: dict[str, VariantTotals] = {}
    for size, start in buckets:
        for name, value in read.get(route_key(size, start, route), {}).items():
            variant, _, code = name.rpartition("|")
            totals = variants.get(variant)
            if totals is None:
                totals = variants[variant] = VariantTotals()
            totals.add(code, value)
    first, last = (buckets[0], buckets[-1]) if buckets else ((0, 0), (0, 0))
    return Pooled(float(first[1]), float(last[1] + last[0]), variants, fleet.replicas)


def keys_of(routes: Iterable[str], buckets: Iterable[tuple[int, int]]) -> list[str]:
    """Every key a read of `routes` over `buckets` asks for (each route's hashes, then the fleet's)."""
    buckets = list(buckets)
    return [route_key(size, start, route) for route in routes for size, start in buckets] + \
        [fleet_key(size, start) for size, start in buckets]


# ------------------------------------------------------------------------------------------- recording


class _Batch:
    """One (route, variant)'s requests in one fine bucket, not flushed yet. Histograms are sparse dicts."""

    __slots__ = ("bucket", "requests", "errors", "rescued", "prompt", "completion", "latency", "latency_sum",
                 "latency_squares", "ttft", "ttft_sum", "ttft_squares")

    def __init__(self, bucket: int) -> None:
        self.bucket = bucket
        self.requests = 0
        self.errors = 0
        self.rescued = 0
        self.prompt = 0
        self.completion = 0
        self.latency: dict[int, int] = {}
        self.latency_sum = 0.0
        self.latency_squares = 0.0
        self.ttft: dict[int, int] = {}
        self.ttft_sum = 0.0
        self.ttft_squares = 0.0

    def fields(self, variant: str) -> Fields:
        prefix = f"{variant}|"
        numbers: Fields = {prefix + "n": float(self.requests)}
        for code, value in (("e", self.errors), ("r", self.rescued), ("p", self.prompt), ("c", self.completion),
                            ("ls", self.latency_sum), ("lq", self.latency_squares), ("ts", self.ttft_sum),
                            ("tq", self.ttft_squares)):
            if value:
                numbers[prefix + code] = float(value)
        for code, histogram in (("l", self.latency), ("t", self.ttft)):
            for index, count in histogram.items():
                numbers[f"{prefix}{code}{index}"] = float(count)
        return numbers


Drained = list[tuple[str, str, _Batch]]  # (route, variant, batch)


class RequestStats:
    """This replica's requests not yet flushed, keyed route -> variant (names from the rules: a closed set).

    `clock` is the fleet's wall clock (`time.time`; tests give the rollout controller's fake one), read once
    per request to pick the 10-second bucket. A batch whose bucket has passed waits in `_closed` for the next
    drain; memory is bounded by routes x variants x the buckets between two drains."""

    __slots__ = ("_clock", "_open", "_closed")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._open: dict[str, dict[str, _Batch]] = {}
        self._closed: Drained = []

    def record(self, route: str, variant: str, latency: float, ttft: float | None, is_error: bool,
               prompt_tokens: int | None, completion_tokens: int | None, rescued: bool = False) -> None:
        """One request of `variant`. A rescued one (its pool failed, a fallback pool answered) is an error:
        the client was served, the variant was not up to it; its timings are the fallback's, so not kept."""
        bucket = int(self._clock() // FINE)
        variants = self._open.get(route)
        if variants is None:
            variants = self._open[route] = {}
        batch = variants.get(variant)
        if batch is None or batch.bucket != bucket:
            if batch is not None:
                self._closed.append((route, variant, batch))
            batch = variants[variant] = _Batch(bucket)
        batch.requests += 1
        if is_error:
            batch.errors += 1
            if rescued:
                batch.rescued += 1
        else:
            index = bisect_left(BOUNDS, latency)
            batch.latency[index] = batch.latency.get(index, 0) + 1
            batch.latency_sum += latency
            batch.latency_squares += latency * latency
            if ttft is not None:
                index = bisect_left(BOUNDS, ttft)
                batch.ttft[index] = batch.ttft.get(index, 0) + 1
                batch.ttft_sum += ttft
                batch.ttft_squares += ttft * ttft
        if prompt_tokens:
            batch.prompt += prompt_tokens
        if completion_tokens:
            batch.completion += completion_tokens

    def drain(self) -> Drained:
        """Every batch recorded since the last drain (this replica's share, to add to the store), then none."""
        drained, self._closed = self._closed, []
        for route, variants in self._open.items():
            drained.extend((route, variant, batch) for variant, batch in variants.items())
        self._open = {}
        return drained


FeedbackDeltas = Mapping[tuple[str, str], tuple[int, float, float]]  # (route, variant) -> (count, sum, squares)


def increments(drained: Drained, feedback: FeedbackDeltas, replica: str, now: float) -> dict[int, dict[str, Fields]]:
    """What one flush adds, per bucket size: every batch under its route's hash of each size, the feedback
    scores booked since the last flush under the current bucket, and the fleet hashes' heartbeat (`replica|id`)
    and route index (`route|name`: requests, so retired routes stay visible)."""
    tiers: dict[int, dict[str, Fields]] = {size: {} for size, _ in TIERS}

    def add(route: str | None, second: int, numbers: Fields) -> None:
        for size, keyed in tiers.items():
            start = second // size * size
            key = fleet_key(size, start) if route is None else route_key(size, start, route)
            into = keyed.get(key)
            if into is None:
                keyed[key] = dict(numbers)
                continue
            for name, value in numbers.items():
                into[name] = into.get(name, 0.0) + value

    for route, variant, batch in drained:
        second = batch.bucket * FINE
        add(route, second, batch.fields(variant))
        add(None, second, {f"route|{route}": float(batch.requests)})
    second = int(now // FINE) * FINE
    for (route, variant), (count, total, squares) in feedback.items():
        add(route, second, {f"{variant}|fn": float(count), f"{variant}|fs": total, f"{variant}|fq": squares})
    add(None, second, {f"replica|{replica}": 1.0})
    return tiers


def count_requests(drained: Drained) -> int:
    return sum(batch.requests for _, _, batch in drained)


STATS = web.AppKey("STATS", RequestStats)
