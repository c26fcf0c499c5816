"""training: runs, examples, epoch curves; model registry lifecycle; heatmaps; training batches

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())


def upgrade() -> None:
    op.execute("ALTER TYPE image_status ADD VALUE IF NOT EXISTS 'stored'")
    batch_purpose = sa.Enum('screening', 'training', name='batch_purpose')
    batch_purpose.create(op.get_bind(), checkfirst=True)
    op.add_column('batches', sa.Column('purpose', batch_purpose, nullable=False, server_default='screening'))
    op.alter_column('batches', 'purpose', server_default=None)
    op.create_table('training_runs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'completed', 'failed', name='training_status'), nullable=False),
    sa.Column('hyperparameters', JSONB, nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('split_sizes', JSONB, nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('epochs_done', sa.Integer(), nullable=False),
    sa.Column('checkpoint_key', sa.String(length=512), nullable=True),
    sa.Column('evaluation', JSONB, nullable=True),
    sa.Column('model_version_id', sa.Uuid(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_training_runs_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_runs'))
    )
    op.create_index(op.f('ix_training_runs_tenant_id'), 'training_runs', ['tenant_id'], unique=False)
    op.create_table('training_examples',
    sa.Column('run_id', sa.Uuid(), nullable=False),
    sa.Column('image_id', sa.Uuid(), nullable=False),
    sa.Column('label', sa.Enum('malignant', 'benign', 'normal', name='training_label'), nullable=False),
    sa.Column('split', sa.Enum('train', 'validation', 'test', name='data_split'), nullable=False),
    sa.Column('box', JSONB, nullable=True),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_training_examples_image_id_images')),
    sa.ForeignKeyConstraint(['run_id'], ['training_runs.id'], name=op.f('fk_training_examples_run_id_training_runs')),
    sa.PrimaryKeyConstraint('run_id', 'image_id', name=op.f('pk_training_examples'))
    )
    op.create_table('training_epochs',
    sa.Column('run_id', sa.Uuid(), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('train_loss', sa.Float(), nullable=False),
    sa.Column('validation_loss', sa.Float(), nullable=False),
    sa.Column('validation_auc', sa.Float(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['training_runs.id'], name=op.f('fk_training_epochs_run_id_training_runs')),
    sa.PrimaryKeyConstraint('run_id', 'epoch', name=op.f('pk_training_epochs'))
    )
    op.add_column('model_versions', sa.Column('recall_threshold', sa.Float(), nullable=True))
    op.add_column('model_versions', sa.Column('calibration', JSONB, nullable=True))
    op.add_column('model_versions', sa.Column('model_card', JSONB, nullable=True))
    op.add_column('model_versions', sa.Column('training_run_id', sa.Uuid(), nullable=True))
    op.add_column('model_versions', sa.Column('promoted_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('model_versions', sa.Column('retired_at', sa.DateTime(timezone=True), nullable=True))
    op.create_foreign_key(op.f('fk_model_versions_training_run_id_training_runs'), 'model_versions', 'training_runs', ['training_run_id'], ['id'])
    op.add_column('predictions', sa.Column('heatmap_key', sa.String(length=512), nullable=True))


def downgrade() -> None:
    op.drop_column('predictions', 'heatmap_key')
    op.drop_constraint(op.f('fk_model_versions_training_run_id_training_runs'), 'model_versions', type_='foreignkey')
    for column in ('retired_at', 'promoted_at', 'training_run_id', 'model_card', 'calibration', 'recall_threshold'):
        op.drop_column('model_versions', column)
    op.drop_table('training_epochs')
    op.drop_table('training_examples')
    op.drop_index(op.f('ix_training_runs_tenant_id'), table_name='training_runs')
    op.drop_table('training_runs')
    sa.Enum(name='data_split').drop(op.get_bind(), checkfirst=True)
    sa.Enum(name='training_label').drop(op.get_bind(), checkfirst=True)
    sa.Enum(name='training_status').drop(op.get_bind(), checkfirst=True)
    op.drop_column('batches', 'purpose')
    sa.Enum(name='batch_purpose').drop(op.get_bind(), checkfirst=True)
    # PostgreSQL cannot drop one value of an enum; 'stored' stays in image_status.
