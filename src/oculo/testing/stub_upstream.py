"""A fast, scriptable OpenAI-compatible upstream for tests and benchmarks.

A plain asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) with three routes:
`POST /v1/chat/completions` (whole or streamed answers, with usage), `GET /health` and
`GET /v1/models`. What it answers is a `Reply`: the default one, or the next of a script that
tests queue (`stub.script(Reply(status=500), Reply(hang=True))`). It records what it received
and notices clients that leave mid-answer (`stub.disconnects`).

In a thread of its own, for tests: `with running_stub() as stub: ... stub.url ...`.
As a process, for benchmarks: `python -m oculo.testing.stub_upstream --port 9000`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

__all__ = ["Reply", "StubUpstream", "running_stub"]


@dataclass(frozen=True)
class Reply:
    """How the stub answers one chat request."""

    words: tuple[str, ...] = ("Hello", " from", " the", " stub", ".")
    status: int = 200  # anything else: an OpenAI-shaped error body with this status
    error: str = "stub failure"
    first_byte_delay: float = 0.0  # seconds before the response starts
    chunk_delay: float = 0.0  # seconds between streamed pieces
    drop_after: int | None = None  # close the connection after this many pieces
    hang: bool = False  # never answer (until the client leaves)
    usage: bool = True  # send usage (always in whole answers; streamed when asked)
    finish_reason: str = "stop"
    error_event_after: int | None = None  # stream: an error event after this many pieces
    prompt_tokens: int = 11


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class StubUpstream:
    default: Reply = field(default_factory=Reply)
    health_status: int = 200  # for GET /health; 404: only /v1/models answers
    models_status: int = 200
    record: bool = True
    received: list[Received] = field(default_factory=list)
    disconnects: int = 0  # clients that left before the end of an answer
    finished: int = 0  # answers sent to the end
    connections: int = 0  # TCP connections accepted (keep-alive reuse shows as few)
    port: int = 0
    _script: deque[Reply] = field(default_factory=deque)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order, then with `default` again."""
        with self._lock:
            self._script.extend(replies)

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else self.default

    @property
    def chat_requests(self) -> list[Received]:
        return [r for r in self.received if r.path == "/v1/chat/completions"]

    # -- the server --------------------------------------------------------------------------

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        server = await asyncio.start_server(self._connection, host, port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # the stub is shutting down
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        raw = await reader.readexactly(length) if length else b""
        if method == "GET" and path == "/health":
            await _send_json(writer, self.health_status, {"status": "ok"})
        elif method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [{"id": "stub", "object": "model",
                                                  "created": 0, "owned_by": "stub"}]}  # fmt: skip
            await _send_json(writer, self.models_status, models)
        elif method == "POST" and path == "/v1/chat/completions":
            body = orjson.loads(raw) if raw else {}
            if self.record:
                with self._lock:
                    self.received.append(Received(path, headers, body))
            await self._chat(reader, writer, body, self._next_reply())
        else:
            await _send_json(writer, 404, {"error": {"message": "not found", "type": "x"}})
        return headers.get("connection", "").lower() != "close"

    async def _chat(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        body: dict[str, Any],
        reply: Reply,
    ) -> None:
        if reply.hang:
            await reader.read()  # until the client leaves
            self.disconnects += 1
            raise ConnectionResetError
        if reply.first_byte_delay:
            await asyncio.sleep(reply.first_byte_delay)
        if reply.status != 200:
            error = {"error": {"message": reply.error, "type": "stub_error", "code": None}}
            await _send_json(writer, reply.status, error)
            return
        model = str(body.get("model", "stub"))
        stream = bool(body.get("stream"))
        usage = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": len(reply.words),
            "total_tokens": reply.prompt_tokens + len(reply.words),
        }
        if not stream:
            answer = {
                "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "finish_reason": reply.finish_reason, "logprobs": None,
                             "message": {"role": "assistant", "content": "".join(reply.words)}}],
                **({"usage": usage} if reply.usage else {}),
            }  # fmt: skip
            await _send_json(writer, 200, answer)
            self.finished += 1
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model}  # fmt: skip
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}]  # fmt: skip
        for word in reply.words:
            events.append({**base, "choices": [{"index": 0, "delta": {"content": word},
                                                "finish_reason": None}]})  # fmt: skip
        events.append(
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]}
        )
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if reply.usage and wants_usage:
            events.append({**base, "choices": [], "usage": usage})
        for i, event in enumerate(events):
            pieces = i  # the role-only event is not a piece
            if reply.drop_after is not None and pieces > reply.drop_after:
                # the connection ends mid-body (no last chunk) with a FIN, not a reset: a reset
                # lets the peer's kernel drop pieces already sent but not yet read
                writer.close()
                raise ConnectionResetError
            if reply.error_event_after is not None and pieces > reply.error_event_after:
                error = {"error": {"message": reply.error, "type": "stub_error"}}
                await _chunk(writer, b"data: " + orjson.dumps(error) + b"\n\n")
                break
            if reply.chunk_delay and i > 1:
                await asyncio.sleep(reply.chunk_delay)
            if reader.at_eof():
                self.disconnects += 1
                raise ConnectionResetError
            await _chunk(writer, b"data: " + orjson.dumps(event) + b"\n\n")
        else:
            await _chunk(writer, b"data: [DONE]\n\n")
            self.finished += 1
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def _send_json(writer: asyncio.StreamWriter, status: int, payload: Any) -> None:
    data = orjson.dumps(payload)
    writer.write(
        b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (status, len(data), data)
    )
    await writer.drain()


@contextlib.contextmanager
def running_stub(stub: StubUpstream | None = None, **fields: Any) -> Iterator[StubUpstream]:
    """A stub on a free loopback port, served from a thread of its own until the block ends."""
    stub = stub or StubUpstream(**fields)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, asyncio.Server] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        holder["server"] = loop.run_until_complete(stub.serve())
        started.set()
        loop.run_forever()
        holder["server"].close()
        for task in list(stub._tasks):
            task.cancel()
        if stub._tasks:
            loop.run_until_complete(asyncio.gather(*stub._tasks, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, name="stub-upstream", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield stub
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description="A fast OpenAI-compatible stub upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--words", type=int, default=8, help="pieces in each answer")
    args = parser.parse_args()
    words = tuple(f" w{i}" for i in range(args.words))
    stub = StubUpstream(default=replace(Reply(), words=words), record=False)

    async def run() -> None:
        server = await stub.serve(args.host, args.port)
        print(f"stub upstream on {stub.url}", flush=True)
        async with server:
            await server.serve_forever()

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())


if __name__ == "__main__":
    main()
