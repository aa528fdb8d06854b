"""Time-sharing: the jobs' submitted priority, limits (time, grace, watchdog) and reported activity.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 01:30:00

[Note: server defaults] The new NOT NULL columns carry a server default so that an existing
database's rows get a value: ``submitted_priority`` takes the row's own ``priority`` (what a job
submitted before AUTO asked for), ``submitted_at`` its chain's first attempt's creation time.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_FLOATS = ("time_limit", "grace", "watchdog", "chain_run_s", "last_output", "last_checkpoint", "submitted_at")


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('submitted_priority', sa.Integer(), nullable=False, server_default='10'))
        for name in _FLOATS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('suspend_sent_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('suspend_acked_at', sa.Float(), nullable=True))
    op.execute("UPDATE jobs SET submitted_priority = priority")
    op.execute("UPDATE jobs SET submitted_at = (SELECT MIN(f.created_at) FROM jobs f WHERE f.chain_id = jobs.chain_id)")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        for name in ('suspend_acked_at', 'suspend_sent_at', *reversed(_FLOATS), 'submitted_priority'):
            batch_op.drop_column(name)
