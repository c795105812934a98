"""Who sees which captured mail: shared mailboxes and personal sharing levels."""

from __future__ import annotations

import pytest

from atsmail.rules import decide, read_message
from atsmail.storage import Capture, CaptureWriter, Store, UserError
from atsmail.storage.mailboxes import Account, Mailboxes
from atsmail.storage.visibility import MailboxRule, Viewer, access
from tests.conftest import make_mail

ALICE, BOB, CARL, COMP = ("alice@example.com", "bob@example.com", "carl@example.com",
                          "comp@example.com")
JOBS = MailboxRule("jobs@example.com", None, True, frozenset({ALICE}), "full")
BOBS = MailboxRule(BOB, BOB, False, frozenset(), "metadata")
CARLS = MailboxRule(CARL, CARL, False, frozenset(), "subject")
BOXES = {b.address: b for b in (JOBS, BOBS, CARLS)}


def viewer(email: str, role: str = "recruiter") -> Viewer:
    return Viewer(email, role, frozenset({email}))


@pytest.mark.parametrize(("who", "participants", "read_from", "expected"), [
    # Mail no mailbox is involved in is the team's.
    (viewer(ALICE), ["ada@applicant.test", "rita@example.com"], [], "full"),
    # A shared mailbox: the people it lists only...
    (viewer(ALICE), ["ada@applicant.test", "jobs@example.com"], [], "full"),
    (viewer(CARL), ["ada@applicant.test", "jobs@example.com"], [], None),
    # ...also when it was only read from there (a Bcc).
    (viewer(CARL), ["ada@applicant.test", "rita@example.com"], ["jobs@example.com"], None),
    # ...except for whoever takes part, and compliance.
    (viewer(CARL), ["ada@applicant.test", "jobs@example.com", CARL], [], "full"),
    (viewer(COMP, "compliance"), ["ada@applicant.test", "jobs@example.com"], [], "full"),
    # Admins are not reviewers: no exception for them.
    (viewer("root@example.com", "admin"), ["ada@applicant.test", "jobs@example.com"], [],
     None),
    # A personal mailbox: its owner in full, the rest at its sharing level.
    (viewer(BOB), ["ada@applicant.test"], [BOB], "full"),
    (viewer(ALICE), ["ada@applicant.test", BOB], [], "metadata"),
    (viewer(ALICE), ["ada@applicant.test", CARL], [], "subject"),
    # Seen in two personal mailboxes: the more open one decides.
    (viewer(ALICE), ["ada@applicant.test", BOB, CARL], [], "subject"),
    # A shared mailbox's limit wins over a personal mailbox's openness.
    (viewer(BOB), ["ada@applicant.test", CARL], ["jobs@example.com"], None),
])
def test_access(who: Viewer, participants: list[str], read_from: list[str],
                expected: str | None) -> None:
    assert access(who, participants, read_from, BOXES) == expected


async def captured(store: Store, raw: bytes, mailbox: str = "") -> None:
    facts = read_message(raw)
    decision = decide(facts, await store.context_for(facts, capture_forwards=True))
    assert decision.capture, decision.trace
    writer = CaptureWriter(store.db)
    await writer.start()
    try:
        await writer.confirm(await writer.prepare(
            Capture(facts, decision, raw, "mirror" if mailbox else "relay", mailbox=mailbox)))
    finally:
        await writer.stop()


def account(address: str, owner: str | None, visible_to: list[str]) -> Account:
    return Account(address=address, provider="imap", owner=owner, shared=owner is None,
                   visible_to=visible_to, imap_host="127.0.0.1", imap_port=1,
                   smtp_host="127.0.0.1", smtp_port=1, security="none", username=address,
                   sealed_secret=b"sealed")


async def test_every_reading_path_of_the_store_applies_the_limits(team: Store) -> None:
    for email, role in ((ALICE, "recruiter"), (BOB, "recruiter"), (CARL, "recruiter"),
                        (COMP, "compliance")):
        await team.add_team_member(email, email.split("@")[0].title(), role)
    boxes = Mailboxes(team.db)
    await boxes.connect(account("jobs@example.com", None, [ALICE]))
    await boxes.connect(account(BOB, BOB, []))
    await boxes.set_sharing(BOB, "metadata")
    await captured(team, make_mail("ada@applicant.test", "jobs@example.com", "My CV"),
                   mailbox="jobs@example.com")
    await captured(team, make_mail(BOB, "ada@applicant.test", "Salary talk"), mailbox=BOB)

    def shown(threads: list) -> list[tuple[str, int]]:  # type: ignore[type-arg]
        return sorted((t.subject, t.message_count) for t in threads)

    everything = await team.threads("C-1")
    assert shown(everything) == [("My CV", 1), ("Salary talk", 1)]
    assert shown(await team.threads("C-1", await team.viewer(ALICE))) == [
        ("", 1), ("My CV", 1)]
    assert shown(await team.threads("C-1", await team.viewer(CARL))) == [("", 1)]
    assert shown(await team.threads(None, await team.viewer(BOB))) == [("Salary talk", 1)]
    assert shown(await team.threads("C-1", await team.viewer(COMP))) == shown(everything)

    cv = next(t.id for t in everything if t.subject == "My CV")
    salary = next(t.id for t in everything if t.subject == "Salary talk")
    with pytest.raises(UserError, match=f"unknown thread {cv}"):
        await team.thread(cv, await team.viewer(CARL))
    detail = await team.thread(salary, await team.viewer(CARL))
    [message] = detail.messages
    assert (detail.subject, message["subject"], message["access"], message["trace"]) == (
        "", "", "metadata", [])
    assert message["from"] == BOB and message["date"]
    assert (await team.thread(salary, await team.viewer(BOB))).messages[0]["access"] == "full"
    with pytest.raises(UserError, match="not a team member"):
        await team.viewer("stranger@example.com")
    with pytest.raises(UserError, match="shared mailbox"):
        await boxes.set_sharing("jobs@example.com", "full")
