"""mailboxes, their folders, hosted identities, and the sources of captured messages

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("team_members") as batch:
        batch.add_column(sa.Column("hosted_address", sa.String(length=320), nullable=True))
    op.create_table(
        "mailboxes",
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("provider", sa.String(length=20), nullable=False),
        sa.Column("owner", sa.String(length=320), nullable=True),
        sa.Column("shared", sa.Boolean(), nullable=False),
        sa.Column("visible_to", sa.JSON(), nullable=False),
        sa.Column("imap_host", sa.String(length=255), nullable=False),
        sa.Column("imap_port", sa.Integer(), nullable=False),
        sa.Column("smtp_host", sa.String(length=255), nullable=False),
        sa.Column("smtp_port", sa.Integer(), nullable=False),
        sa.Column("security", sa.String(length=10), nullable=False),
        sa.Column("username", sa.String(length=320), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("last_sync", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_mailboxes")),
    )
    op.create_table(
        "mailbox_folders",
        sa.Column("mailbox", sa.String(length=320), nullable=False),
        sa.Column("name", sa.String(length=1000), nullable=False),
        sa.Column("special_use", sa.String(length=50), nullable=False),
        sa.Column("role", sa.String(length=10), nullable=False),
        sa.Column("role_fixed", sa.Boolean(), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("last_uid", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["mailbox"], ["mailboxes.address"],
            name=op.f("fk_mailbox_folders_mailbox_mailboxes"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("mailbox", "name", name=op.f("pk_mailbox_folders")),
    )
    op.create_table(
        "message_sources",
        sa.Column("message_pk", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("mailbox", sa.String(length=320), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_pk"], ["messages.id"],
            name=op.f("fk_message_sources_message_pk_messages"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("message_pk", "source", "mailbox",
                                name=op.f("pk_message_sources")),
    )


def downgrade() -> None:
    op.drop_table("message_sources")
    op.drop_table("mailbox_folders")
    op.drop_table("mailboxes")
    with op.batch_alter_table("team_members") as batch:
        batch.drop_column("hosted_address")
