"""cross-validation: runs of a kind, folds and final models under their parent run; epochs
without a validation split; imported models in the audit log

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KIND = sa.Enum('single', 'cross_validation', 'fold', 'final', name='training_run_kind')


def upgrade() -> None:
    KIND.create(op.get_bind(), checkfirst=True)
    op.add_column('training_runs', sa.Column('kind', KIND, server_default='single', nullable=False))
    op.alter_column('training_runs', 'kind', server_default=None)
    op.add_column('training_runs', sa.Column('parent_id', sa.Uuid(), nullable=True))
    op.add_column('training_runs', sa.Column('fold', sa.Integer(), nullable=True))
    op.create_foreign_key(op.f('fk_training_runs_parent_id_training_runs'), 'training_runs', 'training_runs', ['parent_id'], ['id'])
    op.create_index(op.f('ix_training_runs_parent_id'), 'training_runs', ['parent_id'], unique=False)
    op.execute("ALTER TYPE audit_action ADD VALUE IF NOT EXISTS 'import_model'")
    op.alter_column('training_epochs', 'validation_loss', existing_type=sa.Float(), nullable=True)
    op.alter_column('training_epochs', 'validation_auc', existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    op.alter_column('training_epochs', 'validation_auc', existing_type=sa.Float(), nullable=False)
    op.alter_column('training_epochs', 'validation_loss', existing_type=sa.Float(), nullable=False)
    op.drop_index(op.f('ix_training_runs_parent_id'), table_name='training_runs')
    op.drop_constraint(op.f('fk_training_runs_parent_id_training_runs'), 'training_runs', type_='foreignkey')
    op.drop_column('training_runs', 'fold')
    op.drop_column('training_runs', 'parent_id')
    op.drop_column('training_runs', 'kind')
    KIND.drop(op.get_bind(), checkfirst=True)
