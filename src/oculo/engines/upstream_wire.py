"""The wire to an OpenAI-compatible upstream: the request body oculo forwards, and what comes back.

- `request_body` renders a `GenerationRequest` as an OpenAI chat-completion body (always streamed,
  with `stream_options.include_usage` so that the upstream's own token counts come back). Images
  go as data URIs: the client's own string, untouched, unless `detail: "low"` asks for a smaller
  image than the one sent (`low_detail_uri`, which shrinks it to fit 560 x 560 and re-encodes it).
  `temperature` and `top_p` are sent only when the request or the catalog chose them, so that an
  upstream's own generation config decides otherwise.
- `SSEDecoder` splits the upstream's byte stream into the `data:` payloads of its events.
- `parse_event` reads one payload: text, finish reason, the upstream's usage, or its error.
- `error_message` reads an upstream's error body, whatever its shape, bounded in length.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import orjson
import pybase64

from oculo.engines.base import (
    FinishReason,
    GenerationRequest,
    ImageSegment,
    ImageSource,
    Message,
    TextSegment,
)
from oculo.media.decode import LOW_DETAIL_SIZE

__all__ = [
    "SSEDecoder",
    "UpstreamEvent",
    "error_message",
    "image_uri",
    "parse_event",
    "request_body",
]

DONE = b"[DONE]"
_MAX_ERROR_CHARS = 300


def image_uri(source: ImageSource) -> str:
    """The data URI to forward for one image: the client's own, unless it must be shrunk."""
    if source.detail == "low" and max(source.width, source.height) > LOW_DETAIL_SIZE:
        return low_detail_uri(source)
    if source.url is not None:
        return source.url
    encoded = pybase64.b64encode(source.data).decode("ascii")
    return f"data:image/{source.format};base64,{encoded}"


def low_detail_uri(source: ImageSource) -> str:
    """The image shrunk to fit 560 x 560 (first frame, EXIF applied, RGB), as PNG when the
    original is lossless (png, gif) and JPEG otherwise. Blocking: run it in a worker thread."""
    from oculo.media.decode import decode
    from oculo.media.probe import ImageHeader
    from oculo.media.sniff import ImageFormat

    fmt: ImageFormat = source.format  # type: ignore[assignment]
    header = ImageHeader(format=fmt, width=source.width, height=source.height, frames=1)
    pixels = source.width * source.height  # already checked against the cap by the policy
    image = decode(source.data, header, max_pixels=pixels, detail="low", param=None)
    out = io.BytesIO()
    if source.format in ("png", "gif"):
        image.save(out, format="PNG", optimize=False)
        mime = "image/png"
    else:
        image.save(out, format="JPEG", quality=90)
        mime = "image/jpeg"
    return f"data:{mime};base64," + pybase64.b64encode(out.getvalue()).decode("ascii")


def _content(message: Message, uris: list[str]) -> str | list[dict[str, Any]]:
    if all(isinstance(segment, TextSegment) for segment in message.content):
        return message.text
    parts: list[dict[str, Any]] = []
    for segment in message.content:
        if isinstance(segment, ImageSegment):
            parts.append({"type": "image_url", "image_url": {"url": uris[segment.index]}})
        else:
            parts.append({"type": "text", "text": segment.text})
    return parts


def request_body(
    request: GenerationRequest, *, model: str, max_tokens: int, uris: list[str]
) -> bytes:
    """The JSON body forwarded upstream; `uris[i]` is the data URI of `request.sources[i]`."""
    sampling = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": _content(m, uris)} for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": sampling.max_tokens or max_tokens,
    }
    if "temperature" in sampling.chosen:
        body["temperature"] = sampling.temperature
    if "top_p" in sampling.chosen:
        body["top_p"] = sampling.top_p
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    if sampling.presence_penalty:
        body["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        body["frequency_penalty"] = sampling.frequency_penalty
    return orjson.dumps(body)


class SSEDecoder:
    """Incremental server-sent-events parsing: bytes in, the `data` of each whole event out."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        out: list[bytes] = []
        for event in events:
            data = [
                line[5:].removeprefix(b" ")
                for line in event.split(b"\n")
                if line.startswith(b"data:")
            ]
            if data:
                out.append(b"\n".join(data))
            elif event.startswith(b"error:"):  # a bare `error: {...}` line, as some servers send
                out.append(event[6:].strip())
        return out

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished event are buffered."""
        return bool(self._buffer.strip())


@dataclass(frozen=True, slots=True)
class UpstreamEvent:
    """One upstream event, read: any of text, finish reason, usage, error; `done` for [DONE]."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    done: bool = False


class MalformedEvent(ValueError):
    """The upstream sent an event that is not an OpenAI chat-completion chunk."""


def _count(usage: dict[str, Any], name: str) -> int | None:
    value = usage.get(name)
    return value if isinstance(value, int) and value >= 0 else None


def parse_event(data: bytes) -> UpstreamEvent:
    """Read one event's payload: an OpenAI chat-completion chunk, `[DONE]` or an error."""
    if data.strip() == DONE:
        return UpstreamEvent(done=True)
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise MalformedEvent("an event that is not JSON") from None
    if not isinstance(payload, dict):
        raise MalformedEvent("an event that is not a JSON object")
    if "error" in payload:
        return UpstreamEvent(error=error_message(payload))
    text = ""
    finish: FinishReason | None = None
    choices = payload.get("choices") or []
    if not isinstance(choices, list):
        raise MalformedEvent("an event whose choices are not a list")
    for choice in choices[:1]:
        if not isinstance(choice, dict):
            raise MalformedEvent("an event whose choice is not an object")
        delta = choice.get("delta") or choice.get("message") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str):
            text = content
        reason = choice.get("finish_reason")
        if reason is not None:
            finish = "length" if reason == "length" else "stop"
    usage = payload.get("usage")
    if isinstance(usage, dict):
        return UpstreamEvent(
            text=text,
            finish_reason=finish,
            prompt_tokens=_count(usage, "prompt_tokens"),
            completion_tokens=_count(usage, "completion_tokens"),
        )
    return UpstreamEvent(text=text, finish_reason=finish)


def error_message(body: bytes | dict[str, Any]) -> str:
    """The message in an upstream's error body (OpenAI's shape, FastAPI's, or plain text)."""
    payload: Any = body
    if isinstance(body, bytes):
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            text = body.decode("utf-8", "replace").strip()
            return _bounded(text or "no message")
    message: Any = None
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail")
        elif isinstance(error, str):
            message = error
        if message is None:
            message = payload.get("detail") or payload.get("message")
    if not isinstance(message, str):
        message = orjson.dumps(payload).decode() if payload is not None else "no message"
    return _bounded(message)


def _bounded(text: str) -> str:
    """At most a few hundred characters: an error body may echo a whole request."""
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."
