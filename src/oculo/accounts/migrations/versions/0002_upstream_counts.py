"""The usage ledger keeps the engine's own counts and the upstream that answered.

For a remote model these are the upstream server's own `usage` (its prompt count includes the
image positions it really ran) and its base URL; for a local model, the engine's counts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("engine_prompt_tokens", sa.Integer, nullable=True))
        batch.add_column(sa.Column("engine_completion_tokens", sa.Integer, nullable=True))
        batch.add_column(sa.Column("upstream", sa.String(500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("upstream")
        batch.drop_column("engine_completion_tokens")
        batch.drop_column("engine_prompt_tokens")
