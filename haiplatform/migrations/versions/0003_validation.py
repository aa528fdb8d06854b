"""Node validation: each validator run per node (hai validate), who drained a node, pending requests.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 05:00:00

The ``nodes`` columns carry server defaults so an existing database's rows get a value; a node an
admin drained before this revision counts as drained by an admin (the validator never returns it), one
the scheduler drained after losing it ("node N lost under job J") as drained by the scheduler.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'validations',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('node', sa.String(length=64), nullable=False),
        sa.Column('at', sa.Float(), nullable=False),
        sa.Column('received_at', sa.Float(), nullable=False),
        sa.Column('ok', sa.Boolean(), nullable=False),
        sa.Column('trigger', sa.String(length=16), nullable=False),
        sa.Column('request', sa.Float(), nullable=False, server_default='0'),
        sa.Column('duration', sa.Float(), nullable=False),
        sa.Column('failed', sa.JSON(), nullable=False),
        sa.Column('summary', sa.String(length=500), nullable=False),
        sa.Column('checks', sa.JSON(), nullable=False),
    )
    op.create_index('ix_validations_node', 'validations', ['node'])
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('drained_by', sa.String(length=16), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('validate_requested', sa.Float(), nullable=False, server_default='0'))
    op.execute("UPDATE nodes SET drained_by = CASE WHEN drain_reason LIKE 'node % lost%' THEN 'scheduler' "
               "ELSE 'admin' END WHERE drained")


def downgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_column('validate_requested')
        batch_op.drop_column('drained_by')
    op.drop_index('ix_validations_node', table_name='validations')
    op.drop_table('validations')
