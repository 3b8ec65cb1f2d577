"""Responses serialised with orjson, and the one way an OculoError becomes an HTTP response."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel
from starlette.responses import Response

from oculo.errors import from_exception


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        if isinstance(content, BaseModel):
            return content.__pydantic_serializer__.to_json(content)
        return orjson.dumps(content)


def error_response(exc: BaseException, *, close: bool = False) -> JSONResponse:
    """The OpenAI-shaped error body with the status (and Retry-After) that `errors` assigns."""
    error = from_exception(exc)
    headers = error.headers()
    if close:
        headers["Connection"] = "close"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)
