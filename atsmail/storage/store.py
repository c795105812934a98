"""The service layer over the store: each public method is one transaction.

Admin changes keep the central promise that no internal address is ever on
a candidate: adding a team member or an internal domain removes matching
addresses from candidate profiles in the same transaction, leaving a notice
that says which address went and why, and an event that tells the ATS.
"""

from __future__ import annotations

import asyncio
import hashlib
import unicodedata
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncSession

from atsmail.rules import Context, MessageFacts
from atsmail.rules.addresses import AddressError, in_domains, normalize_address, normalize_domain
from atsmail.storage import lookup
from atsmail.storage.db import Database
from atsmail.storage.events import ADDRESS_REMOVED, record_event
from atsmail.storage.lookup import Directory, load_directory
from atsmail.storage.migrate import Schema, migrate, schema
from atsmail.storage.models import (
    ROLES,
    CandidateEmail,
    CapturedMessage,
    InternalDomain,
    Job,
    Mailbox,
    MessageCandidate,
    TeamMember,
    utcnow,
)
from atsmail.storage.repositories import (
    CandidateRepository,
    CandidateView,
    DomainRepository,
    JobRepository,
    OutboxRepository,
    TeamRepository,
    ThreadRepository,
    ThreadSummary,
    like_escape,
)
from atsmail.storage.visibility import LEVELS, Viewer, load_viewer, message_access

MAX_ADDRESS_LENGTH = 320
MAX_ID_LENGTH = 100
# A purge deletes this many messages per transaction, so that the relay's
# captures are never held up for longer than one batch takes.
PURGE_BATCH = 2000
# Between batches: SQLite's lock is not fair, and a writer waiting in its busy
# handler sleeps up to 100 ms, so an immediate next batch would starve it.
PURGE_PAUSE = 0.1


class UserError(Exception):
    """A request the store refuses; the text is meant for the user."""


class BadInput(UserError):
    """A value that is malformed in itself: not an address, a domain or an id."""


class NotFound(UserError):
    """The thing asked for does not exist (or is not the asker's to see)."""


class Refused(UserError):
    """The asker may see that it exists, but not this much of it (role, sharing level)."""


@dataclass(frozen=True)
class AddressRemoval:
    candidate_id: str
    address: str
    notice: str


@dataclass(frozen=True)
class PurgeResult:
    """What one purge removed: everything captured (or composed) before `cutoff`."""

    cutoff: datetime
    messages: int
    threads: int
    outbox: int
    # False: readers kept SQLite's write-ahead log busy, so purged text may
    # linger there until the next checkpoint.
    scrubbed: bool

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "threads": self.threads, "outbox": self.outbox,
                "cutoff": self.cutoff.isoformat(), "scrubbed": self.scrubbed}


@dataclass(frozen=True)
class ThreadDetail:
    id: int
    subject: str
    candidates: list[str]
    messages: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "subject": self.subject, "candidates": self.candidates,
                "messages": self.messages}


def checked_address(address: str) -> str:
    try:
        normalized = normalize_address(address)
    except AddressError as exc:
        raise BadInput(str(exc)) from None
    if len(normalized) > MAX_ADDRESS_LENGTH:
        raise BadInput(f"address longer than {MAX_ADDRESS_LENGTH} characters: {address[:40]}…")
    return normalized


def checked_domain(domain: str) -> str:
    try:
        normalized = normalize_domain(domain.removeprefix("@"))
    except AddressError as exc:
        raise BadInput(str(exc)) from None
    if "@" in normalized or " " in normalized or "." not in normalized:
        raise BadInput(f"not a domain: {domain!r}")
    return normalized


async def _keep_an_admin(session: AsyncSession, member: TeamMember) -> None:
    """Refuse to demote or remove the last admin: nobody could manage the team after."""
    if member.role != "admin":
        return
    if await TeamRepository(session).count_role("admin") == 1:
        raise UserError(f"{member.email} is the last admin: make another member admin first")


