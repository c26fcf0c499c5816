"""shadow mode: a version that scores every newly screened image after the active one, its
scores kept apart (shadow_scores)

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE audit_action ADD VALUE IF NOT EXISTS 'shadow_model'")
    op.add_column(
        "model_versions", sa.Column("shadow_since", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "uq_model_versions_one_shadow",
        "model_versions",
        [sa.text("(shadow_since IS NOT NULL)")],
        unique=True,
        postgresql_where=sa.text("shadow_since IS NOT NULL"),
    )
    op.create_table(
        "shadow_scores",
        sa.Column("image_id", sa.Uuid(), sa.ForeignKey("images.id"), primary_key=True),
        sa.Column(
            "model_version_id", sa.Uuid(), sa.ForeignKey("model_versions.id"), primary_key=True
        ),
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_shadow_scores_tenant_id", "shadow_scores", ["tenant_id"])
    # The shadow scorer's scan: images finished since a time, oldest first.
    op.create_index(
        "ix_images_done_finished_at",
        "images",
        ["finished_at"],
        postgresql_where=sa.text("status = 'done'"),
    )


def downgrade() -> None:
    op.drop_index("ix_images_done_finished_at", "images")
    op.drop_index("ix_shadow_scores_tenant_id", "shadow_scores")
    op.drop_table("shadow_scores")
    op.drop_index("uq_model_versions_one_shadow", "model_versions")
    op.drop_column("model_versions", "shadow_since")
