"""Retention on SQLite and PostgreSQL: what a purge removes, keeps and records."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from atsmail.gateway.sender import queue_message
from atsmail.storage import Store, UserError
from atsmail.storage import store as store_module
from atsmail.storage.access import Access
from atsmail.storage.mailboxes import Mailboxes
from atsmail.storage.models import (
    CapturedMessage,
    MessageCandidate,
    MessageSource,
    OutboxMessage,
    utcnow,
)
from atsmail.storage.outbox import Outbox
from atsmail.storage.retention import apply_retention
from tests.conftest import make_mail
from tests.storage.test_store import RECRUITER, capture

ADA = "ada@applicant.test"


async def captured_days_ago(store: Store, days: int, subject: str) -> None:
    """Back-date the capture of the messages with `subject`."""
    async with store.db.write() as session:
        await session.execute(update(CapturedMessage).where(CapturedMessage.subject == subject)
                              .values(created_at=utcnow() - timedelta(days=days)))


async def queued(store: Store, subject: str, status: str, days_ago: int) -> None:
    item = await queue_message(store.db, RECRUITER, [ADA], subject, "Body.\n",
                               candidate_id="C-1")
    async with store.db.write() as session:
        await session.execute(update(OutboxMessage).where(OutboxMessage.id == item.id).values(
            status=status, created_at=utcnow() - timedelta(days=days_ago)))


async def count(store: Store, column: Any) -> int:
    async with store.db.read() as session:
        return int(await session.scalar(select(func.count(column))) or 0)


async def test_a_purge_removes_old_mail_and_keeps_new_and_pending(team: Store) -> None:
    await capture(team, make_mail(RECRUITER, ADA, "Old"))
    await captured_days_ago(team, 40, "Old")
    await capture(team, make_mail(RECRUITER, ADA, "Mixed", message_id="<mixed@example.com>"))
    await captured_days_ago(team, 40, "Mixed")
    await capture(team, make_mail(ADA, RECRUITER, "Re: Mixed",
                                  In_Reply_To="<mixed@example.com>"))
    await capture(team, make_mail(RECRUITER, ADA, "New"))
    # The Date header is not the clock: a forged old one is kept, and a
    # future one does not keep its message once it is old enough.
    await capture(team, make_mail(RECRUITER, ADA, "Forged old"))
    await capture(team, make_mail(RECRUITER, ADA, "Far future"))
    async with team.db.write() as session:
        await session.execute(update(CapturedMessage).where(
            CapturedMessage.subject == "Forged old").values(date=utcnow() - timedelta(days=9000)))
        await session.execute(update(CapturedMessage).where(
            CapturedMessage.subject == "Far future").values(date=utcnow() + timedelta(days=9000)))
    await captured_days_ago(team, 40, "Far future")
    await capture(team, make_mail(RECRUITER, ADA, "In flight"), confirm=False)
    await captured_days_ago(team, 40, "In flight")
    await Mailboxes(team.db).set_hosted_identity(RECRUITER, "rita@hosted.example")
    await queued(team, "Sent long ago", "sent", 40)
    await queued(team, "Failed long ago", "failed", 40)
    await queued(team, "Still queued", "queued", 40)
    await queued(team, "Sent lately", "sent", 5)

    now = utcnow()
    result = await team.purge(30, now=now)

    assert (result.messages, result.threads, result.outbox, result.scrubbed) == (3, 2, 2, True)
    assert result.cutoff == now - timedelta(days=30)
    # A thread that keeps newer mail now takes its subject from that mail.
    assert sorted((t.subject, t.message_count) for t in await team.threads()) == [
        ("Forged old", 1), ("New", 1), ("Re: Mixed", 1)]
    async with team.db.read() as session:
        left = set(await session.scalars(select(CapturedMessage.subject)))
    assert left == {"Re: Mixed", "New", "Forged old", "In flight"}
    # Links and sources went with their messages.
    assert await count(team, MessageCandidate.message_pk) == 4
    assert await count(team, MessageSource.message_pk) == 4
    assert sorted((i.status, i.created_at > result.cutoff) for i in await Outbox(team.db).all()
                  ) == [("queued", False), ("sent", True)]
    again = await team.purge(30, now=now)
    assert (again.messages, again.threads, again.outbox) == (0, 0, 0)


async def test_a_large_purge_goes_in_batches(team: Store,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "PURGE_BATCH", 3)
    monkeypatch.setattr(store_module, "PURGE_PAUSE", 0)
    for i in range(7):
        await capture(team, make_mail(RECRUITER, ADA, f"Batch {i}"))
        await captured_days_ago(team, 10, f"Batch {i}")
    result = await team.purge(9)
    assert (result.messages, result.threads) == (7, 7)
    assert await team.threads() == []


async def test_retention_is_at_least_a_day(team: Store) -> None:
    with pytest.raises(UserError, match="at least one day"):
        await team.purge(0)


async def test_every_purge_is_audited(team: Store) -> None:
    await capture(team, make_mail(RECRUITER, ADA, "Old"))
    await captured_days_ago(team, 8, "Old")
    result = await apply_retention(team, 7, "cli")
    await apply_retention(team, 7, "retention")
    entries = await Access(team.db).audit()
    assert [(e.actor, e.action) for e in entries[:2]] == [
        ("retention", "retention.purge"), ("cli", "retention.purge")]
    assert entries[1].detail == {"retention_days": 7, "messages": 1, "threads": 1, "outbox": 0,
                                 "cutoff": result.cutoff.isoformat(), "scrubbed": True}
    assert entries[0].detail["messages"] == 0


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_purged_text_is_gone_from_the_sqlite_files(team: Store, store_url: str) -> None:
    path = Path(store_url.partition(":///")[2])
    marker = "Okapi-Retention-4417"
    await capture(team, make_mail(RECRUITER, ADA, f"About {marker}",
                                  f"The {marker} body.\n" * 50, message_id="<okapi@example.com>"))
    await captured_days_ago(team, 40, f"About {marker}")
    await capture(team, make_mail(ADA, RECRUITER, "Re: the job", "Thanks.\n",
                                  In_Reply_To="<okapi@example.com>"))
    await Mailboxes(team.db).set_hosted_identity(RECRUITER, "rita@hosted.example")
    item = await queue_message(team.db, RECRUITER, [ADA], f"Re {marker}", f"Sent {marker}.\n")
    await Outbox(team.db).sent(item.id)
    async with team.db.write() as session:
        await session.execute(update(OutboxMessage).values(
            created_at=utcnow() - timedelta(days=40)))
    await capture(team, make_mail(RECRUITER, ADA, "Kept", "Nothing to see.\n"))
    await team.db.checkpoint()
    assert marker.encode() in path.read_bytes()

    result = await team.purge(30)
    assert (result.messages, result.threads, result.outbox, result.scrubbed) == (1, 0, 1, True)
    files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    for file in files:
        assert marker.encode() not in file.read_bytes(), file.name
    assert sorted(t.subject for t in await team.threads()) == ["Kept", "Re: the job"]
