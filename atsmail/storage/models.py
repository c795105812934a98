"""The store's tables, as typed SQLAlchemy 2 models.

Addresses and domains are kept in their normalised spelling
(`atsmail.rules.addresses`), so look-ups are exact matches on indexed
columns. A captured message is tied to candidates per message, not per
thread, so erasing one candidate keeps exactly the messages another
candidate still needs.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    select,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column

ROLES = ("admin", "recruiter", "compliance")


SHARING_LEVELS = ("full", "subject", "metadata")


# Mail sent from the ATS: <atsmail.KEY.RANDOM@domain>, KEY being its thread's.
_OUR_MESSAGE_ID = re.compile(r"atsmail\.([0-9a-f]{24})\.[0-9a-f]{8,64}@[^@\s]+")


def new_thread_key() -> str:
    return secrets.token_hex(12)


def our_message_id(thread_key: str, domain: str) -> str:
    """A Message-ID (without angle brackets) that names the thread it belongs to."""
    return f"atsmail.{thread_key}.{secrets.token_hex(8)}@{domain}"


def thread_key_of(message_id: str | None) -> str | None:
    match = _OUR_MESSAGE_ID.fullmatch(message_id or "")
    return match[1] if match else None


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps that come back timezone-aware from SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value  # type: ignore[no-any-return]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class TeamMember(Base):
    __tablename__ = "team_members"

    email: Mapped[str] = mapped_column(String(320), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(20), default="recruiter")
    # The ATS-hosted address the member sends from once their mailbox is gone.
    hosted_address: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class InternalDomain(Base):
    __tablename__ = "internal_domains"

    domain: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    title: Mapped[str] = mapped_column(String(300))
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Candidate(Base):
    __tablename__ = "candidates"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set by every change to the candidate, their addresses or jobs (an ATS
    # syncing incrementally asks for what changed since).
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class CandidateEmail(Base):
    __tablename__ = "candidate_emails"
    __table_args__ = (Index("ix_candidate_emails_email", "email"),)

    candidate_id: Mapped[str] = mapped_column(
        ForeignKey("candidates.id", ondelete="CASCADE"), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), primary_key=True)


class CandidateJob(Base):
    __tablename__ = "candidate_jobs"

    candidate_id: Mapped[str] = mapped_column(
        ForeignKey("candidates.id", ondelete="CASCADE"), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)


class Notice(Base):
    """Why something changed on a candidate's profile (an address removed)."""

    __tablename__ = "notices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    candidate_id: Mapped[str] = mapped_column(
        ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Thread(Base):
    __tablename__ = "threads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # A random token that mail sent from the ATS carries in its Message-ID,
    # so that a reply joins the thread whatever address it comes from.
    # Threads from before keys existed get one when first replied to.
    key: Mapped[str | None] = mapped_column(String(32), unique=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_date: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MessageBody(Base):
    """A captured message's bytes, in a row of their own.

    SQLite writes a whole row again to change any column of it: kept in the
    message's row, a 30 MB message would be written again when its capture
    is confirmed.
    """

    __tablename__ = "message_bodies"

    message_pk: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True, autoincrement=False)
    raw: Mapped[bytes] = mapped_column(LargeBinary)


class CapturedMessage(Base):
    """One captured message. `state` is `pending` until the upstream accepted it."""

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_message_id", "message_id"),
                      # Retention finds what was captured before its cutoff.
                      Index("ix_messages_created_at", "created_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    thread_id: Mapped[int] = mapped_column(
        ForeignKey("threads.id", ondelete="CASCADE"), index=True)
    capture_key: Mapped[str] = mapped_column(String(1000), unique=True)
    message_id: Mapped[str | None] = mapped_column(String(1000))
    state: Mapped[str] = mapped_column(String(10), default="pending")
    direction: Mapped[str] = mapped_column(String(10))
    source: Mapped[str] = mapped_column(String(20))
    from_addr: Mapped[str] = mapped_column(Text, default="")
    to_addrs: Mapped[list[str]] = mapped_column(JSON, default=list)
    cc_addrs: Mapped[list[str]] = mapped_column(JSON, default=list)
    subject: Mapped[str] = mapped_column(Text, default="")
    date: Mapped[datetime | None] = mapped_column(UTCDateTime)
    size: Mapped[int] = mapped_column(Integer, default=0)
    # Read with the message; written to its own table (MessageBody).
    raw: Mapped[bytes] = column_property(
        select(MessageBody.raw).where(MessageBody.message_pk == id).scalar_subquery())
    trace: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # Attempts holding a pending copy (concurrent retries of one message).
    holders: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MessageCandidate(Base):
    __tablename__ = "message_candidates"
    __table_args__ = (Index("ix_message_candidates_candidate_id", "candidate_id"),)

    message_pk: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    candidate_id: Mapped[str] = mapped_column(
        ForeignKey("candidates.id", ondelete="CASCADE"), primary_key=True)


FOLDER_ROLES = ("incoming", "outgoing", "none")


