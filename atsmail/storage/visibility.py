"""Who may see which captured mail, and how much of it.

Captured mail is the team's, with two limits: a shared mailbox's mail is
seen only by the people it lists, and a personal mailbox's owner decides how
much of its mail the rest of the team sees (`full`, `subject`: no bodies, or
`metadata`: participants and dates). A message belongs to every mailbox it
was read from or whose address takes part in it. People always see their own
conversations in full, and compliance sees everything (reviewing, exporting
and erasing is their job). Every reading path (CLI, API, review pages,
export) asks `access` the same question.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from atsmail.storage.models import CapturedMessage, Mailbox, MessageSource, TeamMember

# From least to most.
LEVELS = ("metadata", "subject", "full")


@dataclass(frozen=True)
class Viewer:
    email: str
    role: str
    # Every address that is the viewer's own: theirs, their hosted identity,
    # the mailboxes they own.
    addresses: frozenset[str]


@dataclass(frozen=True)
class MailboxRule:
    address: str
    owner: str | None
    shared: bool
    visible_to: frozenset[str]
    sharing: str


async def load_viewer(session: AsyncSession, email: str) -> Viewer | None:
    member = await session.get(TeamMember, email)
    if member is None:
        return None
    owned = set(await session.scalars(select(Mailbox.address).where(Mailbox.owner == email)))
    own = {email, *owned, *([member.hosted_address] if member.hosted_address else [])}
    return Viewer(email, member.role, frozenset(own))


async def load_rules(session: AsyncSession) -> dict[str, MailboxRule]:
    """Every mailbox ever connected: a disconnected one's mail keeps its limits."""
    return {box.address: MailboxRule(box.address, box.owner, box.shared,
                                     frozenset(box.visible_to), box.sharing)
            for box in await session.scalars(select(Mailbox))}


def access(viewer: Viewer, participants: Iterable[str], read_from: Iterable[str],
           mailboxes: Mapping[str, MailboxRule]) -> str | None:
    """How much of a message `viewer` sees: a level, or None for nothing."""
    people = set(participants)
    if viewer.role == "compliance" or people & viewer.addresses:
        return "full"
    related = [mailboxes[a] for a in {*read_from, *people} if a in mailboxes]
    if any(viewer.email == (box.owner if not box.shared else None)
           or (box.shared and viewer.email in box.visible_to) for box in related):
        return "full"
    if any(box.shared for box in related):
        return None
    if not related:
        return "full"
    return max((box.sharing for box in related), key=LEVELS.index)


async def message_access(session: AsyncSession, viewer: Viewer,
                         messages: Collection[CapturedMessage]) -> dict[int, str | None]:
    """`access` for each of `messages` (by primary key), with two queries for all."""
    if not messages:
        return {}
    read_from: dict[int, set[str]] = defaultdict(set)
    rows = await session.execute(
        select(MessageSource.message_pk, MessageSource.mailbox)
        .where(MessageSource.message_pk.in_([m.id for m in messages]),
               MessageSource.mailbox != ""))
    for pk, mailbox in rows:
        read_from[pk].add(mailbox)
    rules = await load_rules(session)
    return {m.id: access(viewer, [m.from_addr, *m.to_addrs, *m.cc_addrs], read_from[m.id],
                         rules)
            for m in messages}
