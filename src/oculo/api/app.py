"""The ASGI application: routers, the body guard, and the one exception-to-response mapping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from oculo import __version__
from oculo.accounts.keys import KeyRing, KeyStore
from oculo.accounts.ledger import Ledger
from oculo.accounts.limits import open_limiter
from oculo.accounts.store import database_url, migrate, open_engine, redacted
from oculo.api import chat, health, metrics, models, pool_view, usage
from oculo.api.bodyguard import BodyGuard
from oculo.api.metrics import Metrics, MetricsMiddleware
from oculo.api.ratelimit import RateLimitHeaders
from oculo.api.responses import error_response
from oculo.config import Settings
from oculo.errors import InvalidRequest, MethodNotAllowed, NotFound, OculoError, from_exception
from oculo.policy import Limits
from oculo.protocol import param_of
from oculo.registry import ModelRegistry
from oculo.scheduler import Admission

log = logging.getLogger("oculo.app")


async def _oculo_error(request: Request, exc: Exception) -> Response:
    request.app.state.metrics.errors.labels(from_exception(exc).code).inc()
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = tuple(p for p in first["loc"] if p not in ("body", "path", "query", "header"))
    param = param_of(loc)
    return error_response(
        InvalidRequest(f"Invalid value for '{param}': {first['msg']}", param=param)
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return await _oculo_error(request, NotFound(f"Unknown request URL: {where}."))
    if exc.status_code == 405:
        return await _oculo_error(request, MethodNotAllowed(f"Method not allowed: {where}."))
    return await _oculo_error(request, InvalidRequest(str(exc.detail)))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return await _oculo_error(request, exc)


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> FastAPI:
    registry = registry if registry is not None else ModelRegistry(settings.models)
    url = database_url(settings.database_url, settings.data_dir)
    database = open_engine(url)
    limiter = open_limiter(settings.redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await migrate(database)
        log.info("accounts database %s; rate limits %s", redacted(url), type(limiter).__name__)
        loading = asyncio.create_task(registry.load_all())
        try:
            yield
        finally:
            loading.cancel()
            await registry.close()
            await limiter.close()
            app.state.ledger.close()
            await database.dispose()

    app = FastAPI(
        title="oculo",
        version=__version__,
        summary="A self-hosted, OpenAI-compatible vision inference API",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.keyring = KeyRing(settings.api_keys)
    app.state.keys = KeyStore(database)
    app.state.ledger = Ledger(database, sync=settings.ledger_sync)
    app.state.limiter = limiter
    app.state.admission = admission = Admission(settings.max_concurrent_requests)
    app.state.metrics = Metrics(in_flight=lambda: admission.in_flight)
    app.state.metrics.registry.register(
        pool_view.UpstreamCollector(lambda: pool_view.pools(registry))
    )
    app.state.limits = Limits(max_images=settings.max_images, max_pixels=settings.max_pixels)

    app.add_exception_handler(OculoError, _oculo_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

    routers = (
        chat.router,
        models.router,
        usage.router,
        health.router,
        metrics.router,
        pool_view.router,
    )
    for router in routers:
        app.include_router(router)
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RateLimitHeaders)
    paths = frozenset(getattr(route, "path", "") for router in routers for route in router.routes)
    # outermost, so that it also counts the body guard's 413s
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, paths=paths)
    return app
