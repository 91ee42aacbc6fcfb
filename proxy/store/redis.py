"""The Redis store (`redis.asyncio`): what makes replicas agree. Needs Redis >= 7.0 (SET ... NX GET).

Owns the one boundary where redis-py errors become `StoreUnavailableError`, short socket timeouts, and
a circuit breaker (`store/breaker.py`) so a dead Redis costs no latency: while it is open, calls fail at
once without touching the network, and one probe per cooldown finds out when Redis is back. Outages are
logged once when they begin and once when they end, never per request. Keys and values are never logged.
Quotas run as one Lua script per batch (EVALSHA, on the server's clock) so every replica shares the limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import struct
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError, NoScriptError, RedisError

from proxy.errors import StoreUnavailableError
from proxy.store.breaker import Admission, Breaker
from proxy.store.quota import Claim, QuotaBatch, Verdict

log = logging.getLogger("splitstream.store")

# Loopback or same-rack Redis answers in well under a millisecond; 100 ms means it is not answering,
# and the request is better served by the fallback than by waiting.
DEFAULT_TIMEOUT = 0.1
# Calls in flight at once (= connections at most). A call takes ~0.1 ms, so a few dozen carry thousands
# of requests/s; beyond this a call falls back at once rather than queue behind a slow Redis or open a
# burst of new connections (a busy proxy is not a Redis outage: the breaker is not told).
DEFAULT_MAX_CONNECTIONS = 64
_BIG_ENDIAN = sys.byteorder == "big"  # the quota script's doubles are little-endian


class RedisStore:
    """`Store` on Redis. `calls` counts commands actually sent (tests assert the breaker stops them)."""

    __slots__ = ("_client", "_execute", "_breaker", "_clock", "_active", "_max_active", "where", "calls")

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cooldown: float = 1.0,
        max_cooldown: float = 10.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raises ValueError for a URL redis-py cannot use. Connects lazily (first call, or `start`)."""
        pool = ConnectionPool.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # never retry inside a request: the breaker decides when to try again
            max_connections=max_connections,
            health_check_interval=0,
        )
        self._client = Redis.from_pool(pool)
        # redis-py leaves execute_command unannotated; every command here goes through it.
        self._execute = cast(Callable[..., Awaitable[Any]], self._client.execute_command)
        self._breaker = Breaker(cooldown, max_cooldown)
        self._clock = clock
        kwargs = pool.connection_kwargs
        # host:port or the socket path for logs, never the URL (it may carry a password)
        self.where = str(kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}")
        self.calls = 0
        self._active = 0
        self._max_active = max_connections

    @property
    def breaker(self) -> Breaker:
        return self._breaker

    async def _call(self, *args: Any, **options: Any) -> Any:
        return await self._guarded(lambda: self._execute(*args, **options))

    async def _pipelined(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one round trip (not a transaction: each is atomic, the batch is not)."""
        def send() -> Awaitable[list[Any]]:
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return cast(Awaitable[list[Any]], pipe.execute())
        return cast(list[Any], await self._guarded(send))

    async def _guarded(self, send: Callable[[], Awaitable[Any]]) -> Any:
        """One exchange with Redis behind the breaker and the in-flight bound; redis-py errors become
        `StoreUnavailableError` here and nowhere else."""
        if self._active >= self._max_active:
            raise StoreUnavailableError("redis busy (too many calls in flight)")
        admission = self._breaker.admit(self._clock())
        if admission is Admission.DENY:
            raise StoreUnavailableError("redis unavailable (circuit open)")
        self.calls += 1
        self._active += 1
        try:
            result = await send()
        except MaxConnectionsError as exc:
            self._breaker.abandoned(admission)
            raise StoreUnavailableError("redis connection limit reached") from exc
        except (RedisError, OSError) as exc:
            if self._breaker.failed(self._clock(), admission):
                log.warning("redis unavailable: %s (%s); falling back, next try in %.1fs",
                            _describe(exc), self.where, self._breaker.cooldown)
            raise StoreUnavailableError(f"redis: {_describe(exc)}") from exc
        except asyncio.CancelledError:  # the client went away: says nothing about Redis
            self._breaker.abandoned(admission)
            raise
        finally:
            self._active -= 1
        if self._breaker.succeeded(admission):
            log.info("redis back (%s) after %.1fs", self.where, self._clock() - self._breaker.opened_at)
        return result

    async def get(self, key: str) -> bytes | None:
        value = await self._call("GET", key)
        return None if value is None else bytes(value)

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        # One round trip for hit and miss alike: SET NX GET answers the old value (untouched) or nil (set).
        existing = await self._call("SET", key, value, "NX", "GET", "PX", _millis(ttl), get=True)
        return None if existing is None else bytes(existing)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._call("SET", key, value, "PX", _millis(ttl))

    async def delete(self, key: str) -> None:
        await self._call("DEL", key)

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes, ttl: float) -> bool:
        present = b"0" if expected is None else b"1"
        stored = await self._call("EVAL", _CAS_SCRIPT, 1, key, present, expected or b"", value, _millis(ttl))
        return bool(stored)

    async def set_many(self, values: Mapping[str, bytes], ttl: float) -> None:
        if values:
            await self._pipelined([("SET", key, value, "PX", _millis(ttl)) for key, value in values.items()])

    async def add_counts(self, increments: Mapping[str, Mapping[str, float]], ttl: float) -> None:
        commands: list[tuple[Any, ...]] = []
        for key, fields in increments.items():
            commands.extend(("HINCRBYFLOAT", key, name, repr(float(amount))) for name, amount in fields.items()
                            if math.isfinite(amount))  # Redis refuses inf/nan: they would trip the breaker
            commands.append(("PEXPIRE", key, _millis(ttl)))
        if commands:
            await self._pipelined(commands)

    async def read_counts(self, keys: Sequence[str]) -> list[dict[str, float]]:
        if not keys:
            return []
        replies = await self._pipelined([("HGETALL", key) for key in keys])
        return [{_text(name): float(number) for name, number in _pairs(reply)} for reply in replies]

    async def quota(self, batch: QuotaBatch) -> list[Verdict]:
        if not (batch.claims or batch.adjusts or batch.releases or batch.renewals):
            return []
        keys, argv = _quota_args(batch)
        reply = await self._guarded(lambda: self._eval_quota(keys, argv))
        return _verdicts(batch.claims, reply)

    async def _eval_quota(self, keys: list[str], argv: list[str | bytes]) -> bytes:
        try:
            reply = await self._execute("EVALSHA", _QUOTA_SHA, len(keys), *keys, *argv)
        except NoScriptError:  # first use on this server, or it restarted: EVAL runs the script and caches it
            reply = await self._execute("EVAL", _QUOTA_SCRIPT, len(keys), *keys, *argv)
        return bytes(reply)

    async def start(self) -> None:
        """Check Redis once at startup, so a wrong URL or a dead server is logged before traffic arrives."""
        try:
            await self._call("PING")
        except StoreUnavailableError:
            return  # logged by _call; requests fall back until the breaker's probe succeeds
        log.info("redis store at %s", self.where)

    async def close(self) -> None:
        await self._client.aclose()


# compare_and_set: ARGV = present-flag ("0": expect absent), expected, value, ttl in ms.
_CAS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if current then return 0 end
elseif current ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
"""

# quota: the rules of store/quota.py in one atomic script. KEYS: every key the batch touches, once. ARGV[1]: the
# batch's numbers as little-endian doubles (Lua's tonumber costs ~0.25 us per number, struct.unpack a fraction of
# that, and redis-py frames one blob instead of hundreds of arguments); ARGV[2...]: the leases. Numbers name keys
# and leases by index into KEYS and ARGV:
#   counts  adjusts releases renewals claims
#   adjust  k period limit delta | release k lease | renewal k lease ttl
#   claim   n has_slot (k period limit cost)*n [k limit lease ttl]
# Reply: doubles per claim: refused, retry_after, in_use, then per rate remaining and reset.
# A rate key holds (anchor_us, ahead) as two doubles: its TAT is anchor + ahead seconds (on precision see
# store/quota.py), its TTL 1 s past the TAT. A slot key is a sorted set of leases scored by expiry in integer
# microseconds, its TTL never shortened below the ttl just given (so one lease's renewal cannot cut another's).
_QUOTA_SCRIPT = """
local blob, unpack_d, max, floor, ceil = ARGV[1], struct.unpack, math.max, math.floor, math.ceil
local clock = redis.call('TIME')
local now_us, EPSILON = tonumber(clock[1]) * 1000000 + tonumber(clock[2]), 1e-9
local aheads, dirty, purged, lease_ms, out = {}, {}, {}, {}, {}
local n_out = 0

local function ahead(k)
  local a = aheads[k]
  if a == nil then
    a = 0
    local stored = redis.call('GET', KEYS[k])
    if stored and #stored == 16 then
      local anchor_us, was_ahead = unpack_d('<dd', stored)
      a = max((anchor_us - now_us) / 1e6 + was_ahead, 0)
    end
    aheads[k] = a
  end
  return a
end

local function purge(k)
  if not purged[k] then
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now_us)
    purged[k] = true
  end
end

local function lease_until(k, ttl)
  lease_ms[k] = max(lease_ms[k] or 0, ceil(ttl * 1000))
  return now_us + floor(ttl * 1e6 + 0.5)
end

local n_adjusts, n_releases, n_renewals, n_claims, pos = unpack_d('<dddd', blob, 1)
for _ = 1, n_adjusts do
  local k, period, limit, delta
  k, period, limit, delta, pos = unpack_d('<dddd', blob, pos)
  aheads[k] = max(ahead(k) + delta * (period / limit), 0)
  dirty[k] = true
end
for _ = 1, n_releases do
  local k, s
  k, s, pos = unpack_d('<dd', blob, pos)
  redis.call('ZREM', KEYS[k], ARGV[s])
end
for _ = 1, n_renewals do
  local k, s, ttl
  k, s, ttl, pos = unpack_d('<ddd', blob, pos)
  purge(k)
  if redis.call('ZSCORE', KEYS[k], ARGV[s]) then
    redis.call('ZADD', KEYS[k], 'XX', lease_until(k, ttl), ARGV[s])
  end
end

local rate_keys, periods, steps, starts, ends = {}, {}, {}, {}, {}
for _ = 1, n_claims do
  local n, has_slot
  n, has_slot, pos = unpack_d('<dd', blob, pos)
  local refused, retry = -1, 0
  for i = 1, n do
    local k, period, limit, cost
    k, period, limit, cost, pos = unpack_d('<dddd', blob, pos)
    local step = period / limit
    local start = ahead(k)
    local finish = start + cost * step
    if finish > period + EPSILON then
      if refused < 0 then refused = i - 1 end
      retry = max(retry, finish - period)
    end
    rate_keys[i], periods[i], steps[i], starts[i], ends[i] = k, period, step, start, finish
  end
  local in_use, slot, limit, s, ttl = 0, nil, nil, nil, nil
  if has_slot == 1 then
    slot, limit, s, ttl, pos = unpack_d('<dddd', blob, pos)
    purge(slot)
    in_use = redis.call('ZCARD', KEYS[slot])
    if in_use >= limit then
      if refused < 0 then refused = n end
      retry = max(retry, 1)
    end
  end
  local final = starts
  if refused < 0 then
    final = ends
    for i = 1, n do
      aheads[rate_keys[i]] = ends[i]
      dirty[rate_keys[i]] = true
    end
    if slot then
      in_use = in_use + redis.call('ZADD', KEYS[slot], lease_until(slot, ttl), ARGV[s])
    end
  end
  out[n_out + 1], out[n_out + 2], out[n_out + 3] = refused, refused < 0 and 0 or retry, in_use
  n_out = n_out + 3
  for i = 1, n do
    out[n_out + 1] = max(0, floor((periods[i] - final[i]) / steps[i] + EPSILON))
    out[n_out + 2] = final[i]
    n_out = n_out + 2
  end
end

for k in pairs(dirty) do
  local a = aheads[k]
  if a > 0 then
    redis.call('SET', KEYS[k], struct.pack('<dd', now_us, a), 'PX', ceil(a * 1000) + 1000)
  else
    redis.call('DEL', KEYS[k])
  end
end
for k, ms in pairs(lease_ms) do
  if redis.call('PTTL', KEYS[k]) < ms then redis.call('PEXPIRE', KEYS[k], ms) end
end

local pieces = {}
for i = 1, n_out, 64 do  -- struct.pack takes its values on the Lua stack: 64 at a time
  local j = math.min(i + 63, n_out)
  pieces[#pieces + 1] = struct.pack('<' .. string.rep('d', j - i + 1), unpack(out, i, j))
end
return table.concat(pieces)
"""
_QUOTA_SHA = hashlib.sha1(_QUOTA_SCRIPT.encode()).hexdigest()  # EVALSHA sends 40 bytes, not the script


def _quota_args(batch: QuotaBatch) -> tuple[list[str], list[str | bytes]]:
    """KEYS and ARGV for `_QUOTA_SCRIPT`: each distinct key once; numbers packed, naming keys and leases by
    their 1-based index in KEYS and ARGV."""
    index: dict[str, int] = {}
    argv: list[str | bytes] = [b""]  # ARGV[1], the numbers, filled in last
    numbers: list[float] = [len(batch.adjusts), len(batch.releases), len(batch.renewals), len(batch.claims)]
    for adjust in batch.adjusts:
        numbers += (index.setdefault(adjust.key, len(index) + 1), adjust.period, adjust.limit, adjust.delta)
    for key, lease in batch.releases:
        argv.append(lease)
        numbers += (index.setdefault(key, len(index) + 1), len(argv))
    for key, lease, ttl in batch.renewals:
        argv.append(lease)
        numbers += (index.setdefault(key, len(index) + 1), len(argv), ttl)
    for claim in batch.claims:
        slot = claim.slot
        numbers += (len(claim.rates), 0 if slot is None else 1)
        for rate in claim.rates:
            numbers += (index.setdefault(rate.key, len(index) + 1), rate.period, rate.limit, rate.cost)
        if slot is not None:
            argv.append(slot.lease)
            numbers += (index.setdefault(slot.key, len(index) + 1), slot.limit, len(argv), slot.ttl)
    packed = array("d", numbers)
    if _BIG_ENDIAN:
        packed.byteswap()
    argv[0] = packed.tobytes()
    return list(index), argv


def _verdicts(claims: tuple[Claim, ...], reply: bytes) -> list[Verdict]:
    """The script's doubles back into one Verdict per claim."""
    values = struct.unpack(f"<{len(reply) // 8}d", reply)
    verdicts: list[Verdict] = []
    at = 0
    for claim in claims:
        end = at + 3 + 2 * len(claim.rates)
        refused = int(values[at])
        verdicts.append(Verdict(refused < 0, refused, values[at + 1], values[at + 3:end:2], values[at + 4:end:2],
                                int(values[at + 2])))
        at = end
    return verdicts


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """HGETALL's answer as (field, value) pairs: redis-py gives a dict (RESP2 callbacks) or a flat list."""
    if isinstance(reply, dict):
        return list(reply.items())
    return list(zip(reply[::2], reply[1::2], strict=True))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _millis(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
