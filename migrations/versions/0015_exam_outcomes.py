"""exam outcomes: the site's truth per exam, breast and source (biopsy, follow-up ...)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRUTH = postgresql.ENUM("malignant", "benign", "normal", name="outcome_truth")
BREAST = postgresql.ENUM("left", "right", "both", name="breast")
SOURCE = postgresql.ENUM(
    "biopsy", "surgery", "follow_up", "registry", "other", name="outcome_source"
)


def upgrade() -> None:
    op.execute("ALTER TYPE audit_action ADD VALUE IF NOT EXISTS 'record_outcome'")
    op.create_table(
        "exam_outcomes",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("study_id", sa.Uuid(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("truth", TRUTH, nullable=False),
        sa.Column("breast", BREAST, nullable=False),
        sa.Column("source", SOURCE, nullable=False),
        sa.Column("outcome_date", sa.Date(), nullable=False),
        sa.Column("recorded_by", sa.String(32), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_id", "breast", "source"),
    )
    op.create_index("ix_exam_outcomes_tenant_id", "exam_outcomes", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_exam_outcomes_tenant_id", "exam_outcomes")
    op.drop_table("exam_outcomes")
    for enum in (SOURCE, BREAST, TRUTH):
        enum.drop(op.get_bind())