def checked_id(kind: str, value: str) -> str:
    value = value.strip()
    if (not value or len(value) > MAX_ID_LENGTH
            or any(c.isspace() or unicodedata.category(c) in ("Cc", "Cs") for c in value)):
        raise BadInput(f"bad {kind} id {value!r}: 1 to {MAX_ID_LENGTH} characters, "
                       "no spaces or control characters")
    return value


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    def open(cls, url: str) -> Store:
        return cls(Database(url))

    async def close(self) -> None:
        await self.db.close()

    async def migrate(self, revision: str = "head") -> None:
        """Bring the schema to `revision`: the newest ("head"), or an older one
        to go back to (an older version's)."""
        path = self.db.sqlite_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        state = await schema(self.db)
        if state.condition == "newer":
            raise UserError(state.summary)
        await migrate(self.db, revision)

    async def schema(self) -> Schema:
        """The store's schema revision, against this version's migrations."""
        path = self.db.sqlite_path
        if path is not None and not path.exists():
            raise UserError(f"there is no store at {path}: run `atsmail init`")
        return await schema(self.db)

    async def ensure_current(self) -> None:
        state = await self.schema()
        if state.condition != "current":
            raise UserError(state.summary)

    # --- team members and internal domains -------------------------------

    async def add_team_member(self, email: str, name: str = "",
                              role: str = "recruiter") -> list[AddressRemoval]:
        email = checked_address(email)
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        async with self.db.write() as session:
            team = TeamRepository(session)
            if await team.get(email) is not None:
                raise UserError(f"{email} is already a team member")
            await team.add(email, name, role)
            reason = f"it belongs to team member {email}" + (f" ({name})" if name else "")
            return await _remove_candidate_addresses(
                CandidateRepository(session), CandidateEmail.email == email,
                lambda address: address == email, reason)

    async def put_team_member(self, email: str, name: str,
                              role: str) -> tuple[bool, list[AddressRemoval]]:
        """Create or update a team member: (whether they are new, addresses removed)."""
        email = checked_address(email)
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        async with self.db.write() as session:
            member = await TeamRepository(session).get(email)
            if member is not None:
                if role != "admin":
                    await _keep_an_admin(session, member)
                member.name, member.role = name, role
                return False, []
        return True, await self.add_team_member(email, name, role)

    async def team_member(self, email: str) -> TeamMember:
        async with self.db.read() as session:
            member = await TeamRepository(session).get(checked_address(email))
        if member is None:
            raise NotFound(f"{email} is not a team member")
        return member

    async def remove_team_member(self, email: str) -> None:
        """Remove a member (and their tokens); their mailbox must be disconnected first."""
        email = checked_address(email)
        async with self.db.write() as session:
            member = await TeamRepository(session).get(email)
            if member is None:
                raise NotFound(f"{email} is not a team member")
            owned = await session.scalar(select(Mailbox.address).where(
                Mailbox.owner == email, Mailbox.state != "disconnected"))
            if owned:
                raise UserError(f"{email} still has the connected mailbox {owned}: "
                                "disconnect it first")
            await _keep_an_admin(session, member)
            await session.delete(member)

    async def team(self) -> list[TeamMember]:
        async with self.db.read() as session:
            return await TeamRepository(session).all()

    async def add_domain(self, domain: str) -> list[AddressRemoval]:
        domain = checked_domain(domain)
        async with self.db.write() as session:
            domains = DomainRepository(session)
            if await domains.get(domain) is not None:
                raise UserError(f"{domain} is already an internal domain")
            await domains.add(domain)
            return await _remove_candidate_addresses(
                CandidateRepository(session),
                CandidateEmail.email.like("%" + like_escape(domain), escape="\\"),
                lambda address: in_domains(address, (domain,)) is not None,
                f"{domain} is an internal domain")

    async def remove_domain(self, domain: str) -> None:
        domain = checked_domain(domain)
        async with self.db.write() as session:
            if not await DomainRepository(session).remove(domain):
                raise UserError(f"{domain} is not an internal domain")

    async def domains(self) -> list[InternalDomain]:
        async with self.db.read() as session:
            return await DomainRepository(session).all()

    # --- jobs ----------------------------------------------------------------

    async def add_job(self, job_id: str, title: str) -> None:
        job_id = checked_id("job", job_id)
        async with self.db.write() as session:
            jobs = JobRepository(session)
            if await jobs.get(job_id) is not None:
                raise UserError(f"job {job_id} already exists")
            await jobs.add(job_id, title)

    async def put_job(self, job_id: str, title: str, archived: bool) -> bool:
        """Create or replace a job; True when it is new."""
        job_id = checked_id("job", job_id)
        async with self.db.write() as session:
            jobs = JobRepository(session)
            job = await jobs.get(job_id)
            if job is None:
                job = await jobs.add(job_id, title)
                job.archived = archived
                return True
            job.title, job.archived = title, archived
            return False

    async def job(self, job_id: str) -> tuple[Job, int]:
        async with self.db.read() as session:
            repo = JobRepository(session)
            job = await repo.get(job_id)
            if job is None:
                raise NotFound(f"unknown job {job_id}")
            return job, (await repo.candidate_counts()).get(job_id, 0)

    async def remove_job(self, job_id: str) -> None:
        async with self.db.write() as session:
            job = await JobRepository(session).get(job_id)
            if job is None:
                raise NotFound(f"unknown job {job_id}")
            await session.delete(job)

    async def set_job_archived(self, job_id: str, archived: bool) -> None:
        async with self.db.write() as session:
            job = await JobRepository(session).get(job_id)
            if job is None:
                raise NotFound(f"unknown job {job_id}")
            job.archived = archived

    async def jobs(self) -> list[tuple[Job, int]]:
        async with self.db.read() as session:
            repo = JobRepository(session)
            counts = await repo.candidate_counts()
            return [(job, counts.get(job.id, 0)) for job in await repo.all()]

    # --- candidates ----------------------------------------------------------

    async def add_candidate(self, candidate_id: str, name: str, emails: Sequence[str],
                            job_ids: Sequence[str] = ()) -> list[str]:
        """Create a candidate; returns a notice for each internal address refused."""
        _, refused = await self.put_candidate(candidate_id, name, emails, job_ids,
                                              replace=False)
        return refused

    async def put_candidate(self, candidate_id: str, name: str, emails: Sequence[str],
                            job_ids: Sequence[str] = (),
                            replace: bool = True) -> tuple[bool, list[str]]:
        """Create or replace a candidate: (whether it is new, a notice per address refused).

        Internal addresses are refused with a notice on the profile, as always.
        """
        candidate_id = checked_id("candidate", candidate_id)
        if not emails:
            raise UserError(f"candidate {candidate_id} needs at least one email address")
        addresses = list(dict.fromkeys(checked_address(e) for e in emails))
        async with self.db.write() as session:
            candidates = CandidateRepository(session)
            existing = await candidates.get(candidate_id)
            if existing is not None and not replace:
                raise UserError(f"candidate {candidate_id} already exists")
            for job_id in dict.fromkeys(job_ids):
                if await JobRepository(session).get(job_id) is None:
                    raise UserError(f"unknown job {job_id} (add it with `atsmail job add`)")
            # The same notion of "internal" as the rules': members, their
            # hosted identities, connected mailboxes and internal domains.
            directory = await session.run_sync(lambda s: load_directory(s.connection()))
            refused: list[str] = []
            kept: list[str] = []
            for address in addresses:
                why = _internal_reason(address, directory)
                if why:
                    refused.append(f"{address} was not added: {why}; internal addresses are "
                                   "never kept on a candidate")
                else:
                    kept.append(address)
            if not kept:
                raise UserError("; ".join(refused))
            if existing is None:
                await candidates.add(candidate_id, name, kept, dict.fromkeys(job_ids))
            else:
                await candidates.replace(existing, name, kept, dict.fromkeys(job_ids))
            for text in refused:
                await candidates.add_notice(candidate_id, text)
            return existing is None, refused

    async def candidate(self, candidate_id: str) -> CandidateView:
        async with self.db.read() as session:
            views = await CandidateRepository(session).views([candidate_id])
        if not views:
            raise NotFound(f"unknown candidate {candidate_id}")
        return views[0]

    async def candidates(self, search: str = "", updated_since: datetime | None = None,
                         limit: int | None = None, offset: int = 0) -> list[CandidateView]:
        if "\x00" in search:
            # Matches nothing (ids, names and addresses are taken without
            # one), and PostgreSQL refuses to compare text holding one.
            return []
        async with self.db.read() as session:
            return await CandidateRepository(session).views(
                search=search, updated_since=updated_since, limit=limit, offset=offset)

    async def delete_candidate(self, candidate_id: str) -> tuple[int, bool]:
        """Erase a candidate and every message only they are tied to.

        On SQLite the write-ahead log is then folded in and emptied, so that
        with `secure_delete` the erased text is gone from the files. Returns
        how many messages were erased, and whether the files are scrubbed
        already (False: readers kept the log busy; the next delete or
        checkpoint finishes it).
        """
        async with self.db.write() as session:
            candidates = CandidateRepository(session)
            if await candidates.get(candidate_id) is None:
                raise NotFound(f"unknown candidate {candidate_id}")
            erased = await ThreadRepository(session).erase_candidate_messages(candidate_id)
            await candidates.delete(candidate_id)
        return erased, await self.db.checkpoint()

    async def purge(self, retention_days: int, now: datetime | None = None) -> PurgeResult:
        """Forget mail kept longer than `retention_days`, then scrub the files.

        Age is counted from capture (`created_at`), not from the Date header:
        the capture time is our own clock, so a forged old Date cannot get a
        message purged the moment it arrives, nor a future one keep it for
        ever, and the copy is held for the same span whatever the sender
        wrote. (Old mail a mirror first finds today is kept `retention_days`
        from today.) Outbox messages count from when they were composed;
        only sent and failed ones go.

        Deletes in batches of `PURGE_BATCH`, each its own transaction, so a
        large backlog never holds the write lock for long.
        """
        if retention_days <= 0:
            raise UserError("retention must be at least one day")
        cutoff = (now or utcnow()) - timedelta(days=retention_days)

        async def outbox_batch(session: AsyncSession) -> tuple[int, int]:
            return await OutboxRepository(session).purge_created_before(cutoff, PURGE_BATCH), 0

        messages, threads = await self._in_batches(
            lambda session: ThreadRepository(session).purge_captured_before(cutoff, PURGE_BATCH))
        outbox, _ = await self._in_batches(outbox_batch)
        return PurgeResult(cutoff, messages, threads, outbox, await self.db.checkpoint())

    async def _in_batches(self, batch: Callable[[AsyncSession], Awaitable[tuple[int, int]]],
                          ) -> tuple[int, int]:
        """Run `batch` (deleting up to `PURGE_BATCH` rows: (rows, anything else
        removed)) in a transaction of its own until a batch comes back short."""
        rows = other = 0
        while True:
            async with self.db.write() as session:
                done, also = await batch(session)
            rows, other = rows + done, other + also
            if done < PURGE_BATCH:
                return rows, other
            await asyncio.sleep(PURGE_PAUSE)

    async def intake_candidate(self, address: str, name: str, inbox: str,
                               forwarded_by: str) -> str:
        """The candidate for a CV forwarded to the ATS inbox, created when new.

        The id is derived from the address, so a retried message finds the
        candidate its first attempt made.
        """
        address = checked_address(address)
        candidate_id = "inbox-" + hashlib.sha256(address.encode()).hexdigest()[:10]
        async with self.db.write() as session:
            candidates = CandidateRepository(session)
            existing = await candidates.emails_matching(CandidateEmail.email == address)
            if existing:
                return existing[0][0]
            if await candidates.get(candidate_id) is None:
                await candidates.add(candidate_id, name or address, [address], [])
                await candidates.add_notice(
                    candidate_id, f"Created from mail that {forwarded_by or 'someone'} "
                    f"forwarded to the ATS inbox {inbox}.")
        return candidate_id

    # --- what the rules need, and what was captured ------------------------

    async def context_for(self, facts: MessageFacts, capture_forwards: bool) -> Context:
        """The rules' context for one message, read fresh from the store."""
        return await self.db.run(
            lambda conn: lookup.context_for(conn, facts, None, capture_forwards), write=False)

    async def viewer(self, email: str) -> Viewer:
        """A team member as a reader of captured mail."""
        async with self.db.read() as session:
            found = await load_viewer(session, checked_address(email))
        if found is None:
            raise UserError(f"{email} is not a team member")
        return found

    async def threads(self, candidate_id: str | None = None,
                      viewer: Viewer | None = None) -> list[ThreadSummary]:
        """Threads, newest first; for a `viewer`, only what they may see of them."""
        async with self.db.read() as session:
            if candidate_id is not None and await CandidateRepository(session).get(
                    candidate_id) is None:
                raise NotFound(f"unknown candidate {candidate_id}")
            repo = ThreadRepository(session)
            summaries = await repo.summaries(candidate_id)
            if viewer is None:
                return summaries
            messages = await repo.messages_in([t.id for t in summaries], candidate_id)
            levels = await message_access(session, viewer, messages)
        seen: dict[int, list[tuple[CapturedMessage, str]]] = defaultdict(list)
        for m in messages:
            if (level := levels[m.id]) is not None:
                seen[m.thread_id].append((m, level))
        return [
            replace(t, subject=t.subject if _best(level for _, level in seen[t.id]) != "metadata"
                    else "", message_count=len(seen[t.id]),
                    last_date=max(m.date or m.created_at for m, _ in seen[t.id]))
            for t in summaries if seen[t.id]
        ]

    async def thread(self, thread_id: int, viewer: Viewer | None = None) -> ThreadDetail:
        """A thread's messages; for a `viewer`, those they may see, as far as they may."""
        async with self.db.read() as session:
            repo = ThreadRepository(session)
            thread = await repo.get(thread_id)
            messages = await repo.messages(thread_id) if thread else []
            levels: dict[int, str | None] = dict.fromkeys((m.id for m in messages), "full")
            if viewer is not None:
                levels = await message_access(session, viewer, messages)
                messages = [m for m in messages if levels[m.id] is not None]
            if thread is None or not messages:
                raise NotFound(f"unknown thread {thread_id}")
            candidates = (await repo.thread_candidates([thread_id])).get(thread_id, [])
            sources = await repo.sources([m.id for m in messages])
        subject = thread.subject if _best(levels[m.id] for m in messages) != "metadata" else ""
        return ThreadDetail(thread.id, subject, candidates, [
            _message_json(m, sources.get(m.id, [m.source]), levels[m.id] or "full")
            for m in messages
        ])


    async def message(self, pk: int, viewer: Viewer | None = None) -> tuple[CapturedMessage, str]:
        """A captured message with its bytes, and how much of it `viewer` may see."""
        async with self.db.read() as session:
            found = await session.get(CapturedMessage, pk)
            if found is None or found.state != "confirmed":
                raise NotFound(f"unknown message {pk}")
            level = "full" if viewer is None else (
                await message_access(session, viewer, [found]))[found.id]
        if level is None:
            raise NotFound(f"unknown message {pk}")
        return found, level

    async def candidate_messages(self, candidate_id: str,
                                 viewer: Viewer | None = None) -> list[CapturedMessage]:
        """A candidate's messages with their bytes, oldest first: those `viewer` sees in full."""
        async with self.db.read() as session:
            if await CandidateRepository(session).get(candidate_id) is None:
                raise NotFound(f"unknown candidate {candidate_id}")
            found = list(await session.scalars(
                select(CapturedMessage)
                .where(CapturedMessage.state == "confirmed", CapturedMessage.id.in_(
                    select(MessageCandidate.message_pk)
                    .where(MessageCandidate.candidate_id == candidate_id)))
                .order_by(CapturedMessage.date, CapturedMessage.id)))
            if viewer is not None:
                levels = await message_access(session, viewer, found)
                found = [m for m in found if levels[m.id] == "full"]
        return found


