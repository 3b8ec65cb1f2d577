"""The remote engine: a catalog model served by a pool of OpenAI-compatible upstream servers.

oculo has already applied its own contract when a request gets here (keys, limits, image checks,
the token rule, rate limits); this engine forwards it and relays the answer:

- The body is OpenAI's (`oculo.engines.upstream_wire`), for `upstream_model` (else the public
  id), always streamed with usage asked for; images go as the data URIs the client sent, except
  `detail: "low"` ones larger than 560 px, which are shrunk (in a worker thread) first.
- **Retries.** An attempt that fails before the first piece of the answer (no connection, a 5xx,
  a 429, no first byte within `first_byte_timeout`, a malformed or broken stream) is retried on
  another upstream, up to `retries` times. A client that reads the answer whole gets its first
  piece only at the end, so its request is retried whenever the upstream failed; a stream that
  has started is never retried: its failure becomes an error event. A 4xx refusal is not
  retried: it is the request's, and comes back as 400 `upstream_rejected` with the upstream's
  own message.
- **Timeouts.** `connect_timeout` to connect, `first_byte_timeout` from sending to the first piece
  of the answer, `total_timeout` for the whole answer.
- **Leaving.** Closing the iterator (the client left) closes the upstream response, which closes
  its connection: the upstream sees the disconnect and stops generating.
- **Counts.** The last delta carries the upstream's own prompt and completion counts (when it
  sent usage) and which upstream answered; oculo bills the prompt by its own rule.

`count_text_tokens` uses a tokenizer when the catalog names one (`tokenizer`: a `tokenizer.json`
or its folder), else estimates four bytes of UTF-8 a token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from oculo.config import ModelSpec
from oculo.engines.base import Delta, EngineInfo, FinishReason, GenerationRequest, Message
from oculo.engines.pool import Upstream, UpstreamPool
from oculo.engines.upstream_wire import (
    MalformedEvent,
    SSEDecoder,
    UpstreamEvent,
    error_message,
    image_uri,
    parse_event,
    request_body,
)
from oculo.errors import (
    ContextLengthExceeded,
    OculoError,
    Overloaded,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from oculo.media.tokens import image_tokens

__all__ = ["RemoteEngine"]

log = logging.getLogger("oculo.remote")

DEFAULT_CONTEXT = 8192
_DRAIN_SECONDS = 0.5  # after the last event: how long the rest of the body may take
_TOKENS_PER_MESSAGE = 4  # role markers and separators, as chat templates add them


@dataclass
class _Failed(Exception):
    """An attempt that failed: the error the client would get, and whether to try another."""

    error: OculoError
    retry: bool


# what an attempt can fail with: the upstream's fault, not oculo's (aiohttp's timeouts are
# TimeoutErrors, its connection and protocol failures ClientErrors)
_EXPECTED = (_Failed, TimeoutError, aiohttp.ClientError, MalformedEvent)


def unread(content: aiohttp.StreamReader) -> bytes:
    """The bytes of a failed response body that arrived but were not read yet.

    Once a connection breaks, aiohttp's reader raises its error at the next read even where the
    bytes that came just before the break wait in its buffer (aio-libs/aiohttp#3026): under
    load, the last pieces an upstream did send before failing would be lost. Its error is held
    back for one read here, so that they can be relayed before the error is."""
    error = content.exception()
    if error is None or not hasattr(content, "_exception"):
        return b""
    content._exception = None
    try:
        return content.read_nowait()
    finally:
        content.set_exception(error)


async def _raise(error: BaseException) -> AsyncIterator[bytes]:
    """An iterator of body chunks that fails at once with `error`."""
    raise error
    yield b""  # pragma: no cover  (an async generator)


class RemoteEngine:
    """`engine = "remote"`: see the module docstring."""

    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        self._upstream_model = spec.upstream_model or spec.id
        key = spec.resolved_upstream_key()
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        # connecting has its own limit here; the first byte and the whole answer are timed by
        # each attempt (asyncio.timeout), the way the module's notes say
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=spec.connect_timeout, sock_connect=spec.connect_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        auth = {"Authorization": self._headers["Authorization"]} if key else {}
        self.pool = UpstreamPool(
            spec.upstreams,
            client=self.session,
            health_headers=auth,
            health_interval=spec.health_interval,
            health_timeout=spec.connect_timeout,
            eject_after=spec.eject_after,
            eject_seconds=spec.eject_seconds,
            max_outstanding=spec.max_outstanding,
        )
        self._tokenizer = _load_tokenizer(spec.tokenizer) if spec.tokenizer else None
        self._context_length = spec.context_length or DEFAULT_CONTEXT
        self._info = EngineInfo(
            id=spec.id,
            engine="remote",
            context_length=self._context_length,
            owned_by=spec.owned_by,
            description=spec.description
            or f"{self._upstream_model} on {len(spec.upstreams)} upstream server(s)",
            extra={"upstream_model": self._upstream_model},
            needs_pixels=False,
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    async def start(self) -> None:
        await self.pool.start()

    def session(self) -> aiohttp.ClientSession:
        """The keep-alive connection pool to the upstreams (made on first use, in the loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        await self.pool.close()
        if self._session is not None:
            await self._session.close()

    # -- counting --------------------------------------------------------------------------

    def count_text_tokens(self, messages: Sequence[Message]) -> int:
        total = 3  # the assistant turn's opening
        for message in messages:
            text = message.text
            if self._tokenizer is not None:
                total += len(self._tokenizer.encode(text, add_special_tokens=False).ids)
            else:
                total += math.ceil(len(text.encode("utf-8")) / 4)
            total += _TOKENS_PER_MESSAGE
        return total

    def _check_context(self, request: GenerationRequest) -> None:
        images = sum(image_tokens(s.width, s.height, s.detail) for s in request.sources)
        prompt = self.count_text_tokens(request.messages) + images
        if prompt >= self._context_length:
            raise ContextLengthExceeded(
                f"This model's context is {self._context_length} tokens; the prompt is about "
                f"{prompt} ({images} of them for images).",
                param="messages",
            )

    # -- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self._check_context(request)
        body = await self._body(request)
        headers = {**self._headers, "X-Request-Id": _uuid_form(request.request_id)}
        tried: list[Upstream] = []
        upstream = self.pool.choose()
        while True:
            tried.append(upstream)
            attempt = _Attempt(self, upstream, body, headers, whole=not request.stream)
            try:
                first = await attempt.first()
            except _Failed as failed:
                await attempt.close()
                if not failed.retry or len(tried) > self._spec.retries:
                    raise failed.error from None
                try:
                    upstream = self.pool.choose(tried)
                except OculoError:
                    raise failed.error from None
                self.pool.counters.retries += 1
                log.info("%s: retrying on %s: %s", request.request_id, upstream.label, failed.error)
                continue
            except BaseException:
                await attempt.close()
                raise
            break
        try:
            yield first
            while (delta := await attempt.next()) is not None:
                yield delta
        finally:
            await attempt.close()

    async def _body(self, request: GenerationRequest) -> bytes:
        sources = request.sources
        if any(s.detail == "low" for s in sources):
            uris = await asyncio.to_thread(lambda: [image_uri(s) for s in sources])
        else:
            uris = [image_uri(s) for s in sources]
        return request_body(
            request, model=self._upstream_model, max_tokens=self._spec.max_tokens, uris=uris
        )


class _Attempt:
    """One request to one upstream: open it, read its events as deltas, close it."""

    def __init__(
        self,
        engine: RemoteEngine,
        upstream: Upstream,
        body: bytes,
        headers: dict[str, str],
        *,
        whole: bool,
    ) -> None:
        self._engine = engine
        self._pool = engine.pool
        self._spec = engine._spec
        self._upstream = upstream
        self._body = body
        self._headers = headers
        self._whole = whole
        self._lease = self._pool.lease(upstream)
        self._lease.__enter__()
        self._deadline = asyncio.get_running_loop().time() + self._spec.total_timeout
        self._response: aiohttp.ClientResponse | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._decoder = SSEDecoder()
        self._events: deque[UpstreamEvent] = deque()
        self._finish: FinishReason | None = None
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        self._ended = False
        self._answering = False  # the first piece of the answer has come
        self._settled = False  # the pool has been told how it went
        self._closed = False

    # -- the outside ----------------------------------------------------------------------

    async def first(self) -> Delta:
        """Up to the first piece of the answer (whole: all of it); raises `_Failed`."""
        try:
            async with asyncio.timeout(self._spec.first_byte_timeout):
                await self._open()
                delta = await self._delta()
            self._answering = True
            if self._whole:
                async with asyncio.timeout_at(self._deadline):
                    delta = await self._rest(delta)
            return delta
        except _Failed as failed:
            self._failure(failed)
            raise
        except _EXPECTED as exc:
            raise _Failed(self._failure(exc), retry=True) from None

    async def next(self) -> Delta | None:
        """The next piece of a stream that has started; None after the last."""
        if self._ended:
            return None
        try:
            async with asyncio.timeout_at(self._deadline):
                return await self._delta()
        except _EXPECTED as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: BaseException) -> OculoError:
        """An attempt's failure as the error a client gets; the pool is told of it once."""
        error: OculoError
        if isinstance(exc, _Failed):
            error = exc.error
        elif isinstance(exc, TimeoutError):
            error = self._timeout_error(exc)
        else:
            error = self._broken_error(exc)
        self._fail(error, timeout=isinstance(error, UpstreamTimeout))
        return error

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._ended:
                await self._drain()
        finally:
            await self._release()

    async def _drain(self) -> None:
        """Read what follows the last event (the end of the chunked body, usually already
        here): a response read to its end gives its connection back to the pool for the next
        request, where one closed early would cost a new connection."""
        if self._chunks is None:
            return
        with suppress(Exception):
            async with asyncio.timeout(_DRAIN_SECONDS):
                async for _ in self._chunks:
                    pass

    async def _release(self) -> None:
        try:
            if self._response is not None:
                if self._ended:
                    self._response.release()  # read to its end: the connection is reused
                else:
                    self._response.close()  # closes the connection: the upstream stops
        finally:
            self._lease.__exit__(None, None, None)
            if not self._settled:
                self._settled = True
                self._pool.abandoned(self._upstream)

    # -- the inside -----------------------------------------------------------------------

    async def _open(self) -> None:
        response = await self._engine.session().post(
            self._upstream.url + "/v1/chat/completions", data=self._body, headers=self._headers
        )
        self._response = response
        if response.status == 200:
            self._chunks = response.content.iter_any()
            return
        raw = await response.read()
        raise self._status_failure(response, raw)

    def _status_failure(self, response: aiohttp.ClientResponse, raw: bytes) -> _Failed:
        status = response.status
        name = self._upstream.name
        detail = error_message(raw)
        if status == 429:
            self._settled = True
            self._pool.succeeded(self._upstream, outcome="busy")
            retry_after = _seconds(response.headers.get("retry-after"))
            return _Failed(
                Overloaded(
                    f"The upstream model server ({name}) is overloaded (HTTP 429): {detail}",
                    retry_after=retry_after or 1,
                ),
                retry=True,
            )
        if 400 <= status < 500 and status != 408:
            self._settled = True
            self._pool.succeeded(self._upstream, outcome="rejected")
            return _Failed(
                UpstreamRejected(
                    f"The upstream model server ({name}) refused the request "
                    f"(HTTP {status}): {detail}"
                ),
                retry=False,
            )
        if status == 408:
            return _Failed(
                UpstreamTimeout(f"The upstream model server ({name}) timed out (HTTP 408)."),
                retry=True,
            )
        return _Failed(
            UpstreamError(
                f"The upstream model server ({name}) failed (HTTP {status}): {detail}. "
                "oculo itself is working; try again."
            ),
            retry=True,
        )

    def _timeout_error(self, exc: BaseException) -> UpstreamTimeout:
        name = self._upstream.name
        spec = self._spec
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            what = f"could not be reached within {spec.connect_timeout:g} s"
        elif not self._answering:
            what = f"did not start its answer within {spec.first_byte_timeout:g} s"
        else:
            what = f"did not finish its answer within {spec.total_timeout:g} s"
        return UpstreamTimeout(f"The upstream model server ({name}) {what}.")

    def _broken_error(self, exc: BaseException) -> UpstreamError:
        name = self._upstream.name
        if isinstance(exc, MalformedEvent):
            what = f"sent {exc}"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            what = "refused the connection"
        else:
            what = f"broke off the answer ({type(exc).__name__})"
        return UpstreamError(f"The upstream model server ({name}) {what}.")

    def _fail(self, error: OculoError, *, timeout: bool = False) -> None:
        if self._settled:
            return
        self._settled = True
        log.warning("upstream %s: %s", self._upstream.label, error.message)
        self._pool.failed(self._upstream, error.message, outcome="timeout" if timeout else "error")

    async def _event(self) -> UpstreamEvent | None:
        """The next upstream event; None at the end of the body."""
        assert self._chunks is not None
        while not self._events:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return None
            except aiohttp.ClientError as error:
                assert self._response is not None
                chunk = unread(self._response.content)
                if not chunk:
                    raise
                self._chunks = _raise(error)  # the pieces that came first, then the error
            self._events.extend(parse_event(data) for data in self._decoder.feed(chunk))
        return self._events.popleft()

    async def _delta(self) -> Delta:
        """The next piece with text, or the last one (finish reason and counts)."""
        while True:
            event = await self._event()
            if event is None or event.done:
                if self._finish is None and (event is None or self._decoder.pending):
                    raise _Failed(
                        UpstreamError(
                            f"The upstream model server ({self._upstream.name}) ended its "
                            "answer early."
                        ),
                        retry=True,
                    )
                return self._last()
            if event.error is not None:
                raise _Failed(
                    UpstreamError(
                        f"The upstream model server ({self._upstream.name}) failed: {event.error}"
                    ),
                    retry=True,
                )
            if event.prompt_tokens is not None:
                self._prompt_tokens = event.prompt_tokens
            if event.completion_tokens is not None:
                self._completion_tokens = event.completion_tokens
            if event.finish_reason is not None:
                self._finish = event.finish_reason
            if event.text:
                return Delta(text=event.text)

    def _last(self) -> Delta:
        self._ended = True
        if not self._settled:
            self._settled = True
            self._pool.succeeded(self._upstream)
        return Delta(
            finish_reason=self._finish or "stop",
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            upstream=self._upstream.url,
        )

    async def _rest(self, first: Delta) -> Delta:
        """A whole answer in one delta: `first` and everything after it."""
        parts = [first.text]
        last = first
        pieces = 1 if first.text else 0
        while last.finish_reason is None:
            last = await self._delta()
            if last.text:
                parts.append(last.text)
                pieces += 1
        completion = last.completion_tokens if last.completion_tokens is not None else pieces
        return Delta(
            text="".join(parts),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=completion,
            upstream=last.upstream,
        )


def _uuid_form(request_id: str) -> str:
    """A request id as a UUID (some servers, llama-cpp-python's, refuse any other form)."""
    hex_part = request_id.rsplit("-", 1)[-1]
    try:
        return str(uuid.UUID(hex=hex_part))
    except ValueError:
        return str(uuid.uuid4())


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _load_tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "tokenizer.json"
    return Tokenizer.from_file(str(file))
