"""inference_batches: one row per forward pass, for /metrics

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('inference_batches',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('model_version_id', sa.Uuid(), nullable=False),
    sa.Column('images', sa.Integer(), nullable=False),
    sa.Column('forward_seconds', sa.Float(), nullable=False),
    sa.Column('device', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_inference_batches_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inference_batches'))
    )


def downgrade() -> None:
    op.drop_table('inference_batches')
