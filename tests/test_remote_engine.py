"""Remote models against scripted stub upstreams on loopback: forwarding, relaying, usage and the
ledger, errors that say which side failed, retries, ejection, health checks, disconnects."""

from __future__ import annotations

import base64
import io
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    API_KEY,
    data_uri,
    free_port,
    make_image,
    oculo_cli,
    png_uri,
    serve_settings,
)
from PIL import Image

from oculo.config import ConfigError, ModelSpec, load_settings
from oculo.media import image_tokens
from oculo.testing.stub_upstream import Reply, StubUpstream, running_stub

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PUBLIC = "google/gemma-3-27b-instruct/bf-16"
UPSTREAM_MODEL = "google/gemma-3-27b-it"


def remote(*upstreams: str, **fields: Any) -> ModelSpec:
    return ModelSpec(
        id=PUBLIC,
        engine="remote",
        upstreams=list(upstreams),
        upstream_model=UPSTREAM_MODEL,
        **fields,
    )


@contextmanager
def stubs(n: int, **fields: Any) -> Iterator[list[StubUpstream]]:
    with ExitStack() as stack:
        yield [stack.enter_context(running_stub(**fields)) for _ in range(n)]


@contextmanager
def oculo(*models: ModelSpec, data_dir: Path | None = None) -> Iterator[str]:
    extra = {"data_dir": str(data_dir)} if data_dir else {}
    with serve_settings(list(models), **extra) as base:
        yield base


def ask(
    base: str,
    *,
    stream: bool = False,
    images: tuple[str, ...] = (),
    text: str = "What is in this image?",
    **fields: Any,
) -> httpx.Response:
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": url}} for url in images
    ]
    content.append({"type": "text", "text": text})
    body = {
        "model": PUBLIC,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": content},
        ],
        "stream": stream,
        **fields,
    }
    return httpx.post(base + "/v1/chat/completions", json=body, headers=HEADERS, timeout=30)


def events(response: httpx.Response) -> list[Any]:
    raw = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert raw[-1] == "[DONE]"
    return [json.loads(e) for e in raw[:-1]]


def ledger(data_dir: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(data_dir / "oculo.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM usage ORDER BY created_at")]


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(base + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- the happy path


def test_whole_and_streamed_answers_are_relayed_with_oculos_ids_and_usage(
    schemas: Any, tmp_path: Path
) -> None:
    with stubs(1) as (stub,), oculo(remote(stub.url), data_dir=tmp_path) as base:
        image = png_uri(840, 560)
        r = ask(base, images=(image,))
        assert r.status_code == 200, r.text
        body = r.json()
        schemas(body, "CreateChatCompletionResponse")
        assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
        assert body["model"] == PUBLIC
        assert body["choices"][0]["message"]["content"] == "Hello from the stub."
        assert body["choices"][0]["finish_reason"] == "stop"
        usage = body["usage"]
        assert usage["prompt_tokens_details"]["image_tokens"] == image_tokens(840, 560) == 2402
        assert usage["prompt_tokens"] > 2402  # the text, estimated, on top
        assert usage["completion_tokens"] == 5  # the upstream's own count

        # what went upstream: its model name, the image as sent, no sampling nobody chose
        sent = stub.chat_requests[-1]
        assert sent.body["model"] == UPSTREAM_MODEL
        assert sent.body["stream"] is True
        assert sent.body["stream_options"] == {"include_usage": True}
        parts = sent.body["messages"][1]["content"]
        assert parts[0] == {"type": "image_url", "image_url": {"url": image}}
        assert parts[1] == {"type": "text", "text": "What is in this image?"}
        assert sent.body["messages"][0] == {"role": "system", "content": "Be brief."}
        assert "temperature" not in sent.body and "top_p" not in sent.body
        assert sent.body["max_tokens"] == 512
        request_id = sent.headers["x-request-id"]
        assert request_id.replace("-", "") == body["id"].removeprefix("chatcmpl-")

        r = ask(base, stream=True, stream_options={"include_usage": True}, max_tokens=7)
        assert r.status_code == 200
        payloads = events(r)
        for payload in payloads:
            schemas(payload, "CreateChatCompletionStreamResponse")
        assert {p["id"] for p in payloads} == {payloads[0]["id"]}
        assert payloads[0]["id"] != body["id"] and payloads[0]["model"] == PUBLIC
        text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-1])
        assert text == "Hello from the stub."
        assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
        assert payloads[-1]["usage"]["completion_tokens"] == 5
        assert stub.chat_requests[-1].body["max_tokens"] == 7

    rows = ledger(tmp_path)
    assert len(rows) == 2
    for row, stream in zip(rows, (0, 1), strict=True):
        assert row["status"] == 200 and row["stream"] == stream
        assert row["engine_prompt_tokens"] == 11  # the stub's prompt count, kept beside ours
        assert row["engine_completion_tokens"] == 5
        assert row["upstream"] == stub.url
    assert rows[0]["image_tokens"] == 2402


