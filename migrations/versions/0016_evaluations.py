"""evaluations: model versions measured on a tenant's exams with outcomes (a queued job)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS = postgresql.ENUM(name="training_status", create_type=False)


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("model_version_ids", postgresql.ARRAY(sa.Uuid()), nullable=False),
        sa.Column("batch_ids", postgresql.ARRAY(sa.Uuid()), nullable=False),
        sa.Column("outcomes_from", sa.Date(), nullable=True),
        sa.Column("outcomes_to", sa.Date(), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("figures", postgresql.JSONB(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("touched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_evaluations_tenant_id_id", "evaluations", ["tenant_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_evaluations_tenant_id_id", "evaluations")
    op.drop_table("evaluations")
