"""One repository per aggregate; each takes a session and never commits.

Transactions belong to the service layer (`atsmail.storage.store`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from atsmail.storage.lookup import candidate_infos
from atsmail.storage.models import (
    Candidate,
    CandidateEmail,
    CandidateJob,
    CapturedMessage,
    InternalDomain,
    Job,
    MessageCandidate,
    MessageSource,
    Notice,
    OutboxMessage,
    TeamMember,
    Thread,
    utcnow,
)


def like_escape(text: str) -> str:
    """`text` for a LIKE pattern with `escape="\\"`: its wildcards taken literally."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class TeamRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, email: str) -> TeamMember | None:
        return await self.session.get(TeamMember, email)

    async def add(self, email: str, name: str, role: str) -> TeamMember:
        member = TeamMember(email=email, name=name, role=role)
        self.session.add(member)
        await self.session.flush()
        return member

    async def all(self) -> list[TeamMember]:
        return list(await self.session.scalars(select(TeamMember).order_by(TeamMember.email)))

    async def count_role(self, role: str) -> int:
        return await self.session.scalar(
            select(func.count()).select_from(TeamMember).where(TeamMember.role == role)) or 0


class DomainRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, domain: str) -> InternalDomain | None:
        return await self.session.get(InternalDomain, domain)

    async def add(self, domain: str) -> None:
        self.session.add(InternalDomain(domain=domain))
        await self.session.flush()

    async def remove(self, domain: str) -> bool:
        result = await self.session.execute(
            delete(InternalDomain).where(InternalDomain.domain == domain))
        return bool(getattr(result, "rowcount", 0))

    async def all(self) -> list[InternalDomain]:
        return list(await self.session.scalars(
            select(InternalDomain).order_by(InternalDomain.domain)))


class JobRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, job_id: str) -> Job | None:
        return await self.session.get(Job, job_id)

    async def add(self, job_id: str, title: str) -> Job:
        job = Job(id=job_id, title=title, archived=False)
        self.session.add(job)
        await self.session.flush()
        return job

    async def all(self) -> list[Job]:
        return list(await self.session.scalars(select(Job).order_by(Job.id)))

    async def candidate_counts(self) -> dict[str, int]:
        rows = await self.session.execute(
            select(CandidateJob.job_id, func.count()).group_by(CandidateJob.job_id))
        return {job_id: count for job_id, count in rows}


@dataclass(frozen=True)
class CandidateView:
    id: str
    name: str
    emails: list[str]
    jobs: list[tuple[str, bool]]
    notices: list[tuple[str, datetime]]
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "emails": self.emails,
            "jobs": [{"id": j, "archived": a} for j, a in self.jobs],
            "notices": [{"text": t, "at": at.isoformat()} for t, at in self.notices],
            "updated_at": self.updated_at.isoformat(),
        }


class CandidateRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, candidate_id: str) -> Candidate | None:
        return await self.session.get(Candidate, candidate_id)

    async def add(self, candidate_id: str, name: str, emails: Iterable[str],
                  job_ids: Iterable[str]) -> None:
        self.session.add(Candidate(id=candidate_id, name=name))
        await self.session.flush()
        self.session.add_all(CandidateEmail(candidate_id=candidate_id, email=e) for e in emails)
        self.session.add_all(CandidateJob(candidate_id=candidate_id, job_id=j) for j in job_ids)
        await self.session.flush()

    async def replace(self, candidate: Candidate, name: str, emails: Iterable[str],
                      job_ids: Iterable[str]) -> None:
        await self.session.execute(delete(CandidateEmail).where(
            CandidateEmail.candidate_id == candidate.id))
        await self.session.execute(delete(CandidateJob).where(
            CandidateJob.candidate_id == candidate.id))
        candidate.name, candidate.updated_at = name, utcnow()
        self.session.add_all(CandidateEmail(candidate_id=candidate.id, email=e) for e in emails)
        self.session.add_all(CandidateJob(candidate_id=candidate.id, job_id=j) for j in job_ids)
        await self.session.flush()

    async def add_notice(self, candidate_id: str, text: str) -> None:
        self.session.add(Notice(candidate_id=candidate_id, text=text))
        await self.session.flush()

    async def emails_matching(self, predicate: ColumnElement[bool]) -> list[tuple[str, str]]:
        """(candidate id, address) pairs whose address satisfies `predicate`."""
        rows = await self.session.execute(
            select(CandidateEmail.candidate_id, CandidateEmail.email).where(predicate))
        return [(c, e) for c, e in rows]

    async def remove_email(self, candidate_id: str, email: str) -> None:
        await self.session.execute(delete(CandidateEmail).where(
            CandidateEmail.candidate_id == candidate_id, CandidateEmail.email == email))
        await self.session.execute(update(Candidate).where(Candidate.id == candidate_id)
                                   .values(updated_at=utcnow()))

    async def views(self, ids: Collection[str] | None = None, *, search: str = "",
                    updated_since: datetime | None = None, limit: int | None = None,
                    offset: int = 0) -> list[CandidateView]:
        """Candidates by id; `search` matches a part of an id, name or address."""
        query = select(Candidate).order_by(Candidate.id).offset(offset).limit(limit)
        if ids is not None:
            query = query.where(Candidate.id.in_(ids))
        if search:
            pattern = "%" + like_escape(search.lower()) + "%"
            query = query.where(or_(
                func.lower(Candidate.id).like(pattern, escape="\\"),
                func.lower(Candidate.name).like(pattern, escape="\\"),
                Candidate.id.in_(select(CandidateEmail.candidate_id).where(
                    CandidateEmail.email.like(pattern, escape="\\")))))
        if updated_since is not None:
            query = query.where(Candidate.updated_at > updated_since)
        candidates = list(await self.session.scalars(query))
        wanted = [c.id for c in candidates]
        infos = await self.session.run_sync(
            lambda session: candidate_infos(session.connection(), (), wanted))
        notices: dict[str, list[tuple[str, datetime]]] = defaultdict(list)
        for cid, text, at in (await self.session.execute(
                select(Notice.candidate_id, Notice.text, Notice.at)
                .where(Notice.candidate_id.in_(wanted)).order_by(Notice.id))):
            notices[cid].append((text, at))
        return [
            CandidateView(c.id, c.name, sorted(infos[c.id].emails), list(infos[c.id].jobs),
                          notices[c.id], c.created_at, c.updated_at)
            for c in candidates
        ]

    async def delete(self, candidate_id: str) -> None:
        """The candidate, and what the outbox still holds of mail to or for them."""
        emails = set(await self.session.scalars(select(CandidateEmail.email).where(
            CandidateEmail.candidate_id == candidate_id)))
        outbox = await self.session.execute(select(OutboxMessage.id, OutboxMessage.candidate_id,
                                                   OutboxMessage.recipients))
        theirs = [i for i, cid, to in outbox if cid == candidate_id or emails & set(to)]
        if theirs:
            await self.session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(theirs)))
        await self.session.execute(delete(Candidate).where(Candidate.id == candidate_id))


@dataclass(frozen=True)
class ThreadSummary:
    id: int
    subject: str
    candidates: list[str]
    message_count: int
    last_date: datetime

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "subject": self.subject, "candidates": self.candidates,
                "message_count": self.message_count, "last_date": self.last_date.isoformat()}


