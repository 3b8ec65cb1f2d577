"""The accounts store on SQLite and PostgreSQL: migrations, keys, the ledger and its totals."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from oculo.accounts.keys import PREFIX, KeyRing, KeyStore, key_id_of, new_key
from oculo.accounts.ledger import Ledger, UsageRecord
from oculo.accounts.store import database_url as resolve_url
from oculo.accounts.store import migrate, open_store
from oculo.errors import StorageUnavailable


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = await open_store(database_url, None)
    yield engine
    await engine.dispose()


async def dump(engine: AsyncEngine) -> str:
    """Every value in every accounts table, as text: where a leaked key would show."""
    parts: list[str] = []
    async with engine.connect() as conn:
        for table in ("api_keys", "usage", "alembic_version"):
            rows = await conn.execute(text(f"SELECT * FROM {table}"))
            parts += [repr(tuple(row)) for row in rows]
    return "\n".join(parts)


def test_key_format_and_parsing() -> None:
    key_id, key = new_key()
    assert key.startswith(PREFIX + key_id + "_") and len(key) == len(PREFIX) + 12 + 1 + 43
    assert key_id_of(key) == key_id
    for bad in ("sk-oculo-", "sk-other-0123456789ab_x", PREFIX + "0123456789ab", PREFIX + "x" * 20):
        assert key_id_of(bad) is None
    assert new_key() != new_key()


def test_database_urls(tmp_path: object) -> None:
    assert resolve_url("postgresql://u:p@h/db", None) == "postgresql+asyncpg://u:p@h/db"
    assert resolve_url("postgres://h/db", None) == "postgresql+asyncpg://h/db"
    assert resolve_url("sqlite:////x/y.db", None) == "sqlite+aiosqlite:////x/y.db"
    assert resolve_url(None, str(tmp_path)).endswith("/oculo.db")


async def test_migrations_are_idempotent(engine: AsyncEngine) -> None:
    await migrate(engine)  # second run: nothing to do
    async with engine.connect() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    assert version == "0002"


async def test_keys_create_verify_revoke_expire(engine: AsyncEngine) -> None:
    store = KeyStore(engine)
    assert await store.count() == 0
    key, info = await store.create("alice", models=["m1"], rpm=2, tpm=100)
    account = await store.verify(key)
    assert account is not None
    assert (account.id, account.name, account.models, account.rpm, account.tpm) == (
        info.id,
        "alice",
        ("m1",),
        2,
        100,
    )
    assert account.may_use("m1") and not account.may_use("m2")
    assert await store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # wrong secret
    assert await store.verify(PREFIX + "0" * 12 + "_" + key.split("_", 1)[1]) is None  # no such id
    assert await store.verify("sk-test-whatever") is None

    soon, _ = await store.create("bob", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert await store.verify(soon) is None  # expired
    later, _ = await store.create("carol", expires_at=datetime.now(UTC) + timedelta(days=1))
    assert (await store.verify(later)) is not None

    listed = {i.name: i for i in await store.list()}
    assert set(listed) == {"alice", "bob", "carol"}
    assert listed["alice"].active and not listed["bob"].active
    assert await store.revoke(info.id) is True
    assert await store.verify(key) is None
    assert await store.revoke(info.id) is True  # already revoked: still fine
    assert await store.revoke("nonexistent") is False
    assert not {i.id: i for i in await store.list()}[info.id].active
    assert await store.count() == 3

    stored = await dump(engine)
    for secret in (key, soon, later):
        assert secret not in stored and secret.split("_", 1)[1] not in stored


def test_configured_keys_ring() -> None:
    ring = KeyRing(["sk-a", "sk-b"])
    assert len(ring) == 2
    a = ring.verify("sk-a")
    assert a is not None and a.models is None and a.rpm is None
    assert ring.verify("sk-c") is None


def record(request_id: str, key_id: str = "k1", model: str = "m", **kw: object) -> UsageRecord:
    values: dict[str, object] = {
        "request_id": request_id,
        "key_id": key_id,
        "model": model,
        "text_tokens": 10,
        "image_tokens": 1601,
        "image_positions": 81,
        "completion_tokens": 5,
        "status": 200,
        "error_code": None,
        "latency_ms": 12.5,
        "stream": False,
        "created_at": datetime.now(UTC),
    }
    values.update(kw)
    return UsageRecord(**values)  # type: ignore[arg-type]


async def test_ledger_rows_and_totals(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    yesterday = datetime.now(UTC) - timedelta(days=1)
    await ledger.record(record("r1"))
    await ledger.record(record("r2", stream=True, completion_tokens=7))
    await ledger.record(record("r3", model="other", status=499, error_code="client_disconnected"))
    await ledger.record(record("r4", key_id="k2"))
    await ledger.record(record("r5", created_at=yesterday, image_positions=None))
    await ledger.record(record("r6", status=500, error_code="engine_error"))  # kept, not billed
    with pytest.raises(StorageUnavailable):
        await ledger.record(record("r1"))  # a request is billed once

    totals = await ledger.totals(key_id="k1")
    today = datetime.now(UTC).date().isoformat()
    assert [(t.day, t.model, t.requests) for t in totals] == [
        (yesterday.date().isoformat(), "m", 1),
        (today, "m", 2),
        (today, "other", 1),
    ]
    today_m = totals[1]
    assert today_m.text_tokens == 20 and today_m.image_tokens == 3202
    assert today_m.completion_tokens == 12 and today_m.prompt_tokens == 3222
    assert today_m.total_tokens == 3234
    since_today = await ledger.totals(since=datetime.now(UTC).date())
    assert sum(t.requests for t in since_today) == 4
    assert {t.key_id for t in since_today} == {"k1", "k2"}
    async with engine.connect() as conn:
        row = (
            (await conn.execute(text("SELECT * FROM usage WHERE request_id = 'r3'")))
            .mappings()
            .one()
        )
        count = (await conn.execute(text("SELECT count(*) FROM usage"))).scalar()
    assert count == 6
    assert row["status"] == 499 and row["error_code"] == "client_disconnected"
    assert row["image_positions"] == 81 and row["stream"] in (False, 0)


async def test_ledger_rows_that_arrive_together_share_a_commit(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    # 40 requests finishing together: every one returns only once its row is committed, and
    # the rows go in a few transactions, not 40
    await asyncio.gather(*(ledger.record(record(f"g{i}")) for i in range(40)))
    assert 1 <= ledger.commits < 10
    assert (await ledger.totals(key_id="k1"))[0].requests == 40

    # one bad row in a batch (a request id written twice) fails its own request only
    results = await asyncio.gather(
        ledger.record(record("h0")),
        ledger.record(record("g3")),
        *(ledger.record(record(f"h{i}")) for i in range(1, 10)),
        return_exceptions=True,
    )
    assert isinstance(results[1], StorageUnavailable)
    assert [r for i, r in enumerate(results) if i != 1] == [None] * 10
    assert (await ledger.totals(key_id="k1"))[0].requests == 50

    # a caller that leaves while its row is being written does not stop the write
    waiting = asyncio.ensure_future(ledger.record(record("late")))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(100):
        if (await ledger.totals(key_id="k1"))[0].requests == 51:
            break
        await asyncio.sleep(0.01)
    assert (await ledger.totals(key_id="k1"))[0].requests == 51
    ledger.close()


async def test_a_full_ledger_flushes_every_commit_a_deferred_one_within_its_interval(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ledger_sync: "full" waits for the disk on every commit (SQLite synchronous=FULL, or
    PostgreSQL's default); "deferred" commits without waiting and flushes once an interval."""
    import os

    flushed: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    sqlite = engine.dialect.name == "sqlite"

    full = Ledger(engine)
    await full.record(record("f1"))
    if sqlite:
        with full._sqlite_writer().connect() as conn:  # type: ignore[union-attr]
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    assert not any("synchronous_commit" in s for s in statements)
    full.close()

    deferred = Ledger(engine, sync="deferred", flush_seconds=0.2)
    await asyncio.gather(*(deferred.record(record(f"d{i}")) for i in range(5)))
    await deferred.record(record("d5"))
    # committed: every other connection reads the rows at once
    assert (await deferred.totals(key_id="k1"))[0].requests == 7
    if sqlite:
        with deferred._sqlite_writer().connect() as conn:  # type: ignore[union-attr]
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        path = engine.url.database
        assert deferred.flushes == 0 and f"{path}-wal" not in flushed  # not yet on disk
        for _ in range(100):
            if deferred.flushes:
                break
            await asyncio.sleep(0.02)
        # one flush for the six rows of the interval, of the WAL that holds them
        assert deferred.flushes == 1 and f"{path}-wal" in flushed
        await asyncio.sleep(0.4)
        assert deferred.flushes == 1  # nothing new, nothing flushed
        await deferred.record(record("d6"))
        deferred.close()  # a row whose flush is pending: closing flushes it
        assert deferred.flushes == 2
    else:  # PostgreSQL: each transaction commits asynchronously, PostgreSQL flushes it
        assert sum("SET LOCAL synchronous_commit TO OFF" in s for s in statements) >= 2
        deferred.close()
    event.remove(engine.sync_engine, "before_cursor_execute", seen)


