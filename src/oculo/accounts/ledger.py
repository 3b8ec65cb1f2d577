"""The usage ledger: one durable row per request that reached an engine, and its totals.

`record` returns only once the row is committed (SQLite: on disk, WAL with full sync;
PostgreSQL: its commit), so a caller that sends the last bytes of a 200 after it has returned
never answers a request the ledger could lose. A failure to write is `StorageUnavailable`.

Group commit: rows that arrive while a commit is under way wait for it to finish and then go
together, in one transaction (one fsync) of their own. A lone row is committed at once; under
load a commit carries as many rows as came in during the one before, so the ledger keeps up
with any request rate without a timer. A batch that fails is retried row by row, so one bad row
(a request id written twice) fails only its own request.

On a SQLite file a batch is written by the synchronous driver in one worker-thread call (the
async driver hops threads for every step of a transaction: twice the CPU a row); PostgreSQL's
goes through the async engine.

How far "committed" goes is the operator's choice (`ledger_sync`):
- "full" (the default): on disk before `record` returns, as above. Each answer waits for one
  flush of the disk (shared by the rows of a group commit): 1 to 8 ms on the disks seen here.
- "deferred": written to the database before `record` returns (an oculo process that crashes
  or is killed afterwards loses nothing), flushed to disk at most `flush_seconds` later. An
  operating-system crash or power cut can lose the rows of that last interval; the database
  stays intact. SQLite: the writer's connection commits with synchronous=NORMAL (WAL appended,
  not flushed) and one flush a second covers every row since the last (the WAL file's fsync).
  PostgreSQL: each row's transaction sets synchronous_commit off; PostgreSQL's own WAL writer
  flushes within three times its wal_writer_delay (200 ms by default).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, insert, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from oculo.accounts.schema import usage
from oculo.accounts.store import sqlite_pragmas
from oculo.config import LedgerSync
from oculo.errors import StorageUnavailable

log = logging.getLogger("oculo.ledger")


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    key_id: str
    model: str
    text_tokens: int
    image_tokens: int  # by the 560-tile rule: what the caller is billed
    image_positions: int | None  # the engine's own count, when it gave one
    completion_tokens: int
    status: int
    error_code: str | None
    latency_ms: float
    stream: bool
    created_at: datetime
    # the engine's own counts (a remote model: the upstream's usage), and which upstream answered
    engine_prompt_tokens: int | None = None
    engine_completion_tokens: int | None = None
    upstream: str | None = None


BILLED = (200, 499)  # answered, or cut short by the client (billed for what was generated)


@dataclass(frozen=True)
class UsageTotal:
    """One line of a usage view: a day, a key, a model; billed requests only (`BILLED`)."""

    day: str
    key_id: str
    model: str
    requests: int
    text_tokens: int
    image_tokens: int
    completion_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.image_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


_Waiting = tuple[dict[str, Any], "asyncio.Future[None]"]


class Ledger:
    def __init__(
        self, engine: AsyncEngine, sync: LedgerSync = "full", flush_seconds: float = 1.0
    ) -> None:
        self._engine = engine
        self.sync = sync
        self.flush_seconds = flush_seconds
        self._insert = insert(usage)
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._unflushed = False  # "deferred": rows committed since the last flush began
        self._sqlite: Engine | None = None  # the synchronous writer, made on the first write
        self.commits = 0  # transactions written (rows / commits: how well writes are grouped)
        self.flushes = 0  # "deferred": the disk flushes that followed commits

    async def record(self, row: UsageRecord) -> None:
        """Write one row; returns once it is committed (see the module's notes)."""
        values = asdict(row)
        values["day"] = row.created_at.astimezone(UTC).date().isoformat()
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # a caller cancelled while waiting leaves the write to finish; its outcome is not lost
        # to a "never retrieved" warning
        committed.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.append((values, committed))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        await asyncio.shield(committed)

    async def _write_waiting(self) -> None:
        """Commit what is waiting, batch after batch, until nothing is."""
        while self._waiting:
            batch, self._waiting = self._waiting, []
            # any failure (not only the database's) settles every waiting caller: none may
            # wait for ever on a row that will not be written
            try:
                await self._commit([values for values, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0], exc)
                    continue
                for waiting in batch:  # one bad row must not fail the others
                    try:
                        await self._commit([waiting[0]])
                    except Exception as one:
                        _settle(waiting, one)
                    else:
                        _settle(waiting, None)
            else:
                for waiting in batch:
                    _settle(waiting, None)

    async def _commit(self, rows: list[dict[str, Any]]) -> None:
        sqlite = self._sqlite_writer()
        if sqlite is not None:
            await asyncio.to_thread(self._commit_sqlite, sqlite, rows)
            if self.sync == "deferred":
                self._unflushed = True
                if self._flusher is None or self._flusher.done():
                    self._flusher = asyncio.create_task(self._flush_later())
        else:
            async with self._engine.begin() as conn:
                if self.sync == "deferred" and conn.dialect.name == "postgresql":
                    await conn.execute(text("SET LOCAL synchronous_commit TO OFF"))
                await conn.execute(self._insert, rows)
        self.commits += 1

    async def _flush_later(self) -> None:
        """Under "deferred", on SQLite: flush what was committed `flush_seconds` after the
        interval's first row (the rows committed meanwhile ride along), until none is left."""
        while self._unflushed:
            await asyncio.sleep(self.flush_seconds)
            self._unflushed = False
            try:
                await asyncio.to_thread(self._flush_files)
            except OSError as exc:  # the rows stay in the file; the next interval tries again
                self._unflushed = True
                log.warning("usage ledger: flush to disk failed (%s); trying again", exc)

    def _flush_files(self) -> None:
        path = self._engine.url.database
        if not path:
            return
        # an fsync through any descriptor flushes the file's pages: the WAL holds every row
        # committed since the last checkpoint, the main file what checkpoints copied there
        for name in (f"{path}-wal", path):
            try:
                fd = os.open(name, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.flushes += 1

    def _commit_sqlite(self, sqlite: Engine, rows: list[dict[str, Any]]) -> None:
        with sqlite.begin() as conn:
            conn.execute(self._insert, rows)

    def _sqlite_writer(self) -> Engine | None:
        url = self._engine.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        if self._sqlite is None:
            self._sqlite = create_engine(
                url.set(drivername="sqlite"),
                connect_args={"timeout": 30, "check_same_thread": False},
            )
            event.listen(self._sqlite, "connect", sqlite_pragmas)
            if self.sync == "deferred":
                event.listen(self._sqlite, "connect", _append_only)
        return self._sqlite

    def close(self) -> None:
        """Stop writing; under "deferred", flush what a pending flush would have."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
        if self._sqlite is not None:
            if self.sync == "deferred":
                try:
                    self._flush_files()
                except OSError as exc:
                    log.warning("usage ledger: last flush to disk failed (%s)", exc)
            self._sqlite.dispose()
            self._sqlite = None

    async def totals(
        self, *, key_id: str | None = None, since: date | None = None
    ) -> list[UsageTotal]:
        """Totals by day, key and model, oldest first."""
        query = (
            select(
                usage.c.day,
                usage.c.key_id,
                usage.c.model,
                func.count().label("requests"),
                func.coalesce(func.sum(usage.c.text_tokens), 0).label("text_tokens"),
                func.coalesce(func.sum(usage.c.image_tokens), 0).label("image_tokens"),
                func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
            )
            .where(usage.c.status.in_(BILLED))
            .group_by(usage.c.day, usage.c.key_id, usage.c.model)
            .order_by(usage.c.day, usage.c.key_id, usage.c.model)
        )
        if key_id is not None:
            query = query.where(usage.c.key_id == key_id)
        if since is not None:
            query = query.where(usage.c.day >= since.isoformat())
        try:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        except (SQLAlchemyError, OSError) as exc:
            raise StorageUnavailable(
                f"The usage ledger is unavailable ({type(exc).__name__}).", retry_after=1
            ) from None
        return [
            UsageTotal(
                day=row.day,
                key_id=row.key_id,
                model=row.model,
                requests=int(row.requests),
                text_tokens=int(row.text_tokens),
                image_tokens=int(row.image_tokens),
                completion_tokens=int(row.completion_tokens),
            )
            for row in rows
        ]


def _append_only(dbapi_connection: Any, _record: Any) -> None:
    """The "deferred" writer's commits: appended to the WAL, flushed by `_flush_later`."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _settle(waiting: _Waiting, exc: BaseException | None) -> None:
    values, committed = waiting
    if committed.done():
        return
    if exc is None:
        committed.set_result(None)
        return
    log.error("%s: usage row not written: %s", values["request_id"], type(exc).__name__)
    committed.set_exception(
        StorageUnavailable(
            "The usage ledger is unavailable; the request was not completed.", retry_after=1
        )
    )
