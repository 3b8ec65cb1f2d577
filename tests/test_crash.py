"""SIGKILL in the middle of 50 concurrent requests: every request answered 200 is in the ledger,
and the database is intact, on SQLite and on PostgreSQL, whichever ledger_sync."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, Server, one_model, png_uri, run_async, start_server, stop_server
from sqlalchemy import text

from oculo.accounts.store import open_store

N = 50


def body(i: int) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_uri(32 + i, 32)}},
                    {"type": "text", "text": f"Request {i}: what is in this image?"},
                ],
            }
        ],
        "max_tokens": 8,
        "stream": i % 2 == 1,
    }


def completed_id(server: Server, i: int) -> str | None:
    """The id of a request answered 200 in full (a stream through `data: [DONE]`), else None."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        r = httpx.post(server.v1 + "/chat/completions", json=body(i), headers=headers, timeout=120)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    if not body(i)["stream"]:
        return str(r.json()["id"])
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    if not events or events[-1] != "[DONE]":
        return None
    payloads = [json.loads(e) for e in events[:-1]]
    if any("error" in p for p in payloads):
        return None
    return str(payloads[0]["id"])


def ledger_ids(database_url: str) -> set[str]:
    async def read() -> set[str]:
        engine = await open_store(database_url, None)
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(text("SELECT request_id FROM usage"))
                return {row[0] for row in rows}
        finally:
            await engine.dispose()

    ids: set[str] = run_async(read())
    return ids


@pytest.mark.parametrize("sync", ["full", "deferred"])
def test_sigkill_mid_flight_loses_no_answered_request(
    checkpoints: dict[str, Path], tmp_path: Path, database_url: str, sync: str
) -> None:
    """Under ledger_sync "deferred" too: the rows are written before the answers, only their
    flush to disk waits, and a killed process's writes are the operating system's to keep."""
    env = {"OCULO_DATABASE_URL": database_url, "OCULO_LEDGER_SYNC": sync}
    (tmp_path / "first").mkdir()
    server = start_server(one_model(checkpoints), tmp_path / "first", env)
    answered: list[str] = []
    enough = threading.Event()
    lock = threading.Lock()

    def one(i: int) -> None:
        request_id = completed_id(server, i)
        if request_id is not None:
            with lock:
                answered.append(request_id)
                if len(answered) >= 10:
                    enough.set()

    try:
        with ThreadPoolExecutor(max_workers=N) as pool:
            futures = [pool.submit(one, i) for i in range(N)]
            assert enough.wait(timeout=300), server.log()
            os.kill(server.process.pid, signal.SIGKILL)
            for future in futures:
                future.result()
        server.process.wait(timeout=30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert 10 <= len(answered) < N, "the kill did not come in the middle"

    # restarted on the same database: migrations run, the server answers, nothing is lost
    (tmp_path / "second").mkdir()
    again = start_server(one_model(checkpoints), tmp_path / "second", env)
    try:
        fresh = completed_id(again, 0)
        assert fresh is not None
    finally:
        stop_server(again)
    recorded = ledger_ids(database_url)
    missing = set(answered) - recorded
    assert not missing, f"{len(missing)} of {len(answered)} answered requests not in the ledger"
    assert fresh in recorded
    if database_url.startswith("sqlite"):
        path = database_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            count = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
            assert len(answered) + 1 <= count <= N + 1
