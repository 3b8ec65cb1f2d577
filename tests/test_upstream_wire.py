"""The wire to upstreams, in pieces: the forwarded body, SSE splitting, events, error bodies; and
the pool's routing and ejection on a clock the test moves."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from oculo.engines.base import (
    GenerationRequest,
    ImageSegment,
    ImageSource,
    Message,
    SamplingParams,
    TextSegment,
)
from oculo.engines.pool import UpstreamPool
from oculo.engines.upstream_wire import (
    MalformedEvent,
    SSEDecoder,
    error_message,
    image_uri,
    parse_event,
    request_body,
)
from oculo.errors import EngineUnavailable, Overloaded


def test_the_forwarded_body() -> None:
    request = GenerationRequest(
        messages=[
            Message("system", (TextSegment("Be brief."),)),
            Message("user", (ImageSegment(0), TextSegment("What?"))),
            Message("assistant", (TextSegment("A cat."),)),
        ],
        images=[],
        sampling=SamplingParams(
            temperature=0.5, stop=("END",), presence_penalty=0.1, chosen=frozenset({"temperature"})
        ),
    )
    body = orjson.loads(request_body(request, model="up", max_tokens=64, uris=["data:x"]))
    assert body == {
        "model": "up",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:x"}},
                {"type": "text", "text": "What?"},
            ]},
            {"role": "assistant", "content": "A cat."},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 64,
        "temperature": 0.5,
        "stop": ["END"],
        "presence_penalty": 0.1,
    }  # fmt: skip


def test_image_uris_are_the_clients_own_unless_low_detail_must_shrink() -> None:
    source = ImageSource(data=b"\x89PNG...", format="png", width=600, height=600, url="data:a")
    assert image_uri(source) == "data:a"
    unnamed = ImageSource(data=b"abc", format="webp", width=10, height=10)
    assert image_uri(unnamed) == "data:image/webp;base64,YWJj"
    small_low = ImageSource(data=b"x", format="png", width=560, height=100, detail="low", url="u")
    assert image_uri(small_low) == "u"


def test_sse_events_split_across_reads_and_line_endings() -> None:
    decoder = SSEDecoder()
    stream = b'data: {"a":1}\n\ndata: {"b":\r\n\r\n: comment\n\nevent: x\ndata: [DONE]\n\n'
    out: list[bytes] = []
    for i in range(0, len(stream), 3):
        out += decoder.feed(stream[i : i + 3])
    assert out == [b'{"a":1}', b'{"b":', b"[DONE]"]
    assert not decoder.pending
    assert decoder.feed(b"data: partial") == [] and decoder.pending
    assert SSEDecoder().feed(b'error: {"error": "boom"}\n\n') == [b'{"error": "boom"}']


def test_events() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    assert parse_event(orjson.dumps(chunk)).text == "Hi"
    chunk["choices"][0]["finish_reason"] = "length"  # type: ignore[index]
    assert parse_event(orjson.dumps(chunk)).finish_reason == "length"
    chunk["choices"][0]["finish_reason"] = "eos"  # type: ignore[index]
    assert parse_event(orjson.dumps(chunk)).finish_reason == "stop"
    usage = parse_event(b'{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}')
    assert (usage.prompt_tokens, usage.completion_tokens) == (9, 2)
    assert parse_event(b"[DONE]").done
    assert parse_event(b'{"error": {"message": "bad"}}').error == "bad"
    for bad in (b"nope", b"[1]", b'{"choices": 3}'):
        with pytest.raises(MalformedEvent):
            parse_event(bad)


def test_error_messages_in_any_shape_and_bounded() -> None:
    assert error_message(b'{"error": {"message": "m", "type": "t"}}') == "m"
    assert error_message(b'{"detail": "not here"}') == "not here"
    assert error_message(b'{"error": "plain"}') == "plain"
    assert error_message(b"<html>\n502 Bad Gateway</html>") == "<html> 502 Bad Gateway</html>"
    assert len(error_message(b"x" * 10_000)) == 300


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_pool(n: int, clock: Clock, **kw: Any) -> UpstreamPool:
    client = httpx.AsyncClient()
    return UpstreamPool([f"http://u{i}" for i in range(n)], client=client, clock=clock, **kw)


def test_least_outstanding_with_round_robin_ties() -> None:
    pool = make_pool(3, Clock())
    u0, u1, u2 = pool.upstreams
    chosen = [pool.choose().index for _ in range(6)]
    assert sorted(chosen) == [1, 1, 2, 2, 3, 3]  # idle: every one in turn
    with pool.lease(u0), pool.lease(u1):
        assert pool.choose() is u2
        with pool.lease(u2), pool.lease(u2):
            assert pool.choose() in (u0, u1)
    assert pool.choose(exclude=[u0, u1]) is u2


def test_ejection_after_failures_in_a_row_and_back_after_the_cool_down() -> None:
    clock = Clock()
    pool = make_pool(2, clock, eject_after=3, eject_seconds=30)
    u0, u1 = pool.upstreams
    pool.failed(u0, "x")
    pool.failed(u0, "x")
    pool.succeeded(u0)  # a success resets the run
    pool.failed(u0, "x")
    pool.failed(u0, "x")
    assert u0.ejections == 0
    pool.failed(u0, "HTTP 500")
    assert u0.ejections == 1
    assert all(pool.choose() is u1 for _ in range(5))
    state = pool.states()[0]
    assert state.ejected and state.ejected_for == 30 and state.last_error == "HTTP 500"
    pool.failed(u1, "x")
    u1.healthy = False
    with pytest.raises(EngineUnavailable) as caught:
        pool.choose()
    assert caught.value.retry_after == 30
    clock.now += 30
    assert pool.choose() is u0
    assert not pool.states()[0].ejected


def test_a_full_pool_is_overloaded() -> None:
    pool = make_pool(1, Clock(), max_outstanding=1)
    with pool.lease(pool.upstreams[0]), pytest.raises(Overloaded):
        pool.choose()
