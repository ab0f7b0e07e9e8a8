"""reliability: owner, idempotency key, dispatch time, hand-off

Revision ID: 0002
Revises: 0001

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate writes sqlmodel.sql.sqltypes.AutoString)

import service.models  # noqa: F401  (UTCDateTime and the other column types autogenerate refers to)


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('job', schema=None) as batch_op:
        # Existing rows: no hand-off pending, submitted while the API was open.
        batch_op.add_column(sa.Column('handoff_requested', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True))
        batch_op.add_column(sa.Column('request_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('dispatched_at', service.models.UTCDateTime(timezone=True), nullable=True))
        batch_op.create_unique_constraint('uq_job_owner_idempotency_key', ['owner', 'idempotency_key'])



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_constraint('uq_job_owner_idempotency_key', type_='unique')
        batch_op.drop_column('dispatched_at')
        batch_op.drop_column('request_hash')
        batch_op.drop_column('idempotency_key')
        batch_op.drop_column('owner')
        batch_op.drop_column('handoff_requested')

