"""drift: a version's score reference, images' acquisition metadata, the breast intensity of
each prediction, and the weekly drift table

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "model_versions",
        sa.Column("score_reference", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column("images", sa.Column("manufacturer", sa.String(64), nullable=True))
    op.add_column("images", sa.Column("manufacturer_model", sa.String(64), nullable=True))
    op.add_column("images", sa.Column("pixel_spacing_mm", sa.Float(), nullable=True))
    op.add_column("predictions", sa.Column("input_intensity", sa.Float(), nullable=True))
    op.create_table(
        "score_drift_weeks",
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("week_start", sa.Date(), primary_key=True),
        sa.Column(
            "model_version_id", sa.Uuid(), sa.ForeignKey("model_versions.id"), primary_key=True
        ),
        sa.Column("exams", sa.Integer(), nullable=False),
        sa.Column("psi", sa.Float(), nullable=True),
        sa.Column("alarm", sa.Boolean(), nullable=False),
        sa.Column("bin_shares", postgresql.ARRAY(sa.Float()), nullable=False),
        sa.Column("inputs", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
    )
    # The weekly scan: one tenant's predictions in a time range.
    op.create_index(
        "ix_predictions_tenant_id_created_at", "predictions", ["tenant_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_predictions_tenant_id_created_at", "predictions")
    op.drop_table("score_drift_weeks")
    op.drop_column("predictions", "input_intensity")
    op.drop_column("images", "pixel_spacing_mm")
    op.drop_column("images", "manufacturer_model")
    op.drop_column("images", "manufacturer")
    op.drop_column("model_versions", "score_reference")
