"""thread keys for Message-IDs of our own, and a personal mailbox's sharing level

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("threads") as batch:
        batch.add_column(sa.Column("key", sa.String(32), nullable=True))
        batch.create_unique_constraint("uq_threads_key", ["key"])
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("thread_key", sa.String(32), nullable=True))
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(sa.Column("sharing", sa.String(10), nullable=False,
                                   server_default="full"))


def downgrade() -> None:
    with op.batch_alter_table("mailboxes") as batch:
        batch.drop_column("sharing")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("thread_key")
    with op.batch_alter_table("threads") as batch:
        batch.drop_constraint("uq_threads_key", type_="unique")
        batch.drop_column("key")