class Mailbox(Base):
    """A connected mailbox the mirror watches; its secret is stored encrypted.

    `state` is connecting, syncing, idle, error or disconnected. Exactly one
    gateway mirrors a mailbox at a time: the one named in `lease_holder`
    until `lease_until` (it renews the lease every few seconds; a lease that
    runs out is free for any gateway to take). `auth` says
    what the secret is: a password (`password`) or an OAuth2 refresh token
    (`oauth2`). `security` is the IMAP server's; `smtp_security` the SMTP
    server's, which for Outlook differs (implicit TLS vs STARTTLS).
    """

    __tablename__ = "mailboxes"

    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    provider: Mapped[str] = mapped_column(String(20))
    owner: Mapped[str | None] = mapped_column(String(320))
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    visible_to: Mapped[list[str]] = mapped_column(JSON, default=list)
    imap_host: Mapped[str] = mapped_column(String(255))
    imap_port: Mapped[int] = mapped_column(Integer)
    smtp_host: Mapped[str] = mapped_column(String(255), default="")
    smtp_port: Mapped[int] = mapped_column(Integer, default=0)
    security: Mapped[str] = mapped_column(String(10))
    smtp_security: Mapped[str] = mapped_column(String(10))
    auth: Mapped[str] = mapped_column(String(10), default="password")
    username: Mapped[str] = mapped_column(String(320))
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[str] = mapped_column(Text, default="")
    # How much of a personal mailbox's mail the rest of the team sees:
    # full, subject (no bodies) or metadata (participants and dates).
    sharing: Mapped[str] = mapped_column(String(10), default="full")
    state: Mapped[str] = mapped_column(String(20), default="connecting")
    last_sync: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_holder: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RunningMirror(Base):
    """A running gateway's mirror, alive while it renews `alive_until`.

    Counted to give each its fair share of the mailboxes, including one that
    has just started and holds none yet.
    """

    __tablename__ = "mirrors"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    alive_until: Mapped[datetime] = mapped_column(UTCDateTime)


class MailboxFolder(Base):
    """A folder of a mailbox: its role, and how far the mirror has read it."""

    __tablename__ = "mailbox_folders"

    mailbox: Mapped[str] = mapped_column(
        ForeignKey("mailboxes.address", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(1000), primary_key=True)
    special_use: Mapped[str] = mapped_column(String(50), default="")
    role: Mapped[str] = mapped_column(String(10), default="none")
    # True once an admin chose the role; the defaults no longer apply then.
    role_fixed: Mapped[bool] = mapped_column(Boolean, default=False)
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)


class MessageSource(Base):
    """Everywhere a captured message was seen: the relay, a mailbox's folder."""

    __tablename__ = "message_sources"

    message_pk: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    source: Mapped[str] = mapped_column(String(20), primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(320), primary_key=True, default="")


class OutboxMessage(Base):
    """Mail composed in the ATS, kept until it is sent, filed and captured.

    `status` is queued, sending, sent or failed.
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_status_next_attempt", "status", "next_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sender: Mapped[str] = mapped_column(String(320))
    from_address: Mapped[str] = mapped_column(String(320))
    # The connected mailbox it goes out through; None: the hosted identity.
    mailbox: Mapped[str | None] = mapped_column(String(320))
    recipients: Mapped[list[str]] = mapped_column(JSON, default=list)
    candidate_id: Mapped[str | None] = mapped_column(String(100))
    # The key of the thread it opens or continues (see `Thread.key`).
    thread_key: Mapped[str | None] = mapped_column(String(32))
    message_id: Mapped[str] = mapped_column(String(1000), unique=True)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(10), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiToken(Base):
    """A team member's API token; only its SHA-256 is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    member: Mapped[str] = mapped_column(
        ForeignKey("team_members.email", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEntry(Base):
    """Who looked at, exported, erased or changed what, and when.

    Append-only: the database refuses to change or delete a row.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(50))
    target: Mapped[str] = mapped_column(String(1000), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class WebhookEvent(Base):
    """Something the ATS is told about, recorded with the change it reports.

    `fanned_out` turns true once the webhook worker has queued a delivery
    for each configured URL; the event goes when its last delivery does.
    An event about a message or a candidate goes with it too: erasing a
    candidate leaves no subject of theirs waiting in the queue.
    """

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_fanned_out_id", "fanned_out", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The id receivers see (and deduplicate by): a UUID, never reused.
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    type: Mapped[str] = mapped_column(String(50))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    fanned_out: Mapped[bool] = mapped_column(Boolean, default=False)
    message_pk: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    candidate_id: Mapped[str | None] = mapped_column(
        ForeignKey("candidates.id", ondelete="CASCADE"), index=True)


class WebhookDelivery(Base):
    """One event still to be delivered to one URL; deleted once it is."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_url_event_pk", "url", "event_pk"),)

    event_pk: Mapped[int] = mapped_column(
        ForeignKey("webhook_events.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str] = mapped_column(String(2000), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A gateway delivering it holds it until then; a crashed one's hold lapses.
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
