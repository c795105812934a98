"""The sender: mail composed in the ATS, delivered from the outbox.

A message goes out through the sender's own mailbox (SMTP submission with
their password, or SASL XOAUTH2 with an OAuth2 access token), is filed in
that mailbox's Sent folder (once: it looks for the Message-ID first; Gmail
files sent mail itself), and is captured on the candidate. A team member
without a mailbox sends from their hosted identity through the gateway's
upstream, DKIM-signed when configured. Failures are retried from the outbox
with back-off; nothing is sent twice on purpose, and nothing queued is
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formataddr, formatdate

import aiosmtplib
import dkim

from atsmail.config import Config
from atsmail.gateway.credentials import Credentials, CredentialsError, Login
from atsmail.gateway.imap import ImapError, ImapSession
from atsmail.gateway.upstream import Reply, open_session
from atsmail.rules import Decision, decide, read_message
from atsmail.rules.addresses import domain_of
from atsmail.secrets import SecretError
from atsmail.storage import Capture, CaptureWriter, Store, lookup
from atsmail.storage.db import Database
from atsmail.storage.mailboxes import Mailboxes
from atsmail.storage.models import Mailbox, OutboxMessage, our_message_id
from atsmail.storage.outbox import Conversation, Outbox, Route
from atsmail.storage.store import UserError, checked_address

log = logging.getLogger(__name__)

# How often the outbox is looked at for due messages.
POLL = 1.0


def compose(route: Route, recipients: list[str], subject: str, body: str,
            conversation: Conversation) -> tuple[str, bytes]:
    """The message to send, and its Message-ID (without angle brackets).

    The Message-ID carries the thread's key, so that the candidate's reply
    finds its thread even when it comes from another address.
    """
    message_id = our_message_id(conversation.thread_key, domain_of(route.from_address))
    msg = EmailMessage()
    msg["From"] = formataddr((route.name, route.from_address)) if route.name else (
        route.from_address)
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = f"<{message_id}>"
    if conversation.in_reply_to:
        msg["In-Reply-To"] = f"<{conversation.in_reply_to}>"
        msg["References"] = " ".join(f"<{m}>" for m in conversation.references)
    text = body if body.endswith("\n") else body + "\n"
    if route.signature:
        text += "\n-- \n" + route.signature.rstrip("\n") + "\n"
    msg.set_content(text)
    return message_id, msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def queue_message(db: Database, sender: str, recipients: Sequence[str], subject: str,
                        body: str, candidate_id: str | None = None,
                        thread_id: int | None = None,
                        from_address: str | None = None) -> OutboxMessage:
    """Compose a team member's message and put it in the outbox (`send`, the API)."""
    outbox = Outbox(db)
    route = await outbox.route(sender, from_address)
    addresses = [checked_address(r) for r in recipients]
    if not addresses:
        raise UserError("a message needs at least one recipient")
    conversation = await outbox.conversation(candidate_id, thread_id)
    message_id, raw = compose(route, addresses, subject, body, conversation)
    return await outbox.queue(sender, route, addresses, conversation, message_id, raw)


class DeliveryError(Exception):
    def __init__(self, text: str, permanent: bool) -> None:
        super().__init__(text)
        self.permanent = permanent


