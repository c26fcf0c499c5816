"""image leases and outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('images', sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('images', sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_images_unfinished', 'images', ['status', 'enqueued_at'], unique=False, postgresql_where=sa.text("status IN ('queued', 'running')"))


def downgrade() -> None:
    op.drop_index('ix_images_unfinished', table_name='images', postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.drop_column('images', 'lease_expires_at')
    op.drop_column('images', 'enqueued_at')
