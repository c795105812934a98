"""mailboxes: the lease of the gateway that mirrors each; the mirrors that are running

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No mailbox is held yet: the first mirror to look takes them.
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(sa.Column("lease_holder", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "mirrors",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("alive_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mirrors")),
    )


def downgrade() -> None:
    op.drop_table("mirrors")
    with op.batch_alter_table("mailboxes") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("lease_holder")
