"""Building routes from their rule-file entries: match, pool or split, sticky, timeouts, retry, shadows,
cache and rollout, each validated with file:line messages and resolved against the defined pools.
Called by `config/loader.py`; glob shadowing between routes is `config/globs.py`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from proxy.config.durations import parse_size
from proxy.config.keys import (
    CACHE_KEYS,
    DEFAULT_RETRY_ATTEMPTS,
    FEEDBACK_KEYS,
    HEADERS_KEYS,
    MATCH_KEYS,
    RETRY_KEYS,
    ROLLOUT_DEFAULTS,
    ROLLOUT_KEYS,
    ROUTE_KEYS,
    SHADOW_DEFAULTS,
    SHADOW_KEYS,
    SPLIT_KEYS,
    STICKY_BY_FIXED,
    STICKY_KEYS,
    VARIANT_KEYS,
    WEBHOOK_KEYS,
)
from proxy.config.model import (
    Balance,
    DEFAULT_STICKY_TTL,
    ENDPOINTS,
    WEBHOOK_EVENTS,
    CacheRule,
    FeedbackRule,
    Pool,
    Rollout,
    Route,
    Shadow,
    Sticky,
    Timeouts,
    Variant,
    Webhook,
)
from proxy.config.sections import HEADER_TOKEN, balance_from, reference, references, subject_from, timeouts_from
from proxy.config.yamlread import (
    Entry,
    Errors,
    Loc,
    Map,
    Reader,
    Seq,
    is_number,
    read_mapping,
    show,
    suggest,
)

UNFORWARDABLE_HEADERS = frozenset({
    "authorization", "x-api-key", "cookie", "host", "content-length", "content-type", "transfer-encoding",
    "connection", "keep-alive", "te", "trailer", "upgrade", "expect", "accept", "accept-encoding",
    "content-encoding", "x-request-id", "traceparent", "tracestate", "baggage", "anthropic-version",
    "anthropic-beta",
})

@dataclass(slots=True)
class RouteContext:
    """What every route is resolved against."""

    pools: Mapping[str, Pool | None]
    timeouts: Timeouts
    balance: Balance
    errors: Errors
    tenants: Mapping[str, object] = field(default_factory=dict)  # defined tenant names (valid or not)
    seen: dict[str, Loc] = field(default_factory=dict)


def _route_label(value: object) -> str:
    name = value.get("name") if isinstance(value, Map) else None
    return f"route {name!r}" if isinstance(name, str) and name.strip() else "route"


def _route_name(reader: Reader, entry: Entry, seen: dict[str, Loc]) -> str | None:
    name = reader.text("name", required=True)
    if name is None:
        return None
    if name in seen:
        reader.errors.add(reader.at("name"), f"duplicate route {name!r} (first defined at {seen[name]})")
        return None
    seen[name] = entry.loc
    return name


def _match_models(reader: Reader) -> tuple[str, ...]:
    if not reader.has("model"):
        reader.fail("model", "match.model is required")
        return ()
    raw = reader.get("model")
    models = (raw,) if isinstance(raw, str) else tuple(raw) if isinstance(raw, Seq) else ()
    if not models or not all(isinstance(m, str) and m.strip() for m in models):
        reader.fail("model", f"match.model must be a model name or glob, or a non-empty list of them, "
                             f"got {show(raw)}")
        return ()
    return models


def _match_endpoints(reader: Reader) -> tuple[str, ...]:
    if not reader.has("endpoints"):
        return ()
    raw = reader.get("endpoints")
    if not isinstance(raw, Seq) or not raw:
        reader.fail("endpoints", f"match.endpoints must be a non-empty list of {', '.join(ENDPOINTS)} "
                                 f"(omit it to match every endpoint), got {show(raw)}")
        return ()
    for endpoint in raw:
        if endpoint not in ENDPOINTS:
            hint = suggest(endpoint, ENDPOINTS) if isinstance(endpoint, str) else ""
            reader.fail("endpoints", f"match.endpoints: unknown endpoint {show(endpoint)}{hint}, "
                                     f"expected one of {', '.join(ENDPOINTS)}")
    return tuple(dict.fromkeys(e for e in raw if e in ENDPOINTS))


def _match(reader: Reader, ctx: RouteContext) -> tuple[tuple[str, ...], tuple[str, ...], frozenset[str]]:
    if not reader.has("match"):
        reader.fail("match", "match is required (at least match.model)")
        return (), (), frozenset()
    match = reader.mapping("match")
    if match is None:
        return (), (), frozenset()
    match.check_keys(MATCH_KEYS)
    return _match_models(match), _match_endpoints(match), _match_tenants(match, ctx)


def _match_tenants(reader: Reader, ctx: RouteContext) -> frozenset[str]:
    if not reader.has("tenants"):
        return frozenset()
    raw = reader.get("tenants")
    if not isinstance(raw, Seq) or not raw or not all(isinstance(name, str) for name in raw):
        reader.fail("tenants", f"match.tenants must be a non-empty list of tenant names, got {show(raw)}")
        return frozenset()
    for name in raw:
        reference(reader, "tenants", "tenant", name, ctx.tenants)
    return frozenset(raw)


def _pool_ref(reader: Reader, key: str, ctx: RouteContext) -> Pool | None:
    name = reader.text(key, required=True)
    if name is None or not reference(reader, key, "pool", name, ctx.pools):
        return None
    return ctx.pools[name]


def _variant(item: object, line: int, reader: Reader, ctx: RouteContext, names: set[str]) -> Variant | None:
    loc = reader.loc.at(line)
    variant = read_mapping(item, f"{reader.label} split variant", loc, ctx.errors, " with name, pool, weight")
    if variant is None:
        return None
    name = variant.text("name", required=True)
    if name is not None:
        variant.label = f"{reader.label} variant {name!r}"
        if name in names:
            variant.fail("name", "name is used twice in this split")
        names.add(name)
    variant.check_keys(VARIANT_KEYS)
    pool = _pool_ref(variant, "pool", ctx)
    weight = variant.number("weight", 1.0, minimum=0, inclusive=True)
    if variant.failed or pool is None or name is None:
        return None
    return Variant(name=name, pool=pool, weight=weight)


def _sticky(reader: Reader | None) -> Sticky | None:
    """`split.sticky` as the snapshot holds it; None for `by: none`, an absent block, or an invalid one."""
    if reader is None:
        return None
    reader.check_keys(STICKY_KEYS)
    subject = subject_from(reader, "by", STICKY_BY_FIXED, required=True)
    ttl = reader.duration("ttl", DEFAULT_STICKY_TTL, positive=True)
    if reader.failed or subject is None:
        return None
    return Sticky(by=subject.by, header=subject.header, ttl=ttl)


def _route_sticky(reader: Reader) -> Sticky | None:
    """The route's `split.sticky`; a `split` that is not a mapping was already reported by `_split`."""
    split = reader.get("split")
    if not isinstance(split, Map):
        return None
    return _sticky(Reader(split, reader.label, reader.loc, reader.errors, "split.").mapping("sticky"))


