"""dicom out: identity vault, key scopes, export destinations, exam exports and deliveries

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('tenants', sa.Column('identity_vault', sa.Boolean(), server_default=sa.text('true'), nullable=False))
    # Keys issued before scopes existed keep what they could do, the audit log included; new
    # keys get submit and read unless issued with more.
    op.add_column('api_keys', sa.Column('scopes', postgresql.ARRAY(sa.String(length=32)), nullable=False,
                                        server_default=sa.text("'{submit,read,audit}'")))
    op.alter_column('api_keys', 'scopes', server_default=None)
    op.execute("ALTER TYPE audit_action ADD VALUE IF NOT EXISTS 'decrypt_identity'")
    op.create_table('identity_vault',
    sa.Column('image_id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('key_id', sa.String(length=64), nullable=False),
    sa.Column('nonce', sa.LargeBinary(), nullable=False),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_identity_vault_image_id_images')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_identity_vault_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('image_id', name=op.f('pk_identity_vault'))
    )
    op.create_index(op.f('ix_identity_vault_tenant_id'), 'identity_vault', ['tenant_id'], unique=False)
    op.create_table('export_destinations',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('transport', sa.Enum('dimse', 'stow-rs', name='export_transport'), nullable=False),
    sa.Column('dicom_node_id', sa.Uuid(), nullable=True),
    sa.Column('url', sa.String(length=2048), nullable=True),
    sa.Column('secondary_capture', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['dicom_node_id'], ['dicom_nodes.id'], name=op.f('fk_export_destinations_dicom_node_id_dicom_nodes')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_export_destinations_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_export_destinations')),
    sa.UniqueConstraint('tenant_id', 'name', name=op.f('uq_export_destinations_tenant_id_name'))
    )
    op.create_table('exam_exports',
    sa.Column('study_id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('batch_id', sa.Uuid(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'rendered', 'failed', name='export_status'), nullable=False),
    sa.Column('objects', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('rendered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_exam_exports_batch_id_batches')),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_exam_exports_study_id_studies')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_exam_exports_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('study_id', name=op.f('pk_exam_exports'))
    )
    op.create_index(op.f('ix_exam_exports_batch_id'), 'exam_exports', ['batch_id'], unique=False)
    op.create_index(op.f('ix_exam_exports_tenant_id'), 'exam_exports', ['tenant_id'], unique=False)
    op.create_index('ix_exam_exports_pending', 'exam_exports', ['created_at'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_table('export_deliveries',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('batch_id', sa.Uuid(), nullable=False),
    sa.Column('study_id', sa.Uuid(), nullable=False),
    sa.Column('destination_id', sa.Uuid(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'delivered', 'dead', name='export_delivery_status'), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('identified', sa.Boolean(), nullable=True),
    sa.Column('last_status_code', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_export_deliveries_batch_id_batches')),
    sa.ForeignKeyConstraint(['destination_id'], ['export_destinations.id'], name=op.f('fk_export_deliveries_destination_id_export_destinations')),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_export_deliveries_study_id_studies')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_export_deliveries_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_export_deliveries')),
    sa.UniqueConstraint('study_id', 'destination_id', name=op.f('uq_export_deliveries_study_id_destination_id'))
    )
    op.create_index('ix_export_deliveries_batch_id_id', 'export_deliveries', ['batch_id', 'id'], unique=False)
    op.create_index('ix_export_deliveries_due', 'export_deliveries', ['next_attempt_at'], unique=False, postgresql_where=sa.text("status = 'pending'"))


def downgrade() -> None:
    op.drop_index('ix_export_deliveries_due', table_name='export_deliveries', postgresql_where=sa.text("status = 'pending'"))
    op.drop_index('ix_export_deliveries_batch_id_id', table_name='export_deliveries')
    op.drop_table('export_deliveries')
    op.drop_index('ix_exam_exports_pending', table_name='exam_exports', postgresql_where=sa.text("status = 'pending'"))
    op.drop_index(op.f('ix_exam_exports_tenant_id'), table_name='exam_exports')
    op.drop_index(op.f('ix_exam_exports_batch_id'), table_name='exam_exports')
    op.drop_table('exam_exports')
    op.drop_table('export_destinations')
    op.drop_index(op.f('ix_identity_vault_tenant_id'), table_name='identity_vault')
    op.drop_table('identity_vault')
    for name in ('export_delivery_status', 'export_status', 'export_transport'):
        sa.Enum(name=name).drop(op.get_bind(), checkfirst=True)
    # Postgres cannot drop one value of an enum; 'decrypt_identity' stays in audit_action.
    op.drop_column('api_keys', 'scopes')
    op.drop_column('tenants', 'identity_vault')
