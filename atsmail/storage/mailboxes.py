"""Connected mailboxes: accounts, folder roles, the mirror's checkpoints and leases.

The service methods here each run in one transaction, like `Store`'s; the
mirror reads and advances checkpoints through them.

Gateways sharing a store split the mailboxes between their mirrors with
leases: a mailbox is mirrored by the gateway whose lease on it has not run
out. Each mirror renews its leases every few seconds and takes free or
expired ones up to its fair share (the connected mailboxes divided by the
mirrors alive), handing over what it holds beyond that share, so a gateway
that joins gets work and the mailboxes of one that dies move to the others
once its leases run out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from atsmail.storage.capture import Capture, commit_captures, keep
from atsmail.storage.db import Database
from atsmail.storage.events import MAILBOX_ERROR, MAILBOX_RECOVERED, record_event
from atsmail.storage.models import (
    FOLDER_ROLES,
    SHARING_LEVELS,
    Mailbox,
    MailboxFolder,
    RunningMirror,
    TeamMember,
    utcnow,
)
from atsmail.storage.store import UserError, checked_address

PROVIDERS = ("imap", "gmail", "outlook")
SECURITY = ("ssl", "starttls", "none")
# How a mailbox logs in: with a password, or with OAuth2 (SASL XOAUTH2) from a
# refresh token; only the providers whose token endpoints the gateway knows
# can do the latter.
AUTHS = ("password", "oauth2")
OAUTH2_PROVIDERS = ("gmail", "outlook")
# Where providers keep sent mail when the server does not flag it \Sent.
SENT_FOLDERS = {
    "gmail": ("[Gmail]/Sent Mail", "[Google Mail]/Sent Mail", "[Gmail]/Gesendet"),
    "outlook": ("Sent Items", "Gesendete Elemente", "Éléments envoyés"),
    "imap": ("Sent", "Sent Messages", "Sent Items"),
}
# Built once: SQLAlchemy then reuses its compiled form on every batch.
_CHECKPOINT = (update(MailboxFolder)
               .where(MailboxFolder.mailbox == bindparam("address"),
                      MailboxFolder.name == bindparam("folder"))
               .values(uidvalidity=bindparam("to_uidvalidity"), last_uid=bindparam("to_uid")))


@dataclass(frozen=True)
class Account:
    """What the CLI gives to connect a mailbox."""

    address: str
    provider: str
    owner: str | None
    shared: bool
    visible_to: Sequence[str]
    imap_host: str
    imap_port: int
    smtp_host: str
    smtp_port: int
    security: str
    username: str
    sealed_secret: bytes
    signature: str = ""
    # The SMTP server's TLS; empty: the same as the IMAP server's.
    smtp_security: str = ""
    # What the sealed secret is: a password, or an OAuth2 refresh token.
    auth: str = "password"


@dataclass(frozen=True)
class FolderState:
    name: str
    special_use: str
    role: str
    uidvalidity: int | None
    last_uid: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "special_use": self.special_use or None,
                "uidvalidity": self.uidvalidity, "last_uid": self.last_uid}


@dataclass(frozen=True)
class Leases:
    """The mailboxes a mirror holds after renewing its leases."""

    held: list[str]
    # Of those, the ones beyond its fair share: to stop mirroring and release.
    surplus: list[str]


def mirrored_by(box: Mailbox) -> str | None:
    """The gateway whose lease on the mailbox is live, if any."""
    if box.lease_holder is None or box.lease_until is None or box.lease_until <= utcnow():
        return None
    return box.lease_holder


def mailbox_json(box: Mailbox) -> dict[str, Any]:
    return {
        "address": box.address, "provider": box.provider, "owner": box.owner,
        "shared": box.shared, "visible_to": list(box.visible_to), "state": box.state,
        "last_sync": box.last_sync.isoformat() if box.last_sync else None,
        "last_error": box.last_error, "sharing": None if box.shared else box.sharing,
        "imap": f"{box.imap_host}:{box.imap_port}",
        "security": box.security,
        "smtp": f"{box.smtp_host}:{box.smtp_port}" if box.smtp_host else None,
        "smtp_security": box.smtp_security, "auth": box.auth,
        "mirrored_by": mirrored_by(box),
    }


def default_role(name: str, special_use: str, provider: str) -> str:
    if name.upper() == "INBOX":
        return "incoming"
    if special_use == "\\Sent" or (not special_use and name in SENT_FOLDERS[provider]):
        return "outgoing"
    return "none"


class Mailboxes:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def connect(self, account: Account) -> None:
        address = checked_address(account.address)
        if account.provider not in PROVIDERS:
            raise UserError(f"unknown provider {account.provider!r}: one of {', '.join(PROVIDERS)}")
        smtp_security = account.smtp_security or account.security
        for security in (account.security, smtp_security):
            if security not in SECURITY:
                raise UserError(f"unknown security {security!r}: one of {', '.join(SECURITY)}")
        if account.auth not in AUTHS:
            raise UserError(f"unknown auth {account.auth!r}: one of {', '.join(AUTHS)}")
        if account.auth == "oauth2" and account.provider not in OAUTH2_PROVIDERS:
            raise UserError(f"OAuth2 is for {' and '.join(OAUTH2_PROVIDERS)} mailboxes; "
                            f"a {account.provider} mailbox logs in with a password")
        if account.shared == (account.owner is not None):
            raise UserError("a mailbox has an --owner, or is --shared with --visible-to users")
        async with self.db.write() as session:
            existing = await session.get(Mailbox, address)
            if existing is not None and existing.state != "disconnected":
                by = (f"as a shared mailbox (visible to {', '.join(existing.visible_to)})"
                      if existing.shared else f"by {existing.owner}")
                raise UserError(f"{address} is already connected {by}")
            people = [checked_address(p) for p in
                      ([account.owner] if account.owner else list(account.visible_to))]
            for person in people:
                if await session.get(TeamMember, person) is None:
                    raise UserError(f"{person} is not a team member (add them with "
                                    "`atsmail user add`)")
            if existing is not None:
                await session.delete(existing)
                await session.flush()
            session.add(Mailbox(
                address=address, provider=account.provider,
                owner=people[0] if account.owner else None, shared=account.shared,
                visible_to=[] if account.owner else people,
                imap_host=account.imap_host, imap_port=account.imap_port,
                smtp_host=account.smtp_host, smtp_port=account.smtp_port,
                security=account.security, smtp_security=smtp_security, auth=account.auth,
                username=account.username, secret=account.sealed_secret,
                signature=account.signature, state="connecting"))

    async def all(self) -> list[Mailbox]:
        async with self.db.read() as session:
            return list(await session.scalars(select(Mailbox).order_by(Mailbox.address)))

    async def get(self, address: str) -> Mailbox:
        async with self.db.read() as session:
            box = await session.get(Mailbox, checked_address(address))
        if box is None:
            raise UserError(f"no mailbox {address} is connected")
        return box

    async def disconnect(self, address: str) -> None:
        """Stop mirroring; a personal mailbox needs its owner's hosted identity first."""
        address = checked_address(address)
        async with self.db.write() as session:
            box = await session.get(Mailbox, address)
            if box is None or box.state == "disconnected":
                raise UserError(f"no mailbox {address} is connected")
            if box.owner is not None:
                owner = await session.get(TeamMember, box.owner)
                if owner is None or not owner.hosted_address:
                    raise UserError(
                        f"{box.owner} has no hosted identity yet: give them one with `atsmail "
                        f"identity hosted {box.owner} ADDRESS` first, so their mail from the "
                        "ATS still goes out and replies still come back")
            box.state = "disconnected"
            box.secret = b""
            box.last_error = None
            box.lease_holder = box.lease_until = None

    async def set_hosted_identity(self, user: str, address: str) -> None:
        user, address = checked_address(user), checked_address(address)
        async with self.db.write() as session:
            member = await session.get(TeamMember, user)
            if member is None:
                raise UserError(f"{user} is not a team member")
            taken = await session.scalar(select(TeamMember.email).where(
                TeamMember.hosted_address == address, TeamMember.email != user))
            if taken:
                raise UserError(f"{address} is already the hosted identity of {taken}")
            member.hosted_address = address

    async def folders(self, address: str) -> list[FolderState]:
        address = checked_address(address)
        async with self.db.read() as session:
            if await session.get(Mailbox, address) is None:
                raise UserError(f"no mailbox {address} is connected")
            rows = await session.scalars(select(MailboxFolder).where(
                MailboxFolder.mailbox == address).order_by(MailboxFolder.name))
            return [_state(f) for f in rows]

    async def set_role(self, address: str, folder: str, role: str) -> None:
        if role not in FOLDER_ROLES:
            raise UserError(f"unknown role {role!r}: one of {', '.join(FOLDER_ROLES)}")
        address = checked_address(address)
        async with self.db.write() as session:
            found = await session.get(MailboxFolder, (address, folder))
            if found is None:
                raise UserError(f"{address} has no folder {folder!r} (see `atsmail mailbox "
                                f"folders {address}`)")
            found.role, found.role_fixed = role, True

    async def set_sharing(self, address: str, level: str) -> None:
        if level not in SHARING_LEVELS:
            raise UserError(f"unknown sharing level {level!r}: one of {', '.join(SHARING_LEVELS)}")
        address = checked_address(address)
        async with self.db.write() as session:
            box = await session.get(Mailbox, address)
            if box is None or box.state == "disconnected":
                raise UserError(f"no mailbox {address} is connected")
            if box.shared:
                raise UserError(f"{address} is a shared mailbox: only the people it lists see "
                                "its mail, whatever the sharing level")
            box.sharing = level

    # --- for the mirror ------------------------------------------------------

    async def record_folders(self, address: str, provider: str,
                             listed: Sequence[tuple[str, str]]) -> list[FolderState]:
        """Note the folders the server lists; new ones get their default role."""
        try:
            return await self._record_folders(address, provider, listed)
        except IntegrityError:
            # The mirror and the sender noted a new folder at the same time;
            # the second look sees the first one's rows.
            return await self._record_folders(address, provider, listed)

    async def _record_folders(self, address: str, provider: str,
                              listed: Sequence[tuple[str, str]]) -> list[FolderState]:
        async with self.db.write() as session:
            known = {f.name: f for f in await session.scalars(
                select(MailboxFolder).where(MailboxFolder.mailbox == address))}
            for name, special_use in listed:
                folder = known.get(name)
                if folder is None:
                    folder = MailboxFolder(mailbox=address, name=name, special_use=special_use,
                                           role=default_role(name, special_use, provider),
                                           role_fixed=False, last_uid=0)
                    session.add(folder)
                    known[name] = folder
                elif not folder.role_fixed:
                    folder.special_use = special_use
                    folder.role = default_role(name, special_use, provider)
            await session.flush()
            return [_state(known[name]) for name, _ in listed]

    async def checkpoint(self, address: str, folder: str, uidvalidity: int, last_uid: int,
                         captures: Sequence[Capture] = ()) -> None:
        """Store what the mirror captured up to `last_uid` and move the folder's
        checkpoint there, in one transaction: the checkpoint can never pass
        mail whose capture failed, and a batch costs one commit."""
        def work(conn: Connection) -> None:
            keep(conn, list(captures))
            conn.execute(_CHECKPOINT, {"address": address, "folder": folder,
                                       "to_uidvalidity": uidvalidity, "to_uid": last_uid})

        await commit_captures(self.db, work)

    async def hold(self, holder: str, ttl: float) -> Leases:
        """Renew `holder`'s leases for `ttl` seconds and take free or expired
        ones up to its fair share; one transaction.

        The rows taken are locked with `SKIP LOCKED` on PostgreSQL and the
        update checks again that each is free, so two mirrors taking at once
        never both get one (on SQLite, writers take turns anyway).
        """
        now = utcnow()
        until = now + timedelta(seconds=ttl)
        connected = Mailbox.state != "disconnected"
        free = or_(Mailbox.lease_holder.is_(None), Mailbox.lease_until < now)
        async with self.db.write() as session:
            alive = await session.execute(update(RunningMirror).where(
                RunningMirror.id == holder).values(alive_until=until))
            if not getattr(alive, "rowcount", 0):
                session.add(RunningMirror(id=holder, alive_until=until))
            await session.execute(delete(RunningMirror).where(RunningMirror.alive_until < now))
            await session.flush()
            mirrors = int(await session.scalar(select(func.count(RunningMirror.id))) or 1)
            total = int(await session.scalar(
                select(func.count(Mailbox.address)).where(connected)) or 0)
            share = math.ceil(total / max(mirrors, 1))
            held = list(await session.scalars(
                update(Mailbox).where(connected, Mailbox.lease_holder == holder)
                .values(lease_until=until).returning(Mailbox.address),
                execution_options={"synchronize_session": False}))
            if len(held) < share:
                wanted = list(await session.scalars(
                    select(Mailbox.address).where(connected, free)
                    .order_by(Mailbox.address).limit(share - len(held))
                    .with_for_update(skip_locked=True)))
                if wanted:
                    held += await session.scalars(
                        # The state the last holder left says nothing of this one.
                        update(Mailbox).where(Mailbox.address.in_(wanted), connected, free)
                        .values(lease_holder=holder, lease_until=until, state="connecting")
                        .returning(Mailbox.address),
                        execution_options={"synchronize_session": False})
        held.sort()
        return Leases(held, held[share:])

    async def alive(self) -> list[str]:
        """The mirrors of the gateways running on the store: those whose
        heartbeat has not run out (a gateway stopped cleanly leaves none)."""
        async with self.db.read() as session:
            return list(await session.scalars(
                select(RunningMirror.id).where(RunningMirror.alive_until >= utcnow())
                .order_by(RunningMirror.id)))

    async def release(self, holder: str, addresses: Sequence[str] | None = None) -> None:
        """Give up `holder`'s leases on `addresses` (all of them, and its place
        among the mirrors, when None): free at once for another mirror."""
        async with self.db.write() as session:
            mine = update(Mailbox).where(Mailbox.lease_holder == holder)
            if addresses is not None:
                mine = mine.where(Mailbox.address.in_(list(addresses)))
            await session.execute(mine.values(lease_holder=None, lease_until=None))
            if addresses is None:
                await session.execute(delete(RunningMirror).where(RunningMirror.id == holder))

    async def replace_secret(self, address: str, old: bytes, new: bytes) -> None:
        """Keep a refresh token the provider rotated, unless the mailbox changed meanwhile."""
        async with self.db.write() as session:
            await session.execute(update(Mailbox).where(
                Mailbox.address == address, Mailbox.secret == old,
                Mailbox.state != "disconnected").values(secret=new))

    async def set_state(self, address: str, state: str) -> None:
        """Record what the mirror is doing; the last error stays until a sync succeeds."""
        async with self.db.write() as session:
            await _update(session, address, state=state)

    async def set_error(self, address: str, error: str) -> None:
        """Record a failure; the first after a good sync is a `mailbox.error` event.

        In trouble means "has a last error", not the state: a watcher in
        error passes through connecting and syncing on each retry, and that
        must not report a new failure each time.
        """
        async with self.db.write() as session:
            found, last_error = await _last_error(session, address)
            await _update(session, address, state="error", last_error=error)
            if found and last_error is None:
                await record_event(session, MAILBOX_ERROR, {"mailbox": address, "error": error})

    async def set_synced(self, address: str) -> None:
        """Record a good sync; the first after a failure is a `mailbox.recovered` event."""
        async with self.db.write() as session:
            found, last_error = await _last_error(session, address)
            await _update(session, address, state="idle", last_error=None, last_sync=utcnow())
            if found and last_error is not None:
                await record_event(session, MAILBOX_RECOVERED, {
                    "mailbox": address, "last_error": last_error})


async def _update(session: AsyncSession, address: str, **values: Any) -> None:
    await session.execute(update(Mailbox).where(
        Mailbox.address == address, Mailbox.state != "disconnected").values(**values))


async def _last_error(session: AsyncSession, address: str) -> tuple[bool, str | None]:
    """Whether the mailbox is connected, and its last error; its row locked so
    that two reports of one change (two gateways on one store) make one event."""
    row = (await session.execute(
        select(Mailbox.last_error)
        .where(Mailbox.address == address, Mailbox.state != "disconnected")
        .with_for_update())).first()
    return (False, None) if row is None else (True, row[0])

def _state(folder: MailboxFolder) -> FolderState:
    return FolderState(folder.name, folder.special_use, folder.role, folder.uidvalidity,
                       folder.last_uid)