def _split(reader: Reader, ctx: RouteContext) -> tuple[Variant, ...]:
    split = reader.mapping("split")
    if split is None:
        return ()
    split.check_keys(SPLIT_KEYS)
    raw = split.get("variants")
    if not isinstance(raw, Seq) or not raw:
        got = "nothing" if not split.has("variants") else show(raw)
        split.fail("variants", f"split.variants must be a non-empty list, got {got}")
        return ()
    names: set[str] = set()
    built = [_variant(item, line, reader, ctx, names) for item, line in zip(raw, raw.item_lines)]
    variants = tuple(v for v in built if v is not None)
    if len(variants) < len(built):  # a broken variant (or its pool) was reported; never a partial split
        return ()
    if all(v.weight == 0 for v in variants):
        split.fail("variants", "split weights are all 0 (at least one variant needs a weight > 0)")
    return variants


def _variants(reader: Reader, ctx: RouteContext) -> tuple[Variant, ...]:
    has_pool, has_split = reader.has("pool"), reader.has("split")
    if has_pool == has_split:
        got = "both" if has_pool else "neither"
        reader.fail("pool" if has_pool else "name", f"needs exactly one of 'pool' or 'split', got {got}")
        return ()
    if has_split:
        return _split(reader, ctx)
    pool = _pool_ref(reader, "pool", ctx)
    return (Variant(name=pool.name, pool=pool, weight=1.0),) if pool is not None else ()


def _compile_models(models: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in models))


