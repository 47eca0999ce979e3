"""job ETA and typed activity (overall progress weighted by the planner's expected work)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 14:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: jobs that are not running have no ETA and no activity.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('eta_s', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('activity', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('activity')
        batch_op.drop_column('eta_s')
