"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

Each limit is a bucket of `limit` units that refills at `limit` per minute. A request takes one
unit from the requests bucket; its prompt estimate is taken from the tokens bucket at admission,
and the difference to the real count (prompt + completion) is settled when it ends, which may
leave the bucket in debt. A take that does not fit is refused and says when it would (Retry-After).
A request larger than a whole bucket is let through when the bucket is full rather than never.

`MemoryLimiter` keeps buckets in the process. `RedisLimiter` keeps them in Redis, each take one
Lua script run atomically on Redis's own clock, so every process sharing a key shares its limit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from oculo.errors import StorageUnavailable

WINDOW = 60.0  # seconds for a bucket to refill from empty


@dataclass(frozen=True)
class Bucket:
    """A bucket's state after a take: what OpenAI's x-ratelimit-* headers report."""

    limit: int
    level: float  # may be negative: debt from requests that used more than estimated

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.level))

    @property
    def reset_seconds(self) -> float:
        """Until the bucket is full again."""
        return max(0.0, (self.limit - self.level) * WINDOW / self.limit)

    def wait_for(self, units: float) -> float:
        """Seconds until `units` (at most the limit) fit."""
        need = min(units, self.limit)
        return max(0.0, (need - self.level) * WINDOW / self.limit)


@dataclass(frozen=True)
class Take:
    allowed: bool
    bucket: Bucket
    retry_after: float  # 0 when allowed


class Limiter(Protocol):
    async def take(self, name: str, limit: int, units: float) -> Take:
        """Take `units` if they fit; `units=0` only reads the state."""
        ...

    async def settle(self, name: str, limit: int, units: float) -> None:
        """Take (positive) or give back (negative) `units` unconditionally."""
        ...

    async def close(self) -> None: ...


def _refill(level: float, elapsed: float, limit: int) -> float:
    return min(float(limit), level + max(0.0, elapsed) * limit / WINDOW)


class MemoryLimiter:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (level, monotonic time)

    def _level(self, name: str, limit: int, now: float) -> float:
        level, at = self._buckets.get(name, (float(limit), now))
        return _refill(level, now - at, limit)

    async def take(self, name: str, limit: int, units: float) -> Take:
        now = time.monotonic()
        level = self._level(name, limit, now)
        bucket = Bucket(limit, level)
        if units > 0 and level < min(units, limit):
            self._buckets[name] = (level, now)
            return Take(False, bucket, bucket.wait_for(units))
        level -= units
        self._buckets[name] = (level, now)
        return Take(True, Bucket(limit, level), 0.0)

    async def settle(self, name: str, limit: int, units: float) -> None:
        now = time.monotonic()
        self._buckets[name] = (min(float(limit), self._level(name, limit, now) - units), now)

    async def close(self) -> None:
        self._buckets.clear()


# KEYS[1] the bucket; ARGV: limit, units, force (1: take even if it does not fit), window.
# Returns {allowed, level as a string (Lua numbers would be truncated to integers)}.
_TAKE = """
local limit = tonumber(ARGV[1])
local units = tonumber(ARGV[2])
local force = ARGV[3] == '1'
local window = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local level = limit
local state = redis.call('HMGET', KEYS[1], 'level', 'at')
if state[1] then
  local elapsed = math.max(0, now - tonumber(state[2]))
  level = math.min(limit, tonumber(state[1]) + elapsed * limit / window)
end
local allowed = 1
if not force and units > 0 and level < math.min(units, limit) then
  allowed = 0
else
  level = math.min(limit, level - units)
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((limit - level) * window * 1000 / limit) + 1000)
return {allowed, tostring(level)}
"""


class RedisLimiter:
    def __init__(self, url: str, *, prefix: str = "oculo:ratelimit:") -> None:
        from redis.asyncio import Redis

        self._redis: Redis = Redis.from_url(url)
        self._script: Any = self._redis.register_script(_TAKE)
        self._prefix = prefix

    async def _run(self, name: str, limit: int, units: float, force: bool) -> tuple[bool, float]:
        from redis.exceptions import RedisError

        try:
            allowed, level = await self._script(
                keys=[self._prefix + name], args=[limit, units, int(force), WINDOW]
            )
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(
                f"The rate-limit store is unavailable ({type(exc).__name__}).", retry_after=1
            ) from None
        return bool(int(allowed)), float(level)

    async def take(self, name: str, limit: int, units: float) -> Take:
        allowed, level = await self._run(name, limit, units, force=False)
        bucket = Bucket(limit, level)
        return Take(allowed, bucket, 0.0 if allowed else bucket.wait_for(units))

    async def settle(self, name: str, limit: int, units: float) -> None:
        await self._run(name, limit, units, force=True)

    async def close(self) -> None:
        await self._redis.aclose()


def open_limiter(redis_url: str | None) -> Limiter:
    return RedisLimiter(redis_url) if redis_url else MemoryLimiter()
