"""Rate limits at the API: the dependency that takes a request's turn, the token admission and
settlement, and the middleware that puts OpenAI's x-ratelimit-* headers on every response.

The state of a request's buckets travels in the ASGI scope (`request.state.ratelimit`), so the
headers reach error responses (429 included) as well as answers and streams.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oculo.accounts.keys import Account
from oculo.accounts.limits import Bucket, Limiter
from oculo.api.auth import authenticate
from oculo.errors import RateLimited

STATE_KEY = "ratelimit"


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{text}s" if minutes >= 1 else f"{text}s"


@dataclass
class Quota:
    requests: Bucket | None = None
    tokens: Bucket | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for unit, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                out += [
                    (f"x-ratelimit-limit-{unit}".encode(), str(bucket.limit).encode()),
                    (f"x-ratelimit-remaining-{unit}".encode(), str(bucket.remaining).encode()),
                    (f"x-ratelimit-reset-{unit}".encode(), duration(bucket.reset_seconds).encode()),
                ]
        return out


def _names(account: Account) -> tuple[str, str]:
    return f"{account.id}:requests", f"{account.id}:tokens"


async def limit_requests(request: Request, account: Account = Depends(authenticate)) -> Account:
    """FastAPI dependency: authenticate, then take one request from the key's bucket, or 429."""
    limiter: Limiter = request.app.state.limiter
    quota = Quota()
    setattr(request.state, STATE_KEY, quota)
    requests, tokens = _names(account)
    if account.tpm:
        quota.tokens = (await limiter.take(tokens, account.tpm, 0)).bucket
    if account.rpm:
        took = await limiter.take(requests, account.rpm, 1)
        quota.requests = took.bucket
        if not took.allowed:
            raise RateLimited(
                f"Rate limit reached for requests: this key may make {account.rpm} requests per "
                "minute. Retry after the time in Retry-After.",
                retry_after=took.retry_after,
            )
    return account


async def take_tokens(request: Request, account: Account, tokens: int) -> None:
    """Admit a prompt of `tokens` (the estimate) against the key's tokens per minute, or 429."""
    if not account.tpm:
        return
    limiter: Limiter = request.app.state.limiter
    took = await limiter.take(_names(account)[1], account.tpm, tokens)
    quota: Quota = getattr(request.state, STATE_KEY)
    quota.tokens = took.bucket
    if not took.allowed:
        raise RateLimited(
            f"Rate limit reached for tokens: this key may use {account.tpm} tokens per minute and "
            f"this request needs {tokens}. Retry after the time in Retry-After.",
            retry_after=took.retry_after,
        )


async def settle_tokens(request: Request, account: Account, correction: int) -> None:
    """Correct the admission estimate by the real count (positive: more was used)."""
    if account.tpm and correction:
        limiter: Limiter = request.app.state.limiter
        await limiter.settle(_names(account)[1], account.tpm, correction)


class RateLimitHeaders:
    """Pure ASGI: adds the request's x-ratelimit-* headers to its response, whatever it is."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                quota = scope.get("state", {}).get(STATE_KEY)
                if isinstance(quota, Quota):
                    message["headers"] = [*message.get("headers", ()), *quota.headers()]
            await send(message)

        await self.app(scope, receive, with_headers)