def build_route(entry: Entry, ctx: RouteContext) -> Route | None:
    label = _route_label(entry.value)
    reader = read_mapping(entry.value, label, entry.loc, ctx.errors, " with name, match, and pool or split")
    if reader is None:
        return None
    reader.check_keys(ROUTE_KEYS)
    name = _route_name(reader, entry, ctx.seen)
    models, endpoints, tenants = _match(reader, ctx)
    variants = _variants(reader, ctx)
    sticky = _route_sticky(reader)
    balance = balance_from(reader, ctx.balance)
    timeouts = timeouts_from(reader.mapping("timeouts"), ctx.timeouts)
    attempts = _retry_attempts(reader.mapping("retry"))
    runtime_load = reader.boolean("runtime_load")
    shadows = _shadows(reader, ctx)
    cache_rule = _cache_rule(reader.mapping("cache"))
    rollout = _rollout(reader, variants)
    feedback = _feedback_rule(reader.mapping("feedback"))
    fallback = _fallback(reader, ctx)
    max_tokens = reader.integer("max_tokens", 0, minimum=1) if reader.has("max_tokens") else None
    forward_headers = _forward_headers(reader.mapping("headers"))
    if reader.failed or name is None or not models or not variants:
        return None
    return Route(name=name, models=models, model_pattern=_compile_models(models), endpoints=endpoints,
                 variants=variants, timeouts=timeouts, balance=balance, source=str(entry.loc),
                 retry_attempts=attempts, runtime_load=runtime_load, sticky=sticky, shadows=shadows,
                 cache=cache_rule, rollout=rollout, feedback=feedback, tenants=tenants, fallback=fallback,
                 max_tokens=max_tokens, forward_headers=forward_headers)


def _forward_headers(reader: Reader | None) -> tuple[str, ...]:
    """`headers.forward`: lower-cased names of client headers to send on. Credentials, hop-by-hop headers and
    the ones splitstream writes itself are refused: forwarding them would leak a client's key to a runtime
    or break the upstream exchange."""
    if reader is None:
        return ()
    reader.check_keys(HEADERS_KEYS)
    raw = reader.get("forward")
    if not isinstance(raw, Seq) or not raw or not all(isinstance(n, str) and HEADER_TOKEN.fullmatch(n) for n in raw):
        reader.fail("forward", f"headers.forward must be a non-empty list of header names, got {show(raw)}")
        return ()
    names = tuple(dict.fromkeys(name.lower() for name in raw))
    refused = [name for name in names if name in UNFORWARDABLE_HEADERS or name.startswith(("proxy-", "x-splitstream-"))]
    if refused:
        reader.fail("forward", f"headers.forward cannot include {', '.join(map(repr, refused))} (credentials, "
                               "hop-by-hop, or headers splitstream sets itself)")
        return ()
    return names


def _fallback(reader: Reader, ctx: RouteContext) -> tuple[Pool, ...]:
    """`fallback: [pool, ...]`: defined pools, each once (a pool already tried is skipped at request time, so
    listing a variant's own pool is allowed: it rescues the other variants)."""
    if not reader.has("fallback"):
        return ()
    return tuple(pool for pool in references(reader, "fallback", "pool", ctx.pools) if pool is not None)


def _rollout(reader: Reader, variants: tuple[Variant, ...]) -> Rollout | None:
    """`rollout: {candidate, baseline, steps, interval, ...}`: both names must be variants of the route's split."""
    block = reader.mapping("rollout")
    if block is None:
        return None
    block.check_keys(ROLLOUT_KEYS)
    if reader.has("pool"):
        reader.fail("rollout", "rollout needs a split (candidate and baseline variants), not a single pool")
        return None
    names = [variant.name for variant in variants]
    candidate = _rollout_variant(block, "candidate", names)
    baseline = _rollout_variant(block, "baseline", names)
    if candidate is not None and candidate == baseline:
        block.fail("baseline", "rollout.baseline must be another variant than rollout.candidate")
    base = ROLLOUT_DEFAULTS
    steps = _rollout_steps(block, base.steps)
    interval = block.duration("interval", base.interval, positive=True)
    min_requests = block.integer("min_requests", base.min_requests, minimum=1)
    delta = block.number("max_error_rate_delta", base.max_error_rate_delta, minimum=0, inclusive=True)
    if delta >= 1:
        block.fail("max_error_rate_delta", f"rollout.max_error_rate_delta must be < 1, got {delta:g}")
    p95 = block.number("max_p95_ratio", base.max_p95_ratio, minimum=1, inclusive=True)
    ttft_p95 = block.number("max_ttft_p95_ratio", base.max_ttft_p95_ratio, minimum=1, inclusive=True)
    confidence = block.number("confidence", base.confidence, minimum=0.5, inclusive=False)
    if confidence >= 1:
        block.fail("confidence", f"rollout.confidence must be < 1, got {confidence:g}")
    confirm = block.boolean("confirm_promotion")
    webhooks = _webhooks(block)
    if block.failed or candidate is None or baseline is None:
        return None
    # Not in the digest: adding a gate or a webhook to a running rollout must not start it afresh.
    fields = (candidate, baseline, steps, interval, min_requests, delta, p95, ttft_p95, confidence)
    digest = hashlib.sha256(repr(fields).encode()).hexdigest()[:16]
    return Rollout(candidate=candidate, baseline=baseline, steps=steps, interval=interval, min_requests=min_requests,
                   max_error_rate_delta=delta, max_p95_ratio=p95, max_ttft_p95_ratio=ttft_p95, confidence=confidence,
                   confirm_promotion=confirm, webhooks=webhooks, digest=digest)


