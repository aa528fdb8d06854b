"""Job arrays, dependencies, holds, output files; user state (disabled).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 05:00:00

[Note: server defaults] As in 0002, the NOT NULL columns carry a server default so an existing
database's rows get a value: no array, no dependency, not held, no output file, not disabled. The
indexes serve ``GET /v1/history`` (ended chains by ``finished_at``) and an array's tasks.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('array_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('array_index', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('array_throttle', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('after', sa.JSON(), nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('after_ok', sa.JSON(), nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('held', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('output', sa.String(length=1000), nullable=True))
        batch_op.create_index('ix_jobs_array_id', ['array_id'], unique=False)
        batch_op.create_index('ix_jobs_finished_at', ['finished_at'], unique=False)
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('disabled', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('disabled')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_finished_at')
        batch_op.drop_index('ix_jobs_array_id')
        for name in ('output', 'held', 'after_ok', 'after', 'array_throttle', 'array_index', 'array_id'):
            batch_op.drop_column(name)
