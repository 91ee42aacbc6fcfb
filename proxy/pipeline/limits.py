"""Tenant limits on the request path: a reservation before dispatch, a settlement when the answer ends.

Policy lives here; the numbers live in the store (`store/quota.py`: GCRA per rate, expiring leases for
concurrency), so every replica enforces the same limit. A limited tenant's request claims, in one atomic
step: 1 of `requests_per_minute`; its estimated tokens of `tokens_per_minute` and `tokens_per_day` (prompt
bytes over the pool's learned bytes per token, plus `max_tokens` or else the learned completion length; capped
at the limit, so one request always fits an idle window); and a lease of `max_concurrent`. When the request
ends (`settle`), the reported usage replaces the estimate — a short answer or a cut stream gives tokens
back, a longer one is charged (a debt later requests wait out) — and the lease is released.

Round trips. A claim waits for the store; settlements, releases and lease renewals never make a request
wait: they ride the next claim's batch, or go on their own after SETTLE_SECONDS. One task (`run`) sends
batches: whatever arrived while one was in flight goes in the next, so at low load a request costs one
round trip and under load many share one EVALSHA.

Store down. The same claims go to an in-process `QuotaTable`: limits then hold per replica (the fleet may
admit up to replicas × limit), counted in splitstream_tenant_limit_fallbacks_total and logged once per
outage, never a failed request. Settlements go where their claim was decided. A replica that crashes
leaves leases that run out after LEASE_TTL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import replace

from aiohttp import web

from proxy.config.model import Tenant
from proxy.errors import StoreUnavailableError, TenantLimitError
from proxy.observe.metrics import Metrics
from proxy.observe.record import CLIENT_CLOSED, NONE, RequestRecord
from proxy.pipeline.cost import Estimate
from proxy.store.base import Store
from proxy.store.quota import Adjust, Claim, QuotaBatch, QuotaTable, Rate, Slot, Verdict

log = logging.getLogger("splitstream.limits")

KEY_PREFIX = "splitstream:quota:"  # + tenant name + ":" + rpm | tpm | tpd | inflight
MINUTE, DAY = 60.0, 86400.0
LEASE_TTL = 30.0  # a lease nobody renews (its replica died) frees its slot after this long
RENEW_SECONDS = 10.0  # live leases are renewed this often: three chances before they would run out
# A cut stream reports no usage: its completion is priced by the bytes relayed, an OpenAI chunk carrying one
# token being ~130–200 bytes of JSON.
CUT_STREAM_BYTES_PER_TOKEN = 160.0
REQUESTS, TOKENS_MINUTE, TOKENS_DAY, CONCURRENT = (
    "requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent")
_HEADERS = {name: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
            for name, kind in ((REQUESTS, "requests"), (TOKENS_MINUTE, "tokens"), (TOKENS_DAY, "tokens"))}
# Settlements and lease releases wait at most this long for a claim to ride with (one round trip, not two,
# per request at low load); a claim right after a release on this replica sees it (releases go first).
SETTLE_SECONDS = 0.05
MAX_PLANS = 4096


class Ticket:
    """An admitted request's claim: what to settle and release when it ends, and where (store or local)."""

    __slots__ = ("token_rates", "slot", "prompt_estimate", "reserved", "shared")

    def __init__(self, token_rates: tuple[Rate, ...], slot: Slot | None, prompt_estimate: float, reserved: float,
                 shared: bool) -> None:
        self.token_rates = token_rates
        self.slot = slot
        self.prompt_estimate = prompt_estimate
        self.reserved = reserved
        self.shared = shared


