"""The parts one proxy process shares between requests, under a typed app key (aiohttp `AppKey`).

`app.py` builds one `ProxyContext` and stores it under `CONTEXT`; handlers read it from there. It holds
parts, not logic: rules holder, connection pool, backend state, metrics, request-id source, rollouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import Iterable

from aiohttp import web

from proxy.config.model import RulesHolder, Snapshot
from proxy.delivery.controller import RolloutController
from proxy.delivery.weights import RolloutWeights
from proxy.observe.feedback import FeedbackLedger
from proxy.observe.logs import AccessLog
from proxy.observe.metrics import Metrics
from proxy.observe.stats import RequestStats
from proxy.store.base import Store
from proxy.store.memory import MemoryStore
from proxy.upstream.pool import ConnectionPool
from proxy.store.recent import RecentAssignments
from proxy.pipeline.response_cache import ResponseCache
from proxy.pipeline.shadow import ShadowMirror
from proxy.upstream.health import HealthChecker
from proxy.upstream.queue import WaitQueue
from proxy.upstream.state import BackendStates, ModelStats


# The embedded result cache's bounds (the process's memory is the limit; Redis has its own maxmemory).
CACHE_MAX_ENTRIES = 50_000
CACHE_MAX_BYTES = 256 * 1024 * 1024


class RequestIds:
    """Process-unique request ids: a random prefix and a counter (no uuid4 per request)."""

    __slots__ = ("_prefix", "_counter")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = 0

    def next(self) -> str:
        self._counter += 1
        return f"{self._prefix}-{self._counter:x}"


def hash_api_key(key: str) -> str:
    """A client key as stored and compared: its SHA-256, so keys never sit in memory dumps or logs."""
    return hashlib.sha256(key.encode()).hexdigest()


class ProxyContext:
    """Shared parts of one proxy process. `pool` exists only while the app runs (see `app.py`)."""

    __slots__ = (
        "rules", "metrics", "access_log", "backends", "ids", "pool", "turns", "inflight", "client_key_hashes",
        "model_stats", "queue", "health", "store", "rng", "shadows", "cache", "cache_store", "recent_assignments", "stats",
        "weights", "rollouts", "feedback",
    )

    def __init__(
        self, snapshot: Snapshot, metrics: Metrics, access_log: AccessLog, client_keys: Iterable[str] = ()
    ) -> None:
        self.rules = RulesHolder(snapshot)
        self.metrics = metrics
        self.access_log = access_log
        self.backends = BackendStates()
        self.backends.sync(snapshot.backends)
        metrics.watch_backends(lambda: self.backends.samples(asyncio.get_running_loop().time()))
        self.weights = RolloutWeights()  # effective split weights of routes with a rollout (hot path)
        metrics.watch_rules(lambda: self.rules.current, lambda: self.queue.depths(), self.weights.variants_for)
        self.ids = RequestIds()
        self.pool: ConnectionPool | None = None
        self.turns: dict[str, int] = {}  # per-pool request counter for round_robin
        self.inflight = 0  # client requests being served by this process
        self.client_key_hashes = frozenset(hash_api_key(k) for k in client_keys if k)
        self.model_stats: dict[str, ModelStats] = {}  # learned per upstream model (see pipeline/cost.py)
        self.queue = WaitQueue()
        self.health: HealthChecker | None = None  # exists only while the app runs
        self.shadows = ShadowMirror(self.backends, lambda: self.upstream, metrics, lambda: self.rules.current)
        self.store: Store = MemoryStore()  # app.py swaps in the configured one (Redis) and owns its lifecycle
        self.recent_assignments: RecentAssignments | None = None  # set by app.py in front of a shared store
        # Cached answers are large: embedded, they get their own byte-bounded LRU; with Redis, Redis holds them.
        self.cache_store: Store = MemoryStore(max_entries=CACHE_MAX_ENTRIES, max_bytes=CACHE_MAX_BYTES)
        self.cache = ResponseCache(self._cache_store, metrics)
        self.rng = random.Random()  # per-request split draws; tests seed it
        self.stats = RequestStats()  # per-variant counters and recent samples (status pages, rollouts)
        self.feedback = FeedbackLedger()  # request id -> variant, and client feedback scores per variant
        # Rollout state: app.py gives it the configured store (Redis); embedded, it keeps its own small store,
        # which sticky subjects filling the shared LRU can never evict.
        self.rollouts = RolloutController(self, MemoryStore(max_entries=1024))

    def _cache_store(self) -> Store:
        return self.cache_store if isinstance(self.store, MemoryStore) else self.store

    @property
    def upstream(self) -> ConnectionPool:
        """The connection pool; only while the app runs (created in app.py's cleanup_ctx)."""
        assert self.pool is not None, "the upstream pool exists only while the app runs"
        return self.pool

    def next_turn(self, pool_name: str) -> int:
        turn = self.turns.get(pool_name, 0)
        self.turns[pool_name] = turn + 1
        return turn


CONTEXT = web.AppKey("CONTEXT", ProxyContext)
