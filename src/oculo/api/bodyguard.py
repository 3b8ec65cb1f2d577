"""A pure ASGI guard on request bodies: 1 MiB or more is refused with 413 as it streams in.

A declared `Content-Length` at or over the limit is refused before a byte of the body is read.
Otherwise (chunked, or an honest length) the body is counted chunk by chunk and buffered up to
the limit; the moment the count reaches the limit the request is refused and the rest is never
read. A body that fits is replayed to the app in one piece, so the app reads it at no extra cost.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oculo.api.responses import error_response
from oculo.errors import InvalidRequest, RequestTooLarge

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body must be smaller than {limit:,} bytes (1 MiB). Send smaller or fewer "
        "images: downscale them, or use JPEG/WebP.",
    )


class _ClientGone(Exception):
    pass


class BodyGuard:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            declared = self._content_length(scope)
            if declared is not None and declared >= self.limit:
                raise _too_large(self.limit)
            body = await self._read(receive)
        except _ClientGone:
            return
        except (RequestTooLarge, InvalidRequest) as exc:
            await error_response(exc, close=True)(scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client leaves

        await self.app(scope, replay, send)

    @staticmethod
    def _content_length(scope: Scope) -> int | None:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    raise InvalidRequest("Content-Length is not a number.") from None
        return None

    async def _read(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size >= self.limit:
                raise _too_large(self.limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