class Plan:
    """One tenant's limits as its claims are built: made once per tenant and rules snapshot, so a request
    only fills in its token cost and its lease (and the answer's header values)."""

    __slots__ = ("tenant", "names", "_request_rate", "_token_limits", "_slot_key", "_slot_limit", "_headers")

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        limits = tenant.limits
        base = f"{KEY_PREFIX}{tenant.name}:"
        rpm = limits.requests_per_minute
        self._request_rate = Rate(base + "rpm", MINUTE, rpm, 1.0) if rpm else None
        self._token_limits = tuple((base + suffix, period, limit, name) for suffix, period, limit, name in (
            ("tpm", MINUTE, limits.tokens_per_minute, TOKENS_MINUTE), ("tpd", DAY, limits.tokens_per_day, TOKENS_DAY))
            if limit)
        self.names = ((REQUESTS,) if rpm else ()) + tuple(name for *_, name in self._token_limits)
        self._slot_key = base + "inflight" if limits.max_concurrent else ""
        self._slot_limit = limits.max_concurrent or 0
        # The requests limit, and the token limit with the shorter window: (header names, rate index, limit)
        shown = [REQUESTS] if rpm else []
        shown += [name for name in (TOKENS_MINUTE, TOKENS_DAY) if name in self.names][:1]
        self._headers = tuple((_HEADERS[name], self.names.index(name), str(getattr(limits, name))) for name in shown)

    def claim(self, tokens: float, lease: str) -> Claim:
        """One request estimated at `tokens` (capped at each limit: one request always fits an idle window)."""
        rates = tuple(Rate(key, period, limit, min(tokens, limit)) for key, period, limit, _ in self._token_limits)
        if self._request_rate is not None:
            rates = (self._request_rate, *rates)
        slot = Slot(self._slot_key, self._slot_limit, lease, LEASE_TTL) if self._slot_key else None
        return Claim(rates, slot)

    def probe(self) -> Claim:
        """A claim of every rate that takes nothing: its verdict says how much of each is spent."""
        return Claim(tuple(replace(rate, cost=0.0) for rate in self.claim(0.0, "").rates))

    def headers(self, verdict: Verdict) -> tuple[tuple[str, str], ...]:
        """OpenAI's x-ratelimit-* headers for an answer with this verdict."""
        headers: tuple[tuple[str, str], ...] = ()
        for (limit_name, remaining_name, reset_name), index, limit in self._headers:
            headers += ((limit_name, limit), (remaining_name, str(int(verdict.remaining[index]))),
                        (reset_name, go_duration(verdict.reset[index])))
        return headers


def reservation(est: Estimate, max_tokens: int | None) -> float:
    """Tokens reserved for a request: its prompt estimate plus what it may write (`max_tokens` when the
    client set one — what it may cost, as OpenAI reserves — else what the model usually writes)."""
    return est.prompt_tokens + (float(max_tokens) if max_tokens is not None else est.completion_tokens)


def tokens_used(record: RequestRecord, ticket: Ticket) -> float:
    """What the request really cost in tokens, as well as it can be known when it ends."""
    if record.backend == "cache":
        return 0.0  # answered without a runtime: token limits protect the GPUs
    if record.prompt_tokens is not None or record.completion_tokens is not None:
        return float((record.prompt_tokens or 0) + (record.completion_tokens or 0))
    if record.backend is NONE:
        return 0.0  # refused or failed before a runtime took it
    if record.bytes_out or record.status == CLIENT_CLOSED:  # a stream cut short: the prompt was prefilled
        return ticket.prompt_estimate + record.bytes_out / CUT_STREAM_BYTES_PER_TOKEN
    if record.error is None:
        return ticket.reserved  # answered without reporting usage: the estimate is all there is
    return 0.0  # the runtime failed before answering


