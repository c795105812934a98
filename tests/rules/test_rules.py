"""The capture rules, one table per behaviour, judged end to end.

Each row is a message (built here or read from `tests/data/`) and what the
rules must decide for it: capture or not, for which candidates, into which
thread, in which direction, and the reason that settles it. The context is
built the way the store builds it: only the candidates the message's
addresses and Message-IDs point at.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from atsmail.rules import (
    RULES,
    CandidateInfo,
    Context,
    Decision,
    KnownMessage,
    MessageFacts,
    TraceEntry,
    Verdict,
    decide,
    evaluate,
    read_message,
    vetoed,
)

DATA = Path(__file__).parent.parent / "data"

# --- the cast ---------------------------------------------------------------------

DOMAINS = frozenset({"example.com", "exämple.de"})
# Rita and Sam recruit; the agency partner is on the team with an outside address.
# Harry (hm@), Bob and Carol (eu. subdomain) work at the company but are not on the team.
TEAM = frozenset({"recruiter@example.com", "sourcer@example.com",
                  "agency.partner@freelance.test"})


def _candidate(cid: str, name: str, *emails: str,
               jobs: tuple[tuple[str, bool], ...] = ()) -> CandidateInfo:
    return CandidateInfo(cid, name, frozenset(emails), jobs)


OPEN, ARCHIVED = False, True
CAST = {c.id: c for c in (
    _candidate("C-1", "Ada Applicant", "ada@applicant.test", "ada.lovelace@mail.test",
               jobs=(("J1", OPEN),)),
    _candidate("C-2", "Grace Hopper", "grace@candidates.test", jobs=(("J2", OPEN),)),
    _candidate("C-3", "Archie Old", "archie@old.test", jobs=(("J3", ARCHIVED),)),
    _candidate("C-4", "Jürgen Müller", "juergen@bücher.example", jobs=(("J1", OPEN),)),
    _candidate("C-5", "Nora Nojob", "nora@nojob.test"),
    _candidate("C-6", "Mia Mixed", "mia@mixed.test", jobs=(("J3", ARCHIVED), ("J1", OPEN))),
    # An employee who applied internally: a profile should never carry this
    # address, and the rules must not match it even when one does.
    _candidate("C-7", "Bob Insider", "bob@example.com", jobs=(("J1", OPEN),)),
    _candidate("C-8", "Eve Lookalike", "eve@evilexample.com", jobs=(("J1", OPEN),)),
    _candidate("C-9", "Avery Gone", "avery@old.test", jobs=(("J3", ARCHIVED), ("J4", ARCHIVED))),
)}

KNOWN = {m.message_id: m for m in (
    KnownMessage("m1@applicant.test", 7, frozenset({"C-1"})),
    KnownMessage("m2@candidates.test", 9, frozenset({"C-2"})),
    KnownMessage("m3@old.test", 11, frozenset({"C-3"})),
    KnownMessage("m4@example.com", 12, frozenset({"C-1", "C-3"})),
    # Rita's forward of Ada's application, itself captured.
    KnownMessage("fwd1@example.com", 13, frozenset({"C-1"})),
    KnownMessage("ada-application-0001@applicant.test", 14, frozenset({"C-1"})),
)}


def context_for(facts: MessageFacts, **overrides: Any) -> Context:
    """What `Store.context_for` loads: candidates of the addresses and of linked messages."""
    cast: Mapping[str, CandidateInfo] = overrides.pop("cast", CAST)
    addresses = {*facts.participants, *facts.forward.original_addresses}
    known = {m: KNOWN[m] for m in facts.thread_ids if m in KNOWN}
    ids = {c.id for c in cast.values() if c.emails & addresses}
    for message in known.values():
        ids |= message.candidates
    ctx = Context(internal_domains=DOMAINS, team=TEAM,
                  candidates={i: cast[i] for i in sorted(ids) if i in cast},
                  known_messages=known)
    return replace(ctx, **overrides)


# --- building messages and rows ---------------------------------------------------------


def mail(headers: Mapping[str, str], body: str = "Hello.\n") -> bytes:
    lines = [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    lines += ["Date: Fri, 27 Nov 2026 10:00:00 +0000", "MIME-Version: 1.0",
              "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    return ("\r\n".join(lines) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode("utf-8")


@dataclass(frozen=True)
class Expect:
    capture: bool
    candidates: tuple[str, ...] = ()
    thread_id: int | None = None
    direction: str = "inbound"
    # (rule, "hit" | "miss", a fragment of one of its reasons)
    because: tuple[str, str, str] | None = None


def captured(*candidates: str, thread_id: int | None = None, direction: str = "inbound",
             because: tuple[str, str, str] | None = None) -> Expect:
    return Expect(True, candidates, thread_id, direction, because)


def passed(direction: str = "inbound", because: tuple[str, str, str] | None = None) -> Expect:
    return Expect(False, (), None, direction, because)


@dataclass(frozen=True)
class Msg:
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = "Hello.\n"
    fixture: str | None = None
    envelope_sender: str | None = None
    envelope_recipients: Sequence[str] = ()
    ctx: Mapping[str, Any] = field(default_factory=dict)

    def raw(self) -> bytes:
        if self.fixture:
            return (DATA / self.fixture).read_bytes()
        return mail(self.headers, self.body)

    def decide(self) -> Decision:
        facts = read_message(self.raw(), self.envelope_sender, self.envelope_recipients)
        return decide(facts, context_for(facts, **self.ctx))


def row(id: str, msg: Msg, expect: Expect, xfail: str | None = None) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(msg, expect, id=id, marks=marks)


def entry(decision: Decision, rule: str) -> TraceEntry:
    found = [t for t in decision.trace if t.rule == rule]
    assert len(found) == 1, f"{rule} appears {len(found)} times in the trace"
    return found[0]


def check(decision: Decision, expect: Expect) -> None:
    thread = ("existing" if expect.thread_id is not None else "new") if expect.capture else None
    got = (decision.capture, decision.candidates, decision.thread, decision.thread_id,
           decision.direction)
    want = (expect.capture, expect.candidates, thread, expect.thread_id, expect.direction)
    trace = "\n".join(f"  {t.rule} {t.verdict} {t.reasons}" for t in decision.trace)
    assert got == want, f"\n{trace}"
    if expect.because:
        rule, verdict, fragment = expect.because
        found = entry(decision, rule)
        assert found.verdict == verdict, f"\n{trace}"
        assert any(fragment in reason for reason in found.reasons), f"\n{trace}"


RITA = "Rita Recruiter <recruiter@example.com>"
ENCODED_NAME_BUG = ("an address inside an RFC 2047 encoded display name is read as a participant "
                    "(MessageFacts gains the spoofed address)")
ADA = "Ada Applicant <ada@applicant.test>"


# --- direction ----------------------------------------------------------------------------

DIRECTION = [
    row("from-team-member", Msg({"From": RITA, "To": ADA}),
        captured("C-1", direction="outbound",
                 because=("direction", "hit", "From recruiter@example.com is internal"))),
    row("from-team-member-any-case", Msg({"From": "RECRUITER@Example.COM", "To": ADA}),
        captured("C-1", direction="outbound")),
    row("from-team-member-outside-internal-domains",
        Msg({"From": "agency.partner@freelance.test", "To": ADA}),
        captured("C-1", direction="outbound")),
    row("from-internal-domain-not-on-team",
        Msg({"From": "bob@example.com", "To": ADA, "Cc": RITA}),
        captured("C-1", direction="outbound")),
    row("from-subdomain", Msg({"From": "carol@eu.example.com", "To": ADA, "Cc": RITA}),
        captured("C-1", direction="outbound")),
    row("from-idna-internal-domain",
        Msg({"From": "hr@xn--exmple-cua.de", "To": ADA, "Cc": RITA}),
        captured("C-1", direction="outbound")),
    row("from-candidate", Msg({"From": ADA, "To": RITA}),
        captured("C-1", because=("direction", "miss", "ada@applicant.test is not internal"))),
    row("from-look-alike-domain", Msg({"From": "eve@evilexample.com", "To": RITA}),
        captured("C-8", because=("direction", "miss", "inbound"))),
    row("display-name-does-not-make-it-outbound",
        Msg({"From": '"recruiter@example.com" <ada@applicant.test>', "To": RITA}),
        captured("C-1")),
    row("sender-internal-from-external-is-inbound",
        Msg({"From": ADA, "Sender": "recruiter@example.com", "To": "hm@example.com"}),
        captured("C-1")),
    row("no-from-envelope-sender-internal",
        Msg({"To": ADA}, envelope_sender="recruiter@example.com"),
        captured("C-1", direction="outbound")),
    row("no-from-no-envelope", Msg({"To": RITA, "Cc": ADA}),
        captured("C-1", because=("direction", "miss", "(no From)"))),
    row("direction-reported-when-not-captured", Msg({"From": RITA, "To": "hm@example.com"}),
        passed(direction="outbound")),
]


@pytest.mark.parametrize(("msg", "expect"), DIRECTION)
def test_direction(msg: Msg, expect: Expect) -> None:
    check(msg.decide(), expect)


# --- candidate match ------------------------------------------------------------------------

CANDIDATE_MATCH = [
    row("candidate-in-from", Msg({"From": ADA, "To": RITA}),
        captured("C-1", because=("candidate-match", "hit", "ada@applicant.test is candidate C-1"))),
    row("candidate-in-to", Msg({"From": RITA, "To": ADA}), captured("C-1", direction="outbound")),
    row("candidate-in-cc", Msg({"From": RITA, "To": "client@customer.test", "Cc": ADA}),
        captured("C-1", direction="outbound")),
    row("candidate-in-reply-to",
        Msg({"From": "noreply@jobboard.test", "Reply-To": ADA, "To": RITA}), captured("C-1")),
    row("candidate-in-sender",
        Msg({"From": "portal@jobboard.test", "Sender": "ada@applicant.test", "To": RITA}),
        captured("C-1")),
    row("candidate-bcc-envelope-recipient",
        Msg({"From": RITA, "To": "hm@example.com"},
            envelope_recipients=("hm@example.com", "ada@applicant.test")),
        captured("C-1", direction="outbound")),
    row("candidate-envelope-sender",
        Msg({"From": "mailer@bounce.test", "To": RITA}, envelope_sender="ada@applicant.test"),
        captured("C-1")),
    row("candidate-any-case", Msg({"From": "Ada <ADA@APPLICANT.TEST>", "To": RITA}),
        captured("C-1")),
    row("candidate-second-address", Msg({"From": "ada.lovelace@Mail.test", "To": RITA}),
        captured("C-1")),
    row("candidate-idna-domain",
        Msg({"From": "=?UTF-8?Q?J=C3=BCrgen?= <Juergen@XN--BCHER-KVA.example>", "To": RITA}),
        captured("C-4", because=("candidate-match", "hit", "juergen@bücher.example"))),
    row("candidate-rfc2047-name",
        Msg({"From": "=?UTF-8?B?QWRhIEFwcGxpY2FudA==?= <ada@applicant.test>", "To": RITA}),
        captured("C-1")),
    row("two-candidates", Msg({"From": RITA, "To": f"{ADA}, grace@candidates.test"}),
        captured("C-1", "C-2", direction="outbound")),
    row("nobody-known", Msg({"From": "stranger@elsewhere.test", "To": RITA}),
        passed(because=("candidate-match", "miss", "no participant is a candidate"))),
    row("candidate-only-in-display-name",
        Msg({"From": '"ada@applicant.test" <eve@phish.test>', "To": RITA}), passed()),
    row("candidate-only-in-encoded-display-name",
        Msg({"From": "=?utf-8?q?ada=40applicant=2Etest?= <eve@phish.test>", "To": RITA}),
        passed()),
    row("candidate-only-in-subject-and-body",
        Msg({"From": "stranger@elsewhere.test", "To": RITA,
             "Subject": "About ada@applicant.test"}, body="Ada (ada@applicant.test) is great.\n"),
        passed()),
    row("internal-address-on-a-candidate-never-matches",
        Msg({"From": "bob@example.com", "To": RITA}),
        passed(direction="outbound",
               because=("candidate-match", "miss", "no participant is a candidate"))),
    row("internal-address-on-a-candidate-beside-a-real-candidate",
        Msg({"From": "bob@example.com", "To": f"{RITA}, {ADA}"}),
        captured("C-1", direction="outbound")),
    row("look-alike-domain-is-not-internal-so-it-matches",
        Msg({"From": RITA, "To": "eve@evilexample.com"}),
        captured("C-8", direction="outbound")),
]


@pytest.mark.parametrize(("msg", "expect"), CANDIDATE_MATCH)
def test_candidate_match(msg: Msg, expect: Expect) -> None:
    check(msg.decide(), expect)


# --- team scope -----------------------------------------------------------------------------

TEAM_SCOPE = [
    row("candidate-and-employee-not-on-team", Msg({"From": ADA, "To": "bob@example.com"}),
        passed(because=("team-scope", "miss", "bob@example.com are not on the team"))),
    row("employee-not-on-team-writes-candidate", Msg({"From": "hm@example.com", "To": ADA}),
        passed(direction="outbound", because=("team-scope", "miss", "not on the team"))),
    row("subdomain-employee-not-on-team", Msg({"From": ADA, "To": "carol@eu.example.com"}),
        passed(because=("team-scope", "miss", "carol@eu.example.com"))),
    row("no-internal-participant", Msg({"From": ADA, "To": "friend@elsewhere.test"}),
        passed(because=("team-scope", "miss", "no team member takes part"))),
    row("team-member-in-to", Msg({"From": ADA, "To": RITA}),
        captured("C-1", because=("team-scope", "hit", "recruiter@example.com"))),
    row("team-member-in-cc", Msg({"From": ADA, "To": "bob@example.com", "Cc": RITA}),
        captured("C-1")),
    row("team-member-bcc", Msg({"From": ADA, "To": "bob@example.com"},
                               envelope_recipients=("bob@example.com", "recruiter@example.com")),
        captured("C-1")),
    row("team-member-envelope-sender", Msg({"From": "hm@example.com", "To": ADA},
                                           envelope_sender="sourcer@example.com"),
        captured("C-1", direction="outbound")),
    row("team-member-outside-internal-domains",
        Msg({"From": ADA, "To": "agency.partner@freelance.test"}), captured("C-1")),
    row("team-member-any-case", Msg({"From": ADA, "To": "Sourcer@EXAMPLE.com"}),
        captured("C-1")),
    row("team-member-only-in-encoded-display-name",
        Msg({"From": ADA, "To": "bob@example.com",
             "Cc": "=?utf-8?q?recruiter=40example=2Ecom?= <eve@phish.test>"}),
        passed(because=("team-scope", "miss", "not on the team"))),
    row("look-alike-of-team-member-is-not-team",
        Msg({"From": ADA, "To": "recruiter@evilexample.com"}),
        passed(because=("team-scope", "miss", "no team member takes part"))),
]


@pytest.mark.parametrize(("msg", "expect"), TEAM_SCOPE)
def test_team_scope(msg: Msg, expect: Expect) -> None:
    decision = msg.decide()
    check(decision, expect)
    if not expect.capture and expect.because and expect.because[0] == "team-scope":
        assert decision.deciding_rules == ("team-scope",)


# --- thread link ---------------------------------------------------------------------------

THREAD_LINK = [
    row("in-reply-to-from-unknown-address",
        Msg({"From": "ada.work@newjob.test", "To": RITA, "Subject": "Re: Application",
             "In-Reply-To": "<m1@applicant.test>"}),
        captured("C-1", thread_id=7,
                 because=("thread-link", "hit", "replies to captured <m1@applicant.test> in "
                          "thread 7 (candidates C-1)"))),
    row("references-only",
        Msg({"From": "ada.work@newjob.test", "To": RITA, "References": "<m1@applicant.test>"}),
        captured("C-1", thread_id=7)),
    row("newest-reference-wins",
        Msg({"From": "x@elsewhere.test", "To": RITA,
             "References": "<m1@applicant.test> <unknown@x.test> <m2@candidates.test>"}),
        captured("C-2", thread_id=9)),
    row("in-reply-to-before-references",
        Msg({"From": "x@elsewhere.test", "To": RITA, "In-Reply-To": "<m1@applicant.test>",
             "References": "<m2@candidates.test>"}),
        captured("C-1", thread_id=7)),
    row("unknown-parent-then-known-reference",
        Msg({"From": "x@elsewhere.test", "To": RITA, "In-Reply-To": "<unknown@x.test>",
             "References": "<m1@applicant.test> <unknown@x.test>"}),
        captured("C-1", thread_id=7)),
    row("reply-from-the-candidate",
        Msg({"From": ADA, "To": RITA, "In-Reply-To": "<m1@applicant.test>"}),
        captured("C-1", thread_id=7)),
    row("outbound-reply-to-the-candidate",
        Msg({"From": RITA, "To": ADA, "In-Reply-To": "<m1@applicant.test>"}),
        captured("C-1", thread_id=7, direction="outbound")),
    row("reply-adds-another-candidate",
        Msg({"From": RITA, "To": "grace@candidates.test", "In-Reply-To": "<m1@applicant.test>"}),
        captured("C-1", "C-2", thread_id=7, direction="outbound")),
    row("in-reply-to-with-comment",
        Msg({"From": "x@elsewhere.test", "To": RITA,
             "In-Reply-To": "<m1@applicant.test> (Ada's message)"}),
        captured("C-1", thread_id=7)),
    row("unknown-message-id",
        Msg({"From": "x@elsewhere.test", "To": RITA, "In-Reply-To": "<nope@x.test>",
             "References": "<nope@x.test>"}),
        passed(because=("thread-link", "miss", "refers to no captured message"))),
    row("message-ids-are-case-sensitive",
        Msg({"From": "x@elsewhere.test", "To": RITA, "In-Reply-To": "<M1@applicant.test>"}),
        passed()),
    row("reply-among-colleagues-only",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Re: Application",
             "In-Reply-To": "<m1@applicant.test>", "References": "<m1@applicant.test>"}),
        passed(direction="outbound",
               because=("thread-link", "miss", "every participant is internal"))),
    row("reply-among-team-members-only",
        Msg({"From": RITA, "To": "sourcer@example.com, agency.partner@freelance.test",
             "In-Reply-To": "<m1@applicant.test>"}),
        passed(direction="outbound")),
    row("subject-alone-never-threads",
        Msg({"From": "x@elsewhere.test", "To": RITA, "Subject": "Re: Application"}),
        passed(because=("thread-link", "miss", "not a reply"))),
    row("candidate-reply-without-threading-headers-is-a-new-thread",
        Msg({"From": ADA, "To": RITA, "Subject": "Re: Application"}),
        captured("C-1", because=("thread-link", "miss", "not a reply"))),
    row("reply-outside-the-team",
        Msg({"From": "x@elsewhere.test", "To": "bob@example.com",
             "In-Reply-To": "<m1@applicant.test>"}),
        passed(because=("team-scope", "miss", "not on the team"))),
    row("reply-on-a-mailing-list",
        Msg({"From": "x@elsewhere.test", "To": RITA, "In-Reply-To": "<m1@applicant.test>",
             "List-Id": "<dev.lists.test>"}),
        passed(because=("bulk", "hit", "List-Id"))),
]


@pytest.mark.parametrize(("msg", "expect"), THREAD_LINK)
def test_thread_link(msg: Msg, expect: Expect) -> None:
    check(msg.decide(), expect)


# --- forwards ------------------------------------------------------------------------------

FORWARD_FIXTURES = [
    pytest.param("forward_gmail_inline.eml", id="gmail-inline"),
    pytest.param("forward_attached_rfc822.eml", id="attached-rfc822"),
    pytest.param("forward_apple.eml", id="apple"),
    pytest.param("forward_thunderbird_de.eml", id="thunderbird-de"),
    pytest.param("outlook_forward_de.eml", id="outlook-de"),
]
OUTLOOK_365 = pytest.param(
    "outlook_forward_modern_de.eml", id="outlook-365-de")


@pytest.mark.parametrize("name", [*FORWARD_FIXTURES, OUTLOOK_365])
def test_forward_of_candidate_mail_is_a_new_thread(name: str) -> None:
    # Rita forwards Ada's application to Harry; Ada is not a recipient.
    decision = Msg(fixture=name).decide()
    check(decision, captured("C-1", direction="outbound", because=(
        "forward", "hit", "forwarded original involves ada@applicant.test, candidate C-1")))
    assert "captured as a new thread" in entry(decision, "forward").reasons
    assert entry(decision, "candidate-match").verdict == "miss"


@pytest.mark.parametrize("name", FORWARD_FIXTURES)
def test_capture_forwards_off(name: str) -> None:
    decision = Msg(fixture=name, ctx={"capture_forwards": False}).decide()
    check(decision, passed(direction="outbound",
                           because=("forward", "miss", "capture_forwards is off")))


def _fwd_body(header_block: str, intro: str = "See below.") -> str:
    return f"{intro}\n\n---------- Forwarded message ---------\n{header_block}\n\nHello there\n"


@dataclass(frozen=True)
class _RawMsg(Msg):
    """A message whose own Content-Type header replaces the plain-text default."""

    def raw(self) -> bytes:
        lines = [f"{k}: {v}" for k, v in self.headers.items()] + ["MIME-Version: 1.0"]
        return ("\r\n".join(lines) + "\r\n\r\n" + self.body.replace("\n", "\r\n")).encode()


def _attached(outer: Mapping[str, str], original: str) -> Msg:
    body = ("--outer\nContent-Type: text/plain\n\nSee attached.\n"
            f"--outer\nContent-Type: message/rfc822\n\n{original}\n--outer--\n")
    headers = {**outer, "Content-Type": 'multipart/mixed; boundary="outer"'}
    return _RawMsg(headers=headers, body=body)


FORWARD = [
    row("linked-by-references-only",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Fwd: Application",
             "References": "<m1@applicant.test>"}),
        captured("C-1", direction="outbound",
                 because=("forward", "hit", "forwards captured <m1@applicant.test>"))),
    row("linked-by-in-reply-to-to-an-outsider-still-a-new-thread",
        Msg({"From": RITA, "To": "client@customer.test", "Subject": "Fwd: Application",
             "In-Reply-To": "<m1@applicant.test>", "References": "<m1@applicant.test>"}),
        captured("C-1", direction="outbound",
                 because=("forward", "hit", "forwards captured <m1@applicant.test>"))),
    row("original-names-candidate-as-to",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Fwd: Offer"},
            _fwd_body("From: Rita <recruiter@example.com>\nTo: Grace <grace@candidates.test>")),
        captured("C-2", direction="outbound",
                 because=("forward", "hit", "involves grace@candidates.test, candidate C-2"))),
    row("fw-prefix-outlook-original-message",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "FW: Application"},
            "See below.\n\n-----Original Message-----\nFrom: Ada <ada@applicant.test>\n"
            "Sent: Thursday, November 26, 2026 6:40 PM\nTo: jobs@example.com\n\nHi\n"),
        captured("C-1", direction="outbound", because=("forward", "hit", "Fwd subject"))),
    row("tr-prefix-french",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "TR: Candidature"},
            "Voir ci-dessous.\n\n-------- Message transféré --------\nSujet : Candidature\n"
            "De : Ada <ada@applicant.test>\n\nBonjour\n"),
        captured("C-1", direction="outbound")),
    row("rv-prefix-spanish",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "RV: Solicitud"},
            "Mira.\n\n---------- Mensaje reenviado ---------\nDe: Ada <ada@applicant.test>\n"
            "Para: <jobs@example.com>\n\nHola\n"),
        captured("C-1", direction="outbound")),
    row("inline-block-without-subject-prefix",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Have a look"},
            _fwd_body(f"From: {ADA}\nTo: jobs@example.com")),
        captured("C-1", direction="outbound",
                 because=("forward", "hit", "inline forwarded block"))),
    row("attached-original-known-by-message-id",
        _attached({"From": RITA, "To": "hm@example.com", "Subject": "Please review"},
                  "From: Ada <ada.private@unknown.test>\nMessage-ID: <m1@applicant.test>\n\nHi"),
        captured("C-1", direction="outbound",
                 because=("forward", "hit", "forwards captured <m1@applicant.test>"))),
    row("attached-original-from-candidate",
        _attached({"From": RITA, "To": "hm@example.com", "Subject": "Please review"},
                  "From: Grace <grace@candidates.test>\nTo: jobs@example.com\n\nHi"),
        captured("C-2", direction="outbound", because=("forward", "hit", "attached message"))),
    row("forward-of-two-candidates",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Fwd: shortlist"},
            _fwd_body(f"From: {ADA}\nCc: grace@candidates.test")),
        captured("C-1", "C-2", direction="outbound")),
    row("forward-of-non-candidate-mail",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Fwd: Invoice"},
            _fwd_body("From: Vendor <sales@vendor.test>\nTo: jobs@example.com")),
        passed(direction="outbound",
               because=("forward", "miss", "the forwarded mail involves no candidate"))),
    row("fwd-subject-with-nothing-forwarded",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Fwd: lunch?"}),
        passed(direction="outbound", because=("forward", "miss", "involves no candidate"))),
    row("candidate-named-only-below-the-header-block",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Fwd: Invoice"},
            _fwd_body("From: Vendor <sales@vendor.test>")
            + "PS: Ada (ada@applicant.test) recommended us.\n"),
        passed(direction="outbound")),
    row("original-message-in-a-plain-reply-is-not-a-forward",
        Msg({"From": "hm@example.com", "To": RITA, "Subject": "Re: Application"},
            "Looks good.\n\n-----Original Message-----\nFrom: Ada <ada@applicant.test>\n\nHi\n"),
        passed(direction="outbound", because=("forward", "miss", "not a forward"))),
    row("forward-of-archived-candidate",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Fwd: Application"},
            _fwd_body("From: Archie <archie@old.test>")),
        passed(direction="outbound", because=("archived-jobs", "hit", "C-3"))),
    row("forward-between-employees-not-on-team",
        Msg({"From": "bob@example.com", "To": "carol@eu.example.com",
             "Subject": "Fwd: Application"}, _fwd_body(f"From: {ADA}")),
        passed(direction="outbound", because=("team-scope", "miss", "not on the team"))),
    row("forward-on-a-mailing-list",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Fwd: Application",
             "Precedence": "bulk"}, _fwd_body(f"From: {ADA}")),
        passed(direction="outbound", because=("bulk", "hit", "Precedence: bulk"))),
    row("forward-addressed-to-the-candidate-with-forwards-off",
        Msg({"From": RITA, "To": ADA, "Subject": "Fwd: Job description"},
            _fwd_body("From: Harry <hm@example.com>\nTo: Rita <recruiter@example.com>"),
            ctx={"capture_forwards": False}),
        captured("C-1", direction="outbound",
                 because=("candidate-match", "hit", "ada@applicant.test is candidate C-1"))),
    row("linked-forward-with-forwards-off",
        Msg({"From": RITA, "To": "hm@example.com", "Subject": "Fwd: Application",
             "References": "<m1@applicant.test>"}, ctx={"capture_forwards": False}),
        passed(direction="outbound", because=("forward", "miss", "capture_forwards is off"))),
    # A reply is not a forward, even when the subject or the quote carries one.
    row("candidate-reply-to-a-fwd-subject-stays-in-its-thread",
        Msg({"From": ADA, "To": RITA, "Subject": "Re: Fwd: Job description",
             "In-Reply-To": "<m1@applicant.test>", "References": "<m1@applicant.test>"}),
        captured("C-1", thread_id=7)),
    row("candidate-reply-quoting-a-forward-stays-in-its-thread",
        Msg({"From": ADA, "To": RITA, "Subject": "Re: Job description",
             "In-Reply-To": "<m1@applicant.test>"},
            "Sounds great, thanks!\n\n> ---------- Forwarded message ---------\n"
            "> From: Harry <hm@example.com>\n> To: Rita <recruiter@example.com>\n>\n"
            "> Job description\n"),
        captured("C-1", thread_id=7)),
    row("colleague-reply-to-a-captured-forward-is-not-captured",
        Msg({"From": "hm@example.com", "To": RITA, "Subject": "Re: Fwd: Application",
             "In-Reply-To": "<fwd1@example.com>",
             "References": "<m1@applicant.test> <fwd1@example.com>"}),
        passed(direction="outbound")),
]


@pytest.mark.parametrize(("msg", "expect"), FORWARD)
def test_forward(msg: Msg, expect: Expect) -> None:
    check(msg.decide(), expect)


# --- archived jobs ------------------------------------------------------------------------

ARCHIVED_JOBS = [
    row("only-job-archived", Msg({"From": "archie@old.test", "To": RITA}),
        passed(because=("archived-jobs", "hit", "every job of C-3 is archived"))),
    row("every-job-archived", Msg({"From": RITA, "To": "avery@old.test"}),
        passed(direction="outbound", because=("archived-jobs", "hit", "C-9"))),
    row("one-open-job-left", Msg({"From": "mia@mixed.test", "To": RITA}),
        captured("C-6", because=("archived-jobs", "miss", "no candidate involved"))),
    row("no-job-at-all", Msg({"From": "nora@nojob.test", "To": RITA}), captured("C-5")),
    row("two-candidates-one-archived",
        Msg({"From": RITA, "To": "ada@applicant.test, archie@old.test"}),
        captured("C-1", direction="outbound", because=("archived-jobs", "hit", "C-3"))),
    row("thread-link-to-archived-candidate",
        Msg({"From": "x@elsewhere.test", "To": RITA, "In-Reply-To": "<m3@old.test>"}),
        passed(because=("thread-link", "hit", "thread 11"))),
    row("thread-link-to-thread-with-one-archived-candidate",
        Msg({"From": "x@elsewhere.test", "To": RITA, "In-Reply-To": "<m4@example.com>"}),
        captured("C-1", thread_id=12)),
    row("job-archived-after-capture",
        Msg({"From": ADA, "To": RITA, "In-Reply-To": "<m1@applicant.test>"},
            ctx={"cast": {**CAST, "C-1": replace(CAST["C-1"], jobs=(("J1", ARCHIVED),))}}),
        passed(because=("archived-jobs", "hit", "C-1"))),
    row("job-reopened",
        Msg({"From": "archie@old.test", "To": RITA},
            ctx={"cast": {**CAST, "C-3": replace(CAST["C-3"], jobs=(("J3", OPEN),))}}),
        captured("C-3")),
]


@pytest.mark.parametrize(("msg", "expect"), ARCHIVED_JOBS)
def test_archived_jobs(msg: Msg, expect: Expect) -> None:
    check(msg.decide(), expect)


@pytest.mark.parametrize(("jobs", "active"), [
    pytest.param((), True, id="no-job"),
    pytest.param((("J1", OPEN),), True, id="open"),
    pytest.param((("J1", ARCHIVED),), False, id="archived"),
    pytest.param((("J1", ARCHIVED), ("J2", OPEN)), True, id="one-open"),
    pytest.param((("J1", ARCHIVED), ("J2", ARCHIVED)), False, id="all-archived"),
])
def test_candidate_active(jobs: tuple[tuple[str, bool], ...], active: bool) -> None:
    assert CandidateInfo("C", "C", frozenset(), jobs).active is active


# --- bulk ----------------------------------------------------------------------------------

BULK = [
    row("list-id", Msg({"From": ADA, "To": RITA, "List-Id": "Dev <dev.lists.test>"}),
        passed(because=("bulk", "hit", "List-Id: Dev <dev.lists.test>"))),
    row("list-unsubscribe",
        Msg({"From": ADA, "To": RITA, "List-Unsubscribe": "<mailto:leave@lists.test>"}),
        passed(because=("bulk", "hit", "has List-Unsubscribe"))),
    row("precedence-bulk", Msg({"From": ADA, "To": RITA, "Precedence": "bulk"}),
        passed(because=("bulk", "hit", "Precedence: bulk"))),
    row("precedence-list", Msg({"From": ADA, "To": RITA, "Precedence": "list"}),
        passed(because=("bulk", "hit", "Precedence: list"))),
    row("precedence-junk", Msg({"From": ADA, "To": RITA, "Precedence": "junk"}),
        passed(because=("bulk", "hit", "Precedence: junk"))),
    row("precedence-any-case", Msg({"From": ADA, "To": RITA, "Precedence": "BULK"}),
        passed(because=("bulk", "hit", "Precedence: bulk"))),
    row("outbound-newsletter-to-candidate",
        Msg({"From": RITA, "To": ADA, "List-Unsubscribe": "<https://example.com/unsub>"}),
        passed(direction="outbound", because=("bulk", "hit", "bulk mail is not captured"))),
    row("mailing-list-fixture",
        Msg(fixture="mailing_list.eml", envelope_recipients=("recruiter@example.com",)),
        passed(because=("bulk", "hit", "Precedence: list"))),
    row("precedence-first-class-is-not-bulk",
        Msg({"From": ADA, "To": RITA, "Precedence": "first-class"}),
        captured("C-1", because=("bulk", "miss", "no list or bulk headers"))),
    row("list-post-alone-is-not-bulk",
        Msg({"From": ADA, "To": RITA, "List-Post": "<mailto:dev@lists.test>"}), captured("C-1")),
]


@pytest.mark.parametrize(("msg", "expect"), BULK)
def test_bulk(msg: Msg, expect: Expect) -> None:
    decision = msg.decide()
    check(decision, expect)
    if not expect.capture:
        assert "bulk" in decision.deciding_rules


# --- every participant, from the fixtures -------------------------------------------------


@pytest.mark.parametrize(("name", "envelope", "expect"), [
    pytest.param("malformed_headers.eml", (None, ()), captured("C-1"), id="malformed-headers"),
    pytest.param("bad_charset.eml", (None, ()), captured("C-1"), id="bad-charset"),
    pytest.param("nul_bytes.eml", (None, ()), captured("C-1"), id="nul-bytes"),
])
def test_fixtures_are_judged(name: str, envelope: tuple[Any, Any], expect: Expect) -> None:
    check(Msg(fixture=name, envelope_sender=envelope[0],
              envelope_recipients=envelope[1]).decide(), expect)


def test_idna_candidate_from_the_encoded_fixture() -> None:
    cast = {**CAST, "C-10": _candidate("C-10", "Jürgen", "juergen.mueller@bücher.example",
                                       jobs=(("J1", OPEN),))}
    decision = Msg(fixture="rfc2047_idna.eml", ctx={"cast": cast}).decide()
    check(decision, captured("C-10", because=(
        "candidate-match", "hit", "juergen.mueller@bücher.example is candidate C-10")))


# --- the trace ------------------------------------------------------------------------------

RULE_NAMES = tuple(rule.name for rule in RULES)
H, M = "hit", "miss"


def test_rule_table() -> None:
    assert len(set(RULE_NAMES)) == len(RULE_NAMES), "rule names are unique"
    assert set(RULE_NAMES) >= {"bulk", "direction", "team-scope", "thread-link",
                               "candidate-match", "forward", "archived-jobs"}
    for rule in RULES:
        assert rule.name and rule.description, rule


@pytest.mark.parametrize(("msg", "verdicts"), [
    pytest.param(Msg({"From": ADA, "To": RITA}),
                 {"bulk": M, "direction": M, "team-scope": H, "thread-link": M,
                  "candidate-match": H, "forward": M, "ats-inbox": M,
                  "archived-jobs": M}, id="inbound-capture"),
    pytest.param(Msg({"From": RITA, "To": ADA, "In-Reply-To": "<m1@applicant.test>"}),
                 {"bulk": M, "direction": H, "team-scope": H, "thread-link": H,
                  "candidate-match": H, "forward": M, "ats-inbox": M,
                  "archived-jobs": M}, id="outbound-reply"),
    pytest.param(Msg(fixture="forward_gmail_inline.eml"),
                 {"bulk": M, "direction": H, "team-scope": H, "thread-link": M,
                  "candidate-match": M, "forward": H, "ats-inbox": M,
                  "archived-jobs": M}, id="forward"),
    pytest.param(Msg({"From": ADA, "To": RITA, "List-Id": "<l.test>"}),
                 {"bulk": H, "direction": M, "team-scope": H, "thread-link": M,
                  "candidate-match": H, "forward": M, "ats-inbox": M,
                  "archived-jobs": M}, id="bulk-veto"),
    pytest.param(Msg({"From": "archie@old.test", "To": "bob@example.com"}),
                 {"bulk": M, "direction": M, "team-scope": M, "thread-link": M,
                  "candidate-match": H, "forward": M, "ats-inbox": M,
                  "archived-jobs": H}, id="nothing-captured"),
    pytest.param(Msg(), {"bulk": M, "direction": M, "team-scope": M, "thread-link": M,
                         "candidate-match": M, "forward": M, "ats-inbox": M,
                  "archived-jobs": M},
                 id="empty-message"),
])
def test_trace_has_every_rule_once_in_order(msg: Msg, verdicts: dict[str, str]) -> None:
    decision = msg.decide()
    assert tuple(t.rule for t in decision.trace) == RULE_NAMES
    for t in decision.trace:
        assert t.verdict in ("hit", "miss")
        assert isinstance(t.reasons, tuple) and t.reasons, t
        assert all(isinstance(r, str) and r.strip() for r in t.reasons), t
    assert {t.rule: t.verdict for t in decision.trace} == verdicts


@pytest.mark.parametrize(("msg", "deciding"), [
    pytest.param(Msg({"From": ADA, "To": RITA}), ("team-scope", "candidate-match"),
                 id="capture-names-the-hits"),
    pytest.param(Msg({"From": ADA, "To": "bob@example.com"}), ("team-scope",),
                 id="veto-names-the-veto"),
    pytest.param(Msg({"From": ADA, "To": "bob@example.com", "Precedence": "bulk"}),
                 ("bulk", "team-scope"), id="every-veto-in-order"),
])
def test_deciding_rules(msg: Msg, deciding: tuple[str, ...]) -> None:
    assert msg.decide().deciding_rules == deciding


@pytest.mark.parametrize(("msg", "walked"), [
    pytest.param(Msg({"From": ADA, "To": RITA, "List-Id": "<l.test>"}), ("bulk",),
                 id="bulk-stops-at-once"),
    pytest.param(Msg({"From": ADA, "To": "bob@example.com"}),
                 ("bulk", "direction", "team-scope"), id="team-scope-stops-there"),
])
def test_vetoed_stops_at_the_veto(msg: Msg, walked: tuple[str, ...]) -> None:
    facts = read_message(msg.raw())
    ctx = context_for(facts)
    full, quick = decide(facts, ctx), vetoed(facts, ctx)
    assert quick is not None and full.vetoed
    assert tuple(t.rule for t in quick.trace) == walked
    assert (quick.capture, quick.candidates, quick.thread_id, quick.direction,
            quick.deciding_rules[:1]) == (full.capture, full.candidates, full.thread_id,
                                          full.direction, full.deciding_rules[:1])


def test_vetoed_walks_no_further_than_the_last_rule_that_can_veto() -> None:
    # A forward that no rule vetoes: the rules past team-scope, which would
    # read its body, are left to the full walk.
    facts = read_message(mail({"From": ADA, "To": RITA, "Subject": "Fwd: CV"}))
    assert vetoed(facts, Context(internal_domains=DOMAINS, team=TEAM)) is None
    assert "forward" not in facts.__dict__
    assert not decide(facts, context_for(facts)).vetoed
    assert max(i for i, rule in enumerate(RULES) if rule.can_veto) < RULE_NAMES.index(
        "thread-link")


def test_a_veto_from_a_rule_that_cannot_veto_is_an_error() -> None:
    facts = read_message(b"From: a@b.test\r\n\r\n")
    with pytest.raises(TypeError, match="r0 vetoed"):
        evaluate(facts, Context(), [Stub("r0", miss(veto=True), can_veto=False)])


def test_trace_as_explain_json() -> None:
    decision = Msg({"From": ADA, "To": RITA, "In-Reply-To": "<m1@applicant.test>"}).decide()
    explained = {"capture": decision.capture, "candidates": list(decision.candidates),
                 "thread": decision.thread, "trace": [t.to_json() for t in decision.trace]}
    back = json.loads(json.dumps(explained, ensure_ascii=False))
    assert back["capture"] is True
    assert back["candidates"] == ["C-1"]
    assert back["thread"] == "existing"
    assert [t["rule"] for t in back["trace"]] == list(RULE_NAMES)
    for item, t in zip(back["trace"], decision.trace, strict=True):
        assert set(item) == {"rule", "verdict", "reasons"}
        assert item == {"rule": t.rule, "verdict": t.verdict, "reasons": list(t.reasons)}
    link = next(t for t in back["trace"] if t["rule"] == "thread-link")
    assert link["verdict"] == "hit"
    assert link["reasons"] == ["replies to captured <m1@applicant.test> in thread 7 "
                               "(candidates C-1)"]


def test_trace_entry_to_json() -> None:
    assert TraceEntry("bulk", "miss", ("a", "b")).to_json() == {
        "rule": "bulk", "verdict": "miss", "reasons": ["a", "b"]}


# --- the engine, with stand-in rules --------------------------------------------------------


@dataclass
class Stub:
    name: str
    verdict: Verdict
    description: str = "a stand-in rule"
    can_veto: bool = True

    def check(self, msg: MessageFacts, ctx: Context) -> Verdict:
        return self.verdict


def hit(**kw: Any) -> Verdict:
    return Verdict(True, ("hit",), **kw)


def miss(**kw: Any) -> Verdict:
    return Verdict(False, ("miss",), **kw)


@pytest.mark.parametrize(("verdicts", "expected"), [
    pytest.param([hit(candidates=frozenset({"B", "A"}))],
                 (True, ("A", "B"), None, "inbound"), id="candidates-sorted"),
    pytest.param([hit(candidates=frozenset({"B"})), hit(candidates=frozenset({"A", "B"}))],
                 (True, ("B", "A"), None, "inbound"), id="first-seen-order"),
    pytest.param([hit(candidates=frozenset({"A"})), hit(veto=True)],
                 (False, (), None, "inbound"), id="hit-veto"),
    pytest.param([hit(candidates=frozenset({"A"})), miss(veto=True)],
                 (False, (), None, "inbound"), id="miss-veto"),
    pytest.param([hit(candidates=frozenset({"A"}), excluded=frozenset({"A"}))],
                 (False, (), None, "inbound"), id="all-excluded"),
    pytest.param([hit(candidates=frozenset({"A", "B"})), hit(excluded=frozenset({"A"}))],
                 (True, ("B",), None, "inbound"), id="one-excluded"),
    pytest.param([miss(candidates=frozenset({"A"}), thread_id=3, direction="outbound")],
                 (False, (), None, "inbound"), id="a-miss-contributes-nothing"),
    pytest.param([hit(candidates=frozenset({"A"}), thread_id=3), hit(thread_id=4)],
                 (True, ("A",), 3, "inbound"), id="first-thread-wins"),
    pytest.param([hit(candidates=frozenset({"A"}), thread_id=3), hit(new_thread=True)],
                 (True, ("A",), None, "inbound"), id="new-thread-wins"),
    pytest.param([hit(thread_id=3)], (False, (), None, "inbound"),
                 id="thread-without-candidates-is-not-captured"),
    pytest.param([hit(direction="outbound"), hit(candidates=frozenset({"A"}))],
                 (True, ("A",), None, "outbound"), id="direction-kept"),
    pytest.param([], (False, (), None, "inbound"), id="no-rules"),
])
def test_engine_folds_verdicts(verdicts: list[Verdict],
                               expected: tuple[bool, tuple[str, ...], int | None, str]) -> None:
    rules = [Stub(f"r{i}", v) for i, v in enumerate(verdicts)]
    facts = read_message(b"From: a@b.test\r\n\r\n")
    decision = evaluate(facts, Context(), rules)
    assert (decision.capture, decision.candidates, decision.thread_id,
            decision.direction) == expected
    assert [t.rule for t in decision.trace] == [r.name for r in rules]
    assert [t.verdict for t in decision.trace] == ["hit" if v.hit else "miss" for v in verdicts]


def test_decide_runs_the_standard_table() -> None:
    facts = read_message(mail({"From": ADA, "To": RITA}))
    ctx = context_for(facts)
    assert decide(facts, ctx) == evaluate(facts, ctx, RULES)


def _to_inbox(original_from: str, forward: bool = True) -> bytes:
    body = (f"---------- Forwarded message ---------\nFrom: {original_from}\n"
            "Subject: Application\n\nMy CV.\n") if forward else "Hello ATS\n"
    return (f"From: recruiter@example.com\r\nTo: ats@example.com\r\n"
            f"Subject: {'Fwd: ' if forward else ''}Application\r\n\r\n{body}").encode()


@pytest.mark.parametrize(("raw", "inbox", "intake", "verdict", "reason"), [
    pytest.param(_to_inbox("Neo Applicant <neo@applicant.test>"), "ats@example.com",
                 ("neo@applicant.test", "Neo Applicant"), "hit", "becomes a new candidate",
                 id="new-sender-becomes-a-candidate"),
    pytest.param(_to_inbox("Ada <ada@applicant.test>"), "ats@example.com", None, "hit",
                 "already candidate C-1", id="known-sender-is-captured-on-them"),
    pytest.param(_to_inbox("Colleague <bob@example.com>"), "ats@example.com", None, "miss",
                 "internal", id="internal-original-is-no-candidate"),
    pytest.param(_to_inbox("x", forward=False), "ats@example.com", None, "miss",
                 "forwards no one", id="not-a-forward"),
    pytest.param(_to_inbox("Neo <neo@applicant.test>"), None, None, "miss",
                 "not addressed to the ATS inbox", id="no-inbox-configured"),
])
def test_ats_inbox(raw: bytes, inbox: str | None, intake: tuple[str, str] | None,
                   verdict: str, reason: str) -> None:
    from atsmail.rules import CandidateInfo, Context, decide, read_message
    facts = read_message(raw, "recruiter@example.com", ["ats@example.com"])
    ada = CandidateInfo("C-1", "Ada", frozenset({"ada@applicant.test"}))
    context = Context(internal_domains=frozenset({"example.com"}),
                      team=frozenset({"recruiter@example.com"}),
                      candidates={"C-1": ada}, ats_inbox=inbox)
    decision = decide(facts, context)
    entry = next(t for t in decision.trace if t.rule == "ats-inbox")
    assert entry.verdict == verdict and reason in " ".join(entry.reasons)
    assert decision.intake == intake


@pytest.mark.parametrize("capture_forwards", [True, False])
def test_a_reply_that_attaches_what_it_answers_stays_in_its_thread(
        capture_forwards: bool) -> None:
    from atsmail.rules import CandidateInfo, Context, KnownMessage, decide, read_message
    original = (b"From: Ada <ada@applicant.test>\r\nSubject: Interview\r\n"
                b"Message-ID: <int-1@example.com>\r\n\r\nhi\r\n")
    raw = (b"From: ada.private@home.test\r\nTo: recruiter@example.com\r\n"
           b"Subject: Re: Interview\r\nIn-Reply-To: <int-1@example.com>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nSee below\r\n"
           b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + original + b"\r\n--b--\r\n")
    context = Context(
        internal_domains=frozenset({"example.com"}), team=frozenset({"recruiter@example.com"}),
        candidates={"C-1": CandidateInfo("C-1", "Ada", frozenset({"ada@applicant.test"}))},
        known_messages={"int-1@example.com": KnownMessage("int-1@example.com", 7,
                                                          frozenset({"C-1"}))},
        capture_forwards=capture_forwards)
    decision = decide(read_message(raw), context)
    assert (decision.capture, decision.thread_id, decision.candidates) == (True, 7, ("C-1",))
