"""POST /v1/chat/completions: auth + request limit -> parse -> policy -> token admission ->
decode -> engine -> JSON or SSE -> usage ledger.

The engine's first delta is awaited before any response byte is sent, so that everything that
can fail before generation starts (context too long, engine down) is an ordinary HTTP error,
streamed request or not. After that, a failure in a stream becomes an error event.

Every run that reached the engine is settled exactly once (`_settle`): metrics, the correction
of the tokens-per-minute estimate, and its ledger row, committed before the body of a whole
answer is returned and before a stream's `data: [DONE]`; a client that leaves is settled in a
`finally` path with what was generated.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
from fastapi import APIRouter, Depends, Request
from PIL import Image
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from oculo import __version__
from oculo.accounts.keys import Account
from oculo.accounts.ledger import Ledger, UsageRecord
from oculo.api import ratelimit, sse
from oculo.api.metrics import Metrics
from oculo.api.responses import JSONResponse
from oculo.config import ModelSpec
from oculo.engines.base import Delta, Engine, GenerationRequest
from oculo.errors import EngineError, OculoError, PermissionDenied, from_exception
from oculo.policy import Limits, Prompt, SamplingDefaults, build_prompt, decode_images
from oculo.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    ChunkDelta,
    PromptTokensDetails,
    Usage,
    parse_chat_request,
)
from oculo.scheduler import Ticket

log = logging.getLogger("oculo.chat")
router = APIRouter()
FINGERPRINT = f"oculo-{__version__}"
CLIENT_GONE = 499  # nginx's "client closed request": the ledger's status for a departed caller
CLIENT_GONE_CODE = "client_disconnected"


@dataclass
class Run:
    """One completion in flight: its identity and what has been counted so far."""

    prompt: Prompt
    text_tokens: int
    started: float  # perf_counter at arrival
    account: Account
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    first_delta_at: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    engine_prompt_tokens: int | None = None
    engine_completion_tokens: int | None = None
    upstream: str | None = None  # a remote model: the server that answered
    image_positions: int | None = None
    admitted_tokens: int = 0  # taken from the key's tokens-per-minute bucket at admission
    settled: bool = False  # counted, billed, and its ledger row written (or attempted)

    def absorb(self, delta: Delta) -> None:
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.completion_tokens is not None:
            self.completion_tokens = delta.completion_tokens
            self.engine_completion_tokens = delta.completion_tokens
        elif delta.text:  # until the engine's own count arrives: one per piece of text
            self.completion_tokens += 1
        if delta.prompt_tokens is not None:
            self.engine_prompt_tokens = delta.prompt_tokens
        if delta.image_positions is not None:
            self.image_positions = delta.image_positions
        if delta.upstream is not None:
            self.upstream = delta.upstream

    def usage(self) -> Usage:
        image = self.prompt.image_tokens
        prompt_tokens = self.text_tokens + image
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(image_tokens=image),
        )

    def chunk(self, delta: ChunkDelta, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.prompt.model,
            system_fingerprint=FINGERPRINT,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],  # type: ignore[arg-type]
        )


def _defaults(spec: ModelSpec) -> SamplingDefaults:
    return SamplingDefaults(temperature=spec.temperature, top_p=spec.top_p)


async def _prepare(request: Request, account: Account) -> tuple[Run, Engine]:
    """Everything before the engine: parse, permission, policy, token estimate, admission."""
    started = time.perf_counter()
    body = await request.body()  # already counted and buffered by the body guard
    chat = parse_chat_request(body)
    if not account.may_use(chat.model):
        raise PermissionDenied(f"This API key may not use the model '{chat.model}'.", param="model")
    app_state = request.app.state
    engine = app_state.registry.get(chat.model)
    prompt = build_prompt(chat, app_state.limits, _defaults(app_state.registry.spec(chat.model)))
    run = Run(
        prompt=prompt,
        text_tokens=engine.count_text_tokens(prompt.messages),
        started=started,
        account=account,
    )
    estimate = run.usage().prompt_tokens
    await ratelimit.take_tokens(request, account, estimate)
    run.admitted_tokens = estimate if account.tpm else 0
    return run, engine


async def _decode(request: Request, run: Run, engine: Engine) -> list[Image.Image]:
    """Pixels for an engine that runs a model; none for one that forwards the images."""
    limits: Limits = request.app.state.limits
    images = run.prompt.images
    if not images or not engine.info.needs_pixels:
        return []
    return await asyncio.to_thread(decode_images, images, limits)


async def _start(
    run: Run, engine: Engine, images: list[Image.Image]
) -> tuple[AsyncIterator[Delta], Delta]:
    """Start the engine: its first delta, or the failure to get one."""
    prompt = run.prompt
    generation = GenerationRequest(
        messages=prompt.messages,
        images=images,
        sampling=prompt.sampling,
        request_id=run.id,
        sources=[image.source() for image in prompt.images],
        stream=prompt.stream,
    )
    deltas = engine.generate(generation)
    try:
        first = await anext(deltas)
    except StopAsyncIteration:
        raise EngineError("The engine ended without an answer.") from None
    except BaseException:
        await _close(deltas)
        raise
    run.first_delta_at = time.perf_counter()
    return deltas, first


async def _start_unless_gone(
    request: Request, run: Run, engine: Engine, images: list[Image.Image]
) -> tuple[AsyncIterator[Delta], Delta] | None:
    """`_start`, abandoned (None) if the client leaves first: an engine's first piece can be
    slow to come (a queue; a remote engine's whole answer), and no one would read it."""
    starter = asyncio.ensure_future(_start(run, engine, images))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({starter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        starter.cancel()
        raise
    finally:
        watcher.cancel()
    if starter.done():
        return starter.result()
    starter.cancel()  # `_start` closes the engine's stream on its way out
    with suppress(BaseException):
        await starter
    return None


def _record(request: Request, run: Run, *, stream: bool) -> None:
    """Count a finished completion (also one cut short by the client: bill what was made)."""
    metrics: Metrics = request.app.state.metrics
    model = run.prompt.model
    usage = run.usage()
    metrics.completions.labels(model, run.finish_reason or "cancelled", str(stream).lower()).inc()
    metrics.prompt_tokens.labels(model).inc(usage.prompt_tokens)
    metrics.image_tokens.labels(model).inc(usage.prompt_tokens_details.image_tokens)
    metrics.completion_tokens.labels(model).inc(usage.completion_tokens)
    if run.image_positions:
        metrics.image_positions.labels(model).inc(run.image_positions)
    if run.first_delta_at is not None:
        metrics.ttft.labels(model).observe(run.first_delta_at - run.started)


async def _settle(
    request: Request, run: Run, *, stream: bool, status: int, error: str | None
) -> None:
    """Once per run that reached the engine: metrics, the tokens-per-minute correction, and
    the ledger row, committed before this returns (shielded: a client leaving mid-write
    cannot cancel it). Raises StorageUnavailable when the row could not be written."""
    if run.settled:
        return
    run.settled = True
    generated = run.first_delta_at is not None
    with anyio.CancelScope(shield=True):
        if generated:
            _record(request, run, stream=stream)
        # tokens per minute: the real count replaces the estimate; nothing if nothing was made
        used = run.usage().total_tokens if generated else 0
        try:
            await ratelimit.settle_tokens(request, run.account, used - run.admitted_tokens)
        except OculoError:
            log.warning("%s: rate-limit store unavailable; tokens not settled", run.id)
        ledger: Ledger = request.app.state.ledger
        await ledger.record(
            UsageRecord(
                request_id=run.id,
                key_id=run.account.id,
                model=run.prompt.model,
                text_tokens=run.text_tokens,
                image_tokens=run.prompt.image_tokens,
                image_positions=run.image_positions,
                completion_tokens=run.completion_tokens,
                engine_prompt_tokens=run.engine_prompt_tokens,
                engine_completion_tokens=run.engine_completion_tokens,
                upstream=run.upstream,
                status=status,
                error_code=error,
                latency_ms=(time.perf_counter() - run.started) * 1000,
                stream=stream,
                created_at=datetime.now(UTC),
            )
        )


async def _settle_failure(request: Request, run: Run, exc: BaseException, *, stream: bool) -> None:
    """The ledger row of a run that failed (or was cancelled) after reaching the engine."""
    code: str | None
    if isinstance(exc, asyncio.CancelledError):
        status, code = CLIENT_GONE, CLIENT_GONE_CODE
    else:
        error = from_exception(exc)
        status, code = error.status, error.code
    with suppress(OculoError):  # logged by the ledger; the caller sees the original failure
        await _settle(request, run, stream=stream, status=status, error=code)


async def _close(deltas: AsyncIterator[Delta]) -> None:
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        with suppress(Exception):
            await aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@router.post("/v1/chat/completions")
async def chat_completions(
    request: Request, account: Account = Depends(ratelimit.limit_requests)
) -> Response:
    ticket = request.app.state.admission.admit()
    try:
        run, engine = await _prepare(request, account)
    except BaseException:
        ticket.release()
        raise
    try:
        images = await _decode(request, run, engine)
    except BaseException:
        ticket.release()  # refused before the engine (an image that does not decode)
        with anyio.CancelScope(shield=True), suppress(OculoError):
            await ratelimit.settle_tokens(request, account, -run.admitted_tokens)
        raise
    try:
        started = await _start_unless_gone(request, run, engine, images)
    except BaseException as exc:
        ticket.release()
        await _settle_failure(request, run, exc, stream=run.prompt.stream)
        raise
    if started is None:  # the client left before the first piece of the answer
        ticket.release()
        await _settle_failure(request, run, asyncio.CancelledError(), stream=run.prompt.stream)
        log.info("%s: client disconnected before the answer started", run.id)
        return Response(status_code=CLIENT_GONE)
    deltas, first = started
    if run.prompt.stream:
        return _EventStream(request, run, deltas, first, ticket)
    try:
        response = await _answer(request, run, deltas, first)
    except BaseException as exc:
        await _settle_failure(request, run, exc, stream=False)
        raise
    finally:
        ticket.release()
    # the row is committed before the response is returned, so before any byte of it is sent
    gone = response.status_code == CLIENT_GONE
    await _settle(
        request,
        run,
        stream=False,
        status=response.status_code,
        error=CLIENT_GONE_CODE if gone else None,
    )
    return response


class _EventStream(StreamingResponse):
    """The SSE response; whatever happens to it, the engine stream is closed, the ticket freed
    and the run settled (even when the client leaves before the first byte, and the body
    iterator never starts)."""

    def __init__(
        self,
        request: Request,
        run: Run,
        deltas: AsyncIterator[Delta],
        first: Delta,
        ticket: Ticket,
    ):
        super().__init__(
            _stream(request, run, deltas, first), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS
        )
        self._request = request
        self._run = run
        self._deltas = deltas
        self._ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await _close(self._deltas)
                self._ticket.release()
                if not self._run.settled:  # the client left before the end: bill what was made
                    with suppress(OculoError):
                        await _settle(
                            self._request,
                            self._run,
                            stream=True,
                            status=CLIENT_GONE,
                            error=CLIENT_GONE_CODE,
                        )


async def _answer(
    request: Request, run: Run, deltas: AsyncIterator[Delta], first: Delta
) -> Response:
    if first.finish_reason is not None:
        # the whole answer came at once (a remote engine's, read whole): nothing left to wait
        # for, so no watch for a client leaving in the meantime either
        text = await _collect(run, deltas, first)
    else:
        collector = asyncio.ensure_future(_collect(run, deltas, first))
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not collector.done():  # the client left: stop generating, answer no one
            collector.cancel()
            with suppress(BaseException):
                await collector
            log.info("%s: client disconnected; generation stopped", run.id)
            return Response(status_code=CLIENT_GONE)
        text = collector.result()
    completion = ChatCompletion(
        id=run.id,
        created=run.created,
        model=run.prompt.model,
        system_fingerprint=FINGERPRINT,
        choices=[
            Choice(
                message=AssistantMessage(content=text),
                finish_reason=run.finish_reason or "stop",  # type: ignore[arg-type]
            )
        ],
        usage=run.usage(),
    )
    return JSONResponse(completion)


async def _collect(run: Run, deltas: AsyncIterator[Delta], first: Delta) -> str:
    parts = [first.text]
    run.absorb(first)
    try:
        async for delta in deltas:
            parts.append(delta.text)
            run.absorb(delta)
    finally:
        await _close(deltas)
    return "".join(parts)


async def _stream(
    request: Request, run: Run, deltas: AsyncIterator[Delta], first: Delta
) -> AsyncIterator[bytes]:
    usage_chunk = run.prompt.include_usage
    failure: OculoError | None = None
    try:
        yield sse.event(run.chunk(ChunkDelta(role="assistant", content="")))
        delta: Delta | None = first
        pending = deltas.__aiter__()
        while delta is not None:
            run.absorb(delta)
            if delta.text:
                yield sse.event(run.chunk(ChunkDelta(content=delta.text)))
            try:
                delta = await anext(pending)
            except StopAsyncIteration:
                delta = None
        yield sse.event(run.chunk(ChunkDelta(), finish=run.finish_reason or "stop"))
        if usage_chunk:
            final = run.chunk(ChunkDelta())
            final.choices = []
            final.usage = run.usage()
            yield sse.event(final)
    except OculoError as exc:
        failure = exc
    except Exception as exc:
        log.exception("%s: stream failed", run.id)
        failure = from_exception(exc)
    finally:
        if run.finish_reason is None and failure is None:
            log.info(
                "%s: stream ended early (client gone?) after %d tokens; generation stopped",
                run.id,
                run.completion_tokens,
            )
        await _close(deltas)
    # the ledger row is committed before the last event, so a stream that ends in [DONE]
    # without an error event always has its row
    try:
        await _settle(
            request,
            run,
            stream=True,
            status=failure.status if failure else 200,
            error=failure.code if failure else None,
        )
    except OculoError as exc:
        failure = failure or exc
    if failure is not None:
        yield sse.event(failure.body())
    yield sse.DONE
