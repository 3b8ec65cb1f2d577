"""The least any Python HTTP server spends on the benchmark's request: a bare ASGI app under
uvicorn (uvloop, httptools: the stack oculo runs on) that reads the whole body and answers a
few bytes, doing nothing with it. `benchmarks.gateway` measures its CPU per request beside the
gateways': the part of their cost that is receiving 770 KB over HTTP, not their own work.

    .venv/bin/python -m uvicorn benchmarks.bare_server:app --port 9000
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

_ANSWER = b'{"ok":true}'


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": _ANSWER})
