"""The accounts tables. Migrations in `migrations/versions` create exactly these."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # the public part of the key: a lookup index
    Column("name", String(200), nullable=False),
    Column("secret_hash", String(64), nullable=False),  # sha256 hex of the whole key
    Column(
        "models", JSON(none_as_null=True), nullable=True
    ),  # allowed model ids; NULL: every model
    Column("rpm", Integer, nullable=True),  # requests per minute; NULL: unlimited
    Column("tpm", Integer, nullable=True),  # tokens per minute; NULL: unlimited
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

usage = Table(
    "usage",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("key_id", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("text_tokens", Integer, nullable=False),  # the tokenizer's count of the prompt text
    Column("image_tokens", Integer, nullable=False),  # the 560-tile rule
    Column("image_positions", Integer, nullable=True),  # what the engine really ran
    Column("completion_tokens", Integer, nullable=False),
    Column("status", Integer, nullable=False),
    Column("error_code", String(64), nullable=True),
    Column("latency_ms", Float, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("day", String(10), nullable=False),  # UTC date, YYYY-MM-DD: totals by day anywhere
    # 0002: the engine's own counts (a remote model: the upstream's usage) and the upstream
    Column("engine_prompt_tokens", Integer, nullable=True),
    Column("engine_completion_tokens", Integer, nullable=True),
    Column("upstream", String(500), nullable=True),
    Index("ix_usage_key_day", "key_id", "day"),
    Index("ix_usage_day", "day"),
)
