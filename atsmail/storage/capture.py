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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from atsmail.rules import Decision, MessageFacts
from atsmail.storage.db import Database
from atsmail.storage.models import CapturedMessage, utcnow
from atsmail.storage.repositories import ThreadRepository

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[ThreadRepository], Awaitable[Any]]

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
        return await self._submit(lambda repo: _prepare(repo, capture))

    async def confirm(self, prepared: Prepared) -> None:
        await self._submit(lambda repo: repo.set_state(prepared.pk, "confirmed"))

    async def discard(self, prepared: Prepared) -> None:
        if prepared.created:
            await self._submit(lambda repo: repo.delete_message(prepared.pk))

    async def _submit(self, operation: Callable[[ThreadRepository], Awaitable[T]]) -> T:
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
        try:
            async with self.db.write() as session:
                repo = ThreadRepository(session)
                results = [await op(repo) for op, _ in group]
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


async def _prepare(repo: ThreadRepository, capture: Capture) -> Prepared:
    facts, decision = capture.facts, capture.decision
    existing = await repo.by_capture_key(facts.capture_key)
    if existing is not None:
        return Prepared(existing.id, created=False)
    when = facts.date or utcnow()
    thread_id = decision.thread_id
    if thread_id is not None and await repo.exists(thread_id):
        await repo.touch(thread_id, when)
    else:
        thread_id = await repo.new_thread(facts.subject, when)
    pk = await repo.add_message(CapturedMessage(
        thread_id=thread_id,
        capture_key=facts.capture_key,
        message_id=facts.message_id,
        state="pending",
        direction=decision.direction,
        source=capture.source,
        from_addr=facts.from_[0] if facts.from_ else (facts.envelope_sender or ""),
        to_addrs=list(facts.to),
        cc_addrs=list(facts.cc),
        subject=facts.subject,
        # Without a Date header, the time it passed through us.
        date=when,
        size=facts.size,
        raw=capture.raw,
        trace=[t.to_json() for t in decision.trace],
    ), decision.candidates)
    return Prepared(pk, created=True)
