"""The durable outbox: mail from the ATS is stored before any attempt to send it.

Each message is composed once (so every retry sends the same bytes under the
same Message-ID), claimed by one sender at a time (`sending`), and retried
with back-off until it is sent or fails for good.

Several gateways may share one store, so a claim is a lease, not a lock: a
claimed message is `sending` with its next attempt moved `CLAIM` ahead. The
gateway that claimed it marks it sent, failed or due again long before
then; if that gateway dies instead, the claim runs out and any gateway
picks the message up. Nothing is taken from a gateway that is still alive,
and no start-up sweep is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from atsmail.backoff import backoff
from atsmail.rules import read_message
from atsmail.storage.db import Database
from atsmail.storage.models import (
    Candidate,
    Mailbox,
    MessageBody,
    OutboxMessage,
    TeamMember,
    new_thread_key,
    utcnow,
)
from atsmail.storage.repositories import ThreadRepository
from atsmail.storage.store import UserError, checked_address

# A message still failing for good reasons after this many attempts is given up.
MAX_ATTEMPTS = 12
FIRST_RETRY = 30.0
LAST_RETRY = 3600.0
# How long a claimed message is left to the gateway that claimed it. A
# submission and the filing in Sent are bounded by their timeouts (minutes
# at most); a claim that outlives this belongs to a gateway that died.
CLAIM = timedelta(minutes=15)
# References kept in a reply: the thread's start and its latest messages matter.
MAX_REFERENCES = 20


@dataclass(frozen=True)
class Route:
    """How a team member's mail goes out."""

    from_address: str
    name: str
    # The connected mailbox to submit through; None: the hosted identity.
    mailbox: str | None
    signature: str


@dataclass(frozen=True)
class Conversation:
    """Where a message from the ATS belongs: its thread's key, and what it answers."""

    thread_key: str
    candidate_id: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()


def _chosen_route(member: TeamMember, box: Mailbox | None, address: str) -> Route:
    if box is None or box.state == "disconnected":
        raise UserError(f"no mailbox {address} is connected")
    if box.shared and member.email not in box.visible_to:
        raise UserError(f"{member.email} may not send from the shared mailbox {box.address} "
                        f"(it is shared with {', '.join(box.visible_to)})")
    if not box.shared and box.owner != member.email:
        raise UserError(f"{box.address} is {box.owner}'s mailbox, not {member.email}'s")
    return Route(box.address, member.name, box.address, box.signature)


def outbox_json(item: OutboxMessage) -> dict[str, Any]:
    return {"id": item.id, "message_id": item.message_id, "status": item.status,
            "attempts": item.attempts, "last_error": item.last_error,
            "from": item.from_address, "to": list(item.recipients),
            "candidate": item.candidate_id, "via": item.mailbox or "hosted",
            "created_at": item.created_at.isoformat(),
            "sent_at": item.sent_at.isoformat() if item.sent_at else None}


