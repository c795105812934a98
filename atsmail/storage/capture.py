"""Durable, two-phase, idempotent capture writes, committed in groups.

The relay writes a captured copy before the upstream's final answer
(`prepare`), confirms it after a 2xx and removes it after a refusal. Each of
those is a commit that must be on disk before the relay answers, so
concurrent sessions share commits: one writer task drains every operation
waiting at that moment into a single transaction (one fsync for all). If a
group fails, its operations are retried one by one, so a single bad message
fails alone.

Gateways sharing a PostgreSQL store may capture the same message at the same
moment (the relays of two MX hosts, a relay and a mirror). Neither sees the
other's uncommitted copy, so the later commit runs into the unique capture
key (or a link or source row the other just added) and is made again: then
it finds the first copy and adds its source and candidates to it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import bindparam, delete, exists, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from atsmail.rules import Decision, MessageFacts
from atsmail.storage.db import Database
from atsmail.storage.events import MESSAGE_CAPTURED, event_row, record_events
from atsmail.storage.models import (
    CapturedMessage,
    MessageBody,
    MessageCandidate,
    MessageSource,
    Thread,
    new_thread_key,
    thread_key_of,
    utcnow,
)

log = logging.getLogger(__name__)

MAX_GROUP = 128
# A capture transaction that lost a race to another gateway's is made again
# this many times in all: each new try sees the rows the winner committed.
CONFLICT_ATTEMPTS = 4
# PostgreSQL's deadlock and serialization failures: two gateways' groups
# that touch the same rows in another order.
RETRYABLE_STATES = ("40P01", "40001")

T = TypeVar("T")


def _lost_race(exc: DBAPIError) -> bool:
    return (isinstance(exc, IntegrityError)
            or getattr(exc.orig, "sqlstate", None) in RETRYABLE_STATES)


async def commit_captures(db: Database, work: Callable[[Connection], T],
                          flush: bool = True) -> T:
    """`work` in one write transaction, made again when it lost a race to another
    gateway's transaction over the same message."""
    attempt = 1
    while True:
        try:
            return await db.run(work, write=True, flush=flush)
        except DBAPIError as exc:
            if attempt >= CONFLICT_ATTEMPTS or not _lost_race(exc):
                raise
            attempt += 1
            log.info("a capture met another gateway's copy of the same message (%s); "
                     "trying again", type(exc.orig).__name__)


@dataclass(frozen=True)
class Capture:
    """One message the rules decided to capture, and where it was seen."""

    facts: MessageFacts
    decision: Decision
    raw: bytes
    source: str
    # The mailbox it was found in, for the mirror.
    mailbox: str = ""


@dataclass(frozen=True)
class Prepared:
    pk: int
    # False when the message was already stored (a retry, or seen elsewhere).
    created: bool
    # This attempt holds the pending copy: its discard counts, and the copy
    # goes only when no attempt holds it any more and none confirmed it.
    held: bool = True


@dataclass(frozen=True)
class _Operation:
    kind: Literal["prepare", "confirm", "discard"]
    capture: Capture | None = None
    pk: int = 0