async def test_a_ledger_write_that_fails_unexpectedly_fails_its_requests(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(engine)

    async def broken(rows: object) -> None:
        raise RuntimeError("not a database error")

    monkeypatch.setattr(ledger, "_commit", broken)
    results = await asyncio.wait_for(
        asyncio.gather(*(ledger.record(record(f"x{i}")) for i in range(3)), return_exceptions=True),
        timeout=10,
    )  # every caller gets an answer: none waits for ever
    assert all(isinstance(r, StorageUnavailable) for r in results)


def test_processes_starting_together_on_a_new_sqlite_file_take_turns(tmp_path: Path) -> None:
    """Several `oculo serve` processes started at once on a fresh data folder all come up."""
    go = tmp_path / "go"
    script = f"""
import asyncio, os, sys, time
from oculo.accounts.store import open_store
while not os.path.exists({str(go)!r}):
    time.sleep(0.001)
async def main():
    engine = await open_store(None, {str(tmp_path / "data")!r})
    await engine.dispose()
asyncio.run(main())
"""
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(4)
    ]
    time.sleep(3)  # let every process import and wait at the line
    go.touch()
    errors = [p.communicate(timeout=180)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    versions = sqlite3.connect(tmp_path / "data" / "oculo.db").execute(
        "SELECT count(*) FROM alembic_version"
    )
    assert versions.fetchone() == (1,)