def test_answers_read_to_the_end_keep_the_upstream_connection_for_the_next_request() -> None:
    # a response closed right after its last event (before the chunked body's end) would cost
    # the next request a new TCP connection to the upstream
    with stubs(1) as (stub,), oculo(remote(stub.url, health_interval=60)) as base:
        for stream in (False, True, False, True, False, True):
            assert ask(base, stream=stream).status_code == 200
        assert stub.finished == 6
        assert stub.connections <= 2  # one for the answers (and maybe one for a health check)


def test_sampling_is_forwarded_only_when_chosen() -> None:
    with (
        stubs(1) as (stub,),
        oculo(
            remote(stub.url),
            remote(stub.url, temperature=0.0).model_copy(update={"id": "greedy"}),
        ) as base,
    ):
        r = ask(base, temperature=0.3, top_p=0.9, seed=5, stop=["x"], ignore_eos=True)
        assert r.status_code == 200
        sent = stub.chat_requests[-1].body
        assert (sent["temperature"], sent["top_p"], sent["seed"], sent["stop"]) == (
            0.3, 0.9, 5, ["x"],
        )  # fmt: skip
        assert sent["ignore_eos"] is True  # vLLM's, SGLang's and llama.cpp's own name
        body = {"model": "greedy", "messages": [{"role": "user", "content": "Hi"}]}
        r = httpx.post(base + "/v1/chat/completions", json=body, headers=HEADERS)
        assert r.status_code == 200
        sent = stub.chat_requests[-1].body
        assert sent["temperature"] == 0.0 and "top_p" not in sent and "ignore_eos" not in sent
        assert sent["model"] == UPSTREAM_MODEL
        assert sent["messages"] == [{"role": "user", "content": "Hi"}]


def test_low_detail_images_are_shrunk_before_forwarding_and_others_pass_untouched() -> None:
    big = make_image(1600, 1200, "JPEG", "red")
    small = png_uri(300, 200)
    with stubs(1) as (stub,), oculo(remote(stub.url)) as base:
        r = ask(
            base,
            images=(data_uri(big, "image/jpeg"), small),
            text="Compare.",
        )
        assert r.status_code == 200
        # both low: the big one re-encoded to fit 560 x 560, the small one as sent
        big_uri = data_uri(big, "image/jpeg")
        content = [
            {"type": "image_url", "image_url": {"url": big_uri, "detail": "low"}},
            {"type": "image_url", "image_url": {"url": small, "detail": "low"}},
            {"type": "text", "text": "Compare."},
        ]  # fmt: skip
        body = {"model": PUBLIC, "messages": [{"role": "user", "content": content}]}
        r = httpx.post(base + "/v1/chat/completions", json=body, headers=HEADERS)
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 2 * 1601
        parts = stub.chat_requests[-1].body["messages"][0]["content"]
        shrunk = parts[0]["image_url"]["url"]
        assert shrunk.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(shrunk.split(",", 1)[1]))) as img:
            assert img.size == (560, 420)
        assert parts[1]["image_url"]["url"] == small
        # detail auto: the big image goes as it came
        first = stub.chat_requests[0].body["messages"][1]["content"][0]["image_url"]["url"]
        assert first == data_uri(big, "image/jpeg")


def test_the_upstream_key_and_the_catalog_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-secret")
    with stubs(1) as (stub,), oculo(remote(stub.url, upstream_key_env="TEST_UPSTREAM_KEY")) as base:
        assert ask(base).status_code == 200
        assert stub.chat_requests[-1].headers["authorization"] == "Bearer sk-upstream-secret"
        card = httpx.get(base + "/v1/models/" + PUBLIC, headers=HEADERS).json()
        assert card["engine"] == "remote" and card["status"] == "ready"
        assert card["upstream_model"] == UPSTREAM_MODEL
        assert card["context_length"] == 8192


