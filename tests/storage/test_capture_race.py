"""Two gateways on one PostgreSQL store capturing the same message at the same moment.

Neither sees the other's uncommitted copy, so both insert it and the second
runs into the unique capture key. That attempt is made again, finds the
first one's copy, and adds its source to it: one message, both sources.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.util import await_only

from atsmail.rules import decide, read_message
from atsmail.storage import Capture, CaptureWriter, Store
from atsmail.storage.mailboxes import Mailboxes
from atsmail.storage.models import CapturedMessage, MessageSource, WebhookEvent
from tests.conftest import make_mail

ADA = "ada@applicant.test"
RECRUITER = "recruiter@example.com"

pytestmark = pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)


@pytest.fixture
async def other(store_url: str) -> AsyncIterator[Store]:
    """A second gateway on the same database: its own engine and connections."""
    opened = Store.open(store_url)
    yield opened
    await opened.close()


async def _capture(store: Store, raw: bytes, source: str, mailbox: str = "") -> Capture:
    facts = read_message(raw)
    decision = decide(facts, await store.context_for(facts, capture_forwards=True))
    assert decision.capture, decision.trace
    return Capture(facts, decision, raw, source, mailbox=mailbox)


async def _sources(store: Store) -> dict[str, set[tuple[str, str]]]:
    async with store.db.read() as session:
        rows = await session.execute(
            select(CapturedMessage.message_id, MessageSource.source, MessageSource.mailbox)
            .join(MessageSource, MessageSource.message_pk == CapturedMessage.id))
        found: dict[str, set[tuple[str, str]]] = {}
        for message_id, source, mailbox in rows:
            found.setdefault(message_id, set()).add((source, mailbox))
        return found


async def _count(store: Store, what: Any) -> int:
    async with store.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(what)) or 0)


def _inserts_messages(statement: str) -> bool:
    return statement.lstrip().upper().startswith("INSERT INTO MESSAGES")


async def test_the_second_of_two_racing_captures_is_retried_and_adds_its_source(
        team: Store, other: Store) -> None:
    raw = make_mail(ADA, RECRUITER, "Application", message_id="<race-1@applicant.test>")
    relay = CaptureWriter(team.db)
    mirror = CaptureWriter(other.db)
    first_inserted, second_about_to_insert = asyncio.Event(), asyncio.Event()
    conflicts: list[BaseException] = []

    # The first gateway inserts its copy, then waits (uncommitted) until the
    # second has looked for the message, found nothing and goes to insert it.
    @event.listens_for(team.db.writer.sync_engine, "after_cursor_execute")
    def first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if _inserts_messages(statement) and not first_inserted.is_set():
            first_inserted.set()
            await_only(second_about_to_insert.wait())

    @event.listens_for(other.db.writer.sync_engine, "before_cursor_execute")
    def second(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if _inserts_messages(statement):
            second_about_to_insert.set()

    @event.listens_for(other.db.writer.sync_engine, "handle_error")
    def failed(context: Any) -> None:
        conflicts.append(context.original_exception)

    await relay.start()
    await mirror.start()
    try:
        relayed = asyncio.create_task(
            relay.prepare(await _capture(team, raw, "relay")))
        await first_inserted.wait()
        mirrored = await mirror.prepare(await _capture(other, raw, "mirror", "alice@example.com"))
        prepared = await relayed
        await relay.confirm(prepared)
        await mirror.confirm(mirrored)
    finally:
        await relay.stop()
        await mirror.stop()

    assert len(conflicts) == 1 and "unique" in str(conflicts[0]).lower()
    assert prepared.created and not mirrored.created and mirrored.pk == prepared.pk
    assert await _count(team, CapturedMessage) == 1
    assert await _sources(team) == {
        "race-1@applicant.test": {("relay", ""), ("mirror", "alice@example.com")}}
    assert await _count(team, WebhookEvent) == 1  # message.captured, once


async def test_many_messages_captured_by_two_gateways_at_once_are_each_stored_once(
        team: Store, other: Store) -> None:
    mails = [make_mail(ADA, RECRUITER, f"Note {n}") for n in range(40)]
    writers = [CaptureWriter(team.db), CaptureWriter(other.db)]
    for writer in writers:
        await writer.start()
    try:
        async def both(raw: bytes) -> None:
            captures = [await _capture(team, raw, "relay"),
                        await _capture(other, raw, "mirror", "alice@example.com")]
            for prepared in await asyncio.gather(*(
                    w.prepare(c) for w, c in zip(writers, captures, strict=True))):
                await writers[0].confirm(prepared)

        await asyncio.gather(*(both(raw) for raw in mails))
    finally:
        for writer in writers:
            await writer.stop()
    assert await _count(team, CapturedMessage) == len(mails)
    sources = await _sources(team)
    assert len(sources) == len(mails)
    assert all(s == {("relay", ""), ("mirror", "alice@example.com")} for s in sources.values())


async def test_the_mirror_checkpoint_survives_a_racing_capture(
        team: Store, other: Store) -> None:
    """The mirror commits a batch's captures with its checkpoint: retried the same way."""
    raw = make_mail(ADA, RECRUITER, "Sent copy", message_id="<race-2@example.com>")
    first_inserted, second_about_to_insert = asyncio.Event(), asyncio.Event()

    @event.listens_for(team.db.writer.sync_engine, "after_cursor_execute")
    def first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if _inserts_messages(statement) and not first_inserted.is_set():
            first_inserted.set()
            await_only(second_about_to_insert.wait())

    @event.listens_for(other.db.writer.sync_engine, "before_cursor_execute")
    def second(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if _inserts_messages(statement):
            second_about_to_insert.set()

    relay = CaptureWriter(team.db)
    await relay.start()
    try:
        relayed = asyncio.create_task(relay.prepare(await _capture(team, raw, "relay")))
        await first_inserted.wait()
        await Mailboxes(other.db).checkpoint(
            "alice@example.com", "Sent", 1, 7,
            [await _capture(other, raw, "mirror", "alice@example.com")])
        await relay.confirm(await relayed)
    finally:
        await relay.stop()
    assert await _count(team, CapturedMessage) == 1
    assert await _sources(team) == {
        "race-2@example.com": {("relay", ""), ("mirror", "alice@example.com")}}
