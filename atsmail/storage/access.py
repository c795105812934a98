"""API tokens and the audit log: who is asking, and what they did.

A token is shown once when it is made; the store keeps only its SHA-256, so
a copy of the database lets no one in. Every view, export, erase and change
of configuration is written to the append-only audit log (the database
refuses to alter it), whether it came through the API, the review pages or
the CLI.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from atsmail.storage.db import Database
from atsmail.storage.models import ApiToken, AuditEntry, TeamMember, utcnow
from atsmail.storage.store import NotFound, UserError, checked_address
from atsmail.storage.visibility import Viewer, load_viewer

TOKEN_PREFIX = "atsm_"
# Reads of the same token within this many seconds do not each write last_used_at.
LAST_USED_GRANULARITY = 60.0


@dataclass(frozen=True)
class TokenInfo:
    id: int
    member: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "user": self.member, "created_at": self.created_at.isoformat(),
                "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
                "revoked": self.revoked_at is not None}


# Who may do what beyond reading: the API and the review pages alike.
ROLES_THAT_EDIT = ("admin", "recruiter")
ROLES_THAT_AUDIT = ("admin", "compliance")
ROLES_THAT_ERASE = ("admin", "recruiter", "compliance")

def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {"id": entry.id, "at": entry.at.isoformat(), "actor": entry.actor,
            "action": entry.action, "target": entry.target, "detail": entry.detail}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_LOGINS = select(ApiToken.token_hash, ApiToken.member).where(ApiToken.revoked_at.is_(None))


def relay_logins(conn: Connection) -> dict[str, str]:
    """Each live token's digest and its team member: the relay's SMTP AUTH logins."""
    return {digest: member for digest, member in conn.execute(_LOGINS)}


class Access:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- tokens ------------------------------------------------------------

    async def create_token(self, email: str, actor: str) -> tuple[int, str]:
        """A new token for a team member: (its id, the token, shown only now)."""
        email = checked_address(email)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        async with self.db.write() as session:
            if await session.get(TeamMember, email) is None:
                raise UserError(f"{email} is not a team member")
            row = ApiToken(member=email, token_hash=token_digest(token))
            session.add(row)
            await session.flush()
            session.add(AuditEntry(actor=actor, action="token.create", target=email,
                                   detail={"token": row.id}))
            return row.id, token

    async def tokens(self) -> list[TokenInfo]:
        async with self.db.read() as session:
            rows = await session.scalars(select(ApiToken).order_by(ApiToken.id))
            return [TokenInfo(t.id, t.member, t.created_at, t.last_used_at, t.revoked_at)
                    for t in rows]

    async def revoke_token(self, token_id: int, actor: str) -> None:
        async with self.db.write() as session:
            row = await session.get(ApiToken, token_id)
            if row is None:
                raise NotFound(f"unknown token {token_id}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                session.add(AuditEntry(actor=actor, action="token.revoke", target=row.member,
                                       detail={"token": token_id}))

    async def authenticate(self, token: str) -> Viewer | None:
        """The team member a live token belongs to; None for any other string."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        async with self.db.read() as session:
            row = await session.scalar(select(ApiToken).where(
                ApiToken.token_hash == token_digest(token), ApiToken.revoked_at.is_(None)))
            if row is None:
                return None
            viewer = await load_viewer(session, row.member)
            stale = row.last_used_at is None or (
                utcnow() - row.last_used_at).total_seconds() > LAST_USED_GRANULARITY
            token_id = row.id
        if stale and viewer is not None:
            async with self.db.write() as session:
                await session.execute(update(ApiToken).where(ApiToken.id == token_id)
                                      .values(last_used_at=utcnow()))
        return viewer

    # --- the audit log -----------------------------------------------------

    async def record(self, actor: str, action: str, target: str = "",
                     **detail: Any) -> None:
        async with self.db.write() as session:
            session.add(AuditEntry(actor=actor, action=action, target=target[:1000],
                                   detail=detail))

    async def audit(self, limit: int = 100, offset: int = 0) -> list[AuditEntry]:
        """Newest first."""
        async with self.db.read() as session:
            return list(await session.scalars(
                select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit).offset(offset)))
