"""A front oculo in front of two real `oculo serve` upstreams (processes on loopback), one of which
is SIGKILLed in the middle of a run: requests that had not started their answer are answered by
the other, and the stream that had started on the killed one ends with a clear error event."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, Server, one_model, png_uri, start_server, stop_server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "fleet/tiny"


def front_config(upstreams: list[Server]) -> str:
    urls = ", ".join(f'"{s.base_url}"' for s in upstreams)
    return (
        "[[models]]\n"
        f'id = "{MODEL}"\n'
        'engine = "remote"\n'
        f"upstreams = [{urls}]\n"
        'upstream_model = "tiny"\n'
        f'upstream_key = "{API_KEY}"\n'
        "context_length = 2048\n"
        "health_interval = 0.5\n"
        "eject_after = 1\n"
        "eject_seconds = 60\n"
    )


@pytest.fixture
def fleet(checkpoints: dict[str, Path], tmp_path: Path) -> Iterator[tuple[Server, list[Server]]]:
    servers: list[Server] = []
    try:
        for name in ("up-a", "up-b"):
            (tmp_path / name).mkdir()
            servers.append(start_server(one_model(checkpoints), tmp_path / name))
        (tmp_path / "front").mkdir()
        front = start_server(front_config(servers), tmp_path / "front")
        yield front, servers
        stop_server(front)
    finally:
        for server in servers:
            if server.process.poll() is None:
                stop_server(server)


def body(i: int, *, stream: bool, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_uri(32 + i, 32)}},
                    {"type": "text", "text": f"Request {i}: what is in this image?"},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,  # greedy: the tiny random model runs to max_tokens
        "stream": stream,
        "stream_options": {"include_usage": True},
    }


def outcome(front: Server, i: int, stream: bool) -> tuple[int, list[Any]]:
    """(status, the stream's payloads or the whole answer) of one short request."""
    r = httpx.post(
        front.v1 + "/chat/completions",
        json=body(i, stream=stream, max_tokens=8),
        headers=HEADERS,
        timeout=120,
    )
    if not stream or r.status_code != 200:
        return r.status_code, [r.json()]
    raw = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert raw[-1] == "[DONE]"
    return r.status_code, [json.loads(e) for e in raw[:-1]]


def pool(front: Server) -> list[dict[str, Any]]:
    upstreams: list[dict[str, Any]] = httpx.get(front.base_url + "/pool").json()["models"][0][
        "upstreams"
    ]
    return upstreams


def test_killing_an_upstream_mid_run(fleet: tuple[Server, list[Server]]) -> None:
    front, upstreams = fleet
    assert all(u["healthy"] for u in pool(front))

    # 1. a long stream starts; find the upstream generating it
    long_events: list[Any] = []
    started = threading.Event()

    def long_stream() -> None:
        with httpx.stream(
            "POST",
            front.v1 + "/chat/completions",
            json=body(0, stream=True, max_tokens=1500),
            headers=HEADERS,
            timeout=120,
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                long_events.append(line.removeprefix("data: "))
                if len(long_events) >= 4:
                    started.set()

    long_thread = threading.Thread(target=long_stream)
    long_thread.start()
    assert started.wait(60), front.log()
    busy = [u["url"] for u in pool(front) if u["outstanding"] == 1]
    assert len(busy) == 1
    doomed = next(s for s in upstreams if s.base_url == busy[0])

    # 2. short requests, whole and streamed, spread over both; wait until some queue on the
    #    doomed one behind the long stream (its engine runs one generation at a time)
    with ThreadPoolExecutor(max_workers=16) as executor:
        futures = [executor.submit(outcome, front, i, i % 2 == 1) for i in range(1, 17)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            queued = {u["url"]: u["outstanding"] for u in pool(front)}[doomed.base_url]
            if queued >= 3:
                break
            time.sleep(0.05)
        assert queued >= 3, "no request queued on the upstream to be killed"

        # 3. kill it
        os.kill(doomed.process.pid, signal.SIGKILL)
        results = [f.result() for f in futures]
    long_thread.join(timeout=60)

    # every short request was answered in full, by the survivor when not by the doomed one
    for status, payloads in results:
        assert status == 200, payloads
        assert not any("error" in p for p in payloads), payloads
        assert payloads[-1]["usage"]["completion_tokens"] > 0
    # the stream that had started ends with an error event that says an upstream failed
    assert long_events[-1] == "[DONE]"
    error = json.loads(long_events[-2])
    assert error["error"]["code"] == "upstream_error"
    assert error["error"]["type"] == "server_error"
    assert "upstream model server" in error["error"]["message"]
    pieces = [json.loads(e) for e in long_events[:-2]]
    assert sum(1 for p in pieces if p["choices"][0]["delta"].get("content")) >= 3

    # the front retried the queued requests elsewhere, ejected the dead upstream, and stays up
    state = {u["url"]: u for u in pool(front)}
    assert state[doomed.base_url]["ejected"] or not state[doomed.base_url]["healthy"]
    assert state[doomed.base_url]["requests"]["error"] >= 2
    assert httpx.get(front.base_url + "/pool").json()["models"][0]["retries"] >= 2
    status, payloads = outcome(front, 99, False)
    assert status == 200
    metrics = httpx.get(front.base_url + "/metrics").text
    assert 'oculo_upstream_retries_total{model="fleet/tiny"}' in metrics
