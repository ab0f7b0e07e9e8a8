"""sweeps (a grid of jobs ranked by a metric) and the learning-rate range test's result

Revision ID: 0005
Revises: 0004

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel

import service.models


# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'sweep',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
        sa.Column('tags', sa.JSON(), server_default='[]', nullable=False),
        sa.Column('mode', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('dataset', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column('split', sa.Integer(), nullable=False),
        sa.Column('category_id', sa.Integer(), nullable=True),
        sa.Column('metric', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('grid', sa.JSON(), nullable=False),
        sa.Column('config', sa.JSON(), nullable=False),
        sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column('request_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column('created_at', service.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('owner', 'idempotency_key', name='uq_sweep_owner_idempotency_key'),
    )
    with op.batch_alter_table('sweep', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sweep_created_at'), ['created_at'], unique=False)
    # Jobs made before sweeps existed belong to none; range tests did not exist either.
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sweep_id', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('sweep_values', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('lr_range', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_job_sweep_id'), ['sweep_id'], unique=False)
        batch_op.create_foreign_key('fk_job_sweep_id_sweep', 'sweep', ['sweep_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_constraint('fk_job_sweep_id_sweep', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_job_sweep_id'))
        batch_op.drop_column('lr_range')
        batch_op.drop_column('sweep_values')
        batch_op.drop_column('sweep_id')
    with op.batch_alter_table('sweep', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sweep_created_at'))
    op.drop_table('sweep')
