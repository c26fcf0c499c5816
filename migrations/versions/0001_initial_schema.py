"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-27
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('model_versions',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('architecture', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('checkpoint_key', sa.String(length=512), nullable=False),
    sa.Column('status', sa.Enum('candidate', 'active', 'retired', name='model_status'), nullable=False),
    sa.Column('trained', sa.Boolean(), nullable=False),
    sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('name', name=op.f('uq_model_versions_name'))
    )
    op.create_index('uq_model_versions_one_active', 'model_versions', ['status'], unique=True, postgresql_where=sa.text("status = 'active'"))
    op.create_table('tenants',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
    sa.UniqueConstraint('name', name=op.f('uq_tenants_name'))
    )
    op.create_table('api_keys',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('prefix', sa.String(length=32), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('prefix', name=op.f('uq_api_keys_prefix'))
    )
    op.create_index(op.f('ix_api_keys_tenant_id'), 'api_keys', ['tenant_id'], unique=False)
    op.create_table('batches',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('priority', sa.Enum('normal', 'urgent', name='batch_priority'), nullable=False),
    sa.Column('status', sa.Enum('open', 'processing', 'completed', name='batch_status'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_batches_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batches'))
    )
    op.create_index('ix_batches_tenant_created', 'batches', ['tenant_id', 'created_at', 'id'], unique=False)
    op.create_table('studies',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('batch_id', sa.Uuid(), nullable=False),
    sa.Column('patient_key', sa.String(length=64), nullable=False),
    sa.Column('study_key', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_studies_batch_id_batches')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_studies_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_studies')),
    sa.UniqueConstraint('batch_id', 'study_key', name=op.f('uq_studies_batch_id_study_key'))
    )
    op.create_index(op.f('ix_studies_tenant_id'), 'studies', ['tenant_id'], unique=False)
    op.create_table('images',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('batch_id', sa.Uuid(), nullable=False),
    sa.Column('study_id', sa.Uuid(), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('object_key', sa.String(length=512), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('media_type', sa.String(length=64), nullable=False),
    sa.Column('laterality', sa.Enum('L', 'R', name='laterality'), nullable=True),
    sa.Column('view', sa.Enum('CC', 'MLO', name='view_position'), nullable=True),
    sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', name='image_status'), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('size_bytes >= 0', name=op.f('ck_images_size_nonnegative')),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_images_batch_id_batches')),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_images_study_id_studies')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_images_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('object_key', name=op.f('uq_images_object_key'))
    )
    op.create_index('ix_images_batch_id_id', 'images', ['batch_id', 'id'], unique=False)
    op.create_index('ix_images_batch_status', 'images', ['batch_id', 'status'], unique=False)
    op.create_index(op.f('ix_images_study_id'), 'images', ['study_id'], unique=False)
    op.create_index(op.f('ix_images_tenant_id'), 'images', ['tenant_id'], unique=False)
    op.create_table('predictions',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('image_id', sa.Uuid(), nullable=False),
    sa.Column('model_version_id', sa.Uuid(), nullable=False),
    sa.Column('malignancy_score', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_predictions_image_id_images')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_predictions_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_predictions_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_predictions')),
    sa.UniqueConstraint('image_id', 'model_version_id', name=op.f('uq_predictions_image_id_model_version_id'))
    )
    op.create_index(op.f('ix_predictions_tenant_id'), 'predictions', ['tenant_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_predictions_tenant_id'), table_name='predictions')
    op.drop_table('predictions')
    op.drop_index(op.f('ix_images_tenant_id'), table_name='images')
    op.drop_index(op.f('ix_images_study_id'), table_name='images')
    op.drop_index('ix_images_batch_status', table_name='images')
    op.drop_index('ix_images_batch_id_id', table_name='images')
    op.drop_table('images')
    op.drop_index(op.f('ix_studies_tenant_id'), table_name='studies')
    op.drop_table('studies')
    op.drop_index('ix_batches_tenant_created', table_name='batches')
    op.drop_table('batches')
    op.drop_index(op.f('ix_api_keys_tenant_id'), table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('tenants')
    op.drop_index('uq_model_versions_one_active', table_name='model_versions', postgresql_where=sa.text("status = 'active'"))
    op.drop_table('model_versions')
    for enum_type in ("image_status", "view_position", "laterality", "batch_status",
                      "batch_priority", "model_status"):
        sa.Enum(name=enum_type).drop(op.get_bind(), checkfirst=True)
