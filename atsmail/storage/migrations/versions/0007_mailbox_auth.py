"""mailboxes: how they log in (password or OAuth2), and their SMTP server's own TLS

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every mailbox connected so far logs in with a password, and its SMTP
    # server was reached with the same TLS as its IMAP server.
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(sa.Column("smtp_security", sa.String(length=10), nullable=True))
        batch.add_column(sa.Column("auth", sa.String(length=10), nullable=True))
    op.execute("UPDATE mailboxes SET smtp_security = security, auth = 'password'")
    with op.batch_alter_table("mailboxes") as batch:
        batch.alter_column("smtp_security", existing_type=sa.String(length=10), nullable=False)
        batch.alter_column("auth", existing_type=sa.String(length=10), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("mailboxes") as batch:
        batch.drop_column("auth")
        batch.drop_column("smtp_security")