class Sender:
    def __init__(self, config: Config, store: Store, writer: CaptureWriter,
                 credentials: Credentials) -> None:
        self.config = config
        self.store = store
        self.writer = writer
        self.credentials = credentials
        self.outbox = Outbox(store.db)
        self.mailboxes = Mailboxes(store.db)
        self._task: asyncio.Task[None] | None = None
        # Claimed and not yet sent, retried or failed: the first is in hand.
        self._held: list[OutboxMessage] = []

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sender")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # What this gateway claimed and did not carry through is due again at
        # once, here or in another gateway (the one cut short included: the
        # claim of a gateway that dies instead runs out).
        held, self._held = self._held, []
        await self.outbox.release(held)

    async def _run(self) -> None:
        while True:
            try:
                self._held = await self.outbox.claim_due()
                while self._held:
                    await self._deliver(self._held[0])
                    self._held.pop(0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the outbox could not be worked through; trying again")
                # The rest was not tried: due again at once. The message in
                # hand may have gone out; its claim runs out before a retry.
                untried, self._held = self._held[1:], []
                with contextlib.suppress(Exception):
                    await self.outbox.release(untried)
            await asyncio.sleep(POLL)

    async def _deliver(self, item: OutboxMessage) -> None:
        try:
            box = await self.mailboxes.get(item.mailbox) if item.mailbox else None
            if box is not None:
                await self._submit(box, item)
            else:
                await self._send_hosted(item)
        except DeliveryError as exc:
            log.warning("outbox %d (%s): %s", item.id, item.message_id, exc)
            if exc.permanent:
                await self.outbox.failed(item.id, str(exc))
            else:
                await self.outbox.retry(item.id, item.attempts, str(exc))
            return
        note = None
        if box is not None and box.provider != "gmail":  # Gmail files sent mail itself
            note = await self._file_in_sent(box, item)
        # Captured before it is marked sent, so a sent message is always on
        # the candidate; a capture that fails is noted, never sent again.
        try:
            await self._capture(item)
        except Exception as exc:
            log.exception("outbox %d: sent, but not captured", item.id)
            note = f"sent, but not captured: {exc}"
        await self.outbox.sent(item.id, note)
        log.info("outbox %d (%s) sent from %s", item.id, item.message_id, item.from_address)

    async def _submit(self, box: Mailbox, item: OutboxMessage) -> None:
        try:
            errors = await self.credentials.attempt(
                box, lambda login: self._submit_as(login, box, item),
                aiosmtplib.SMTPAuthenticationError)
        except (CredentialsError, SecretError) as exc:
            raise DeliveryError(str(exc), permanent=False) from None
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"{box.smtp_host} refused the login: {exc.message}",
                                permanent=False) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryError(f"{box.smtp_host} answered {exc.code} {exc.message}",
                                permanent=exc.code >= 500) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryError(f"{box.smtp_host}: {exc}", permanent=False) from None
        if errors:
            refused = "; ".join(f"{r}: {e.code} {e.message}" for r, e in errors.items())
            log.warning("outbox %d: some recipients refused: %s", item.id, refused)

    async def _submit_as(self, login: Login, box: Mailbox,
                         item: OutboxMessage) -> dict[str, aiosmtplib.SMTPResponse]:
        """One submission; the recipients the server refused."""
        # aiosmtplib logs in with a password as it connects; a token is given after.
        client = aiosmtplib.SMTP(
            hostname=box.smtp_host, port=box.smtp_port, timeout=self.config.relay.upstream_timeout,
            use_tls=box.smtp_security == "ssl", start_tls=box.smtp_security == "starttls",
            username=None if login.oauth2 else login.username,
            password=None if login.oauth2 else login.secret)
        async with client:
            if login.oauth2:
                await client.auth_xoauth2(login.username, login.secret)
            errors, _ = await client.sendmail(item.from_address, list(item.recipients), item.raw)
        return errors

    async def _send_hosted(self, item: OutboxMessage) -> None:
        raw = self._signed(item.raw)
        relay = self.config.relay
        session = await open_session(relay.upstream, relay.upstream_timeout, relay.data_timeout,
                                     relay.hostname or None)
        if isinstance(session, Reply):
            raise DeliveryError(str(session), permanent=False)
        try:
            reply = await session.mail(item.from_address, [])
            if reply.ok:
                answers = [await session.rcpt(r) for r in item.recipients]
                accepted = [a for a in answers if a.ok]
                reply = await session.data(raw) if accepted else answers[0]
            if not reply.ok:
                raise DeliveryError(f"upstream answered {reply}", permanent=reply.permanent)
        finally:
            await session.close()

    def _signed(self, raw: bytes) -> bytes:
        settings = self.config.dkim
        if not settings.enabled:
            return raw
        assert settings.key_file is not None
        try:
            key = settings.key_file.read_bytes()
        except OSError as exc:
            raise DeliveryError(f"cannot read the DKIM key: {exc}", permanent=False) from None
        header = dkim.sign(raw, settings.selector.encode(), settings.domain.encode(), key,
                           include_headers=[b"from", b"to", b"subject", b"date",
                                            b"message-id"],
                           canonicalize=(b"relaxed", b"simple"))
        return bytes(header) + raw

    async def _file_in_sent(self, box: Mailbox, item: OutboxMessage) -> str | None:
        """File the sent message as read; a failure is noted, never re-sent."""
        try:
            imap = await ImapSession.for_mailbox(
                box, self.credentials, command_timeout=self.config.mirror.command_timeout)
            try:
                # The folder roles as the mirror keeps them (listed afresh, so a
                # mailbox the mirror has not reached yet is filed correctly too).
                folders = await self.mailboxes.record_folders(
                    box.address, box.provider, await imap.folders())
                sent = next((f.name for f in folders if f.role == "outgoing"), None)
                if sent is None:
                    return "sent, but the mailbox has no outgoing folder to file it in"
                await imap.file(sent, item.raw, item.message_id)
            finally:
                await imap.close()
        except (ImapError, CredentialsError, SecretError) as exc:
            log.warning("outbox %d: sent, but not filed in Sent: %s", item.id, exc)
            return f"sent, but not filed in the Sent folder: {exc}"
        return None

    async def _capture(self, item: OutboxMessage) -> None:
        facts = read_message(item.raw, item.from_address, list(item.recipients))
        forwards = self.config.capture.capture_forwards
        context = await self.store.db.run(
            lambda conn: lookup.context_for(conn, facts, None, forwards), write=False)
        decision = decide(facts, context)
        if item.candidate_id and item.candidate_id not in decision.candidates:
            # Sent for this candidate from the ATS: it belongs on their profile.
            decision = Decision(True, "outbound", (*decision.candidates, item.candidate_id),
                                decision.thread_id if decision.capture else None,
                                decision.trace, decision.deciding_rules)
        if not decision.capture:
            return
        prepared = await self.writer.prepare(Capture(facts, decision, item.raw, "sender",
                                                     mailbox=item.mailbox or ""))
        await self.writer.confirm(prepared)
