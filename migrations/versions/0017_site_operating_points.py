"""site operating points: a tenant's own recall threshold per model version, chosen on one
of its evaluations

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TARGET = postgresql.ENUM("sensitivity", "recall_rate", name="operating_target")


def upgrade() -> None:
    op.execute("ALTER TYPE audit_action ADD VALUE IF NOT EXISTS 'set_operating_point'")
    op.create_table(
        "site_operating_points",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column(
            "model_version_id", sa.Uuid(), sa.ForeignKey("model_versions.id"), nullable=False
        ),
        sa.Column("target", TARGET, nullable=False),
        sa.Column("target_value", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("evaluation_id", sa.Uuid(), sa.ForeignKey("evaluations.id"), nullable=False),
        sa.Column("chosen_by", sa.String(32), nullable=False),
        sa.Column("chosen_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("tenant_id", "model_version_id"),
    )


def downgrade() -> None:
    op.drop_table("site_operating_points")
    TARGET.drop(op.get_bind())
