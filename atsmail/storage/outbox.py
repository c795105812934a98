"""The durable outbox: mail from the ATS is stored before any attempt to send it.

Each message is composed once (so every retry sends the same bytes under the
same Message-ID), claimed by one sender at a time (`sending`), and retried
with back-off until it is sent or fails for good.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from atsmail.storage.db import Database
from atsmail.storage.models import Candidate, Mailbox, OutboxMessage, TeamMember, utcnow
from atsmail.storage.store import UserError, checked_address

# A message still failing for good reasons after this many attempts is given up.
MAX_ATTEMPTS = 12
FIRST_RETRY = 30.0
LAST_RETRY = 3600.0


@dataclass(frozen=True)
class Route:
    """How a team member's mail goes out."""

    from_address: str
    name: str
    # The connected mailbox to submit through; None: the hosted identity.
    mailbox: str | None
    signature: str


def outbox_json(item: OutboxMessage) -> dict[str, Any]:
    return {"id": item.id, "message_id": item.message_id, "status": item.status,
            "attempts": item.attempts, "last_error": item.last_error,
            "from": item.from_address, "to": list(item.recipients),
            "candidate": item.candidate_id, "via": item.mailbox or "hosted",
            "created_at": item.created_at.isoformat(),
            "sent_at": item.sent_at.isoformat() if item.sent_at else None}


def retry_delay(attempts: int) -> float:
    return float(min(LAST_RETRY, FIRST_RETRY * 2.0 ** max(0, attempts - 1)))


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def route(self, sender: str) -> Route:
        """The sender's own connected mailbox, else their hosted identity."""
        sender = checked_address(sender)
        async with self.db.read() as session:
            member = await session.get(TeamMember, sender)
            if member is None:
                raise UserError(f"{sender} is not a team member")
            box = await session.scalar(select(Mailbox).where(
                Mailbox.owner == sender, Mailbox.state != "disconnected"))
        if box is not None:
            return Route(box.address, member.name, box.address, box.signature)
        if member.hosted_address:
            return Route(member.hosted_address, member.name, None, "")
        raise UserError(f"{sender} has no connected mailbox and no hosted identity to send "
                        "from (`atsmail mailbox connect` or `atsmail identity hosted`)")

    async def check_candidate(self, candidate_id: str) -> None:
        async with self.db.read() as session:
            if await session.get(Candidate, candidate_id) is None:
                raise UserError(f"unknown candidate {candidate_id}")

    async def queue(self, sender: str, route: Route, recipients: list[str],
                    candidate_id: str | None, message_id: str, raw: bytes) -> OutboxMessage:
        item = OutboxMessage(
            sender=checked_address(sender), from_address=route.from_address,
            mailbox=route.mailbox, recipients=recipients, candidate_id=candidate_id,
            message_id=message_id, raw=raw, status="queued", attempts=0)
        async with self.db.write() as session:
            session.add(item)
        return item

    async def all(self) -> list[OutboxMessage]:
        async with self.db.read() as session:
            return list(await session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))

    async def claim_due(self, limit: int = 20) -> list[OutboxMessage]:
        """Mark due messages `sending` and return them: one sender per message."""
        async with self.db.write() as session:
            items = list(await session.scalars(
                select(OutboxMessage)
                .where(OutboxMessage.status == "queued", OutboxMessage.next_attempt <= utcnow())
                .order_by(OutboxMessage.next_attempt).limit(limit)
                .with_for_update(skip_locked=True)))
            for item in items:
                item.status = "sending"
                item.attempts += 1
            return items

    async def requeue_interrupted(self) -> None:
        """Messages left `sending` by a stopped gateway are tried again."""
        async with self.db.write() as session:
            await session.execute(update(OutboxMessage).where(
                OutboxMessage.status == "sending").values(status="queued"))

    async def sent(self, item_id: int, note: str | None = None) -> None:
        await self._set(item_id, status="sent", sent_at=utcnow(), last_error=note)

    async def retry(self, item_id: int, attempts: int, error: str) -> None:
        if attempts >= MAX_ATTEMPTS:
            await self._set(item_id, status="failed", last_error=error)
            return
        when: datetime = utcnow() + timedelta(seconds=retry_delay(attempts))
        await self._set(item_id, status="queued", last_error=error, next_attempt=when)

    async def failed(self, item_id: int, error: str) -> None:
        await self._set(item_id, status="failed", last_error=error)

    async def _set(self, item_id: int, **values: Any) -> None:
        async with self.db.write() as session:
            await session.execute(
                update(OutboxMessage).where(OutboxMessage.id == item_id).values(**values))
