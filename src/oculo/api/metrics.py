"""Prometheus metrics: HTTP traffic (a pure ASGI middleware), completions and tokens, GET /metrics.

Each app has its own `CollectorRegistry`, so several apps in one process (tests, embedding) never
share or collide on counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

router = APIRouter()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "oculo_http_requests", "HTTP requests by route and status.",
            ["method", "route", "status"], registry=r,
        )  # fmt: skip
        self.http_seconds = Histogram(
            "oculo_http_request_duration_seconds", "Time to the end of the response body.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "oculo_errors", "Error responses by OpenAI error code.", ["code"], registry=r
        )
        self.completions = Counter(
            "oculo_completions", "Finished completions.",
            ["model", "finish_reason", "stream"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "oculo_prompt_tokens",
            "Billed prompt tokens (text + image rule).",
            ["model"],
            registry=r,
        )
        self.image_tokens = Counter(
            "oculo_image_tokens", "Billed image tokens (the 560-tile rule).", ["model"], registry=r
        )
        self.image_positions = Counter(
            "oculo_engine_image_positions", "Image positions the engine really ran.",
            ["model"], registry=r,
        )  # fmt: skip
        self.completion_tokens = Counter(
            "oculo_completion_tokens", "Generated tokens.", ["model"], registry=r
        )
        self.ttft = Histogram(
            "oculo_time_to_first_token_seconds", "Request start to the engine's first delta.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "oculo_requests_in_flight", "Chat requests admitted and not finished.", registry=r
        )
        self.in_flight.set_function(in_flight)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by its route template and status, including the body guard's."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths  # static route paths: the label for requests refused before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = scope["path"] if scope["path"] in self.paths else "unmatched"
            self.metrics.http_requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.http_seconds.labels(route).observe(time.perf_counter() - started)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
