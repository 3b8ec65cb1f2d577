"""The accounts database: where it is, the async engine, and migrations applied at start.

SQLite by default, one file `oculo.db` in the data folder (`data_dir`, `OCULO_DATA_DIR`, else a
per-user data folder), in WAL mode with full fsync on commit: zero set-up, and a committed row
survives a killed process. PostgreSQL when `database_url` names it, for several oculo processes
behind one load balancer. Migrations are Alembic's, run on every start (a no-op when current);
under a lock (PostgreSQL's advisory lock; on SQLite a lock file beside the database), so
processes starting together take turns and the later ones find the schema current.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import platformdirs
from alembic import command
from alembic.config import Config
from filelock import AsyncFileLock
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger("oculo.accounts")

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x6F63756C6F  # "oculo": the PostgreSQL advisory lock id for migrations


def data_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_data_dir("oculo"))


def database_url(database: str | None, data: str | None) -> str:
    """The SQLAlchemy async URL: the configured one with an async driver, else the SQLite file."""
    if not database:
        folder = data_dir(data)
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{folder / 'oculo.db'}"
    url = make_url(database)
    driver = {"postgres": "postgresql+asyncpg", "postgresql": "postgresql+asyncpg"}.get(
        url.drivername, "sqlite+aiosqlite" if url.drivername == "sqlite" else url.drivername
    )
    return url.set(drivername=driver).render_as_string(hide_password=False)


def redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it returns
    cursor.execute("PRAGMA busy_timeout=30000")  # other processes' writers: wait, don't fail
    cursor.close()


def open_engine(url: str) -> AsyncEngine:
    is_sqlite = url.startswith("sqlite")
    engine = create_async_engine(
        url,
        pool_pre_ping=not is_sqlite,
        connect_args={"timeout": 30} if is_sqlite else {},
    )
    if is_sqlite:
        event.listen(engine.sync_engine, "connect", sqlite_pragmas)
    return engine


def _upgrade(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (idempotent), one process at a time."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        # SQLite's deferred transactions would let two new processes both see no schema and
        # both create it; the lock file makes the second wait and find it current.
        async with AsyncFileLock(f"{database}.migrate.lock", timeout=120):
            await _migrate(engine)
    else:
        await _migrate(engine)


async def _migrate(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
        await connection.run_sync(_upgrade)


async def open_store(database: str | None, data: str | None) -> AsyncEngine:
    """The engine for the configured database, migrated."""
    url = database_url(database, data)
    engine = open_engine(url)
    try:
        await migrate(engine)
    except BaseException:
        await engine.dispose()
        raise
    return engine
