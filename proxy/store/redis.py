"""The Redis store (`redis.asyncio`): what makes replicas agree. Needs Redis >= 7.0 (SET ... NX GET).

Owns the one boundary where redis-py errors become `StoreUnavailableError`, short socket timeouts, and
a circuit breaker (`store/breaker.py`) so a dead Redis costs no latency: while it is open, calls fail at
once without touching the network, and one probe per cooldown finds out when Redis is back. Outages are
logged once when they begin and once when they end, never per request. Keys and values are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError, RedisError

from proxy.errors import StoreUnavailableError
from proxy.store.breaker import Admission, Breaker

log = logging.getLogger("splitstream.store")

# Loopback or same-rack Redis answers in well under a millisecond; 100 ms means it is not answering,
# and the request is better served by the fallback than by waiting.
DEFAULT_TIMEOUT = 0.1
# Calls in flight at once (= connections at most). A call takes ~0.1 ms, so a few dozen carry thousands
# of requests/s; beyond this a call falls back at once rather than queue behind a slow Redis or open a
# burst of new connections (a busy proxy is not a Redis outage: the breaker is not told).
DEFAULT_MAX_CONNECTIONS = 64


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
