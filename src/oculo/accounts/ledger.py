"""The usage ledger: one durable row per request that reached an engine, and its totals.

`record` returns only once the row is committed (SQLite: on disk, WAL with full sync;
PostgreSQL: its commit), so a caller that sends the last bytes of a 200 after it has returned
never answers a request the ledger could lose. A failure to write is `StorageUnavailable`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime

from sqlalchemy import func, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from oculo.accounts.schema import usage
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


class Ledger:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def record(self, row: UsageRecord) -> None:
        values = asdict(row)
        values["day"] = row.created_at.astimezone(UTC).date().isoformat()
        try:
            async with self._engine.begin() as conn:
                await conn.execute(insert(usage).values(**values))
        except (SQLAlchemyError, OSError) as exc:
            log.error("%s: usage row not written: %s", row.request_id, type(exc).__name__)
            raise StorageUnavailable(
                "The usage ledger is unavailable; the request was not completed.", retry_after=1
            ) from None

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
