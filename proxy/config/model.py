"""The rule snapshot: immutable, fully resolved, built once per load by `config/loader.py`.

Durations are float seconds, globs are compiled, names are resolved to objects, so the request path
never parses or looks anything up by string. A snapshot is never edited: a reload builds a new one and
`RulesHolder` swaps it in one assignment; a request reads `holder.current` once and keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

BACKEND_KINDS = ("vllm", "llamacpp", "ollama", "tgi", "openai")
BALANCE_POLICIES = ("least_cost", "least_conn", "round_robin", "consistent_hash")
ENDPOINTS = ("chat", "completions", "embeddings", "responses", "messages", "rerank", "score")
# rollout.webhooks[].events: one per transition a rollout makes (`delivery/state.py` ACTIONS, past tense)
WEBHOOK_EVENTS = ("started", "advanced", "held", "promoted", "rolled_back", "paused", "resumed", "aborted")
DEFAULT_STICKY_TTL = 7 * 86400.0  # split.sticky.ttl when absent
DEFAULT_FEEDBACK_TTL = 3600.0  # feedback.ttl when absent
PRIORITIES = ("high", "normal", "low")  # a tenant's queue class is its index here: 0 is served first
NORMAL_PRIORITY = 1
DEFAULT_TENANT = "default"  # the tenant SPLITSTREAM_API_KEYS stands for


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-phase upstream limits in seconds (aiohttp `ClientTimeout` shape).

    connect: opening a connection to the backend.
    first_token: request sent → first byte of a streamed body (non-streamed bodies come whole, so for them
        only `total` applies: the runtime sends nothing before it is done).
    idle: gap between two chunks of a stream.
    total: the whole exchange.
    queue: how long a request may wait for a free backend slot (all at max_inflight) before a 429.
    heartbeat: streams only: once the first upstream byte is this late, the client's stream starts with SSE
        comments (`: keep-alive`) sent this often until it arrives, so idle timeouts on the way (a load
        balancer's 60 s) do not cut a long prefill. 0 turns it off.
    """

    connect: float = 2.0
    first_token: float = 60.0
    idle: float = 30.0
    total: float = 600.0
    queue: float = 5.0
    heartbeat: float = 15.0


@dataclass(frozen=True, slots=True)
class Tls:
    """How an https:// backend is verified (`upstream/tls.py` turns it into an `ssl.SSLContext`).

    Default: the system trust store, hostname verification against the URL's host. `ca_file`: trust these
    CAs instead (a private CA); `server_name`: the name sent in SNI and checked in the certificate when it
    is not the URL's host (a runtime reached by IP); `verify: false` accepts any certificate."""

    ca_file: str | None = None
    verify: bool = True
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class Backend:
    """One runtime endpoint. `identity` decides whether live state carries over a reload."""

    name: str
    url: str
    host: str
    port: int
    base_path: str  # '' or '/prefix' without trailing slash; request paths are appended
    authority: str = ""  # the Host header: host, [v6 host], with :port unless the scheme's default
    tls: Tls | None = None  # set for https:// URLs
    kind: str = "openai"
    weight: float = 1.0
    max_inflight: int = 0  # 0 = unlimited
    concurrency: int = 1  # the runtime's batch slots (vLLM max_num_seqs, llama.cpp --parallel); more wait there
    cache_tokens: int = 0  # the runtime's prefix (KV) cache in tokens; 0 = learned from what it reports
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.authority:  # built by hand (tests, tools): the loader always sets it
            object.__setattr__(self, "authority", f"{self.host}:{self.port}")

    @property
    def identity(self) -> tuple[str, str]:
        return (self.name, self.url)


@dataclass(frozen=True, slots=True)
class Pool:
    """Backends serving one model. `model` is the name the runtime knows; None passes the client's through."""

    name: str
    backends: tuple[Backend, ...]
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Variant:
    """A weighted share of a route's traffic, served by one pool (Envoy: weighted cluster)."""

    name: str
    pool: Pool
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Sticky:
    """How a split keeps a subject on one variant: who the subject is, and how long the assignment lasts.

    by: 'header' (the `header` request header's value), 'user' (the body's OpenAI `user` field) or
        'api_key' (a hash of the client's bearer key). `split.sticky.by: none` is no `Sticky` at all.
    """

    by: str
    header: str | None = None  # lower-cased header name when by == 'header'
    ttl: float = DEFAULT_STICKY_TTL


@dataclass(frozen=True, slots=True)
class Subject:
    """Whose key a request carries (`consistent_hash`'s `by`, in `split.sticky.by`'s syntax): a header's
    value ('header'), the body's `user` ('user'), or a hash of the bearer key ('api_key')."""

    by: str
    header: str | None = None  # lower-cased header name when by == 'header'


