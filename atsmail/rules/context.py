"""Everything the rules may know besides the message, loaded before they run.

The store fills a `Context` for one message (only the candidates and
captured messages its addresses and Message-IDs point at), so the rules stay
pure functions with no database in reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from atsmail.rules.addresses import in_domains


@dataclass(frozen=True)
class CandidateInfo:
    id: str
    name: str
    emails: frozenset[str]
    # (job id, archived)
    jobs: tuple[tuple[str, bool], ...] = ()

    @property
    def active(self) -> bool:
        """Still in a hiring process: no job at all, or at least one open job."""
        return not self.jobs or any(not archived for _, archived in self.jobs)


@dataclass(frozen=True)
class KnownMessage:
    """A message already captured, as seen by threading."""

    message_id: str
    thread_id: int
    candidates: frozenset[str]


@dataclass(frozen=True)
class Context:
    internal_domains: frozenset[str] = frozenset()
    team: frozenset[str] = frozenset()
    candidates: Mapping[str, CandidateInfo] = field(default_factory=dict)
    known_messages: Mapping[str, KnownMessage] = field(default_factory=dict)
    capture_forwards: bool = True
    # The role of the mailbox folder the message was found in (mirror only).
    folder_role: str | None = None
    # The ATS's own inbox address: forwards to it become candidates.
    ats_inbox: str | None = None

    def is_internal(self, address: str) -> bool:
        """A team member's address, or one in an internal domain or a subdomain of one."""
        return address in self.team or in_domains(address, self.internal_domains) is not None

    def candidates_for(self, address: str) -> list[CandidateInfo]:
        return [c for c in self.candidates.values() if address in c.emails]
