"""honest promotion: rejected model versions, and registry changes in the audit log

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE model_status ADD VALUE IF NOT EXISTS 'rejected'")
    op.add_column('model_versions', sa.Column('rejection_reason', sa.Text(), nullable=True))
    op.execute("ALTER TYPE audit_action ADD VALUE IF NOT EXISTS 'promote_model'")
    op.execute("ALTER TYPE audit_action ADD VALUE IF NOT EXISTS 'rollback_model'")
    # System events (a model promotion concerns every tenant) have no tenant.
    op.alter_column('audit_events', 'tenant_id', existing_type=sa.Uuid(), nullable=True)


def downgrade() -> None:
    # Postgres cannot drop an enum value; the rejected versions become plain candidates.
    op.execute("UPDATE model_versions SET status = 'candidate' WHERE status = 'rejected'")
    op.drop_column('model_versions', 'rejection_reason')
