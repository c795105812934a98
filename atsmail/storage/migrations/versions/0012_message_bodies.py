"""message_bodies: a captured message's bytes move to a table of their own

SQLite writes a whole row again to change any column of it, so confirming a
capture wrote the message a second time; now it changes a small row only.
On PostgreSQL the dropped column's space is freed only as rows are written
again (`VACUUM FULL messages` frees it at once); SQLite reuses it, and
`VACUUM` shrinks the file.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "message_bodies",
        sa.Column("message_pk", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["message_pk"], ["messages.id"],
                                name=op.f("fk_message_bodies_message_pk_messages"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("message_pk", name=op.f("pk_message_bodies")),
    )
    op.execute("INSERT INTO message_bodies (message_pk, raw) SELECT id, raw FROM messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("raw")


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("raw", sa.LargeBinary(), nullable=True))
    op.execute("UPDATE messages SET raw = (SELECT raw FROM message_bodies "
               "WHERE message_pk = messages.id)")
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("raw", existing_type=sa.LargeBinary(), nullable=False)
    op.drop_table("message_bodies")
