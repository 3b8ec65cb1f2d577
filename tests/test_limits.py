"""Token-bucket rate limits: the arithmetic in memory, and the same buckets shared through Redis."""

from __future__ import annotations

import uuid

import pytest

from oculo.accounts import limits
from oculo.accounts.limits import Bucket, MemoryLimiter, RedisLimiter
from oculo.api.ratelimit import Quota, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_buckets_refill_over_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(limits.time, "monotonic", clock)
    limiter = MemoryLimiter()
    first = await limiter.take("k:requests", 2, 1)
    second = await limiter.take("k:requests", 2, 1)
    third = await limiter.take("k:requests", 2, 1)
    assert first.allowed and second.allowed and not third.allowed
    assert (first.bucket.remaining, second.bucket.remaining, third.bucket.remaining) == (1, 0, 0)
    assert third.retry_after == pytest.approx(30.0)  # one request refills in 60 s / 2
    assert second.bucket.reset_seconds == pytest.approx(60.0)
    clock.now += 30
    assert (await limiter.take("k:requests", 2, 1)).allowed
    assert not (await limiter.take("k:requests", 2, 1)).allowed
    assert (await limiter.take("other:requests", 2, 1)).allowed  # buckets are per key


async def test_memory_tokens_estimate_then_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(limits.time, "monotonic", clock)
    limiter = MemoryLimiter()
    took = await limiter.take("k:tokens", 1000, 600)
    assert took.allowed and took.bucket.remaining == 400
    await limiter.settle("k:tokens", 1000, 300)  # it used 900 in the end
    refused = await limiter.take("k:tokens", 1000, 200)
    assert not refused.allowed and refused.bucket.remaining == 100
    assert refused.retry_after == pytest.approx(6.0)  # 100 more tokens at 1000/min
    peek = await limiter.take("k:tokens", 1000, 0)
    assert peek.allowed and peek.bucket.remaining == 100
    # a prompt larger than the whole bucket passes once the bucket is full, and leaves a debt
    clock.now += 60
    big = await limiter.take("k:tokens", 1000, 5000)
    assert big.allowed and big.bucket.level == -4000 and big.bucket.remaining == 0
    later = await limiter.take("k:tokens", 1000, 1)
    assert not later.allowed and later.retry_after == pytest.approx(240.06)


def test_headers_follow_openai() -> None:
    assert duration(0.02) == "20ms"
    assert duration(1.5) == "1.5s"
    assert duration(30) == "30s"
    assert duration(360) == "6m0s"
    assert duration(61.25) == "1m1.25s"
    quota = Quota(requests=Bucket(2, 1.0), tokens=None)
    assert dict(quota.headers()) == {
        b"x-ratelimit-limit-requests": b"2",
        b"x-ratelimit-remaining-requests": b"1",
        b"x-ratelimit-reset-requests": b"30s",
    }


async def test_redis_buckets_are_shared_between_limiters(redis_url: str) -> None:
    """Two limiters (as in two processes) on one Redis share a key's bucket."""
    a, b = RedisLimiter(redis_url), RedisLimiter(redis_url)
    name = f"test-{uuid.uuid4().hex}:requests"
    try:
        results = [await a.take(name, 2, 1), await b.take(name, 2, 1), await a.take(name, 2, 1)]
        assert [r.allowed for r in results] == [True, True, False]
        assert [r.bucket.remaining for r in results] == [1, 0, 0]
        assert 29 < results[2].retry_after <= 30
        tokens = f"test-{uuid.uuid4().hex}:tokens"
        assert (await a.take(tokens, 1000, 700)).allowed
        await b.settle(tokens, 1000, 200)
        peek = await a.take(tokens, 1000, 0)
        assert peek.bucket.remaining in (100, 101)  # a few ms of refill may have happened
        await b.settle(tokens, 1000, -900)  # refunds never overfill the bucket
        assert (await a.take(tokens, 1000, 0)).bucket.level == 1000
    finally:
        await a.close()
        await b.close()


async def test_redis_down_is_a_503() -> None:
    from oculo.errors import StorageUnavailable

    limiter = RedisLimiter("redis://127.0.0.1:1/0")
    with pytest.raises(StorageUnavailable):
        await limiter.take("k:requests", 2, 1)
    await limiter.close()