@dataclass(frozen=True, slots=True)
class Balance:
    """How a pool picks a backend (`balance:`). `prefix`: least_cost prices what each runtime's prefix cache
    probably holds (`upstream/prefix.py`); `by`: the key consistent_hash keeps on one backend (requests
    without one go by least_cost)."""

    policy: str = "least_cost"
    prefix: bool = True
    by: Subject | None = None


@dataclass(frozen=True, slots=True)
class Shadow:
    """Mirror a sampled share of a route's traffic to a pool; the client never waits for or sees it.

    At most `max_concurrency` copies are in flight per route and pool, `max_queue` more wait; beyond that
    copies are dropped (and counted), so shadows can never exhaust memory or connections.
    """

    pool: Pool
    sample: float = 1.0
    max_concurrency: int = 8
    max_queue: int = 64


@dataclass(frozen=True, slots=True)
class CacheRule:
    """Result cache for a route: entries live `ttl` seconds; answers over `max_entry_bytes` are not kept.

    Entries are per tenant (hashed client key) unless `shared`."""

    ttl: float
    max_entry_bytes: int = 1024 * 1024
    shared: bool = False


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where a rollout's transitions are POSTed (JSON, `delivery/webhooks.py`), and which of them."""

    url: str  # http:// or https://
    events: tuple[str, ...] = WEBHOOK_EVENTS


@dataclass(frozen=True, slots=True)
class Rollout:
    """Progressive delivery of one route's `candidate` variant against its `baseline` (`proxy/delivery/`).

    While it runs the candidate takes `steps[i]` % of the route's traffic and the baseline the rest (other
    variants 0), each step lasting at least `interval` seconds and passing the analysis (at `confidence`, on
    at least `min_requests` per side) before the next. `digest` hashes these fields but `confirm_promotion`
    and `webhooks`: it keys the rollout's stored state, so editing the block starts a new rollout and editing
    anything else (those two included) does not. `confirm_promotion`: the last step waits for an operator's
    promote instead of promoting by itself."""

    candidate: str
    baseline: str
    steps: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 100.0)  # candidate %, increasing, ending at 100
    interval: float = 300.0
    min_requests: int = 200
    max_error_rate_delta: float = 0.01  # candidate error rate may exceed the baseline's by this much
    max_p95_ratio: float = 1.2  # candidate p95 latency / baseline p95 beyond which "slower" fails
    max_ttft_p95_ratio: float = 1.2
    confidence: float = 0.95
    confirm_promotion: bool = False
    webhooks: tuple[Webhook, ...] = ()
    digest: str = ""


