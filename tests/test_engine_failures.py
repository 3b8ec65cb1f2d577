"""An engine that fails: before its first token an OpenAI-shaped 5xx, after it an error event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from conftest import API_KEY, serve_in_process

from oculo.engines.base import Delta, EngineInfo, GenerationRequest, Message
from oculo.errors import EngineUnavailable

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


class FailingEngine:
    """`mode` "before": raises before any delta; "after": one delta, then a crash."""

    def __init__(self) -> None:
        self.mode = "after"
        self.info = EngineInfo(id="failing", engine="test", context_length=1000)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self.mode == "before":
            raise RuntimeError("CUDA error: secret internal detail")
        if self.mode == "unavailable":
            raise EngineUnavailable("The engine is restarting.", retry_after=3)
        yield Delta(text="partial")
        raise RuntimeError("CUDA error: secret internal detail")

    def count_text_tokens(self, messages: Sequence[Message]) -> int:
        return 3

    async def close(self) -> None:
        pass


def body(stream: bool) -> dict[str, Any]:
    return {"model": "failing", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def test_failures_are_openai_shaped_and_leak_nothing(schemas: Any) -> None:
    engine = FailingEngine()
    with serve_in_process(engine, "failing") as base:
        url = base + "/v1/chat/completions"
        engine.mode = "before"
        for stream in (False, True):
            r = httpx.post(url, json=body(stream), headers=HEADERS)
            assert r.status_code == 500
            schemas(r.json(), "ErrorResponse")
            assert r.json()["error"]["type"] == "server_error"
            assert "secret" not in r.text
        engine.mode = "unavailable"
        r = httpx.post(url, json=body(True), headers=HEADERS)
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "engine_unavailable"

        engine.mode = "after"
        r = httpx.post(url, json=body(True), headers=HEADERS)
        assert r.status_code == 200  # the stream had started: the failure is an event in it
        events = [e[len("data: ") :] for e in r.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        payloads = [json.loads(e) for e in events[:-1]]
        assert payloads[1]["choices"][0]["delta"]["content"] == "partial"
        error = payloads[-1]
        schemas(error, "ErrorResponse")
        assert error["error"]["type"] == "server_error"
        assert "secret" not in r.text
        r = httpx.post(url, json=body(False), headers=HEADERS)
        assert r.status_code == 500
        schemas(r.json(), "ErrorResponse")
        metrics = httpx.get(base + "/metrics").text
        assert "oculo_requests_in_flight 0.0" in metrics
