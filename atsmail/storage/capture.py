"""Durable, two-phase, idempotent capture writes, committed in groups.

The relay writes a captured copy before the upstream's final answer
(`prepare`), confirms it after a 2xx and removes it after a refusal. Each of
those is a commit that must be on disk before the relay answers, so
concurrent sessions share commits: one writer task drains every operation
waiting at that moment into a single transaction (one fsync for all). If a
group fails, its operations are retried one by one, so a single bad message
fails alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import bindparam, delete, exists, insert, select, update
from sqlalchemy.engine import Connection

from atsmail.rules import Decision, MessageFacts
from atsmail.storage.db import Database
from atsmail.storage.models import CapturedMessage, MessageCandidate, Thread, utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[Connection], Any]

MAX_GROUP = 128


@dataclass(frozen=True)
class Capture:
    """One message the rules decided to capture, and where it was seen."""

    facts: MessageFacts
    decision: Decision
    raw: bytes
    source: str


@dataclass(frozen=True)
class Prepared:
    pk: int
    # False when the message was already stored (a retry, or seen elsewhere):
    # such a copy is never removed by this attempt's failure.
    created: bool


class CaptureWriter:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: asyncio.Queue[tuple[Operation, asyncio.Future[Any]] | None] = (
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
        return await self._submit(lambda conn: prepare(conn, capture))

    async def confirm(self, prepared: Prepared) -> None:
        await self._submit(lambda conn: confirm(conn, prepared.pk))

    async def discard(self, prepared: Prepared) -> None:
        if prepared.created:
            await self._submit(lambda conn: discard(conn, prepared.pk))

    async def _submit(self, operation: Callable[[Connection], T]) -> T:
        if self._task is None:
            raise RuntimeError("the capture writer is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put((operation, future))
        return await future

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            item = await self._queue.get()
            group: list[tuple[Operation, asyncio.Future[Any]]] = []
            while True:
                if item is None:
                    stopping = True
                else:
                    group.append(item)
                if len(group) >= MAX_GROUP or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if group:
                await self._commit(group)

    async def _commit(self, group: list[tuple[Operation, asyncio.Future[Any]]]) -> None:
        operations = [op for op, _ in group]
        try:
            results = await self.db.run(lambda conn: [op(conn) for op in operations], write=True)
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


# Built once: SQLAlchemy then reuses their compiled form on every capture.
_FIND = select(CapturedMessage.id).where(CapturedMessage.capture_key == bindparam("key"))
_THREAD_EXISTS = select(exists().where(Thread.id == bindparam("tid")))
_TOUCH = (update(Thread)
          .where(Thread.id == bindparam("tid"), Thread.last_date < bindparam("when"))
          .values(last_date=bindparam("when")))
_NEW_THREAD = insert(Thread).returning(Thread.id)
_NEW_MESSAGE = insert(CapturedMessage).returning(CapturedMessage.id)
_LINK = insert(MessageCandidate)
_CONFIRM = (update(CapturedMessage).where(CapturedMessage.id == bindparam("pk"))
            .values(state="confirmed"))
_THREAD_OF = select(CapturedMessage.thread_id).where(CapturedMessage.id == bindparam("pk"))
_DELETE = delete(CapturedMessage).where(CapturedMessage.id == bindparam("pk"))
_THREAD_USED = select(exists().where(CapturedMessage.thread_id == bindparam("tid")))
_DELETE_THREAD = delete(Thread).where(Thread.id == bindparam("tid"))


def prepare(conn: Connection, capture: Capture) -> Prepared:
    """Store a pending copy, or find the copy a retry (or another source) stored."""
    facts, decision = capture.facts, capture.decision
    existing = conn.scalar(_FIND, {"key": facts.capture_key})
    if existing is not None:
        return Prepared(existing, created=False)
    when = facts.date or utcnow()
    thread_id = decision.thread_id
    if thread_id is not None and conn.scalar(_THREAD_EXISTS, {"tid": thread_id}):
        conn.execute(_TOUCH, {"tid": thread_id, "when": when})
    else:
        thread_id = conn.execute(
            _NEW_THREAD, {"subject": facts.subject, "last_date": when}).scalar_one()
    pk: int = conn.execute(_NEW_MESSAGE, {
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
        "raw": capture.raw,
        "trace": [t.to_json() for t in decision.trace],
    }).scalar_one()
    conn.execute(_LINK, [{"message_pk": pk, "candidate_id": c} for c in decision.candidates])
    return Prepared(pk, created=True)


def confirm(conn: Connection, pk: int) -> None:
    conn.execute(_CONFIRM, {"pk": pk})


def discard(conn: Connection, pk: int) -> None:
    thread_id = conn.scalar(_THREAD_OF, {"pk": pk})
    conn.execute(_DELETE, {"pk": pk})
    if thread_id is not None and not conn.scalar(_THREAD_USED, {"tid": thread_id}):
        conn.execute(_DELETE_THREAD, {"tid": thread_id})
