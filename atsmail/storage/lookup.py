"""What the rules need from the store, read in as few statements as possible.

These are plain synchronous functions over one SQLAlchemy Core connection,
run through `Database.run` in a single hop; they are the read side of the
relay's hot path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import bindparam, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased

from atsmail.rules import CandidateInfo, Context, KnownMessage, MessageFacts
from atsmail.storage.models import (
    Candidate,
    CandidateEmail,
    CandidateJob,
    CapturedMessage,
    InternalDomain,
    Job,
    Mailbox,
    MessageCandidate,
    TeamMember,
    Thread,
    thread_key_of,
)


@dataclass(frozen=True)
class Directory:
    """Who is internal: the team's addresses and the internal domains."""

    team: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    # Hosted identities and the team member each belongs to.
    hosted: Mapping[str, str] = field(default_factory=dict)


# Built once: SQLAlchemy then reuses their compiled form on every message.
# Team members, their hosted identities and the connected mailboxes all
# count as the team: their conversations are the ATS's business.
_TEAM = select(TeamMember.email).union(
    select(TeamMember.hosted_address).where(TeamMember.hosted_address.is_not(None)),
    select(Mailbox.address).where(Mailbox.state != "disconnected"),
)
_DOMAINS = select(InternalDomain.domain)
_HOSTED = (select(TeamMember.hosted_address, TeamMember.email)
           .where(TeamMember.hosted_address.is_not(None)))
_KNOWN = (
    select(CapturedMessage.message_id, CapturedMessage.thread_id, MessageCandidate.candidate_id)
    .join(MessageCandidate, MessageCandidate.message_pk == CapturedMessage.id)
    .where(CapturedMessage.message_id.in_(bindparam("ids", expanding=True)))
)
_KEYED = (
    select(Thread.key, Thread.id, MessageCandidate.candidate_id).distinct()
    .join(CapturedMessage, CapturedMessage.thread_id == Thread.id)
    .join(MessageCandidate, MessageCandidate.message_pk == CapturedMessage.id)
    .where(Thread.key.in_(bindparam("keys", expanding=True)))
)
_EMAILS = aliased(CandidateEmail)
_CANDIDATES = (
    select(Candidate.id, Candidate.name, _EMAILS.email, Job.id, Job.archived)
    .outerjoin(_EMAILS, _EMAILS.candidate_id == Candidate.id)
    .outerjoin(CandidateJob, CandidateJob.candidate_id == Candidate.id)
    .outerjoin(Job, Job.id == CandidateJob.job_id)
    .where(or_(
        Candidate.id.in_(select(CandidateEmail.candidate_id)
                         .where(CandidateEmail.email.in_(bindparam("addresses", expanding=True)))),
        Candidate.id.in_(bindparam("ids", expanding=True)),
    ))
)


# Values per IN list: PostgreSQL takes at most 32,767 parameters a statement.
_CHUNK = 5000


def load_directory(conn: Connection) -> Directory:
    return Directory(team=frozenset(conn.scalars(_TEAM)),
                     domains=frozenset(conn.scalars(_DOMAINS)),
                     hosted={hosted: member for hosted, member in conn.execute(_HOSTED)
                             if hosted})


def known_messages(conn: Connection, message_ids: Collection[str]) -> dict[str, KnownMessage]:
    """Captured messages among `message_ids`, with their thread and candidates."""
    if not message_ids:
        return {}
    threads: dict[str, int] = {}
    candidates: dict[str, set[str]] = defaultdict(set)
    ids = list(message_ids)[:_CHUNK]  # the newest references are looked at first anyway
    for message_id, thread_id, candidate_id in conn.execute(_KNOWN, {"ids": ids}):
        assert message_id is not None
        threads.setdefault(message_id, thread_id)
        candidates[message_id].add(candidate_id)
    # A reply to mail sent from the ATS names its thread in the Message-ID it
    # refers to: that finds the thread even when the message itself is not
    # (or not yet) stored.
    keys = {m: key for m in ids if m not in threads and (key := thread_key_of(m))}
    if keys:
        by_key: dict[str, int] = {}
        of_key: dict[str, set[str]] = defaultdict(set)
        for found, thread_id, candidate_id in conn.execute(
                _KEYED, {"keys": list(set(keys.values()))}):
            assert found is not None
            by_key[found] = thread_id
            of_key[found].add(candidate_id)
        for message_id, wanted in keys.items():
            if wanted in by_key:
                threads[message_id] = by_key[wanted]
                candidates[message_id] = of_key[wanted]
    return {m: KnownMessage(m, threads[m], frozenset(candidates[m])) for m in threads}


def candidate_infos(conn: Connection, addresses: Collection[str],
                    ids: Collection[str] = ()) -> dict[str, CandidateInfo]:
    """The candidates with any of `addresses` or `ids`: names, all emails, jobs."""
    if not addresses and not ids:
        return {}
    names: dict[str, str] = {}
    found_emails: dict[str, set[str]] = defaultdict(set)
    jobs: dict[str, dict[str, bool]] = defaultdict(dict)
    wanted, known = list(addresses), list(ids)
    rows = [row for start in range(0, max(len(wanted), len(known), 1), _CHUNK)
            for row in conn.execute(_CANDIDATES, {"addresses": wanted[start:start + _CHUNK],
                                                  "ids": known[start:start + _CHUNK]})]
    for cid, name, email, job_id, archived in rows:
        names[cid] = name
        if email is not None:  # every address may have been removed as internal
            found_emails[cid].add(email)
        if job_id is not None:
            jobs[cid][job_id] = bool(archived)
    return {
        cid: CandidateInfo(cid, name, frozenset(found_emails[cid]),
                           tuple(sorted(jobs[cid].items())))
        for cid, name in names.items()
    }


def context_for(conn: Connection, facts: MessageFacts, directory: Directory | None,
                capture_forwards: bool, folder_role: str | None = None,
                ats_inbox: str | None = None) -> Context:
    """The rules' context for one message; `directory` None reads it fresh."""
    return context_for_many(conn, [facts], directory, capture_forwards, folder_role, ats_inbox)


def context_for_many(conn: Connection, messages: Sequence[MessageFacts],
                     directory: Directory | None, capture_forwards: bool,
                     folder_role: str | None = None, ats_inbox: str | None = None) -> Context:
    """One context that serves every message of a batch (the rules only look
    at the candidates and captured messages each message points at)."""
    directory = directory or load_directory(conn)
    known = known_messages(conn, {m for facts in messages for m in facts.thread_ids})
    linked = {c for message in known.values() for c in message.candidates}
    addresses = {a for facts in messages
                 for a in (*facts.participants, *facts.forward.original_addresses)}
    return Context(
        internal_domains=directory.domains,
        team=directory.team,
        candidates=candidate_infos(conn, addresses, linked),
        known_messages=known,
        capture_forwards=capture_forwards,
        folder_role=folder_role,
        ats_inbox=ats_inbox or None,
    )
