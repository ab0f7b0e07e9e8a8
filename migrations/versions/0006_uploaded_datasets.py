"""uploaded datasets (POST /datasets) and the dataset a job was accepted on

Revision ID: 0006
Revises: 0005

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel

import service.models


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'dataset',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('options', sa.JSON(), nullable=False),
        sa.Column('archive_name', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column('archive_bytes', sa.BigInteger(), nullable=False),
        sa.Column('digest', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column('report', sa.JSON(), nullable=True),
        sa.Column('summary', sa.JSON(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('worker', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column('dispatched_at', service.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column('created_at', service.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column('updated_at', service.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('owner', 'name', name='uq_dataset_owner_name'),
    )
    # Jobs made before uploads existed all trained on the server's datasets.
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dataset_id', sa.Uuid(), nullable=True))
        batch_op.create_index(batch_op.f('ix_job_dataset_id'), ['dataset_id'], unique=False)
        batch_op.create_foreign_key('fk_job_dataset_id_dataset', 'dataset', ['dataset_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_constraint('fk_job_dataset_id_dataset', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_job_dataset_id'))
        batch_op.drop_column('dataset_id')
    op.drop_table('dataset')
