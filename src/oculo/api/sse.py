"""Server-sent events as OpenAI streams them: `data: <json>` lines, ending in `data: [DONE]`."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer the stream
}

MEDIA_TYPE = "text/event-stream"


def event(payload: BaseModel | dict[str, Any]) -> bytes:
    if isinstance(payload, BaseModel):
        data = payload.__pydantic_serializer__.to_json(payload)
    else:
        data = orjson.dumps(payload)
    return b"data: " + data + b"\n\n"