def test_catalog_entries_for_remote_models_are_checked(tmp_path: Path) -> None:
    def load(entry: str) -> None:
        config = tmp_path / "oculo.toml"
        config.write_text("[[models]]\n" + entry)
        load_settings(config, env={})

    load('id = "m"\nengine = "remote"\nupstreams = ["http://a:8000/v1/", "http://b:8000"]\n')
    for entry, words in [
        ('id = "m"\nengine = "remote"\n', "needs upstreams"),
        ('id = "m"\nengine = "remote"\nupstreams = ["a:8000"]\n', "not an http"),
        ('id = "m"\nengine = "remote"\nupstreams = ["http://a", "http://a/v1"]\n', "twice"),
        ('id = "m"\npath = "/x"\nupstreams = ["http://a"]\n', "for engine"),
        ('id = "m"\n', "needs a path"),
        (
            'id = "m"\nengine = "remote"\nupstreams = ["http://a"]\nfirst_byte_timeout = 9\n'
            "total_timeout = 5\n",
            "exceeds total_timeout",
        ),
    ]:
        with pytest.raises(ConfigError, match=words):
            load(entry)
    spec = ModelSpec(id="m", engine="remote", upstreams=["http://a:1/v1"], upstream_key_env="NOPE")
    assert spec.upstreams == ["http://a:1"]
    with pytest.raises(ConfigError, match="NOPE"):
        spec.resolved_upstream_key(env={})


def test_a_prompt_over_the_context_is_refused_before_forwarding(schemas: Any) -> None:
    with stubs(1) as (stub,), oculo(remote(stub.url, context_length=2000)) as base:
        r = ask(base, images=(png_uri(),))  # 1,601 image tokens + text: fits
        assert r.status_code == 200
        r = ask(base, images=(png_uri(1120, 1120),))  # 6,404 image tokens: does not
        assert r.status_code == 400
        schemas(r.json(), "ErrorResponse")
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert len(stub.chat_requests) == 1


# --------------------------------------------------------------------------- failures


def test_upstream_failures_are_openai_errors_that_say_which_side_failed(schemas: Any) -> None:
    with (
        stubs(1) as (stub,),
        oculo(remote(stub.url, retries=0, first_byte_timeout=1.0, eject_after=100)) as base,
    ):
        stub.script(Reply(status=500, error="CUDA out of memory"))
        r = ask(base)
        assert r.status_code == 502
        schemas(r.json(), "ErrorResponse")
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "upstream_error")
        assert "upstream model server" in error["message"] and "HTTP 500" in error["message"]
        assert "CUDA out of memory" in error["message"]
        assert stub.url not in r.text  # the client is not told where the upstreams are

        stub.script(Reply(status=400, error="max_tokens is too large"))
        r = ask(base, stream=True)
        assert r.status_code == 400
        schemas(r.json(), "ErrorResponse")
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "upstream_rejected")
        assert "refused" in error["message"] and "max_tokens is too large" in error["message"]

        stub.script(Reply(first_byte_delay=3.0))
        started = time.monotonic()
        r = ask(base)
        assert r.status_code == 504 and time.monotonic() - started < 2.5
        schemas(r.json(), "ErrorResponse")
        assert r.json()["error"]["code"] == "upstream_timeout"
        assert "did not start its answer within 1 s" in r.json()["error"]["message"]

        stub.script(Reply(status=429, error="busy"))
        r = ask(base)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert "retry-after" in r.headers

        assert ask(base).status_code == 200
        assert metric(base, "oculo_errors_total", code="upstream_error") == 1
        assert metric(base, "oculo_upstream_requests_total", outcome="timeout") == 1
        assert metric(base, "oculo_upstream_requests_total", outcome="rejected") == 1
        assert metric(base, "oculo_upstream_requests_total", outcome="ok") == 1