def _webhooks(block: Reader) -> tuple[Webhook, ...]:
    """`rollout.webhooks: [{url, events}]`: http(s) URLs; events a subset of WEBHOOK_EVENTS (default all)."""
    if not block.has("webhooks"):
        return ()
    items = block.get("webhooks")
    if not isinstance(items, Seq):
        block.fail("webhooks", f"rollout.webhooks must be a list of {{url, events}} entries, got {show(items)}")
        return ()
    hooks: list[Webhook] = []
    for index, (item, line) in enumerate(zip(items, items.item_lines)):
        name = f"rollout.webhooks[{index}]"
        if not isinstance(item, Map):
            block.errors.add(block.loc.at(line), f"{block.label}: {name} must be a mapping with url and events, "
                                                 f"got {show(item)}")
            continue
        entry = Reader(item, block.label, block.loc, block.errors, f"{name}.")
        entry.check_keys(WEBHOOK_KEYS)
        url = _webhook_url(entry)
        events = _webhook_events(entry)
        if url is not None and not entry.failed:
            hooks.append(Webhook(url=url, events=events))
    return tuple(hooks)


def _webhook_url(entry: Reader) -> str | None:
    text = entry.text("url", required=True)
    if text is None:
        return None
    text = text.strip()
    parts = urlsplit(text)
    problem = None
    if parts.scheme.lower() not in ("http", "https") or not text.lower().startswith(("http://", "https://")):
        problem = "must start with http:// or https://"
    elif any(c.isspace() for c in text):
        problem = "must not contain spaces"
    elif "#" in text:
        problem = "must not have a fragment"
    elif "@" in parts.netloc:
        problem = "must not contain credentials (a token in its path or query is fine)"
    elif not parts.hostname:
        problem = "has no host"
    else:
        try:
            parts.port  # noqa: B018 - a property that raises on a non-numeric or out-of-range port
        except ValueError:
            problem = "has an invalid port"
    if problem is not None:
        entry.fail("url", f"{entry.name('url')} {text!r} {problem}")
        return None
    return text


def _webhook_events(entry: Reader) -> tuple[str, ...]:
    if not entry.has("events"):
        return WEBHOOK_EVENTS
    raw = entry.get("events")
    if not isinstance(raw, Seq) or not raw:
        entry.fail("events", f"{entry.name('events')} must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}; "
                             f"got {show(raw)}")
        return WEBHOOK_EVENTS
    events: list[str] = []
    for index, (item, line) in enumerate(zip(raw, raw.item_lines)):
        where = f"{entry.label}: {entry.name('events')}[{index}]"
        if not isinstance(item, str) or item not in WEBHOOK_EVENTS:
            hint = suggest(item, WEBHOOK_EVENTS) if isinstance(item, str) else ""
            entry.errors.add(entry.loc.at(line), f"{where} must be one of {', '.join(WEBHOOK_EVENTS)}, "
                                                 f"got {show(item)}{hint}")
        elif item in events:
            entry.errors.add(entry.loc.at(line), f"{where}: {item!r} is listed twice")
        else:
            events.append(item)
    return tuple(events)


def _rollout_variant(block: Reader, key: str, names: Sequence[str]) -> str | None:
    name = block.text(key, required=True)
    if name is not None and names and name not in names:
        block.fail(key, f"rollout.{key} {name!r} is not a variant of this route's split "
                        f"(variants: {', '.join(names)}){suggest(name, names)}")
        return None
    return name


