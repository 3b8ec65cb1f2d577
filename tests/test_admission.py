"""Admission and cancellation, driven deterministically by a gated engine, in-process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import pytest
from conftest import API_KEY, png_uri, serve_in_process

from oculo.engines.base import Delta, EngineInfo, GenerationRequest, Message


class GatedEngine:
    """Yields one delta, then waits for `gate` before finishing; records closes."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = 0
        self.closed = 0
        self.info = EngineInfo(id="gated", engine="test", context_length=1000)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.started += 1
        try:
            yield Delta(text="first")
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
            yield Delta(text=" last", finish_reason="stop", completion_tokens=2)
        finally:
            self.closed += 1

    def count_text_tokens(self, messages: Sequence[Message]) -> int:
        return 5

    async def close(self) -> None:
        pass


@pytest.fixture
def gated() -> Iterator[tuple[str, GatedEngine]]:
    engine = GatedEngine()
    with serve_in_process(engine, "gated", max_concurrent_requests=2) as base:
        yield base, engine
        engine.gate.set()


def body(stream: bool) -> dict[str, Any]:
    return {
        "model": "gated",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_uri()}}]}
        ],
        "stream": stream,
    }


HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_requests_past_the_bound_get_503_then_slots_free_up(gated: tuple[str, GatedEngine]) -> None:
    base, engine = gated
    with (
        httpx.Client(base_url=base, headers=HEADERS, timeout=30) as a,
        httpx.Client(base_url=base, headers=HEADERS, timeout=30) as b,
        a.stream("POST", "/v1/chat/completions", json=body(True)) as s1,
        b.stream("POST", "/v1/chat/completions", json=body(True)) as s2,
    ):
        assert s1.status_code == s2.status_code == 200
        r = httpx.post(base + "/v1/chat/completions", json=body(False), headers=HEADERS)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "overloaded"
        assert r.json()["error"]["type"] == "server_error"
        assert int(r.headers["retry-after"]) >= 1
        engine.gate.set()
        s1.read()
        s2.read()
    r = httpx.post(base + "/v1/chat/completions", json=body(False), headers=HEADERS)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "first last"


def test_leaving_a_stream_closes_the_engine_stream_and_frees_the_slot(
    gated: tuple[str, GatedEngine],
) -> None:
    base, engine = gated
    for _ in range(3):  # more departures than slots: each one must give its slot back
        with (
            httpx.Client(base_url=base, headers=HEADERS, timeout=30) as c,
            c.stream("POST", "/v1/chat/completions", json=body(True)) as s,
        ):
            assert s.status_code == 200
            next(s.iter_raw())
        closed = engine.started
        wait_until(lambda closed=closed: engine.closed == closed)
    engine.gate.set()
    assert (
        httpx.post(base + "/v1/chat/completions", json=body(False), headers=HEADERS).status_code
        == 200
    )


def test_leaving_a_whole_request_stops_generation(gated: tuple[str, GatedEngine]) -> None:
    base, engine = gated
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", json=body(False), headers=HEADERS, timeout=0.5)
    wait_until(lambda: engine.closed == engine.started == 1)
    engine.gate.set()
    assert (
        httpx.post(base + "/v1/chat/completions", json=body(False), headers=HEADERS).status_code
        == 200
    )
