"""dicom in: DICOM nodes per tenant, study-assembled batches, one image per SOP instance

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('dicom_nodes',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('ae_title', sa.String(length=16), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=True),
    sa.Column('port', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_dicom_nodes_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dicom_nodes')),
    sa.UniqueConstraint('ae_title', 'host', name=op.f('uq_dicom_nodes_ae_title_host'), postgresql_nulls_not_distinct=True)
    )
    op.create_index(op.f('ix_dicom_nodes_tenant_id'), 'dicom_nodes', ['tenant_id'], unique=False)
    batch_source = sa.Enum('api', 'dicom', 'dicomweb', name='batch_source')
    batch_source.create(op.get_bind(), checkfirst=True)
    op.add_column('batches', sa.Column('source', batch_source, nullable=False, server_default='api'))
    op.alter_column('batches', 'source', server_default=None)
    op.add_column('batches', sa.Column('dicom_study_key', sa.String(length=128), nullable=True))
    op.add_column('batches', sa.Column('dicom_node_id', sa.Uuid(), nullable=True))
    op.add_column('batches', sa.Column('accession_key', sa.String(length=64), nullable=True))
    op.create_foreign_key(op.f('fk_batches_dicom_node_id_dicom_nodes'), 'batches', 'dicom_nodes', ['dicom_node_id'], ['id'])
    op.create_index('uq_batches_open_dicom_study', 'batches', ['tenant_id', 'dicom_study_key'], unique=True, postgresql_where=sa.text("status = 'open' AND dicom_study_key IS NOT NULL"))
    op.add_column('images', sa.Column('sop_instance_key', sa.String(length=128), nullable=True))
    op.create_index('uq_images_tenant_sop_instance', 'images', ['tenant_id', 'sop_instance_key'], unique=True, postgresql_where=sa.text('sop_instance_key IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('uq_images_tenant_sop_instance', table_name='images', postgresql_where=sa.text('sop_instance_key IS NOT NULL'))
    op.drop_column('images', 'sop_instance_key')
    op.drop_index('uq_batches_open_dicom_study', table_name='batches', postgresql_where=sa.text("status = 'open' AND dicom_study_key IS NOT NULL"))
    op.drop_constraint(op.f('fk_batches_dicom_node_id_dicom_nodes'), 'batches', type_='foreignkey')
    op.drop_column('batches', 'accession_key')
    op.drop_column('batches', 'dicom_node_id')
    op.drop_column('batches', 'dicom_study_key')
    op.drop_column('batches', 'source')
    sa.Enum(name='batch_source').drop(op.get_bind(), checkfirst=True)
    op.drop_index(op.f('ix_dicom_nodes_tenant_id'), table_name='dicom_nodes')
    op.drop_table('dicom_nodes')