def _rollout_steps(block: Reader, default: tuple[float, ...]) -> tuple[float, ...]:
    """Candidate percentages: numbers in (0, 100], strictly increasing, the last one 100."""
    if not block.has("steps"):
        return default
    raw = block.get("steps")
    if not isinstance(raw, Seq) or not raw:
        block.fail("steps", f"rollout.steps must be a non-empty list of percentages, got {show(raw)}")
        return default
    steps: list[float] = []
    for index, (item, line) in enumerate(zip(raw, raw.item_lines)):
        if not is_number(item) or not 0 < item <= 100:
            block.errors.add(block.loc.at(line), f"{block.label}: rollout.steps[{index}] must be a percentage "
                                                 f"in (0, 100], got {show(item)}")
        elif steps and item <= steps[-1]:
            block.errors.add(block.loc.at(line), f"{block.label}: rollout.steps must increase, got {item:g} "
                                                 f"after {steps[-1]:g}")
        else:
            steps.append(float(item))
    if len(steps) == len(raw) and steps[-1] != 100:
        block.fail("steps", f"rollout.steps must end at 100 (the candidate takes all traffic), got {steps[-1]:g}")
    return tuple(steps)


def _feedback_rule(reader: Reader | None) -> FeedbackRule:
    """`feedback: {min, max, ttl}`: finite bounds, min below max; an absent block clamps nothing."""
    default = FeedbackRule()
    if reader is None:
        return default
    reader.check_keys(FEEDBACK_KEYS)
    bounds: list[float | None] = []
    for key in ("min", "max"):
        value = reader.get(key)
        if value is not None and not is_number(value):
            reader.fail(key, f"{reader.name(key)} must be a finite number, got {show(value)}")
            value = None
        bounds.append(None if value is None else float(value))
    low, high = bounds
    if low is not None and high is not None and low >= high:
        reader.fail("max", f"feedback.max must be greater than feedback.min, got min {low:g} and max {high:g}")
    ttl = reader.duration("ttl", default.ttl, positive=True)
    return FeedbackRule(min=low, max=high, ttl=ttl)


def _cache_rule(reader: Reader | None) -> CacheRule | None:
    """`cache: {ttl, max_entry_bytes, shared}`; ttl is required (an entry must expire)."""
    if reader is None:
        return None
    reader.check_keys(CACHE_KEYS)
    if not reader.has("ttl"):
        reader.fail("ttl", "cache.ttl is required")
    default = CacheRule(ttl=1.0)
    ttl = reader.duration("ttl", default.ttl, positive=True)
    max_bytes = default.max_entry_bytes
    if reader.has("max_entry_bytes"):
        try:
            max_bytes = parse_size(reader.get("max_entry_bytes"))
        except ValueError as exc:
            reader.fail("max_entry_bytes", f"cache.max_entry_bytes: {exc}")
    shared = reader.boolean("shared")
    return CacheRule(ttl=ttl, max_entry_bytes=max_bytes, shared=shared)


def _shadows(reader: Reader, ctx: RouteContext) -> tuple[Shadow, ...]:
    """`shadow: [{pool, sample, max_concurrency, max_queue}, ...]`: each pool mirrored at most once."""
    if not reader.has("shadow"):
        return ()
    items = reader.get("shadow")
    if not isinstance(items, Seq):
        reader.fail("shadow", f"shadow must be a list of {{pool, sample}} entries, got {show(items)}")
        return ()
    shadows: list[Shadow] = []
    for item, line in zip(items, items.item_lines):
        entry = read_mapping(item, f"{reader.label} shadow", reader.loc.at(line), ctx.errors, " with pool and sample")
        if entry is None:
            continue
        entry.check_keys(SHADOW_KEYS)
        pool = _pool_ref(entry, "pool", ctx)
        sample = entry.number("sample", 1.0, minimum=0, inclusive=True)
        if sample > 1:
            entry.fail("sample", f"sample must be between 0 and 1, got {show(entry.get('sample'))}")
        concurrency = entry.integer("max_concurrency", SHADOW_DEFAULTS.max_concurrency, minimum=1)
        queue = entry.integer("max_queue", SHADOW_DEFAULTS.max_queue, minimum=0)
        if pool is not None and any(s.pool.name == pool.name for s in shadows):
            entry.fail("pool", f"pool {pool.name!r} is mirrored twice")
        elif pool is not None and not entry.failed:
            shadows.append(Shadow(pool=pool, sample=sample, max_concurrency=concurrency, max_queue=queue))
    return tuple(shadows)


def _retry_attempts(reader: Reader | None) -> int:
    if reader is None:
        return DEFAULT_RETRY_ATTEMPTS
    reader.check_keys(RETRY_KEYS)
    return reader.integer("attempts", DEFAULT_RETRY_ATTEMPTS, minimum=1)
