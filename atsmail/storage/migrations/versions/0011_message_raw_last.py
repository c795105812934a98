"""messages: on SQLite, the message's bytes become the row's last column

SQLite writes a zeroblob (which a large message is then written into piece
by piece) without making it in memory only when it ends the row; anywhere
else a 30 MB message costs 30 MB more to store. PostgreSQL keeps its order.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ORDER = ("id", "thread_id", "capture_key", "message_id", "state", "direction", "source",
          "from_addr", "to_addrs", "cc_addrs", "subject", "date", "size", "trace",
          "created_at", "holders", "raw")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("messages", recreate="always",
                              partial_reordering=[_ORDER]):
        pass


def downgrade() -> None:
    pass  # the order of columns means nothing to earlier versions
