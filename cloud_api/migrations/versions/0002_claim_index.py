"""partial index for annotation-queue claims

The claim takes the most urgent open task: ``WHERE is_gold = ? AND status IN ('pending', 'leased') ...
ORDER BY priority DESC, id LIMIT 1``. This index serves that WHERE and ORDER BY and holds only claimable
tasks, so a claim reads a few index entries instead of sorting every open task or walking the done ones.
A plain (not CONCURRENTLY) build: migrations run in one transaction, and the table is written only by the
queue and ingest, which wait for the short lock.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CLAIMABLE = sa.text("status IN ('pending', 'leased')")


def upgrade() -> None:
    op.create_index(
        "ix_annotation_tasks_claimable",
        "annotation_tasks",
        ["is_gold", sa.text("priority DESC"), "id"],
        unique=False,
        postgresql_where=_CLAIMABLE,
        sqlite_where=_CLAIMABLE,
    )


def downgrade() -> None:
    op.drop_index("ix_annotation_tasks_claimable", table_name="annotation_tasks")
