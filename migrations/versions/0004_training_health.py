"""training health: epoch instruments, copy-the-support baseline per epoch, the job's diagnosis and mPCK

Revision ID: 0004
Revises: 0003

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # Epochs recorded before the instruments existed have none: null, as on a machine that cannot measure them.
    with op.batch_alter_table('epoch_metric', schema=None) as batch_op:
        batch_op.add_column(sa.Column('baseline_pck', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('baseline_mpck', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('health', sa.JSON(), nullable=True))
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('diagnosis', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('best_mpck', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('latest_mpck', sa.Float(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_column('latest_mpck')
        batch_op.drop_column('best_mpck')
        batch_op.drop_column('diagnosis')
    with op.batch_alter_table('epoch_metric', schema=None) as batch_op:
        batch_op.drop_column('health')
        batch_op.drop_column('baseline_mpck')
        batch_op.drop_column('baseline_pck')
