"""count the attempts that hold a pending capture

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("holders", sa.Integer(), nullable=False,
                                   server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("holders")