@dataclass(frozen=True, slots=True)
class FeedbackRule:
    """Client scores of a route's answers (POST /v1/feedback, `pipeline/feedback.py`).

    A finite score is clamped to [min, max]; an unset bound clamps nothing on its side. Any replica sharing
    the store can join a score to its answer for `ttl` seconds (the request -> variant join kept in the store)."""

    min: float | None = None
    max: float | None = None
    ttl: float = DEFAULT_FEEDBACK_TTL

    def clamp(self, score: float) -> float:
        if self.min is not None and score < self.min:
            return self.min
        if self.max is not None and score > self.max:
            return self.max
        return score


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's limits, shared by every replica through the store (`pipeline/limits.py`); None = unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion
    tokens_per_day: int | None = None
    max_concurrent: int | None = None  # requests in flight across the fleet

    @property
    def any(self) -> bool:
        return any(limit is not None for limit in (self.requests_per_minute, self.tokens_per_minute,
                                                   self.tokens_per_day, self.max_concurrent))


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who a client key belongs to: the routes it may use, its place in a saturated queue, its limits."""

    name: str
    routes: tuple[str, ...] = ()  # route-name globs as written; () = every route
    route_pattern: re.Pattern[str] | None = None  # `routes` compiled into one; None = every route
    priority: int = NORMAL_PRIORITY  # index into PRIORITIES
    limits: TenantLimits = TenantLimits()

    def may_use(self, route: str) -> bool:
        return self.route_pattern is None or self.route_pattern.fullmatch(route) is not None

    @property
    def priority_name(self) -> str:
        return PRIORITIES[self.priority]


@dataclass(frozen=True, slots=True)
class Tenants:
    """The tenants of a snapshot. Empty (no `tenants:` and no SPLITSTREAM_API_KEYS): the /v1 API is open.

    `by_key` maps the SHA-256 hex of every key to its tenant; the keys themselves are not kept."""

    by_key: Mapping[str, Tenant] = field(default_factory=dict)
    all: tuple[Tenant, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.all)


@dataclass(frozen=True, slots=True)
class Route:
    """Which requests (model globs, optional endpoints) go to which variants, with what limits."""

    name: str
    models: tuple[str, ...]  # patterns as written; fnmatch globs
    model_pattern: re.Pattern[str]  # all patterns compiled into one
    endpoints: tuple[str, ...]  # subset of ENDPOINTS; empty = all
    variants: tuple[Variant, ...]
    timeouts: Timeouts = Timeouts()
    balance: Balance = Balance()
    source: str = ""  # "file:line" where the route is defined, for messages
    retry_attempts: int = 3  # tries per request (first included), only before a byte reached the client
    runtime_load: bool = False  # fold the runtimes' own queue depth (their /metrics) into the balancer
    shadows: tuple[Shadow, ...] = ()
    cache: CacheRule | None = None
    sticky: Sticky | None = None  # None: each request draws its variant by weight
    rollout: Rollout | None = None  # weights come from the rollout's state while it exists
    feedback: FeedbackRule = FeedbackRule()  # score range, and how long any replica can join a score
    tenants: frozenset[str] = frozenset()  # match.tenants: only these tenants' requests match; empty = all
    # Pools tried in order when the chosen variant's pool cannot answer before a byte reached the client.
    fallback: tuple[Pool, ...] = ()
    max_tokens: int | None = None  # cap on a request's max_tokens / max_completion_tokens (set when absent)
    forward_headers: tuple[str, ...] = ()  # `headers.forward`: client headers sent on (lower-case names)

    def matches(self, model: str, endpoint: str) -> bool:
        if self.endpoints and endpoint not in self.endpoints:
            return False
        return self.model_pattern.fullmatch(model) is not None

    def serves(self, tenant: Tenant | None) -> bool:
        """Whether this tenant's requests may take the route (`match.tenants`, and the tenant's `routes`)."""
        if tenant is None:
            return not self.tenants
        return (not self.tenants or tenant.name in self.tenants) and tenant.may_use(self.name)

    @property
    def advertised_models(self) -> tuple[str, ...]:
        """Model names listed in /v1/models: the patterns that are plain names, not globs."""
        return tuple(m for m in self.models if not any(c in m for c in "*?["))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Process-wide limits, from the optional `server:` block."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_inflight: int = 4096  # requests in flight in this process before 429
    drain_timeout: float = 30.0
    max_queue: int = 1024  # requests waiting per pool for a backend slot before 429
    read_timeout: float = 30.0  # a client's request head, and its body, must arrive within this (else 408)
    max_event_bytes: int = 1024 * 1024  # one SSE event from a runtime; longer ends the stream with an error
    max_upstream_body_bytes: int = 64 * 1024 * 1024  # a non-streamed runtime answer; longer is a 502
    secure_cookies: bool = False  # the UI's cookie is Secure: set it behind a TLS-terminating proxy


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Active probes and passive ejection (Envoy: health checks + outlier detection), the `health:` block.

    interval: probe period for healthy backends; unhealthy_interval: for ejected/unhealthy ones (faster, to
    re-admit quickly). failures: consecutive failed requests, or missed probes, that eject a backend.
    ejection: first ejection time; it doubles with each ejection in a row, capped by max_ejection.
    panic_threshold: percent; when fewer of a pool's backends than this are healthy, the pool routes to all
    of them but those throttled by Retry-After (Envoy's panic routing), since health checks that find most
    of a pool dead are more likely wrong than right, and an outage is certain otherwise. 0 turns it off.
    """

    interval: float = 5.0
    unhealthy_interval: float = 1.0
    timeout: float = 1.0
    failures: int = 5
    ejection: float = 5.0
    max_ejection: float = 300.0
    panic_threshold: float = 50.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the rule files say, merged. `files` is ((path, sha256), ...) for /admin/rules."""

    backends: tuple[Backend, ...]
    pools: tuple[Pool, ...]
    routes: tuple[Route, ...]
    server: ServerSettings = ServerSettings()
    health: HealthSettings = HealthSettings()
    files: tuple[tuple[str, str], ...] = ()
    generation: int = 0
    tenants: Tenants = Tenants()

    def match(self, model: str, endpoint: str, tenant: Tenant | None = None) -> Route | None:
        """First route in file order whose patterns match and that serves the tenant; rule files decide
        precedence, not specificity. A route the tenant may not use is passed over as if absent, so a
        forbidden model looks exactly like an unknown one."""
        for route in self.routes:
            if route.matches(model, endpoint) and route.serves(tenant):
                return route
        return None

    def advertised_models(self, tenant: Tenant | None = None) -> tuple[str, ...]:
        """Plain model names of the routes the tenant may use, in rule order, each once."""
        seen: dict[str, None] = {}
        for route in self.routes:
            if route.serves(tenant):
                for name in route.advertised_models:
                    seen.setdefault(name, None)
        return tuple(seen)


class RulesHolder:
    """Holds the running snapshot; replacing it is one assignment, so readers never see half a reload."""

    __slots__ = ("current",)

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot

    def swap(self, snapshot: Snapshot) -> None:
        self.current = snapshot


RULES = web.AppKey("RULES", RulesHolder)
