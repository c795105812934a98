"""Events for the ATS, and the durable queue their webhook deliveries wait in.

An event is a row written in the same transaction as the change it reports
(a capture confirmed, an address removed from a candidate, a mailbox going
into or out of error): it exists exactly when the change does, and no crash
between the two can lose it. Recording is one insert in a transaction the
caller already has, so the relay and the mirror never wait on a receiver.

The webhook worker then fans each event out to one delivery per configured
URL and deletes a delivery once its URL answered 2xx, and the event with its
last delivery. Fanning out at delivery time rather than at recording time
keeps the [[webhook]] list out of the storage layer, and means a URL added
later is sent only what had not been fanned out yet, never the whole past.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from atsmail.backoff import backoff
from atsmail.storage.db import Database
from atsmail.storage.models import WebhookDelivery, WebhookEvent, utcnow

MESSAGE_CAPTURED = "message.captured"
ADDRESS_REMOVED = "candidate.address_removed"
MAILBOX_ERROR = "mailbox.error"
MAILBOX_RECOVERED = "mailbox.recovered"
EVENT_TYPES = (MESSAGE_CAPTURED, ADDRESS_REMOVED, MAILBOX_ERROR, MAILBOX_RECOVERED)

# Retries of a failed delivery: 10 s, doubling, at most an hour apart.
FIRST_RETRY = 10.0
LAST_RETRY = 3600.0
# A delivery still failing after this long is given up (and logged): a
# receiver gone for a week is replaced, not waited for forever.
GIVE_UP_AFTER = timedelta(days=7)

_RECORD = insert(WebhookEvent)


def event_row(kind: str, data: dict[str, Any], message_pk: int | None = None,
              candidate_id: str | None = None) -> dict[str, Any]:
    """The values of a new event, for a Core insert in the caller's transaction.

    The message or candidate it is about, when given, takes the event with
    it when erased: an undelivered event must not outlive what it reports.
    """
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}")
    return {"event_id": str(uuid.uuid4()), "type": kind, "data": data,
            "created_at": utcnow(), "fanned_out": False, "message_pk": message_pk,
            "candidate_id": candidate_id}


def record_events(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Record events (from `event_row`) in a synchronous transaction (the capture writer's)."""
    if rows:
        conn.execute(_RECORD, list(rows))


async def record_event(session: AsyncSession, kind: str, data: dict[str, Any],
                       candidate_id: str | None = None) -> None:
    """Record one event in the session's transaction."""
    await session.execute(_RECORD, [event_row(kind, data, candidate_id=candidate_id)])


@dataclass(frozen=True)
class Due:
    """A delivery claimed for sending: the event as its receiver will see it."""

    event_pk: int
    url: str
    attempts: int
    event_id: str
    type: str
    created_at: datetime
    data: dict[str, Any]

    def payload(self) -> dict[str, Any]:
        return {"id": self.event_id, "type": self.type,
                "created_at": self.created_at.isoformat(), "data": self.data}


