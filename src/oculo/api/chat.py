"""POST /v1/chat/completions: parse -> policy -> decode -> engine -> JSON or SSE.

The engine's first delta is awaited before any response byte is sent, so that everything that
can fail before generation starts (context too long, engine down) is an ordinary HTTP error,
streamed request or not. After that, a failure in a stream becomes an error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from oculo import __version__
from oculo.api import sse
from oculo.api.auth import Caller, authenticate
from oculo.api.metrics import Metrics
from oculo.api.responses import JSONResponse
from oculo.engines.base import Delta, GenerationRequest
from oculo.errors import EngineError, OculoError, from_exception
from oculo.policy import Limits, Prompt, build_prompt, decode_images
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


@dataclass
class Run:
    """One completion in flight: its identity and what has been counted so far."""

    prompt: Prompt
    text_tokens: int
    started: float  # perf_counter at arrival
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    first_delta_at: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    engine_prompt_tokens: int | None = None
    image_positions: int | None = None

    def absorb(self, delta: Delta) -> None:
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.completion_tokens is not None:
            self.completion_tokens = delta.completion_tokens
        if delta.prompt_tokens is not None:
            self.engine_prompt_tokens = delta.prompt_tokens
        if delta.image_positions is not None:
            self.image_positions = delta.image_positions

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


async def _prepare(request: Request) -> tuple[Run, AsyncIterator[Delta], Delta]:
    started = time.perf_counter()
    body = await request.body()  # already counted and buffered by the body guard
    chat = parse_chat_request(body)
    app_state = request.app.state
    engine = app_state.registry.get(chat.model)
    limits: Limits = app_state.limits
    prompt = build_prompt(chat, limits)
    images = await asyncio.to_thread(decode_images, prompt.images, limits) if prompt.images else []
    run = Run(
        prompt=prompt,
        text_tokens=engine.count_text_tokens(prompt.messages),
        started=started,
    )
    generation = GenerationRequest(
        messages=prompt.messages, images=images, sampling=prompt.sampling, request_id=run.id
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
    return run, deltas, first


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
async def chat_completions(request: Request, caller: Caller = Depends(authenticate)) -> Response:
    ticket = request.app.state.admission.admit()
    try:
        run, deltas, first = await _prepare(request)
    except BaseException:
        ticket.release()
        raise
    if run.prompt.stream:
        return _EventStream(request, run, deltas, first, ticket)
    try:
        return await _answer(request, run, deltas, first)
    finally:
        ticket.release()
        _record(request, run, stream=False)


class _EventStream(StreamingResponse):
    """The SSE response; whatever happens to it, the engine stream is closed and the ticket freed
    (even when the client leaves before the first byte, and the body iterator never starts)."""

    def __init__(
        self,
        request: Request,
        run: Run,
        deltas: AsyncIterator[Delta],
        first: Delta,
        ticket: Ticket,
    ):
        super().__init__(
            _stream(run, deltas, first), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS
        )
        self._request = request
        self._run = run
        self._deltas = deltas
        self._ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self._deltas)
            self._ticket.release()
            _record(self._request, self._run, stream=True)


async def _answer(
    request: Request, run: Run, deltas: AsyncIterator[Delta], first: Delta
) -> Response:
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
        return Response(status_code=499)
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


async def _stream(run: Run, deltas: AsyncIterator[Delta], first: Delta) -> AsyncIterator[bytes]:
    usage_chunk = run.prompt.include_usage
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
        yield sse.event(exc.body())
    except Exception as exc:
        log.exception("%s: stream failed", run.id)
        yield sse.event(from_exception(exc).body())
    finally:
        if run.finish_reason is None:
            log.info(
                "%s: stream ended early (client gone?) after %d tokens; generation stopped",
                run.id,
                run.completion_tokens,
            )
        await _close(deltas)
    yield sse.DONE