def _best(levels: Iterable[str | None]) -> str:
    return max((level for level in levels if level), key=LEVELS.index)


def _message_json(m: CapturedMessage, sources: list[str], level: str) -> dict[str, Any]:
    """A message as a reader at `level` sees it: at `metadata`, no subject."""
    shown = level != "metadata"
    return {"id": m.id, "message_id": m.message_id, "direction": m.direction,
            "source": m.source, "sources": sources, "from": m.from_addr, "to": m.to_addrs,
            "cc": m.cc_addrs, "subject": m.subject if shown else "",
            "date": m.date.isoformat() if m.date else None, "size": m.size,
            "access": level, "trace": m.trace if shown else []}


def member_json(member: TeamMember) -> dict[str, Any]:
    return {"email": member.email, "name": member.name, "role": member.role,
            "hosted_address": member.hosted_address,
            "created_at": member.created_at.isoformat(),
            "updated_at": member.updated_at.isoformat()}


def job_json(job: Job, candidates: int) -> dict[str, Any]:
    return {"id": job.id, "title": job.title, "archived": job.archived,
            "candidates": candidates, "updated_at": job.updated_at.isoformat()}


def _internal_reason(address: str, directory: Directory) -> str | None:
    if address in directory.team:
        return "it is a team member's address (or their hosted identity or mailbox)"
    domain = in_domains(address, tuple(directory.domains))
    return f"{domain} is an internal domain" if domain else None


async def _remove_candidate_addresses(
    candidates: CandidateRepository,
    prefilter: ColumnElement[bool],
    matches: Callable[[str], bool],
    reason: str,
) -> list[AddressRemoval]:
    removals = []
    for candidate_id, address in await candidates.emails_matching(prefilter):
        if not matches(address):
            continue
        text = (f"{address} was removed from this profile: {reason}; internal addresses are "
                "never kept on a candidate, so that an employee's private mail is not synced")
        await candidates.remove_email(candidate_id, address)
        await candidates.add_notice(candidate_id, text)
        await record_event(candidates.session, ADDRESS_REMOVED, {
            "candidate": candidate_id, "address": address, "reason": reason, "notice": text},
            candidate_id=candidate_id)
        removals.append(AddressRemoval(candidate_id, address, text))
    return removals