def _lock_key(url: str) -> int:
    """The PostgreSQL advisory lock that claims to `url` take in turn."""
    digest = hashlib.blake2b(f"webhook {url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def retry_delay(attempts: int) -> float:
    return backoff(attempts, FIRST_RETRY, LAST_RETRY)


class WebhookQueue:
    """The deliveries still owed to the configured URLs; each method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def fan_out(self, urls: Sequence[str], limit: int = 500) -> int:
        """Queue a delivery per URL for events not yet fanned out; how many events.

        With no URL configured an event is owed to nobody and goes at once.
        """
        async with self.db.write() as session:
            pks = list(await session.scalars(
                select(WebhookEvent.id).where(WebhookEvent.fanned_out.is_(False))
                .order_by(WebhookEvent.id).limit(limit).with_for_update(skip_locked=True)))
            if not pks:
                return 0
            # No objects are loaded here: nothing for the ORM to match the
            # rows changed against (it would evaluate the WHERE in Python).
            unsynchronised = {"synchronize_session": False}
            if not urls:
                await session.execute(delete(WebhookEvent).where(WebhookEvent.id.in_(pks)),
                                      execution_options=unsynchronised)
                return len(pks)
            now = utcnow()
            await session.execute(insert(WebhookDelivery), [
                {"event_pk": pk, "url": url, "attempts": 0, "next_attempt": now}
                for pk in pks for url in urls])
            await session.execute(update(WebhookEvent).where(WebhookEvent.id.in_(pks))
                                  .values(fanned_out=True), execution_options=unsynchronised)
            return len(pks)

    async def claim(self, url: str, lease: float, limit: int = 20) -> list[Due]:
        """The next deliveries to `url`, oldest first, held for `lease` seconds.

        Order is kept per URL: nothing is claimed past a delivery that waits
        for its retry or that another gateway holds, so a receiver that is
        down is asked once per back-off interval rather than once per event,
        and gets the events in order when it is back.
        """
        now = utcnow()
        blocked = (select(func.min(WebhookDelivery.event_pk))
                   .where(WebhookDelivery.url == url,
                          or_(WebhookDelivery.next_attempt > now,
                              WebhookDelivery.leased_until > now))
                   .scalar_subquery())
        # Nor past an event not yet fanned out: another gateway's fan-out of
        # older events may not have committed when a later one's has.
        unqueued = (select(func.min(WebhookEvent.id)).where(WebhookEvent.fanned_out.is_(False))
                    .scalar_subquery())
        async with self.db.write() as session:
            if not self.db.is_sqlite:
                # Claims to one URL take turns (SQLite's writers always do):
                # a claim that began while another gateway's was not yet
                # committed would not see its leases, and would take and send
                # the deliveries after them first.
                await session.execute(select(func.pg_advisory_xact_lock(_lock_key(url))))
            rows = list(await session.execute(
                select(WebhookDelivery, WebhookEvent)
                .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_pk)
                .where(WebhookDelivery.url == url,
                       or_(blocked.is_(None), WebhookDelivery.event_pk < blocked),
                       or_(unqueued.is_(None), WebhookDelivery.event_pk < unqueued),
                       # Also on the row itself: PostgreSQL checks these again
                       # on a row another gateway claimed and committed since
                       # this statement began (`blocked` is not checked again).
                       WebhookDelivery.next_attempt <= now,
                       or_(WebhookDelivery.leased_until.is_(None),
                           WebhookDelivery.leased_until <= now))
                .order_by(WebhookDelivery.event_pk).limit(limit)
                .with_for_update(of=WebhookDelivery, skip_locked=True)))
            claimed = []
            for delivery, event in rows:
                delivery.leased_until = now + timedelta(seconds=lease)
                delivery.attempts += 1
                claimed.append(Due(event.id, url, delivery.attempts, event.event_id, event.type,
                                   event.created_at, event.data))
            return claimed

    async def delivered(self, due: Due) -> None:
        """Forget a delivered event for its URL, and the event once no URL is owed it."""
        async with self.db.write() as session:
            # The event's row locked first: the deliverers of two URLs that
            # finish together must not each leave the event to the other.
            await session.execute(select(WebhookEvent.id).where(
                WebhookEvent.id == due.event_pk).with_for_update())
            await session.execute(delete(WebhookDelivery).where(
                WebhookDelivery.event_pk == due.event_pk, WebhookDelivery.url == due.url))
            await session.execute(delete(WebhookEvent).where(
                WebhookEvent.id == due.event_pk,
                ~exists().where(WebhookDelivery.event_pk == due.event_pk)))

    async def retry(self, due: Due, error: str) -> float:
        """Try `due` again after its back-off; the seconds until then."""
        delay = retry_delay(due.attempts)
        async with self.db.write() as session:
            await session.execute(update(WebhookDelivery).where(
                WebhookDelivery.event_pk == due.event_pk, WebhookDelivery.url == due.url,
            ).values(leased_until=None, last_error=error[:1000],
                     next_attempt=utcnow() + timedelta(seconds=delay)))
        return delay

    async def release(self, held: Sequence[Due]) -> None:
        """Give back deliveries not attempted (on shutdown): claimable again at once."""
        if not held:
            return
        async with self.db.write() as session:
            for due in held:
                await session.execute(update(WebhookDelivery).where(
                    WebhookDelivery.event_pk == due.event_pk, WebhookDelivery.url == due.url,
                ).values(leased_until=None, attempts=WebhookDelivery.attempts - 1))

    async def prune(self, urls: Sequence[str]) -> tuple[int, int]:
        """Drop deliveries to URLs no longer configured, and those failing since
        `GIVE_UP_AFTER`; then events owed to nobody. (removed, given up)."""
        cutoff = utcnow() - GIVE_UP_AFTER
        async with self.db.write() as session:
            removed = await session.execute(delete(WebhookDelivery).where(
                WebhookDelivery.url.not_in(urls)))
            expired = await session.execute(delete(WebhookDelivery).where(
                WebhookDelivery.event_pk.in_(
                    select(WebhookEvent.id).where(WebhookEvent.created_at < cutoff))))
            await session.execute(delete(WebhookEvent).where(
                WebhookEvent.fanned_out.is_(True),
                ~exists().where(WebhookDelivery.event_pk == WebhookEvent.id)))
            return (int(getattr(removed, "rowcount", 0) or 0),
                    int(getattr(expired, "rowcount", 0) or 0))

    async def pending(self) -> list[tuple[str, str, int, str | None]]:
        """(URL, event type, attempts, last error) of every delivery still owed."""
        async with self.db.read() as session:
            rows = await session.execute(
                select(WebhookDelivery.url, WebhookEvent.type, WebhookDelivery.attempts,
                       WebhookDelivery.last_error)
                .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_pk)
                .order_by(WebhookDelivery.url, WebhookDelivery.event_pk))
            return [(u, t, a, e) for u, t, a, e in rows]
