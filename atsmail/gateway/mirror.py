"""The IMAP mirror: candidate mail in connected mailboxes, captured as it arrives.

One watcher per connected mailbox reads its incoming and outgoing folders by
UID from a checkpoint kept in the store (UIDVALIDITY and the last UID seen),
headers first: only mail the rules will capture is fetched whole. Between
passes it waits with IDLE where the server offers it, else it polls. A
watcher never lets one mailbox's trouble reach another: failures are
recorded on the mailbox, the connection is retried with back-off, and the
checkpoint only ever moves past mail that was handled.

Gateways that share a store mirror each mailbox once between them: a
mirror watches only the mailboxes it holds a lease on (see
`storage.mailboxes`), renews its leases every sixth of their length, stops
watching a mailbox whose lease it lost or handed over, and stops watching
everything when it could not renew in time (another gateway may hold its
mailboxes by then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from datetime import UTC, datetime, timedelta

from atsmail.config import Config
from atsmail.gateway.credentials import Credentials, CredentialsError, CredentialsRefusedError
from atsmail.gateway.imap import ImapAuthError, ImapError, ImapSession, imap_date
from atsmail.rules import Context, MessageFacts, decide, read_message, vetoed
from atsmail.rules.message import might_forward
from atsmail.rules.prefilter import passed_over
from atsmail.secrets import SecretError
from atsmail.storage import Capture, Store, lookup
from atsmail.storage.lookup import Directory, load_directory
from atsmail.storage.mailboxes import FolderState, Mailboxes
from atsmail.storage.models import Mailbox

log = logging.getLogger(__name__)

# The header fields the rules read; the rest of a message is fetched only
# when it is captured.
HEADER_FIELDS = ("FROM SENDER REPLY-TO TO CC SUBJECT DATE MESSAGE-ID IN-REPLY-TO REFERENCES "
                 "LIST-ID LIST-UNSUBSCRIBE PRECEDENCE CONTENT-TYPE")
HEADERS = f"BODY.PEEK[HEADER.FIELDS ({HEADER_FIELDS})]"
WHOLE = "BODY.PEEK[]"
# The start of a message a forward may hide in, under a subject of its own:
# its header and the first of its text, where a forward's marker stands.
START = "BODY.PEEK[]<0.65536>"
BATCH = 200
# Captured messages fetched whole in one command: they may carry CVs of
# megabytes each, so a response stays bounded.
WHOLE_BATCH = 20
# How often the set of connected mailboxes is looked at again (and the
# leases renewed, at least every sixth of their length).
DISCOVER_EVERY = 5.0
LEASE_RENEWALS = 6


def mirror_name() -> str:
    """This gateway's name on the leases it holds: host and process, and a
    random part so that a restarted process never passes for the old one."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Mirror:
    """Starts and stops one watcher per mailbox this gateway holds the lease of."""

    def __init__(self, config: Config, store: Store, credentials: Credentials) -> None:
        self.config = config
        self.store = store
        self.credentials = credentials
        self.mailboxes = Mailboxes(store.db)
        self.name = mirror_name()
        self.watchers: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        # Until when (monotonic) the leases last renewed are surely ours.
        self._held_until = 0.0

    async def start(self) -> None:
        log.info("mirroring as %s", self.name)
        self._task = asyncio.create_task(self._supervise(), name="mirror")

    async def stop(self) -> None:
        if self._task is None:
            return  # never started: holds nothing
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self._stop_watchers(list(self.watchers))
        # Free at once for the other gateways, rather than when the leases run out.
        try:
            await self.mailboxes.release(self.name)
        except Exception:
            log.warning("could not release the mailbox leases; they run out in %.0f s",
                        self.config.mirror.lease, exc_info=True)

    async def _stop_watchers(self, addresses: list[str]) -> None:
        tasks = [self.watchers.pop(a) for a in addresses]
        # asyncio.wait_for (used throughout aioimaplib) can swallow a
        # cancellation on Python 3.11: cancel until the task has really ended.
        while any(not t.done() for t in tasks):
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=1)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                log.warning("a mailbox watcher ended with %r", task.exception())

    async def _supervise(self) -> None:
        settings = self.config.mirror
        every = min(DISCOVER_EVERY, settings.poll_interval, settings.lease / LEASE_RENEWALS)
        while True:
            began = time.monotonic()
            try:
                await self._reconcile()
            except Exception:
                log.warning("could not renew the mailbox leases", exc_info=True)
                if self.watchers and time.monotonic() >= self._held_until:
                    log.warning("the leases ran out: no longer mirroring %s",
                                ", ".join(sorted(self.watchers)))
                    await self._stop_watchers(list(self.watchers))
            # At a steady pace, however long the renewal took: the time a
            # dead gateway's mailboxes wait is at most a lease and one pace.
            await asyncio.sleep(max(every / 10, began + every - time.monotonic()))

    async def _reconcile(self) -> None:
        asked = time.monotonic()
        leases = await self.mailboxes.hold(self.name, self.config.mirror.lease)
        self._held_until = asked + self.config.mirror.lease
        keep = set(leases.held) - set(leases.surplus)
        lost = sorted(a for a in self.watchers if a not in leases.held)
        if lost:
            log.info("no longer mirroring %s: the lease went to another gateway, or the "
                     "mailbox was disconnected", ", ".join(lost))
        handed = sorted(a for a in self.watchers if a in leases.surplus)
        if handed:
            log.info("handing %s over to another gateway (more than a fair share here)",
                     ", ".join(handed))
        await self._stop_watchers([*lost, *handed])
        if leases.surplus:
            # Stopped first, then released: never two gateways on one mailbox.
            await self.mailboxes.release(self.name, leases.surplus)
        for box in await self.mailboxes.all():
            task = self.watchers.get(box.address)
            if box.address in keep and (task is None or task.done()):
                if task is None:
                    log.info("mirroring %s", box.address)
                watcher = Watcher(self, box)
                self.watchers[box.address] = asyncio.create_task(
                    watcher.run(), name=f"mirror {box.address}")


