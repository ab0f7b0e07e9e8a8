"""initial schema: job and epoch_metric

Revision ID: 0001
Revises: 

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate writes sqlmodel.sql.sqltypes.AutoString)

import service.models  # noqa: F401  (UTCDateTime and the other column types autogenerate refers to)


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('job',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('mode', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('dataset', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('split', sa.Integer(), nullable=False),
    sa.Column('category_id', sa.Integer(), nullable=True),
    sa.Column('image_index', sa.Integer(), nullable=True),
    sa.Column('image_file', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('image_annotation_id', sa.BigInteger(), nullable=True),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('current_epoch', sa.Integer(), nullable=False),
    sa.Column('total_epochs', sa.Integer(), nullable=False),
    sa.Column('best_pck', sa.Float(), nullable=True),
    sa.Column('latest_pck', sa.Float(), nullable=True),
    sa.Column('latest_loss', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('worker', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('created_at', service.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('started_at', service.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('finished_at', service.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', service.models.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_status'), ['status'], unique=False)

    op.create_table('epoch_metric',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('loss', sa.Float(), nullable=False),
    sa.Column('loss_ce', sa.Float(), nullable=False),
    sa.Column('loss_coords', sa.Float(), nullable=False),
    sa.Column('pck', sa.Float(), nullable=True),
    sa.Column('mpck', sa.Float(), nullable=True),
    sa.Column('lr', sa.Float(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('created_at', service.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['job.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'epoch', name='uq_epoch_metric_job_epoch')
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('epoch_metric')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_status'))
        batch_op.drop_index(batch_op.f('ix_job_created_at'))

    op.drop_table('job')