class CaptureWriter:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: asyncio.Queue[tuple[_Operation, asyncio.Future[Any]] | None] = (
            asyncio.Queue())
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="capture-writer")

    async def stop(self) -> None:
        """Finish every queued operation, then stop."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None

    async def prepare(self, capture: Capture) -> Prepared:
        prepared: Prepared = await self._submit(_Operation("prepare", capture=capture))
        return prepared

    async def confirm(self, prepared: Prepared) -> None:
        await self._submit(_Operation("confirm", pk=prepared.pk))

    async def discard(self, prepared: Prepared) -> None:
        if prepared.held:
            await self._submit(_Operation("discard", pk=prepared.pk))

    async def _submit(self, operation: _Operation) -> Any:
        if self._task is None:
            raise RuntimeError("the capture writer is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put((operation, future))
        return await future

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            group, stopping = await self._next_group()
            if group:
                await self._commit(group)
            # Not kept while waiting for the next: it holds whole messages.
            del group

    async def _next_group(self) -> tuple[list[tuple[_Operation, asyncio.Future[Any]]], bool]:
        """The operations waiting now (at least one), and whether to stop after them."""
        item = await self._queue.get()
        group: list[tuple[_Operation, asyncio.Future[Any]]] = []
        while True:
            if item is None:
                return group, True
            group.append(item)
            if len(group) >= MAX_GROUP or self._queue.empty():
                return group, False
            item = self._queue.get_nowait()

    async def _commit(self, group: list[tuple[_Operation, asyncio.Future[Any]]]) -> None:
        operations = [op for op, _ in group]
        try:
            # Pending copies alone need not wait for the disk: the relay
            # answers 250 only after confirming, a flushed commit that takes
            # them to disk too; what a crash undoes before, the client sends again.
            results = await commit_captures(
                self.db, lambda conn: apply(conn, operations),
                flush=any(op.kind != "prepare" for op in operations))
        except Exception as exc:
            if len(group) == 1:
                if not group[0][1].done():
                    group[0][1].set_exception(exc)
                return
            log.warning("a grouped capture commit failed; retrying its %d operations one by one",
                        len(group), exc_info=True)
            for single in group:
                await self._commit([single])
            return
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)


# Built once: SQLAlchemy then reuses their compiled form on every group.
_FIND = (select(CapturedMessage.capture_key, CapturedMessage.id, CapturedMessage.state)
         .where(CapturedMessage.capture_key.in_(bindparam("keys", expanding=True))))
_HOLD = (update(CapturedMessage)
         .where(CapturedMessage.id == bindparam("pk"), CapturedMessage.state == "pending")
         .values(holders=CapturedMessage.holders + 1))
_LINKS_OF = (select(MessageCandidate.message_pk, MessageCandidate.candidate_id)
             .where(MessageCandidate.message_pk.in_(bindparam("pks", expanding=True))))
_LIVE_THREADS = select(Thread.id).where(Thread.id.in_(bindparam("ids", expanding=True)))
_TOUCH = (update(Thread)
          .where(Thread.id == bindparam("tid"), Thread.last_date < bindparam("when"))
          .values(last_date=bindparam("when")))
_KEYED_THREADS = (select(Thread.key, Thread.id)
                  .where(Thread.key.in_(bindparam("keys", expanding=True))))
_NEW_THREADS = insert(Thread).returning(Thread.id, sort_by_parameter_order=True)
_NEW_MESSAGES = insert(CapturedMessage).returning(CapturedMessage.id, sort_by_parameter_order=True)
_LINK = insert(MessageCandidate)
_SOURCES_OF = (select(MessageSource.message_pk, MessageSource.source, MessageSource.mailbox)
               .where(MessageSource.message_pk.in_(bindparam("pks", expanding=True))))
_ADD_SOURCES = insert(MessageSource)
# Only a pending copy turns confirmed: a message seen again (already
# confirmed) changes nothing and reports nothing a second time.
_CONFIRMED = (CapturedMessage.id, CapturedMessage.message_id, CapturedMessage.thread_id,
              CapturedMessage.direction, CapturedMessage.subject, CapturedMessage.date)
_CONFIRM = (update(CapturedMessage)
            .where(CapturedMessage.id.in_(bindparam("pks", expanding=True)),
                   CapturedMessage.state == "pending")
            .values(state="confirmed")
            .returning(*_CONFIRMED))
_KINDS_OF_SOURCES = (select(MessageSource.message_pk, MessageSource.source).distinct()
                     .where(MessageSource.message_pk.in_(bindparam("pks", expanding=True))))
_THREAD_OF = select(CapturedMessage.thread_id).where(CapturedMessage.id == bindparam("pk"))
_RELEASE = (update(CapturedMessage)
            .where(CapturedMessage.id == bindparam("pk"), CapturedMessage.state == "pending")
            .values(holders=CapturedMessage.holders - 1))
_DELETE = delete(CapturedMessage).where(CapturedMessage.id == bindparam("pk"),
                                        CapturedMessage.state == "pending",
                                        CapturedMessage.holders <= 0)
_NEW_BODIES = insert(MessageBody)
# A message written in pieces (_fill_blob) is first a zeroblob of its size.
_NEW_EMPTY_BODY = insert(MessageBody).values(message_pk=bindparam("pk"),
                                            raw=func.zeroblob(bindparam("length")))
_THREAD_USED = select(exists().where(CapturedMessage.thread_id == bindparam("tid")))
_DELETE_THREAD = delete(Thread).where(Thread.id == bindparam("tid"))


def apply(conn: Connection, operations: list[_Operation]) -> list[Prepared | None]:
    """Carry out a group of operations with a handful of statements for all of them.

    Discards go first, so that a retry arriving while an earlier attempt is
    being withdrawn is stored afresh rather than matched to the doomed copy.
    """
    results: list[Prepared | None] = [None] * len(operations)
    for op in operations:
        if op.kind == "discard":
            _discard(conn, op.pk)
    prepares = [(i, op.capture) for i, op in enumerate(operations)
                if op.kind == "prepare" and op.capture is not None]
    if prepares:
        _prepare(conn, prepares, results)
    confirms = [op.pk for op in operations if op.kind == "confirm"]
    if confirms:
        _confirm(conn, confirms)
    return results


def keep(conn: Connection, captures: list[Capture]) -> list[Prepared]:
    """Store and confirm `captures` at once, on `conn`'s transaction.

    For mail already delivered (found in a mailbox), where no upstream answer
    is awaited: a pending copy (the relay's, say) is confirmed too, as the
    mail evidently went through. Used by the mirror to commit a batch's
    captures together with its checkpoint.
    """
    if not captures:
        return []
    results = apply(conn, [_Operation("prepare", capture=c) for c in captures])
    kept = [r for r in results if r is not None]
    _confirm(conn, sorted({r.pk for r in kept}))
    return kept


def _confirm(conn: Connection, pks: list[int]) -> None:
    """Confirm pending copies, and record `message.captured` for each in the same commit."""
    confirmed = conn.execute(_CONFIRM, {"pks": pks}).all()
    if not confirmed:
        return
    ids = [row.id for row in confirmed]
    candidates: dict[int, list[str]] = defaultdict(list)
    for pk, candidate in conn.execute(_LINKS_OF, {"pks": ids}):
        candidates[pk].append(candidate)
    sources: dict[int, list[str]] = defaultdict(list)
    for pk, source in conn.execute(_KINDS_OF_SOURCES, {"pks": ids}):
        sources[pk].append(source)
    record_events(conn, [event_row(MESSAGE_CAPTURED, {
        "message": {"id": row.id, "message_id": row.message_id, "thread_id": row.thread_id,
                    "direction": row.direction, "sources": sorted(sources[row.id]),
                    "subject": row.subject,
                    "date": row.date.isoformat() if row.date else None},
        "candidates": sorted(candidates[row.id]),
    }, message_pk=row.id) for row in sorted(confirmed, key=lambda r: r.id)])


def _prepare(conn: Connection, prepares: list[tuple[int, Capture]],
             results: list[Prepared | None]) -> None:
    """Store pending copies, or find those a retry (or another source) stored."""
    keys = {c.facts.capture_key for _, c in prepares}
    stored: dict[str, int] = {}
    pending: set[int] = set()
    for key, pk, state in conn.execute(_FIND, {"keys": list(keys)}):
        stored[key] = pk
        if state == "pending":
            pending.add(pk)
    first_of: dict[str, int] = {}
    new: list[tuple[int, Capture]] = []
    for i, capture in prepares:
        key = capture.facts.capture_key
        if key not in stored and key not in first_of:
            first_of[key] = i
            new.append((i, capture))
    if new:
        wanted = {c.decision.thread_id for _, c in new if c.decision.thread_id is not None}
        live = set(conn.scalars(_LIVE_THREADS, {"ids": list(wanted)})) if wanted else set()
        when = {i: c.facts.date or utcnow() for i, c in new}
        touches = [{"tid": c.decision.thread_id, "when": when[i]}
                   for i, c in new if c.decision.thread_id in live]
        if touches:
            conn.execute(_TOUCH, touches)
        thread_of = {i: c.decision.thread_id for i, c in new if c.decision.thread_id in live}
        thread_of.update(_keyed_threads(conn, [(i, c) for i, c in new if i not in thread_of]))
        opening: dict[str, list[int]] = {}  # new thread key -> the captures opening it
        for i, c in new:
            if i not in thread_of:
                key = thread_key_of(c.facts.message_id) or new_thread_key()
                opening.setdefault(key, []).append(i)
        if opening:
            captures = dict(new)
            ids = conn.execute(_NEW_THREADS, [
                {"key": key, "subject": captures[firsts[0]].facts.subject,
                 "last_date": max(when[i] for i in firsts)}
                for key, firsts in opening.items()]).scalars()
            for firsts, thread_id in zip(opening.values(), ids, strict=True):
                thread_of.update(dict.fromkeys(firsts, thread_id))
        pks = conn.execute(_NEW_MESSAGES, [
            _message_row(c, thread_of[i], when[i]) for i, c in new]).scalars().all()
        blobs = _writes_blobs(conn)
        whole = []
        for (i, c), pk in zip(new, pks, strict=True):
            stored[c.facts.capture_key] = pk
            results[i] = Prepared(pk, created=True)
            if blobs is not None and len(c.raw) > BLOB_PIECE:
                conn.execute(_NEW_EMPTY_BODY, {"pk": pk, "length": len(c.raw)})
                _fill_blob(blobs, pk, c.raw)
            else:
                whole.append({"message_pk": pk, "raw": c.raw})
        if whole:
            conn.execute(_NEW_BODIES, whole)
    for i, capture in prepares:
        if results[i] is None:
            pk = stored[capture.facts.capture_key]
            # Another attempt's copy: held too while it is pending, so that
            # the other attempt's failure cannot take it from this one.
            if pk in pending:
                conn.execute(_HOLD, {"pk": pk})
            results[i] = Prepared(pk, created=False, held=pk in pending)
    # A copy seen again may concern more candidates (an MTA splits one
    # message's recipients over transactions): link the ones it lacks.
    # (Rows stored just now have none yet: no need to look.)
    created = {r.pk for r in results if r is not None and r.created}
    wanted_links = {(stored[c.facts.capture_key], candidate)
                    for _, c in prepares for candidate in c.decision.candidates}
    older = list({pk for pk, _ in wanted_links} - created)
    have_links = {(pk, candidate) for pk, candidate in conn.execute(
        _LINKS_OF, {"pks": older})} if older else set()
    if wanted_links - have_links:
        conn.execute(_LINK, [{"message_pk": pk, "candidate_id": candidate}
                             for pk, candidate in sorted(wanted_links - have_links)])
    # The same message seen again (a retry, a Sent copy the relay also saw)
    # is stored once and gains the new source.
    seen = {(stored[c.facts.capture_key], c.source, c.mailbox) for _, c in prepares}
    older = list({pk for pk, _, _ in seen} - created)
    known = {(pk, source, mailbox) for pk, source, mailbox in conn.execute(
        _SOURCES_OF, {"pks": older})} if older else set()
    if seen - known:
        conn.execute(_ADD_SOURCES, [{"message_pk": pk, "source": source, "mailbox": mailbox}
                                    for pk, source, mailbox in sorted(seen - known)])


def _keyed_threads(conn: Connection, captures: list[tuple[int, Capture]]) -> dict[int, int]:
    """The threads that mail sent from the ATS continues, by the key in its Message-ID.

    Used only where the rules linked a message to no thread of their own.
    """
    keys = {i: key for i, c in captures if (key := thread_key_of(c.facts.message_id))}
    if not keys:
        return {}
    found: dict[str, int] = {
        key: thread_id
        for key, thread_id in conn.execute(_KEYED_THREADS, {"keys": list(set(keys.values()))})
        if key is not None}
    return {i: found[key] for i, key in keys.items() if key in found}


# Messages larger than this are written to SQLite a piece at a time.
BLOB_PIECE = 1024 * 1024


def _writes_blobs(conn: Connection) -> sqlite3.Connection | None:
    """The SQLite connection under `conn`, which can write a message in pieces.

    Bound as a parameter, a message is copied twice inside SQLite (the bound
    value, then the row made of it): 60 MB for a 30 MB message. Written into
    a zeroblob of its size through an incremental blob handle, it costs SQLite
    a page cache's worth.
    """
    driver = conn.connection.driver_connection
    return driver if isinstance(driver, sqlite3.Connection) else None


def _fill_blob(driver: sqlite3.Connection, pk: int, raw: bytes) -> None:
    """Write `raw` into the zeroblob of its size that message `pk`'s body holds."""
    view = memoryview(raw)
    with driver.blobopen(MessageBody.__tablename__, "raw", pk) as blob:
        for start in range(0, len(raw), BLOB_PIECE):
            blob.write(view[start:start + BLOB_PIECE])


def _message_row(capture: Capture, thread_id: int, when: datetime) -> dict[str, Any]:
    facts, decision = capture.facts, capture.decision
    return {
        "thread_id": thread_id,
        "capture_key": facts.capture_key,
        "message_id": facts.message_id,
        "state": "pending",
        "direction": decision.direction,
        "source": capture.source,
        "from_addr": facts.from_[0] if facts.from_ else (facts.envelope_sender or ""),
        "to_addrs": list(facts.to),
        "cc_addrs": list(facts.cc),
        "subject": facts.subject,
        # Without a Date header, the time it passed through us.
        "date": when,
        "size": facts.size,
        "trace": [t.to_json() for t in decision.trace],
    }


def _discard(conn: Connection, pk: int) -> None:
    thread_id = conn.scalar(_THREAD_OF, {"pk": pk})
    conn.execute(_RELEASE, {"pk": pk})
    conn.execute(_DELETE, {"pk": pk})
    if thread_id is not None and not conn.scalar(_THREAD_USED, {"tid": thread_id}):
        conn.execute(_DELETE_THREAD, {"tid": thread_id})
