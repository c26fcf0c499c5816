"""rejected files: the quality gate's refusals, shown in results

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('rejected_files',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('batch_id', sa.Uuid(), nullable=False),
    sa.Column('filename', sa.String(length=600), nullable=False),
    sa.Column('code', sa.String(length=64), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_rejected_files_batch_id_batches')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_rejected_files_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rejected_files'))
    )
    op.create_index('ix_rejected_files_batch_id_id', 'rejected_files', ['batch_id', 'id'], unique=False)
    op.create_index(op.f('ix_rejected_files_tenant_id'), 'rejected_files', ['tenant_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_rejected_files_tenant_id'), table_name='rejected_files')
    op.drop_index('ix_rejected_files_batch_id_id', table_name='rejected_files')
    op.drop_table('rejected_files')
