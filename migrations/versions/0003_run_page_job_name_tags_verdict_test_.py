"""run page: job name, tags, verdict, test result

Revision ID: 0003
Revises: 0002

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate writes sqlmodel.sql.sqltypes.AutoString)

import service.models  # noqa: F401  (UTCDateTime and the other column types autogenerate refers to)


# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True))
        batch_op.add_column(sa.Column('tags', sa.JSON(), server_default='[]', nullable=False))
        batch_op.add_column(sa.Column('memorised_epoch', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('never_correct', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('test_result', sa.JSON(), nullable=True))



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_column('test_result')
        batch_op.drop_column('never_correct')
        batch_op.drop_column('memorised_epoch')
        batch_op.drop_column('tags')
        batch_op.drop_column('name')

