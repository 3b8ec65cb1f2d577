"""API keys: the format, hashing, and the store that creates, lists, revokes and verifies them.

A key is `sk-oculo-` + a public id (12 hex digits) + `_` + a secret (43 URL-safe characters,
256 bits). The database keeps the public id (the lookup index, shown by `oculo keys list`) and the
SHA-256 of the whole key, never the key; a presented key is looked up by its id and its digest
compared with `secrets.compare_digest`. There is no cache: a revocation is seen by the next
request in every process that shares the database. SHA-256 rather than a slow password hash is
right here because the secret is random and long, not a human-chosen password.

`KeyRing` holds keys given in the configuration (`OCULO_API_KEYS`): the same digests, in memory,
with no model restriction and no limits.
"""

from __future__ import annotations

import hashlib
import secrets
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from oculo.accounts.schema import api_keys
from oculo.errors import StorageUnavailable

PREFIX = "sk-oculo-"
ID_LENGTH = 12
_HEX = frozenset(string.hexdigits.lower())


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh (public id, key)."""
    key_id = secrets.token_hex(ID_LENGTH // 2)
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The public id inside a key of oculo's format, else None."""
    if not key.startswith(PREFIX):
        return None
    body = key[len(PREFIX) :]
    key_id = body[:ID_LENGTH]
    if body[ID_LENGTH : ID_LENGTH + 1] != "_" or not set(key_id) <= _HEX or len(key_id) < ID_LENGTH:
        return None
    return key_id


def utc(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; every stored time is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Account:
    """Who is calling: a key's public id and what it may do."""

    id: str
    name: str
    models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class KeyInfo:
    """A stored key as `oculo keys list` shows it (no secret: the store has none)."""

    id: str
    name: str
    models: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        now = datetime.now(UTC)
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def account(self) -> Account:
        return Account(self.id, self.name, self.models, self.rpm, self.tpm)


def _info(row: Any) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        name=row.name,
        models=tuple(row.models) if row.models is not None else None,
        rpm=row.rpm,
        tpm=row.tpm,
        created_at=utc(row.created_at) or datetime.now(UTC),
        expires_at=utc(row.expires_at),
        revoked_at=utc(row.revoked_at),
    )


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create(
        self,
        name: str,
        *,
        models: Sequence[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[str, KeyInfo]:
        """A new key; the key itself is returned here once and never stored."""
        key_id, key = new_key()
        info = KeyInfo(
            id=key_id,
            name=name,
            models=tuple(models) if models else None,
            rpm=rpm,
            tpm=tpm,
            created_at=datetime.now(UTC),
            expires_at=utc(expires_at),
            revoked_at=None,
        )
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=info.id,
                    name=info.name,
                    secret_hash=_digest(key),
                    models=list(info.models) if info.models else None,
                    rpm=info.rpm,
                    tpm=info.tpm,
                    created_at=info.created_at,
                    expires_at=info.expires_at,
                )
            )
        return key, info

    async def list(self) -> list[KeyInfo]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(api_keys).order_by(api_keys.c.created_at))
            return [_info(row) for row in rows]

    async def count(self) -> int:
        async with self._engine.connect() as conn:
            return int(
                (await conn.execute(select(func.count()).select_from(api_keys))).scalar_one()
            )

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key by its public id; False if there is no such key."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
            if result.rowcount:
                return True
            found = await conn.execute(select(api_keys.c.id).where(api_keys.c.id == key_id))
            return found.first() is not None  # already revoked: still a success

    async def verify(self, key: str) -> Account | None:
        """The account behind a presented key, or None (unknown, wrong, revoked, expired)."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        try:
            async with self._engine.connect() as conn:
                query = select(api_keys).where(api_keys.c.id == key_id)
                row = (await conn.execute(query)).first()
        except (SQLAlchemyError, OSError) as exc:
            raise StorageUnavailable(
                f"The key store is unavailable ({type(exc).__name__}).", retry_after=1
            ) from None
        if row is None or not secrets.compare_digest(_digest(key), row.secret_hash):
            return None
        info = _info(row)
        return info.account() if info.active else None


class KeyRing:
    """Keys from the configuration, as digests; every digest is compared (no early exit)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def verify(self, key: str) -> Account | None:
        presented = _digest(key)
        match: str | None = None
        for digest in self._digests:
            if secrets.compare_digest(presented, digest):
                match = digest
        return Account(id=match[:12], name="configured key") if match is not None else None