def test_failures_before_the_first_byte_are_retried_elsewhere() -> None:
    with (
        stubs(2) as (a, b),
        oculo(remote(a.url, b.url, first_byte_timeout=1.0, eject_after=100)) as base,
    ):
        for reply in (Reply(status=503), Reply(drop_after=0), Reply(first_byte_delay=3.0)):
            a.default = reply  # whenever a is tried first, it fails and b answers
            before = len(a.chat_requests)
            for stream in (False, True, False, True):
                r = ask(base, stream=stream)
                assert r.status_code == 200, r.text
                assert "error" not in r.text
            assert len(a.chat_requests) > before
        retried = metric(base, "oculo_upstream_retries_total", model=PUBLIC)
        assert retried == len(a.chat_requests) >= 3
        assert len(b.chat_requests) == 12


def test_an_unreachable_upstream_is_retried_and_ejected(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with (
        stubs(1) as (live,),
        oculo(remote(dead, live.url, eject_after=2, eject_seconds=60, health_interval=60)) as base,
    ):
        for _ in range(6):
            assert ask(base).status_code == 200
        pool = httpx.get(base + "/pool").json()["models"][0]
        by_url = {u["url"]: u for u in pool["upstreams"]}
        # the dead one failed its first health check and was never chosen
        assert by_url[dead]["healthy"] is False and by_url[dead]["requests"]["ok"] == 0
        assert by_url[live.url]["requests"]["ok"] == 6


def test_passive_ejection_takes_a_failing_upstream_out_for_its_cool_down() -> None:
    with (
        stubs(2) as (bad, good),
        oculo(
            remote(bad.url, good.url, eject_after=2, eject_seconds=60, health_interval=60)
        ) as base,
    ):
        bad.default = Reply(status=500)
        for _ in range(10):
            assert ask(base).status_code == 200
        assert len(bad.chat_requests) == 2  # two failures, then out of rotation
        pool = httpx.get(base + "/pool").json()["models"][0]
        state = {u["url"]: u for u in pool["upstreams"]}[bad.url]
        assert state["ejected"] is True and 0 < state["ejected_for"] <= 60
        assert state["ejections"] == 1 and "HTTP 500" in state["last_error"]
        assert metric(base, "oculo_upstream_ejections_total", upstream=bad.url[7:]) == 1
        assert metric(base, "oculo_upstream_healthy", upstream=bad.url[7:]) == 0
        assert metric(base, "oculo_upstream_healthy", upstream=good.url[7:]) == 1
        assert metric(base, "oculo_upstream_retries_total") == 2


def test_health_checks_fall_back_to_v1_models_and_keep_the_unhealthy_out(schemas: Any) -> None:
    with stubs(2) as (a, b):
        a.health_status = 404  # like vLLM before /health, or llama.cpp builds without it
        b.health_status = 500
        with oculo(remote(a.url, b.url, health_interval=0.2)) as base:
            for _ in range(4):
                assert ask(base).status_code == 200
            assert len(b.chat_requests) == 0 and len(a.chat_requests) == 4
            a.health_status = a.models_status = 500
            deadline = time.monotonic() + 5
            while metric(base, "oculo_upstream_healthy") > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            r = ask(base)
            assert r.status_code == 503
            schemas(r.json(), "ErrorResponse")
            assert r.json()["error"]["code"] == "engine_unavailable"
            assert "retry-after" in r.headers
            b.health_status = 200
            deadline = time.monotonic() + 5
            while metric(base, "oculo_upstream_healthy") < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert ask(base).status_code == 200 and len(b.chat_requests) == 1


def test_a_stream_that_has_started_is_not_retried_and_ends_with_an_error_event(
    schemas: Any, tmp_path: Path
) -> None:
    with stubs(2) as (a, b), oculo(remote(a.url, b.url), data_dir=tmp_path) as base:
        for stub in (a, b):
            stub.script(Reply(drop_after=2))
        r = ask(base, stream=True)
        assert r.status_code == 200
        payloads = events(r)
        text = "".join(
            p["choices"][0]["delta"].get("content", "") for p in payloads if "choices" in p
        )
        assert text == "Hello from"
        error = payloads[-1]
        schemas(error, "ErrorResponse")
        assert error["error"]["code"] == "upstream_error"
        assert "broke off" in error["error"]["message"]
        assert len(a.chat_requests) + len(b.chat_requests) == 1  # no second attempt

        for stub in (a, b):
            stub._script.clear()
            stub.script(Reply(error_event_after=1, error="engine died"))
        payloads = events(ask(base, stream=True))
        assert payloads[-1]["error"]["code"] == "upstream_error"
        assert "engine died" in payloads[-1]["error"]["message"]
    rows = ledger(tmp_path)
    assert [row["error_code"] for row in rows] == ["upstream_error", "upstream_error"]
    assert all(row["status"] == 502 for row in rows)


def test_the_pieces_that_came_before_a_broken_connection_are_relayed_not_dropped() -> None:
    """aiohttp raises a broken body's error before the bytes that arrived just before the break
    (aio-libs/aiohttp#3026): under load the last pieces an upstream sent ('Hello from' came out
    'Hello' in the test above, now and then). `unread` hands them over, and the error stays."""
    import asyncio
    from unittest.mock import Mock

    import aiohttp

    from oculo.engines.remote import unread

    async def run() -> None:
        loop = asyncio.get_running_loop()
        reader = aiohttp.StreamReader(Mock(_reading_paused=False), 2**16, loop=loop)
        assert unread(reader) == b""  # nothing failed: nothing taken
        reader.feed_data(b'data: {"a": 1}\n\n')
        reader.feed_data(b'data: {"b": 2}\n\n')
        reader.set_exception(aiohttp.ClientPayloadError("Response payload is not completed"))
        with pytest.raises(aiohttp.ClientPayloadError):
            await reader.readany()  # aiohttp's own way: the two events are not given
        assert unread(reader) == b'data: {"a": 1}\n\ndata: {"b": 2}\n\n'
        assert unread(reader) == b""
        with pytest.raises(aiohttp.ClientPayloadError):
            await reader.readany()  # and then the error, as before

    asyncio.run(run())


def test_a_client_that_leaves_closes_the_upstream_request(tmp_path: Path) -> None:
    words = tuple(f" w{i}" for i in range(100))
    with stubs(1) as (stub,), oculo(remote(stub.url), data_dir=tmp_path) as base:
        stub.default = Reply(words=words, chunk_delay=0.05)
        body = {"model": PUBLIC, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        with httpx.stream(
            "POST", base + "/v1/chat/completions", json=body, headers=HEADERS
        ) as response:
            for line in response.iter_lines():
                if "w2" in line:
                    break  # leave mid-answer
        deadline = time.monotonic() + 5
        while stub.disconnects < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub.disconnects == 1 and stub.finished == 0

        stub.default = Reply(words=words, chunk_delay=0.05)
        with pytest.raises(httpx.ReadTimeout):  # a whole answer: leave before it comes
            httpx.post(base + "/v1/chat/completions", json={**body, "stream": False},
                       headers=HEADERS, timeout=1.0)  # fmt: skip
        deadline = time.monotonic() + 8
        while stub.disconnects < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub.disconnects == 2 and stub.finished == 0
        assert metric(base, "oculo_upstream_outstanding") == 0
        assert metric(base, "oculo_upstream_requests_total", outcome="cancelled") == 2
    statuses = sorted(row["status"] for row in ledger(tmp_path))
    assert statuses == [499, 499]


def test_least_outstanding_routing_spreads_concurrent_requests() -> None:
    with stubs(2) as (a, b), oculo(remote(a.url, b.url)) as base:
        for stub in (a, b):
            stub.default = Reply(first_byte_delay=0.4)
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda: results.append(ask(base).status_code)) for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 6
        assert (len(a.chat_requests), len(b.chat_requests)) == (3, 3)


def test_oculo_models_shows_each_upstream() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with stubs(1) as (stub,), oculo(remote(stub.url, dead, health_interval=60)) as base:
        assert ask(base).status_code == 200
        models = json.loads(oculo_cli("models", "--url", base, "--json", env={}).stdout)
        (model,) = models
        assert (model["id"], model["engine"], model["status"]) == (PUBLIC, "remote", "ready")
        assert model["upstream_model"] == UPSTREAM_MODEL
        live, down = model["upstreams"]
        assert (live["url"], live["healthy"], live["requests"]["ok"]) == (stub.url, True, 1)
        assert (down["url"], down["healthy"]) == (dead, False)
        assert "cannot connect" in down["last_error"]
        table = oculo_cli("models", "--url", base, env={}).stdout
        for word in (PUBLIC, "remote", stub.url, "healthy", "unhealthy", "1 / 0"):
            assert word in table
    gone = subprocess.run(
        [sys.executable, "-m", "oculo.cli", "models", "--url", base],
        capture_output=True,
        text=True,
    )
    assert gone.returncode == 1 and "no oculo server answered" in gone.stderr
