"""Keys, limits, the ledger and /v1/usage through the HTTP API, on SQLite and on PostgreSQL.

An in-process server around a scripted engine; keys are made in the same database the server
uses, as `oculo keys create` would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import pytest
from conftest import API_KEY, png_uri, run_async, serve_in_process
from sqlalchemy import text

from oculo.accounts.keys import KeyStore
from oculo.accounts.store import open_store
from oculo.engines.base import Delta, EngineInfo, GenerationRequest, Message

MODEL = "scripted"


class ScriptedEngine:
    """Three pieces of text and the engine's counts; `gate` (when set) holds the last piece;
    `fail` raises before the first piece."""

    def __init__(self) -> None:
        self.info = EngineInfo(id=MODEL, engine="test", context_length=100_000)
        self.gate: threading.Event | None = None
        self.fail = False
        self.closed = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self.fail:
            raise RuntimeError("engine crashed")
        try:
            yield Delta(text="a")
            yield Delta(text="b")
            while self.gate is not None and not self.gate.is_set():
                await asyncio.sleep(0.01)
            positions = 64 * len(request.images)
            yield Delta(
                text="c",
                finish_reason="stop",
                completion_tokens=3,
                prompt_tokens=7 + positions,
                image_positions=positions,
            )
        finally:
            self.closed += 1

    def count_text_tokens(self, messages: Sequence[Message]) -> int:
        return 7

    async def close(self) -> None:
        pass


class Env:
    def __init__(self, base: str, database_url: str, engine: ScriptedEngine) -> None:
        self.base = base
        self.database_url = database_url
        self.engine = engine

    def key(self, name: str = "k", **options: Any) -> tuple[str, str]:
        async def create() -> tuple[str, str]:
            db = await open_store(self.database_url, None)
            try:
                key, info = await KeyStore(db).create(name, **options)
                return key, info.id
            finally:
                await db.dispose()

        result: tuple[str, str] = run_async(create())
        return result

    def revoke(self, key_id: str) -> None:
        async def revoke() -> None:
            db = await open_store(self.database_url, None)
            try:
                await KeyStore(db).revoke(key_id)
            finally:
                await db.dispose()

        run_async(revoke())

    def sql(self, query: str) -> list[dict[str, Any]]:
        async def run() -> list[dict[str, Any]]:
            db = await open_store(self.database_url, None)
            try:
                async with db.begin() as conn:
                    result = await conn.execute(text(query))
                    return [dict(r) for r in result.mappings()] if result.returns_rows else []
            finally:
                await db.dispose()

        rows: list[dict[str, Any]] = run_async(run())
        return rows

    def post(self, key: str, **body: Any) -> httpx.Response:
        payload = {"model": MODEL, "messages": messages(), **body}
        return httpx.post(
            self.base + "/v1/chat/completions",
            json=payload,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )


def messages(image: bool = True) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "What is this?"}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_uri(840, 560)}})
    return [{"role": "user", "content": content}]


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    engine = ScriptedEngine()
    with serve_in_process(engine, MODEL, database_url=database_url) as base:
        yield Env(base, database_url, engine)
        if engine.gate is not None:
            engine.gate.set()


def test_rpm_two_gives_200_200_429_with_openai_headers(env: Env, schemas: Any) -> None:
    key, key_id = env.key("rpm2", rpm=2)
    responses = [env.post(key) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    for r, remaining in zip(responses, ("1", "0", "0"), strict=True):
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert r.headers["x-ratelimit-remaining-requests"] == remaining
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in r.headers  # no tokens limit on this key
    refused = responses[2]
    schemas(refused.json(), "ErrorResponse")
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 30

    ids = [r.json()["id"] for r in responses[:2]]
    rows = env.sql("SELECT * FROM usage ORDER BY created_at")
    assert [row["request_id"] for row in rows] == ids  # the 429 never reached the engine
    usage = responses[0].json()["usage"]
    row = rows[0]
    assert row["key_id"] == key_id and row["model"] == MODEL and row["status"] == 200
    assert row["text_tokens"] + row["image_tokens"] == usage["prompt_tokens"]
    assert row["image_tokens"] == usage["prompt_tokens_details"]["image_tokens"] == 2402
    assert row["completion_tokens"] == usage["completion_tokens"] == 3
    assert row["image_positions"] == 64 and row["error_code"] is None
    assert row["latency_ms"] > 0 and not row["stream"]

    mine = httpx.get(env.base + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert mine["key"] == {"id": key_id, "name": "rpm2"}
    [line] = mine["data"]
    assert line["model"] == MODEL and line["requests"] == 2
    assert line["prompt_tokens"] == 2 * usage["prompt_tokens"]
    assert line["image_tokens"] == 2 * 2402 and line["completion_tokens"] == 6
    assert mine["total"]["total_tokens"] == 2 * usage["total_tokens"]
    other, _ = env.key("other")
    theirs = httpx.get(env.base + "/v1/usage", headers={"Authorization": f"Bearer {other}"})
    assert theirs.json()["data"] == []  # a key sees only its own usage


def test_tokens_per_minute_estimate_and_headers_on_every_response(env: Env) -> None:
    # one request: 7 text + 2402 image tokens estimated, 3 completion tokens settled after
    key, _ = env.key("tpm", tpm=4000, rpm=100)
    first = env.post(key)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "4000"
    assert first.headers["x-ratelimit-remaining-tokens"] == str(4000 - 2409)
    second = env.post(key)
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert "tokens" in second.json()["error"]["message"]
    assert int(second.headers["retry-after"]) >= 1
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert remaining < 2409  # what is left (refilling at 4000 a minute) does not fit 2409
    # an error that never reaches the engine still reports the limits
    bad = env.post(key, messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    assert bad.status_code == 400 and bad.headers["x-ratelimit-limit-requests"] == "100"
    assert bad.headers["x-ratelimit-limit-tokens"] == "4000"
    text_only = env.post(key, messages=messages(image=False))
    assert text_only.status_code == 200  # 7 tokens still fit


def test_model_restriction_is_a_403(env: Env, schemas: Any) -> None:
    key, _ = env.key("narrow", models=["another-model"])
    r = env.post(key)
    assert r.status_code == 403
    schemas(r.json(), "ErrorResponse")
    assert r.json()["error"]["type"] == "permission_error" and r.json()["error"]["param"] == "model"
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(env.base + "/v1/models", headers=headers).json()["data"] == []
    assert httpx.get(env.base + f"/v1/models/{MODEL}", headers=headers).status_code == 403
    wide, _ = env.key("wide", models=[MODEL])
    assert env.post(wide).status_code == 200


def test_revocation_and_expiry_apply_to_the_next_request(env: Env) -> None:
    key, key_id = env.key("soon-revoked")
    assert env.post(key).status_code == 200
    env.revoke(key_id)
    r = env.post(key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert env.post(API_KEY).status_code == 200  # OCULO_API_KEYS-style keys keep working


def test_streams_are_billed_like_whole_answers(env: Env) -> None:
    key, _ = env.key("streamer")
    r = env.post(key, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]["usage"]
    [row] = env.sql(f"SELECT * FROM usage WHERE request_id = '{chunks[0]['id']}'")
    assert row["stream"] and row["status"] == 200
    assert row["text_tokens"] + row["image_tokens"] == usage["prompt_tokens"]
    assert row["completion_tokens"] == usage["completion_tokens"] == 3


def test_a_client_that_leaves_mid_stream_is_billed_for_what_was_made(env: Env) -> None:
    key, _ = env.key("leaver")
    env.engine.gate = threading.Event()
    payload = {"model": MODEL, "messages": messages(), "stream": True}
    with (
        httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client,
        client.stream("POST", env.base + "/v1/chat/completions", json=payload) as s,
    ):
        assert s.status_code == 200
        seen = ""
        for piece in s.iter_text():
            seen += piece
            if '"content":"b"' in seen:
                break
        request_id = json.loads(seen.split("\n\n")[0].removeprefix("data: "))["id"]
    deadline = time.monotonic() + 10
    rows: list[dict[str, Any]] = []
    while not rows and time.monotonic() < deadline:
        rows = env.sql(f"SELECT * FROM usage WHERE request_id = '{request_id}'")
        time.sleep(0.05)
    [row] = rows
    assert row["status"] == 499 and row["error_code"] == "client_disconnected"
    assert row["completion_tokens"] == 2 and row["stream"]  # "a" and "b" were generated


def test_engine_failures_are_recorded(env: Env) -> None:
    key, key_id = env.key("unlucky")
    env.engine.fail = True
    r = env.post(key)
    assert r.status_code == 500
    [row] = env.sql(f"SELECT * FROM usage WHERE key_id = '{key_id}'")
    assert row["status"] == 500 and row["error_code"] == "internal_error"
    assert row["completion_tokens"] == 0
    headers = {"Authorization": f"Bearer {key}"}
    mine = httpx.get(env.base + "/v1/usage", headers=headers).json()
    assert mine["data"] == [] and mine["total"]["requests"] == 0  # in the ledger, not billed


def test_no_200_without_its_ledger_row(env: Env, schemas: Any) -> None:
    key, _ = env.key("doomed")
    env.sql("DROP TABLE usage")  # the ledger can no longer be written
    r = env.post(key)
    assert r.status_code == 503
    schemas(r.json(), "ErrorResponse")
    assert r.json()["error"]["code"] == "storage_unavailable"
    s = env.post(key, stream=True)
    events = [e.removeprefix("data: ") for e in s.text.split("\n\n") if e]
    assert json.loads(events[-2])["error"]["code"] == "storage_unavailable"


def test_keys_never_appear_in_errors_or_logs(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key, key_id = env.key("secretive")
    secret = key.split("_", 1)[1]
    wrong = key[:-4] + "AAAA"
    texts = [env.post(wrong).text, env.post(key).text]
    env.revoke(key_id)
    texts.append(env.post(key).text)
    texts.append(env.post("sk-oculo-" + secret).text)
    texts.append(env.post(key, model="nope").text)
    for body in texts:
        assert secret not in body and secret[:8] not in body
    assert secret not in caplog.text and secret[:8] not in caplog.text
    for row in env.sql("SELECT * FROM api_keys") + env.sql("SELECT * FROM usage"):
        assert secret not in repr(row)
