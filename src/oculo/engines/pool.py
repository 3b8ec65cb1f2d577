"""A pool of OpenAI-compatible upstream servers: health, routing, ejection, and their counters.

- **Health checks** (active): every `health_interval` seconds each upstream gets `GET /health`;
  a server without that route (404 / 405) gets `GET /v1/models` instead. A 2xx is healthy;
  anything else, or no answer within `connect_timeout`, is not; after the first check, two failed
  checks in a row make the verdict, and a check that times out while the upstream is answering
  requests is not held against it (some servers, llama-cpp-python's, answer nothing else while
  they generate). Until its first check an upstream counts as healthy.
- **Routing**: least outstanding requests among the usable upstreams (healthy, not ejected, under
  `max_outstanding`); ties go round-robin, so an idle pool spreads its load.
- **Passive ejection**: `eject_after` consecutive failed requests (no connection, a 5xx, a
  timeout, a broken stream) take an upstream out of rotation for `eject_seconds`; it comes back
  by itself when the cool-down ends, and one success resets its count.
- `choose` raises `EngineUnavailable` (503 + Retry-After) when no upstream is usable, and
  `Overloaded` when the usable ones are all at `max_outstanding`.

What the pool knows is also what `/metrics` and `oculo models` show: `states()` and `counters`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from oculo.errors import EngineUnavailable, Overloaded

__all__ = ["PoolCounters", "Upstream", "UpstreamPool", "UpstreamState"]

log = logging.getLogger("oculo.pool")

_CHECKS_TO_FAIL = 2  # failed health checks in a row that make a (checked) upstream unhealthy
OUTCOMES = ("ok", "rejected", "busy", "error", "timeout", "cancelled")


@dataclass
class Upstream:
    url: str  # base URL, without /v1
    index: int  # 1-based position in the catalog entry: how errors name it to clients
    outstanding: int = 0
    healthy: bool = True
    checked: bool = False  # whether a health check has answered yet
    ejected_until: float = 0.0  # the pool clock's time; 0: not ejected
    failures: int = 0  # consecutive failed requests
    failed_checks: int = 0  # consecutive failed health checks
    last_error: str | None = None
    requests: Counter[str] = field(default_factory=Counter)  # by outcome
    ejections: int = 0

    @property
    def label(self) -> str:
        """host:port, for metrics and logs."""
        parts = urlsplit(self.url)
        return parts.netloc + parts.path

    @property
    def name(self) -> str:
        """How an error message names it without giving the address away."""
        return f"upstream #{self.index}"


@dataclass(frozen=True)
class UpstreamState:
    """One upstream as `oculo models` and `/pool` show it."""

    url: str
    healthy: bool
    checked: bool
    ejected: bool
    ejected_for: float  # seconds left of the cool-down
    outstanding: int
    failures: int
    last_error: str | None
    requests: dict[str, int]
    ejections: int


@dataclass
class PoolCounters:
    retries: int = 0  # requests sent to another upstream after a failure before the first byte


class UpstreamPool:
    def __init__(
        self,
        urls: Collection[str],
        *,
        client: Callable[[], aiohttp.ClientSession],
        health_headers: dict[str, str] | None = None,
        health_interval: float = 5.0,
        health_timeout: float = 5.0,
        eject_after: int = 3,
        eject_seconds: float = 30.0,
        max_outstanding: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("a pool needs at least one upstream")
        self.upstreams = [Upstream(url=url, index=i + 1) for i, url in enumerate(urls)]
        self.counters = PoolCounters()
        self._client = client  # the engine's connection pool, made in the event loop
        self._health_headers = health_headers or {}
        self._interval = health_interval
        self._health_timeout = aiohttp.ClientTimeout(total=health_timeout)
        self._eject_after = eject_after
        self._eject_seconds = eject_seconds
        self._max_outstanding = max_outstanding
        self._clock = clock
        self._turn = 0
        self._task: asyncio.Task[None] | None = None

    # -- routing ---------------------------------------------------------------------------

    def choose(self, exclude: Collection[Upstream] = ()) -> Upstream:
        """The usable upstream with the fewest requests in flight, not one of `exclude`."""
        now = self._clock()
        live = [
            u for u in self.upstreams if u not in exclude and u.healthy and u.ejected_until <= now
        ]
        if not live:
            raise self._none_usable(now, exclude)
        free = [u for u in live if u.outstanding < self._max_outstanding]
        if not free:
            raise Overloaded(
                "Every upstream server of this model is at its limit of requests in flight.",
                retry_after=1,
            )
        least = min(u.outstanding for u in free)
        ties = [u for u in free if u.outstanding == least]
        self._turn += 1
        return ties[self._turn % len(ties)]

    def _none_usable(self, now: float, exclude: Collection[Upstream]) -> EngineUnavailable:
        ejected = [u.ejected_until - now for u in self.upstreams if u.ejected_until > now]
        retry = max(1.0, min(ejected)) if ejected else self._interval
        if exclude:
            message = "No other upstream server of this model could be tried."
        else:
            message = "No upstream server of this model is healthy right now."
        return EngineUnavailable(message, param="model", retry_after=retry)

    @contextlib.contextmanager
    def lease(self, upstream: Upstream) -> Iterator[Upstream]:
        """Count a request in flight on `upstream` while the block runs."""
        upstream.outstanding += 1
        try:
            yield upstream
        finally:
            upstream.outstanding -= 1

    # -- outcomes --------------------------------------------------------------------------

    def succeeded(self, upstream: Upstream, outcome: str = "ok") -> None:
        """The upstream answered (a 4xx refusal counts: the server is well)."""
        upstream.requests[outcome] += 1
        upstream.failures = 0

    def failed(self, upstream: Upstream, reason: str, outcome: str = "error") -> None:
        """A failure of the upstream's own; enough in a row eject it for the cool-down."""
        upstream.requests[outcome] += 1
        upstream.failures += 1
        upstream.last_error = reason
        if upstream.failures >= self._eject_after and upstream.ejected_until <= self._clock():
            upstream.ejected_until = self._clock() + self._eject_seconds
            upstream.ejections += 1
            upstream.failures = 0
            log.warning(
                "upstream %s ejected for %.0f s after %d failures in a row (last: %s)",
                upstream.label,
                self._eject_seconds,
                self._eject_after,
                reason,
            )

    def abandoned(self, upstream: Upstream) -> None:
        """The client left: neither the upstream's success nor its failure."""
        upstream.requests["cancelled"] += 1

    # -- health ----------------------------------------------------------------------------

    async def check(self, upstream: Upstream) -> bool:
        """One health check: `GET /health`, else `GET /v1/models`; 2xx is healthy."""
        healthy = False
        reason = None
        try:
            for path in ("/health", "/v1/models"):
                async with self._client().get(
                    upstream.url + path,
                    headers=self._health_headers,
                    timeout=self._health_timeout,
                ) as response:
                    await response.read()  # to the end: the connection can be reused
                    status = response.status
                if status in (404, 405) and path == "/health":
                    continue
                healthy = 200 <= status < 300
                if not healthy:
                    reason = f"health check: HTTP {status} on {path}"
                break
        except TimeoutError as exc:
            if upstream.outstanding:  # busy answering: its requests judge it, not this check
                return upstream.healthy
            reason = f"health check: {type(exc).__name__}"
        except aiohttp.ClientConnectorError as exc:
            reason = f"health check: cannot connect ({type(exc).__name__})"
        except aiohttp.ClientError as exc:
            reason = f"health check: {type(exc).__name__}"
        upstream.failed_checks = 0 if healthy else upstream.failed_checks + 1
        if not healthy and upstream.checked and upstream.failed_checks < _CHECKS_TO_FAIL:
            upstream.last_error = reason
            return upstream.healthy  # one failed check in a row is not yet a verdict
        if healthy != upstream.healthy or not upstream.checked:
            log.log(
                logging.INFO if healthy else logging.WARNING,
                "upstream %s is %s%s",
                upstream.label,
                "healthy" if healthy else "unhealthy",
                f" ({reason})" if reason else "",
            )
        upstream.healthy = healthy
        upstream.checked = True
        if reason:
            upstream.last_error = reason
        return healthy

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.upstreams))

    async def start(self) -> None:
        """Check every upstream once, then keep checking in the background."""
        if self._task is None:
            await self.check_all()
            self._task = asyncio.create_task(self._watch(), name="oculo-upstream-health")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_all()
            except Exception:  # never let the watcher die: the pool would go blind
                log.exception("health checks failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- what it shows ---------------------------------------------------------------------

    def states(self) -> list[UpstreamState]:
        now = self._clock()
        return [
            UpstreamState(
                url=u.url,
                healthy=u.healthy,
                checked=u.checked,
                ejected=u.ejected_until > now,
                ejected_for=max(0.0, u.ejected_until - now),
                outstanding=u.outstanding,
                failures=u.failures,
                last_error=u.last_error,
                requests={outcome: u.requests[outcome] for outcome in OUTCOMES},
                ejections=u.ejections,
            )
            for u in self.upstreams
        ]
