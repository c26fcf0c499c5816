"""retention: per-tenant retention of images and of results, and when a batch's and an
image's objects were purged

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("image_retention_days", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("result_retention_days", sa.Integer(), nullable=True))
    op.add_column(
        "batches", sa.Column("images_purged_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "images", sa.Column("image_purged_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "ix_batches_completed_at",
        "batches",
        ["completed_at"],
        postgresql_where=sa.text("completed_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_batches_completed_at", "batches")
    op.drop_column("images", "image_purged_at")
    op.drop_column("batches", "images_purged_at")
    op.drop_column("tenants", "result_retention_days")
    op.drop_column("tenants", "image_retention_days")