class Watcher:
    """Keeps one mailbox in sync, reconnecting with back-off."""

    def __init__(self, mirror: Mirror, box: Mailbox) -> None:
        self.mirror = mirror
        self.box = box
        self.settings = mirror.config.mirror
        self.mailboxes = mirror.mailboxes

    async def run(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._connected()
            except (ImapAuthError, CredentialsRefusedError) as exc:
                # Trying again soon would not help: an admin must act.
                await self._trouble(str(exc))
                delay = self.settings.reconnect_max
            except (ImapError, CredentialsError, SecretError) as exc:
                await self._trouble(str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("mirror of %s failed", self.box.address)
                await self._trouble(f"internal error: {type(exc).__name__}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max)

    async def _trouble(self, error: str) -> None:
        log.warning("mailbox %s: %s", self.box.address, error)
        with contextlib.suppress(Exception):
            await self.mailboxes.set_error(self.box.address, error)

    async def _connected(self) -> None:
        box = self.box
        await self.mailboxes.set_state(box.address, "connecting")
        imap = await ImapSession.for_mailbox(box, self.mirror.credentials,
                                             command_timeout=self.settings.command_timeout)
        try:
            can_idle = "IDLE" in await imap.capabilities()
            while True:
                await self.mailboxes.set_state(box.address, "syncing")
                listed = await imap.folders()
                folders = await self.mailboxes.record_folders(box.address, box.provider, listed)
                synced = [f for f in folders if f.role != "none"]
                # Who is internal, read once a pass: it changes rarely, and a
                # change is seen on the next pass.
                directory = await self.mirror.store.db.run(load_directory, write=False)
                for folder in synced:
                    await self._sync(imap, folder, directory)
                await self.mailboxes.set_synced(box.address)
                inbox = next((f for f in synced if f.role == "incoming"), None)
                if can_idle and inbox is not None:
                    # Incoming mail wakes us at once; the rest is read at
                    # least every poll_interval.
                    await imap.select(inbox.name)
                    await imap.wait_for_news(self.settings.poll_interval)
                else:
                    await asyncio.sleep(self.settings.poll_interval)
        finally:
            await imap.close()

    async def _sync(self, imap: ImapSession, folder: FolderState, directory: Directory) -> None:
        uidvalidity = await imap.select(folder.name)
        if folder.uidvalidity == uidvalidity:
            uids = await imap.uids_after(folder.last_uid)
        else:
            # First sight of the folder, or its UIDs were renumbered: read the
            # back-fill window again; what was captured already is not stored
            # twice (the capture key is the Message-ID).
            uids = await self._backfill(imap)
            if folder.uidvalidity is not None:
                log.info("mailbox %s folder %s: UIDVALIDITY changed, reading it again",
                         self.box.address, folder.name)
        for start in range(0, len(uids), BATCH):
            batch = uids[start:start + BATCH]
            headers = await imap.fetch(batch, HEADERS)
            captures = await self._judge_batch(imap, folder, directory, headers)
            # The batch's captures and the checkpoint past it commit together.
            await self.mailboxes.checkpoint(self.box.address, folder.name, uidvalidity,
                                            batch[-1], captures)
            for capture in captures:
                log.info("mailbox %s folder %s: captured %s for %s", self.box.address,
                         folder.name, capture.facts.message_id,
                         ", ".join(capture.decision.candidates))
        if not uids and folder.uidvalidity != uidvalidity:
            # An empty window under a new UIDVALIDITY: nothing read yet.
            await self.mailboxes.checkpoint(self.box.address, folder.name, uidvalidity, 0)

    async def _judge_batch(self, imap: ImapSession, folder: FolderState, directory: Directory,
                           headers: dict[int, bytes]) -> list[Capture]:
        """Judge a batch by headers with one store look-up; what counts is read whole.

        A message that cannot be read is logged and skipped; a store failure
        propagates, so the checkpoint stays before the batch and it is tried
        again.
        """
        capture = self.mirror.config.capture
        quick = Context(internal_domains=directory.domains, team=directory.team,
                        capture_forwards=capture.capture_forwards, folder_role=folder.role)
        # A forward under a subject of its own shows only in its body: mail
        # the header leaves uncaptured is looked at for one when the forward
        # rules could capture it. The mirror alone sees mail the company's
        # own server delivers: among colleagues, and from outside.
        forwards_count = capture.capture_forwards or bool(capture.ats_inbox)
        # Bulk mail and mail no team member takes part in need no look-up;
        # the plainest of it needs no parsing either.
        open_: list[tuple[int, MessageFacts]] = []
        unclear: list[int] = []
        for uid, data in sorted(headers.items()):
            why = self._passed_over(data, folder, uid, quick)
            if why == "internal" and forwards_count:
                unclear.append(uid)
            elif why is None and (facts := self._read(data, folder, uid)) is not None:
                if vetoed(facts, quick) is None:
                    open_.append((uid, facts))
        wanted: list[int] = []
        if open_:
            context = await self._context(folder, directory, [f for _, f in open_])
            for uid, facts in open_:
                # A Fwd-style subject: the forward is read from the whole.
                if decide(facts, context).capture or facts.forward.subject_prefix:
                    wanted.append(uid)
                elif forwards_count:
                    unclear.append(uid)
        # At most a batch of starts (BATCH), 64 KB each, in one command.
        wanted += await self._forwarding(imap, folder, directory, sorted(unclear))
        wanted.sort()
        captures: list[Capture] = []
        for start in range(0, len(wanted), WHOLE_BATCH):
            captures += await self._judge_whole(imap, folder, directory,
                                                wanted[start:start + WHOLE_BATCH])
        return captures

    async def _forwarding(self, imap: ImapSession, folder: FolderState, directory: Directory,
                          uids: list[int]) -> list[int]:
        """Those of `uids` that the rules capture as forwards, judged on the
        start of each: a forward's marker and its original's header come
        before any attachment. Only a start with signs of a forward is read."""
        read = [(uid, facts) for uid, facts in
                ((uid, self._read(start, folder, uid))
                 for uid, start in sorted((await imap.fetch(uids, START)).items())
                 if might_forward("", start))
                if facts is not None]
        if not read:
            return []
        context = await self._context(folder, directory, [f for _, f in read])
        return [uid for uid, facts in read if decide(facts, context).capture]

    async def _judge_whole(self, imap: ImapSession, folder: FolderState, directory: Directory,
                           uids: list[int]) -> list[Capture]:
        """Fetch `uids` whole in one command and judge them on all they say."""
        read = [(facts, whole) for facts, whole in
                ((self._read(whole, folder, uid), whole)
                 for uid, whole in sorted((await imap.fetch(uids, WHOLE)).items()))
                if facts is not None]  # an expunged message is simply absent
        if not read:
            return []
        context = await self._context(folder, directory, [f for f, _ in read])
        captures = []
        for facts, whole in read:
            decision = decide(facts, context)
            if decision.capture:
                captures.append(Capture(facts, decision, whole, "mirror",
                                        mailbox=self.box.address))
        return captures

    async def _context(self, folder: FolderState, directory: Directory,
                       messages: list[MessageFacts]) -> Context:
        forwards = self.mirror.config.capture.capture_forwards
        inbox = self.mirror.config.capture.ats_inbox
        return await self.mirror.store.db.run(lambda conn: lookup.context_for_many(
            conn, messages, directory, forwards, folder.role, inbox), write=False)

    async def _backfill(self, imap: ImapSession) -> list[int]:
        settings, provider = self.settings, self.box.provider
        if provider == "outlook":
            return (await imap.search("ALL"))[-settings.backfill_outlook_messages:]
        if provider == "gmail":
            since = datetime.now(UTC) - timedelta(hours=settings.backfill_gmail_hours)
        else:
            since = datetime.now(UTC) - timedelta(days=settings.backfill_imap_days)
        return await imap.search(f"SINCE {imap_date(since.date())}")

    def _passed_over(self, data: bytes, folder: FolderState, uid: int,
                     directory: Context) -> str | None:
        """Why the rules can never capture the message whose header is `data`
        (`passed_over`; "unreadable", logged, when it cannot be read), or
        None: it must be judged."""
        try:
            return passed_over(data, directory)
        except Exception:
            log.exception("mailbox %s folder %s UID %d: unreadable, skipped",
                          self.box.address, folder.name, uid)
            return "unreadable"

    def _read(self, data: bytes, folder: FolderState, uid: int) -> MessageFacts | None:
        """The message's facts; None when it cannot be read."""
        try:
            return read_message(data)
        except Exception:
            log.exception("mailbox %s folder %s UID %d: unreadable, skipped",
                          self.box.address, folder.name, uid)
            return None
