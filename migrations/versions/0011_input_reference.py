"""out-of-distribution warnings: a model version's input reference, each prediction's
distance from it and its warnings

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('model_versions', sa.Column('input_reference', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('predictions', sa.Column('input_distance', sa.Float(), nullable=True))
    op.add_column('predictions', sa.Column('warnings', postgresql.ARRAY(sa.String(length=64)), server_default=sa.text("'{}'"), nullable=False))
    op.alter_column('predictions', 'warnings', server_default=None)


def downgrade() -> None:
    op.drop_column('predictions', 'warnings')
    op.drop_column('predictions', 'input_distance')
    op.drop_column('model_versions', 'input_reference')