def retry_delay(attempts: int) -> float:
    return backoff(attempts, FIRST_RETRY, LAST_RETRY)


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def route(self, sender: str, from_address: str | None = None) -> Route:
        """The mailbox `from_address` (one the sender may send from), else the
        sender's own connected mailbox, else their hosted identity."""
        sender = checked_address(sender)
        async with self.db.read() as session:
            member = await session.get(TeamMember, sender)
            if member is None:
                raise UserError(f"{sender} is not a team member")
            if from_address is not None:
                return _chosen_route(member, await session.get(
                    Mailbox, checked_address(from_address)), from_address)
            box = await session.scalar(select(Mailbox).where(
                Mailbox.owner == sender, Mailbox.state != "disconnected"))
        if box is not None:
            return Route(box.address, member.name, box.address, box.signature)
        if member.hosted_address:
            return Route(member.hosted_address, member.name, None, "")
        raise UserError(f"{sender} has no connected mailbox and no hosted identity to send "
                        "from (`atsmail mailbox connect` or `atsmail identity hosted`)")

    async def conversation(self, candidate_id: str | None,
                           thread_id: int | None) -> Conversation:
        """A new thread (for `candidate_id`, if given), or a reply in `thread_id`."""
        if thread_id is None:
            if candidate_id is not None:
                async with self.db.read() as session:
                    if await session.get(Candidate, candidate_id) is None:
                        raise UserError(f"unknown candidate {candidate_id}")
            return Conversation(new_thread_key(), candidate_id)
        async with self.db.write() as session:
            threads = ThreadRepository(session)
            thread = await threads.get(thread_id)
            messages = await threads.messages(thread_id) if thread else []
            if thread is None or not messages:
                raise UserError(f"unknown thread {thread_id}")
            candidates = (await threads.thread_candidates([thread_id])).get(thread_id, [])
            if candidate_id is None:
                if len(candidates) != 1:
                    raise UserError(f"thread {thread_id} concerns {', '.join(candidates)}: "
                                    "say which with --candidate")
                candidate_id = candidates[0]
            elif candidate_id not in candidates:
                raise UserError(f"thread {thread_id} does not concern candidate {candidate_id}")
            if thread.key is None:  # a thread from before keys existed
                thread.key = new_thread_key()
            last = next((m for m in reversed(messages) if m.message_id), None)
            if last is None:
                return Conversation(thread.key, candidate_id)
            raw = await session.scalar(
                select(MessageBody.raw).where(MessageBody.message_pk == last.id))
            earlier = read_message(raw or b"").references if raw else ()
            assert last.message_id is not None
            return Conversation(thread.key, candidate_id, last.message_id,
                                (*earlier[-(MAX_REFERENCES - 1):], last.message_id))

    async def queue(self, sender: str, route: Route, recipients: list[str],
                    conversation: Conversation, message_id: str, raw: bytes) -> OutboxMessage:
        item = OutboxMessage(
            sender=checked_address(sender), from_address=route.from_address,
            mailbox=route.mailbox, recipients=recipients,
            candidate_id=conversation.candidate_id, thread_key=conversation.thread_key,
            message_id=message_id, raw=raw, status="queued", attempts=0)
        async with self.db.write() as session:
            session.add(item)
        return item

    async def all(self) -> list[OutboxMessage]:
        async with self.db.read() as session:
            return list(await session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))

    async def claim_due(self, limit: int = 5) -> list[OutboxMessage]:
        """Claim due messages (queued ones, and claims that ran out) for `CLAIM`.

        A few at a time: they are sent one after the other, well within the
        claim, and other gateways take the rest. The rows are locked with
        `SKIP LOCKED` on PostgreSQL, so gateways claiming at once pass over
        each other's; the update checks again that each is still due, which
        is what makes the claim atomic on SQLite (and on any store).
        """
        now = utcnow()
        due = (OutboxMessage.status.in_(("queued", "sending")),
               OutboxMessage.next_attempt <= now)
        async with self.db.write() as session:
            ids = list(await session.scalars(
                select(OutboxMessage.id).where(*due)
                .order_by(OutboxMessage.next_attempt).limit(limit)
                .with_for_update(skip_locked=True)))
            if not ids:
                return []
            claimed = list(await session.scalars(
                update(OutboxMessage).where(OutboxMessage.id.in_(ids), *due)
                .values(status="sending", attempts=OutboxMessage.attempts + 1,
                        next_attempt=now + CLAIM)
                .returning(OutboxMessage),
                execution_options={"synchronize_session": False}))
            return sorted(claimed, key=lambda item: item.id)

    async def release(self, claimed: Sequence[OutboxMessage]) -> None:
        """Give back claims not carried through (on shutdown): due again at once.

        Only claims still ours: one that ran out and was taken by another
        gateway (its claim has another expiry) is left alone.
        """
        if not claimed:
            return
        async with self.db.write() as session:
            for item in claimed:
                await session.execute(update(OutboxMessage).where(
                    OutboxMessage.id == item.id, OutboxMessage.status == "sending",
                    OutboxMessage.next_attempt == item.next_attempt,
                ).values(status="queued", next_attempt=utcnow(),
                         attempts=OutboxMessage.attempts - 1))

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
