"""webhook events and their deliveries, one per configured URL

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=50), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fanned_out", sa.Boolean(), nullable=False),
        sa.Column("message_pk", sa.Integer(), nullable=True),
        sa.Column("candidate_id", sa.String(length=100), nullable=True),
        sa.ForeignKeyConstraint(["message_pk"], ["messages.id"], ondelete="CASCADE",
                                name=op.f("fk_webhook_events_message_pk_messages")),
        sa.ForeignKeyConstraint(["candidate_id"], ["candidates.id"], ondelete="CASCADE",
                                name=op.f("fk_webhook_events_candidate_id_candidates")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_webhook_events_event_id")),
    )
    op.create_index("ix_webhook_events_fanned_out_id", "webhook_events", ["fanned_out", "id"])
    op.create_index("ix_webhook_events_message_pk", "webhook_events", ["message_pk"])
    op.create_index("ix_webhook_events_candidate_id", "webhook_events", ["candidate_id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("event_pk", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt", sa.DateTime(timezone=True), nullable=False),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["event_pk"], ["webhook_events.id"], ondelete="CASCADE",
                                name=op.f("fk_webhook_deliveries_event_pk_webhook_events")),
        sa.PrimaryKeyConstraint("event_pk", "url", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index("ix_webhook_deliveries_url_event_pk", "webhook_deliveries",
                    ["url", "event_pk"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_events")