def go_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: `20ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text


def refusal(tenant: Tenant, name: str, verdict: Verdict) -> TenantLimitError:
    limit = getattr(tenant.limits, name)
    wait = max(1, math.ceil(verdict.retry_after))
    return TenantLimitError(f"Rate limit reached for tenant '{tenant.name}' on {name} (limit {limit}); "
                            f"retry in {wait} s.", name, wait)


class Limiter:
    """Admits and settles limited tenants' requests. `store`: the store shared with the other replicas (None:
    this process alone, decided in-process without awaiting)."""

    __slots__ = ("_store", "_local", "_metrics", "_pending", "_adjusts", "_releases", "_renewals", "_wake",
                 "_live", "_down", "_leases", "_nonce", "_plans", "_settle_timer")

    def __init__(self, store: Store | None, metrics: Metrics, local: QuotaTable | None = None) -> None:
        self._store = store
        self._local = local if local is not None else QuotaTable()  # (an empty table is falsy)
        self._metrics = metrics
        self._pending: list[tuple[Claim, asyncio.Future[tuple[Verdict, bool]]]] = []
        self._adjusts: list[Adjust] = []
        self._releases: list[tuple[str, str]] = []
        self._renewals: list[tuple[str, str, float]] = []
        self._wake = asyncio.Event()
        self._live: dict[str, tuple[str, bool]] = {}  # lease -> (slot key, shared): renewed while it runs
        self._down = False
        self._leases = itertools.count()
        self._nonce = secrets.token_hex(6)
        self._plans: dict[str, Plan] = {}  # tenant name -> plan of its current Tenant (names come from the rules)
        self._settle_timer: asyncio.TimerHandle | None = None

    async def admit(self, tenant: Tenant, est: Estimate, max_tokens: int | None, record: RequestRecord) -> Ticket:
        """Claim the request's share of every limit of `tenant`; raises `TenantLimitError` when one is
        spent. Sets the x-ratelimit-* headers of the answer (refused or not) on `record`."""
        tokens = reservation(est, max_tokens)
        # unique across the fleet: replicas on different hosts may share a pid, forked workers share the nonce
        lease = f"{self._nonce}.{os.getpid()}.{next(self._leases)}" if tenant.limits.max_concurrent else ""
        plan = self.plan(tenant)
        claim, names = plan.claim(tokens, lease), plan.names
        if self._store is None:
            verdict, shared = self._local.apply(QuotaBatch(claims=(claim,)))[0], False
        else:
            future: asyncio.Future[tuple[Verdict, bool]] = asyncio.get_running_loop().create_future()
            self._pending.append((claim, future))
            self._wake.set()
            verdict, shared = await future
        record.limit_headers = plan.headers(verdict)
        if not verdict.admitted:
            name = names[verdict.refused] if verdict.refused < len(names) else CONCURRENT
            self._metrics.count_ratelimited(tenant.name, name)
            raise refusal(tenant, name, verdict)
        if claim.slot is not None:
            self._live[lease] = (claim.slot.key, shared)
        token_rates = tuple(rate for rate, name in zip(claim.rates, names) if name != REQUESTS)
        return Ticket(token_rates, claim.slot, est.prompt_tokens, tokens, shared)

    async def use(self, tenants: Sequence[Tenant]) -> dict[str, dict[str, float]]:
        """How much of each rate limit every limited tenant has spent right now, fleet-wide (0 to 1; above 1
        is a debt being repaid): GCRA's own state, read by claims that take nothing."""
        plans = [self.plan(tenant) for tenant in tenants if tenant.limits.any]
        probes = [(plan.tenant, plan.probe(), plan.names) for plan in plans]
        batch = QuotaBatch(claims=tuple(claim for _, claim, _ in probes))
        verdicts: list[Verdict] = []
        if self._store is not None:
            try:
                verdicts = await self._store.quota(batch)
            except StoreUnavailableError:
                pass  # what this replica counted meanwhile
        if not verdicts:
            verdicts = self._local.apply(batch)
        return {tenant.name: {name: verdict.reset[index] / claim.rates[index].period
                              for index, name in enumerate(names)}
                for (tenant, claim, names), verdict in zip(probes, verdicts, strict=True)}

    def plan(self, tenant: Tenant) -> Plan:
        plan = self._plans.get(tenant.name)
        if plan is None or plan.tenant is not tenant:  # new, or its rules were reloaded
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            plan = self._plans[tenant.name] = Plan(tenant)
        return plan

    def settle(self, ticket: Ticket, record: RequestRecord) -> None:
        """The request ended: charge what it used instead of the estimate, release its lease. Never waits."""
        used = tokens_used(record, ticket)
        adjusts = [Adjust(rate.key, rate.period, rate.limit, used - rate.cost) for rate in ticket.token_rates
                   if used != rate.cost]
        releases = [] if ticket.slot is None else [(ticket.slot.key, ticket.slot.lease)]
        if ticket.slot is not None:
            self._live.pop(ticket.slot.lease, None)
        self._queue(adjusts, releases, ticket.shared)

    def _queue(self, adjusts: list[Adjust], releases: list[tuple[str, str]], shared: bool) -> None:
        if not shared or self._store is None:
            if adjusts or releases:
                self._local.apply(QuotaBatch(adjusts=tuple(adjusts), releases=tuple(releases)))
            return
        self._adjusts += adjusts
        self._releases += releases
        if (adjusts or releases) and self._settle_timer is None:
            self._settle_timer = asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._settle_due)

    def _settle_due(self) -> None:
        self._settle_timer = None
        self._wake.set()

    async def run(self) -> None:
        """Send batches to the store until cancelled (`app.py` drains once more after cancelling)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.drain()

    async def renew(self) -> None:
        """Renew the live leases every RENEW_SECONDS until cancelled, so only a dead replica's run out."""
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            self.renew_now()

    def renew_now(self) -> None:
        """Renew every lease of a request still running: in-process ones at once, the store's in the next batch."""
        local = tuple((key, lease, LEASE_TTL) for lease, (key, shared) in self._live.items() if not shared)
        if local:
            self._local.apply(QuotaBatch(renewals=local))
        self._renewals += [(key, lease, LEASE_TTL) for lease, (key, shared) in self._live.items() if shared]
        if self._renewals:
            self._wake.set()

    async def drain(self) -> None:
        """Send what is queued, batch after batch, until nothing is left."""
        while self._pending or self._adjusts or self._releases or self._renewals:
            pending, self._pending = self._pending, []
            if self._settle_timer is not None:  # the settlements waiting for a claim go with this batch
                self._settle_timer.cancel()
                self._settle_timer = None
            batch = QuotaBatch(claims=tuple(claim for claim, _ in pending), adjusts=tuple(self._adjusts),
                               releases=tuple(self._releases), renewals=tuple(self._renewals))
            self._adjusts, self._releases, self._renewals = [], [], []
            verdicts, shared = await self._decide(batch)
            for (claim, future), verdict in zip(pending, verdicts, strict=True):
                if not future.done():
                    future.set_result((verdict, shared))
                elif verdict.admitted:  # its request left while the store decided: give its claim back
                    self._queue(_give_back(claim), [] if claim.slot is None else [(claim.slot.key, claim.slot.lease)],
                                shared)

    async def _decide(self, batch: QuotaBatch) -> tuple[list[Verdict], bool]:
        """The store's verdicts, or this process's when the store cannot answer (settlements then lost)."""
        assert self._store is not None
        try:
            verdicts = await self._store.quota(batch)
        except Exception as exc:  # StoreUnavailableError, or a bug: either way never a failed request
            if not isinstance(exc, StoreUnavailableError):
                log.exception("tenant limits: store call failed; deciding in-process")
            elif not self._down:
                log.warning("tenant limits: store unavailable (%s); enforcing limits per replica until it "
                            "answers", exc)
            self._down = True
            if batch.claims:
                self._metrics.tenant_limit_fallbacks_total.inc(len(batch.claims))
            return self._local.apply(QuotaBatch(claims=batch.claims)), False
        if self._down:
            log.info("tenant limits: store answers again; limits are fleet-wide again")
            self._down = False
        return verdicts, True


def _give_back(claim: Claim) -> list[Adjust]:
    return [Adjust(rate.key, rate.period, rate.limit, -rate.cost) for rate in claim.rates]


LIMITER = web.AppKey("LIMITER", Limiter)
