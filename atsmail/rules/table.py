"""The capture rules, and the one ordered table the gateway runs.

Each rule is a small class with a `name`, a `description` and a pure
`check(msg, ctx) -> Verdict` that explains itself in its reasons. The order
of `RULES` is the order of the trace; the engine combines the verdicts.
"""

from __future__ import annotations

from atsmail.rules.context import CandidateInfo, Context, KnownMessage
from atsmail.rules.engine import Rule, Verdict
from atsmail.rules.message import MessageFacts

BULK_PRECEDENCE = frozenset({"bulk", "list", "junk"})


def _names(candidates: list[CandidateInfo] | set[str]) -> str:
    ids = sorted(c.id if isinstance(c, CandidateInfo) else c for c in candidates)
    return ", ".join(ids)


class Bulk:
    name = "bulk"
    can_veto = True
    description = "Mailing-list and bulk mail is never captured."

    def check(self, msg: MessageFacts, ctx: Context) -> Verdict:
        reasons = []
        if msg.list_id:
            reasons.append(f"List-Id: {msg.list_id}")
        if msg.list_unsubscribe:
            reasons.append("has List-Unsubscribe")
        if msg.precedence in BULK_PRECEDENCE:
            reasons.append(f"Precedence: {msg.precedence}")
        if not reasons:
            return Verdict(False, ("no list or bulk headers",))
        return Verdict(True, (*reasons, "bulk mail is not captured"), veto=True)


class Direction:
    name = "direction"
    can_veto = False
    description = ("Outbound when the From address is internal (or the mailbox folder is an "
                   "outgoing one), inbound otherwise.")

    def check(self, msg: MessageFacts, ctx: Context) -> Verdict:
        if ctx.folder_role == "outgoing":
            return Verdict(True, ("filed in an outgoing folder: outbound",), direction="outbound")
        if ctx.folder_role == "incoming":
            return Verdict(False, ("filed in an incoming folder: inbound",), direction="inbound")
        sender = msg.from_[0] if msg.from_ else msg.envelope_sender
        if sender and ctx.is_internal(sender):
            return Verdict(True, (f"From {sender} is internal: outbound",), direction="outbound")
        shown = sender or "(no From)"
        return Verdict(False, (f"From {shown} is not internal: inbound",), direction="inbound")


class TeamScope:
    name = "team-scope"
    can_veto = True
    description = "Only conversations that a team member takes part in are captured."

    def check(self, msg: MessageFacts, ctx: Context) -> Verdict:
        internal = [a for a in msg.participants if ctx.is_internal(a)]
        members = [a for a in internal if a in ctx.team]
        if members:
            return Verdict(True, (f"team member taking part: {', '.join(members)}",))
        if internal:
            reason = (f"internal participants {', '.join(internal)} are not on the team: "
                      "not the recruiting team's conversation")
        else:
            reason = "no team member takes part"
        return Verdict(False, (reason,), veto=True)


class ThreadLink:
    name = "thread-link"
    can_veto = False
    description = "A reply to a captured message joins that message's thread and candidates."

    def check(self, msg: MessageFacts, ctx: Context) -> Verdict:
        if msg.forwards:
            return Verdict(False, ("a forward: the forward rule decides",))
        if not any(not ctx.is_internal(a) for a in msg.participants):
            return Verdict(False, ("every participant is internal: a conversation about a "
                                   "thread among colleagues is not captured",))
        # The direct parent first, then References from the newest back.
        for message_id in (*msg.in_reply_to, *reversed(msg.references)):
            known = ctx.known_messages.get(message_id)
            if known is not None:
                return Verdict(
                    True,
                    (f"replies to captured <{message_id}> in thread {known.thread_id} "
                     f"(candidates {_names(set(known.candidates))})",),
                    candidates=known.candidates,
                    thread_id=known.thread_id,
                )
        if msg.in_reply_to or msg.references:
            return Verdict(False, ("refers to no captured message",))
        return Verdict(False, ("not a reply",))