class ThreadRepository:
    """Threads and the captured messages in them."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def delete_empty_threads(self, among: Collection[int]) -> int:
        """Delete those of these threads that no message is left in; how many."""
        result = await self.session.execute(delete(Thread).where(
            Thread.id.in_(among), ~exists().where(CapturedMessage.thread_id == Thread.id)))
        return int(getattr(result, "rowcount", 0) or 0)

    async def settle_threads(self, among: Collection[int]) -> int:
        """After messages left these threads: delete the ones left empty, and give
        the rest the subject and latest date of what is left; how many went.

        A thread's subject and date were taken from its messages; left as they
        were, they would outlive the mail they came from.
        """
        deleted = await self.delete_empty_threads(among)
        in_thread = CapturedMessage.thread_id == Thread.id
        first_subject = (select(CapturedMessage.subject).where(in_thread)
                         .order_by(CapturedMessage.id).limit(1).scalar_subquery())
        latest = select(func.max(CapturedMessage.date)).where(in_thread).scalar_subquery()
        await self.session.execute(update(Thread).where(Thread.id.in_(among)).values(
            subject=first_subject, last_date=func.coalesce(latest, Thread.last_date)))
        return deleted

    async def erase_candidate_messages(self, candidate_id: str) -> int:
        """Delete the messages that only this candidate is tied to; return how many."""
        mine = select(MessageCandidate.message_pk).where(
            MessageCandidate.candidate_id == candidate_id)
        shared = select(MessageCandidate.message_pk).where(
            MessageCandidate.candidate_id != candidate_id)
        only_mine = (CapturedMessage.id.in_(mine), CapturedMessage.id.not_in(shared))
        threads = list(await self.session.scalars(
            select(CapturedMessage.thread_id).where(*only_mine).distinct()))
        result = await self.session.execute(delete(CapturedMessage).where(*only_mine))
        await self.session.execute(delete(MessageCandidate).where(
            MessageCandidate.candidate_id == candidate_id))
        await self.settle_threads(threads)
        return int(getattr(result, "rowcount", 0) or 0)

    async def purge_captured_before(self, cutoff: datetime, limit: int) -> tuple[int, int]:
        """Delete up to `limit` confirmed messages captured before `cutoff`, and the
        threads they leave empty: (messages, threads).

        Their candidate links and sources go with them (foreign keys cascade).
        Pending copies stay whatever their age: a relay session still holds them.
        """
        rows = list(await self.session.execute(
            select(CapturedMessage.id, CapturedMessage.thread_id)
            .where(CapturedMessage.state == "confirmed", CapturedMessage.created_at < cutoff)
            .order_by(CapturedMessage.id).limit(limit)))
        if not rows:
            return 0, 0
        await self.session.execute(delete(CapturedMessage).where(
            CapturedMessage.id.in_([pk for pk, _ in rows])))
        return len(rows), await self.settle_threads(sorted({tid for _, tid in rows}))

    async def summaries(self, candidate_id: str | None = None) -> list[ThreadSummary]:
        confirmed = CapturedMessage.state == "confirmed"
        query = (
            select(Thread.id, Thread.subject, Thread.last_date,
                   func.count(func.distinct(CapturedMessage.id)))
            .join(CapturedMessage, CapturedMessage.thread_id == Thread.id)
            .where(confirmed)
            .group_by(Thread.id, Thread.subject, Thread.last_date)
            .order_by(Thread.last_date.desc(), Thread.id.desc())
        )
        if candidate_id is not None:
            query = query.where(CapturedMessage.id.in_(
                select(MessageCandidate.message_pk)
                .where(MessageCandidate.candidate_id == candidate_id)))
        rows = list(await self.session.execute(query))
        cands = await self.thread_candidates([r[0] for r in rows])
        return [ThreadSummary(tid, subject, cands.get(tid, []), count, last)
                for tid, subject, last, count in rows]

    async def thread_candidates(self, thread_ids: Collection[int]) -> dict[int, list[str]]:
        if not thread_ids:
            return {}
        rows = (await self.session.execute(
            select(CapturedMessage.thread_id, MessageCandidate.candidate_id).distinct()
            .join(MessageCandidate, MessageCandidate.message_pk == CapturedMessage.id)
            .where(CapturedMessage.thread_id.in_(thread_ids),
                   CapturedMessage.state == "confirmed")
            .order_by(MessageCandidate.candidate_id)))
        found: dict[int, list[str]] = defaultdict(list)
        for thread_id, candidate_id in rows:
            found[thread_id].append(candidate_id)
        return found

    async def get(self, thread_id: int) -> Thread | None:
        return await self.session.get(Thread, thread_id)

    async def messages(self, thread_id: int) -> list[CapturedMessage]:
        return list(await self.session.scalars(
            select(CapturedMessage).options(defer(CapturedMessage.raw))
            .where(CapturedMessage.thread_id == thread_id, CapturedMessage.state == "confirmed")
            .order_by(CapturedMessage.date, CapturedMessage.id)))

    async def messages_in(self, thread_ids: Collection[int],
                          candidate_id: str | None = None) -> list[CapturedMessage]:
        """The confirmed messages of `thread_ids` (only `candidate_id`'s, if given)."""
        if not thread_ids:
            return []
        query = (select(CapturedMessage).options(defer(CapturedMessage.raw))
                 .where(CapturedMessage.thread_id.in_(thread_ids),
                        CapturedMessage.state == "confirmed"))
        if candidate_id is not None:
            query = query.where(CapturedMessage.id.in_(
                select(MessageCandidate.message_pk)
                .where(MessageCandidate.candidate_id == candidate_id)))
        return list(await self.session.scalars(query))

    async def sources(self, message_pks: Collection[int]) -> dict[int, list[str]]:
        """Every kind of place each message was seen in, first seen first."""
        found: dict[int, list[str]] = defaultdict(list)
        rows = await self.session.execute(
            select(MessageSource.message_pk, MessageSource.source)
            .where(MessageSource.message_pk.in_(message_pks)).distinct()
            .order_by(MessageSource.message_pk, MessageSource.source))
        for pk, source in rows:
            found[pk].append(source)
        return found


class OutboxRepository:
    """What the outbox keeps of mail from the ATS."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def purge_created_before(self, cutoff: datetime, limit: int) -> int:
        """Delete up to `limit` sent or failed messages created before `cutoff`; how many.

        Queued and sending ones stay whatever their age: they are not done.
        """
        ids = list(await self.session.scalars(
            select(OutboxMessage.id)
            .where(OutboxMessage.status.in_(("sent", "failed")),
                   OutboxMessage.created_at < cutoff)
            .order_by(OutboxMessage.id).limit(limit)))
        if ids:
            await self.session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))
        return len(ids)