class CandidateMatch:
    name = "candidate-match"
    can_veto = False
    description = "A non-internal participant is one of a candidate's addresses."

    def check(self, msg: MessageFacts, ctx: Context) -> Verdict:
        found: dict[str, CandidateInfo] = {}
        reasons = []
        for address in msg.participants:
            if ctx.is_internal(address):
                continue
            for candidate in ctx.candidates_for(address):
                found[candidate.id] = candidate
                reasons.append(f"{address} is candidate {candidate.id}")
        if not found:
            return Verdict(False, ("no participant is a candidate",))
        return Verdict(True, tuple(reasons), candidates=frozenset(found))


class ForwardOfCandidate:
    name = "forward"
    can_veto = False
    description = "Forwarding a candidate's mail starts a new thread on that candidate."

    def check(self, msg: MessageFacts, ctx: Context) -> Verdict:
        fwd = msg.forward
        if not msg.forwards:
            return Verdict(False, ("not a forward",))
        signs = [s for s, on in (("Fwd subject", fwd.subject_prefix),
                                 ("attached message", fwd.attached),
                                 ("inline forwarded block", fwd.inline)) if on]
        found: set[str] = set()
        reasons = [f"forward ({', '.join(signs)})"]
        for message_id in msg.thread_ids:
            known: KnownMessage | None = ctx.known_messages.get(message_id)
            if known is not None:
                found |= known.candidates
                reasons.append(f"forwards captured <{message_id}> "
                               f"(candidates {_names(set(known.candidates))})")
        for address in fwd.original_addresses:
            if ctx.is_internal(address):
                continue
            for candidate in ctx.candidates_for(address):
                found.add(candidate.id)
                reasons.append(f"forwarded original involves {address}, candidate {candidate.id}")
        if not found:
            return Verdict(False, (*reasons, "the forwarded mail involves no candidate"))
        if not ctx.capture_forwards:
            return Verdict(False, (*reasons, "capture_forwards is off"))
        return Verdict(True, (*reasons, "captured as a new thread"),
                       candidates=frozenset(found), new_thread=True)


class AtsInbox:
    name = "ats-inbox"
    can_veto = False
    description = ("Mail forwarded to the ATS inbox address makes the forwarded original's "
                   "sender a candidate.")

    def check(self, msg: MessageFacts, ctx: Context) -> Verdict:
        inbox = ctx.ats_inbox
        if not inbox or inbox not in (*msg.envelope_recipients, *msg.to, *msg.cc):
            return Verdict(False, ("not addressed to the ATS inbox",))
        fwd = msg.forward
        sender = fwd.original_sender
        if not msg.forwards or sender is None:
            return Verdict(False, (f"mail to {inbox} that forwards no one's mail: no "
                                   "candidate to create",))
        if ctx.is_internal(sender):
            return Verdict(False, (f"the forwarded original is from internal {sender}",))
        known = ctx.candidates_for(sender)
        if known:
            return Verdict(True, (f"forwarded to {inbox}: {sender} is already candidate "
                                  f"{_names(known)}",),
                           candidates=frozenset(c.id for c in known), new_thread=True)
        return Verdict(True, (f"forwarded to {inbox}: {sender} becomes a new candidate",),
                       intake=(sender, fwd.original_name), new_thread=True)


class ArchivedJobs:
    name = "archived-jobs"
    can_veto = False
    description = "A candidate whose every job is archived is no longer captured for."

    def check(self, msg: MessageFacts, ctx: Context) -> Verdict:
        # Only the candidates this message is tied to: the context may hold
        # more (one look-up serves a batch of messages).
        tied = {c.id for a in (*msg.participants, *msg.forward.original_addresses)
                for c in ctx.candidates_for(a)}
        tied |= {c for m in msg.thread_ids if m in ctx.known_messages
                 for c in ctx.known_messages[m].candidates}
        archived = {cid for cid in tied
                    if cid in ctx.candidates and not ctx.candidates[cid].active}
        if not archived:
            return Verdict(False, ("no candidate involved has only archived jobs",))
        return Verdict(True, (f"every job of {_names(archived)} is archived",),
                       excluded=frozenset(archived))


RULES: tuple[Rule, ...] = (
    Bulk(),
    Direction(),
    TeamScope(),
    ThreadLink(),
    CandidateMatch(),
    ForwardOfCandidate(),
    AtsInbox(),
    ArchivedJobs(),
)
