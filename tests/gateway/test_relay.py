"""The relay end to end: real SMTP in, a real SMTP sink upstream, a real store.

Each test sends through the running relay and then looks at what the sink
received and what the store captured, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import random
import threading
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP
from sqlalchemy import text

from atsmail.config import Upstream
from atsmail.gateway.relay import PARSE_IN_THREAD_ABOVE
from atsmail.gateway.server import Gateway
from atsmail.rules import message as message_module
from atsmail.storage import Store
from tests.conftest import GatewayFactory, Sink, eventually, make_mail, smtp_send

RECRUITER = "recruiter@example.com"
ADA = "ada@applicant.test"
GRACE = "grace@candidates.test"


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def send(gateway: Gateway, raw: bytes, mail_from: str, rcpts: list[str]) -> int:
    result = await smtp_send(gateway.relay.port, raw, mail_from, rcpts)
    return result.code


async def test_candidate_mail_is_delivered_byte_for_byte_and_captured(
        relay: Gateway, sink: Sink, team: Store) -> None:
    raw = make_mail(RECRUITER, ADA, "Your application", "Dear Ada,\n\nthank you.\n")
    assert await send(relay, raw, RECRUITER, [ADA]) == 250

    assert len(sink.messages) == 1
    assert sink.messages[0].content == crlf(raw)
    assert sink.messages[0].rcpt_tos == [ADA]
    threads = await team.threads("C-1")
    assert [(t.subject, t.candidates, t.message_count) for t in threads] == [
        ("Your application", ["C-1"], 1)]
    detail = await team.thread(threads[0].id)
    message = detail.messages[0]
    assert (message["direction"], message["source"], message["from"], message["to"]) == (
        "outbound", "relay", RECRUITER, [ADA])
    assert [t["rule"] for t in message["trace"]][:3] == ["bulk", "direction", "team-scope"]


async def test_company_mail_passes_and_is_not_stored(
        relay: Gateway, sink: Sink, team: Store) -> None:
    raw = make_mail("colleague@example.com", "boss@example.com", "Lunch?")
    assert await send(relay, raw, "colleague@example.com", ["boss@example.com"]) == 250
    outside = make_mail("newsletter@shop.test", "someone@example.com", "Sale")
    assert await send(relay, outside, "newsletter@shop.test", ["someone@example.com"]) == 250
    assert len(sink.messages) == 2
    assert await team.threads() == []


async def test_candidate_with_employee_off_the_team_is_not_captured(
        relay: Gateway, sink: Sink, team: Store) -> None:
    raw = make_mail(ADA, "friend@example.com", "Coffee")
    assert await send(relay, raw, ADA, ["friend@example.com"]) == 250
    assert len(sink.messages) == 1
    assert await team.threads() == []


async def test_inbound_reply_from_another_address_joins_the_thread(
        relay: Gateway, team: Store) -> None:
    first = make_mail(RECRUITER, ADA, "Interview", message_id="<first@example.com>")
    assert await send(relay, first, RECRUITER, [ADA]) == 250
    reply = make_mail("ada.private@home.test", RECRUITER, "Re: Interview",
                      In_Reply_To="<first@example.com>", References="<first@example.com>")
    assert await send(relay, reply, "ada.private@home.test", [RECRUITER]) == 250
    threads = await team.threads("C-1")
    assert len(threads) == 1 and threads[0].message_count == 2
    directions = [m["direction"] for m in (await team.thread(threads[0].id)).messages]
    assert directions == ["outbound", "inbound"]


async def test_same_subject_without_reference_is_a_new_thread(
        relay: Gateway, team: Store) -> None:
    for _ in range(2):
        assert await send(relay, make_mail(RECRUITER, ADA, "Interview"), RECRUITER, [ADA]) == 250
    assert [t.message_count for t in await team.threads("C-1")] == [1, 1]


async def test_bcc_candidate_in_the_envelope_is_captured(relay: Gateway, team: Store) -> None:
    raw = make_mail(RECRUITER, "hiring.manager@example.com", "Team intro")
    assert await send(relay, raw, RECRUITER, ["hiring.manager@example.com", ADA]) == 250
    assert [t.candidates for t in await team.threads()] == [["C-1"]]


@pytest.mark.parametrize("capture_forwards", [True, False])
async def test_forward_of_candidate_mail_starts_a_new_thread(
        gateway_factory: GatewayFactory, team: Store, sink: Sink,
        capture_forwards: bool) -> None:
    gateway = await gateway_factory(capture_forwards=capture_forwards)
    original = make_mail(ADA, RECRUITER, "My CV", message_id="<cv@applicant.test>")
    assert await send(gateway, original, ADA, [RECRUITER]) == 250
    forward = make_mail(
        RECRUITER, "hiring.manager@example.com", "Fwd: My CV",
        "Have a look.\n\n---------- Forwarded message ---------\n"
        f"From: Ada Applicant <{ADA}>\nDate: Fri, 27 Nov 2026\nSubject: My CV\n"
        f"To: <{RECRUITER}>\n\nPlease find my CV attached.\n",
        References="<cv@applicant.test>")
    assert await send(gateway, forward, RECRUITER, ["hiring.manager@example.com"]) == 250
    assert len(sink.messages) == 2
    threads = await team.threads("C-1")
    expected = [1, 1] if capture_forwards else [1]
    assert sorted(t.message_count for t in threads) == expected
    if capture_forwards:
        newest = await team.thread(threads[0].id)
        assert newest.subject == "Fwd: My CV"
        assert newest.messages[0]["to"] == ["hiring.manager@example.com"]


async def test_archived_job_stops_capture_but_another_open_job_keeps_it(
        relay: Gateway, team: Store) -> None:
    await team.set_job_archived("J1", True)
    assert await send(relay, make_mail(RECRUITER, ADA, "Update"), RECRUITER, [ADA]) == 250
    assert await team.threads("C-1") == []

    await team.add_candidate("C-3", "Multi Job", ["multi@applicant.test"], ["J1", "J2"])
    raw = make_mail(RECRUITER, "multi@applicant.test", "Update")
    assert await send(relay, raw, RECRUITER, ["multi@applicant.test"]) == 250
    assert len(await team.threads("C-3")) == 1

    await team.set_job_archived("J1", False)
    assert await send(relay, make_mail(RECRUITER, ADA, "Reopened"), RECRUITER, [ADA]) == 250
    assert len(await team.threads("C-1")) == 1


async def test_internal_applicant_mail_never_syncs(relay: Gateway, team: Store) -> None:
    await team.add_candidate("C-9", "Internal Applicant",
                             ["eve@private.test", "eve@example.com"], ["J1"])
    raw = make_mail(RECRUITER, "eve@example.com", "Salary review")
    assert await send(relay, raw, RECRUITER, ["eve@example.com"]) == 250
    assert await team.threads("C-9") == []
    notices = (await team.candidate("C-9")).notices
    assert any("eve@example.com was not added" in text for text, _ in notices)


async def test_bulk_mail_to_a_candidate_is_not_captured(relay: Gateway, team: Store) -> None:
    raw = make_mail(RECRUITER, ADA, "Newsletter", List_Id="<news.example.com>")
    assert await send(relay, raw, RECRUITER, [ADA]) == 250
    assert await team.threads() == []


async def test_each_recipient_gets_the_upstreams_own_verdict(
        relay: Gateway, sink: Sink) -> None:
    sink.reject_rcpt["nobody@applicant.test"] = "550 5.1.1 No such user here"
    raw = make_mail(RECRUITER, [ADA, "nobody@applicant.test"], "Hello")
    result = await smtp_send(relay.relay.port, raw, RECRUITER, [ADA, "nobody@applicant.test"])
    assert result.rcpt[ADA][0] == 250
    assert result.rcpt["nobody@applicant.test"] == (550, "5.1.1 No such user here")
    assert result.code == 250
    assert sink.messages[0].rcpt_tos == [ADA]


async def test_pipelined_commands_are_answered_in_order_each_recipient_by_the_upstream(
        relay: Gateway, sink: Sink, team: Store) -> None:
    # As Postfix's client sends them once PIPELINING is offered (RFC 2920).
    sink.reject_rcpt["nobody@applicant.test"] = "550 5.1.1 No such user here"
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.relay.port)
    assert (await reader.readline()).startswith(b"220")
    writer.write(b"EHLO mta.example.com\r\n")
    offered = [await reader.readline()]
    while offered[-1][3:4] == b"-":
        offered.append(await reader.readline())
    assert b"250-PIPELINING\r\n" in offered

    async def replies(count: int) -> list[bytes]:
        return [(await asyncio.wait_for(reader.readline(), 10))[:3] for _ in range(count)]

    writer.write(f"MAIL FROM:<{RECRUITER}>\r\nRCPT TO:<{ADA}>\r\n"
                 f"RCPT TO:<nobody@applicant.test>\r\nRCPT TO:<{GRACE}>\r\nDATA\r\n".encode())
    assert await replies(5) == [b"250", b"250", b"550", b"250", b"354"]
    raw = crlf(make_mail(RECRUITER, [ADA, GRACE], "Pipelined"))
    writer.write(raw + b".\r\nMAIL FROM:<>\r\nRCPT TO:<nobody@applicant.test>\r\n"
                 b"DATA\r\nQUIT\r\n")
    # The second transaction has no recipient the upstream took: no DATA.
    assert await replies(5) == [b"250", b"250", b"550", b"503", b"221"]
    writer.close()
    assert [(m.rcpt_tos, m.content) for m in sink.messages] == [([ADA, GRACE], raw)]
    assert [t.subject for t in await team.threads("C-1")] == ["Pipelined"]


async def test_permanent_reject_at_data_is_passed_on_and_capture_removed(
        relay: Gateway, sink: Sink, team: Store) -> None:
    sink.data_reply = "554 5.7.1 Message rejected by policy"
    result = await smtp_send(relay.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
    assert (result.code, result.text) == (554, "5.7.1 Message rejected by policy")
    assert await team.threads() == []


async def test_temporary_failure_then_retry_is_stored_once(
        relay: Gateway, sink: Sink, team: Store) -> None:
    raw = make_mail(RECRUITER, ADA, "Offer")
    sink.data_reply = "451 4.3.0 Try later"
    assert await send(relay, raw, RECRUITER, [ADA]) == 451
    assert await team.threads() == []
    sink.data_reply = None
    assert await send(relay, raw, RECRUITER, [ADA]) == 250
    # The MTA did not see our 250 the first time round and retries again.
    assert await send(relay, raw, RECRUITER, [ADA]) == 250
    assert [t.message_count for t in await team.threads("C-1")] == [1]


async def test_message_without_message_id_is_deduplicated_by_content(
        relay: Gateway, team: Store) -> None:
    raw = make_mail(RECRUITER, ADA, "No id", message_id=None)
    for _ in range(2):
        assert await send(relay, raw, RECRUITER, [ADA]) == 250
    assert [t.message_count for t in await team.threads("C-1")] == [1]


async def test_upstream_down_is_a_temporary_failure(
        gateway_factory: GatewayFactory, team: Store, unused_tcp_port: int) -> None:
    gateway = await gateway_factory(upstream=Upstream("smtp", "127.0.0.1", unused_tcp_port))
    result = await smtp_send(gateway.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
    assert result.code == 451 and "Upstream unavailable" in result.text
    assert await team.threads() == []


async def test_upstream_refusing_the_sender_is_passed_on(relay: Gateway, sink: Sink) -> None:
    sink.mail_reply = "553 5.7.1 Sender not allowed"
    result = await smtp_send(relay.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
    assert (result.code, result.text) == (553, "5.7.1 Sender not allowed")


async def test_upstream_dropping_the_connection_at_data_loses_nothing(
        relay: Gateway, sink: Sink, team: Store) -> None:
    raw = make_mail(RECRUITER, ADA, "Dropped")
    sink.drop_at_data = True
    assert await send(relay, raw, RECRUITER, [ADA]) == 451
    assert await team.threads() == []
    sink.drop_at_data = False
    assert await send(relay, raw, RECRUITER, [ADA]) == 250
    assert len(sink.messages) == 1
    assert [t.message_count for t in await team.threads("C-1")] == [1]


async def test_upstream_closing_an_idle_connection_is_reopened_transparently(
        relay: Gateway, sink: Sink) -> None:
    sink.hang_up_after_data = True
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.relay.port, start_tls=False)
    await client.connect()
    for i in range(3):
        raw = make_mail(RECRUITER, ADA, f"Message {i}")
        errors, _ = await client.sendmail(RECRUITER, [ADA], raw)
        assert errors == {}
        await asyncio.sleep(0.1)
    await client.quit()
    assert len(sink.messages) == 3
    assert sink.sessions == 3


async def test_store_failure_defers_the_message_without_delivering_it(
        relay: Gateway, sink: Sink, team: Store) -> None:
    async with team.db.write() as session:
        await session.execute(text("DROP TABLE candidate_jobs"))
    result = await smtp_send(relay.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
    assert result.code == 451 and "store unavailable" in result.text
    assert "Error" not in result.text and "Table" not in result.text
    assert sink.messages == []
    # Mail that never reaches the broken table still flows.
    other = make_mail("a@example.com", "b@example.com")
    assert await send(relay, other, "a@example.com", ["b@example.com"]) == 250
    assert len(sink.messages) == 1


async def test_oversized_message_is_refused_with_552(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    gateway = await gateway_factory(max_message_size=10_000)
    raw = make_mail(RECRUITER, ADA, "Big", "x" * 70 + "\n" * 0 + ("y" * 70 + "\n") * 200)
    assert await send(gateway, raw, RECRUITER, [ADA]) == 552
    assert sink.messages == []
    assert await team.threads() == []
    # The next, smaller message in a new transaction goes through.
    assert await send(gateway, make_mail(RECRUITER, ADA), RECRUITER, [ADA]) == 250


async def test_recipient_flood_is_refused_with_452(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    gateway = await gateway_factory(max_recipients=3)
    rcpts = [f"r{i}@example.com" for i in range(5)]
    result = await smtp_send(gateway.relay.port, make_mail(RECRUITER, rcpts), RECRUITER, rcpts)
    assert [result.rcpt[r][0] for r in rcpts] == [250, 250, 250, 452, 452]
    assert result.code == 250
    assert sink.messages[0].rcpt_tos == rcpts[:3]


async def test_client_outside_allowed_networks_is_refused_at_rcpt(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    import ipaddress
    gateway = await gateway_factory(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),))
    # An outside sender (an internal one is refused at MAIL already: see
    # test_hostile_input.py) trying to reach anyone but a hosted identity.
    outsider = "someone@outside.test"
    result = await smtp_send(gateway.relay.port, make_mail(outsider, ADA), outsider, [ADA],
                             source="127.0.0.2")
    assert result.rcpt[ADA][0] == 554 and "Relay access denied" in result.rcpt[ADA][1]
    assert sink.sessions == 0
    assert sink.messages == []


async def test_mail_for_a_hosted_identity_is_accepted_from_anywhere_and_captured(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    import ipaddress

    from atsmail.storage.mailboxes import Mailboxes
    await Mailboxes(team.db).set_hosted_identity(RECRUITER, "rita@hosted.example")
    gateway = await gateway_factory(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),))
    reply = make_mail(ADA, "rita@hosted.example", "Re: Interview")
    # From outside the allowed networks, as the Internet reaches an MX.
    result = await smtp_send(gateway.relay.port, reply, ADA,
                             ["rita@hosted.example", "someone@example.com"], source="127.0.0.2")
    assert result.rcpt["rita@hosted.example"][0] == 250
    assert result.rcpt["someone@example.com"][0] == 554
    assert result.code == 250
    # Handed on to the member's own address, and captured on the candidate.
    assert [(m.mail_from, m.rcpt_tos) for m in sink.messages] == [(ADA, [RECRUITER])]
    threads = await team.threads("C-1")
    assert [t.subject for t in threads] == ["Re: Interview"]
    assert (await team.thread(threads[0].id)).messages[0]["direction"] == "inbound"


def forwarded_cv(sender: str, to: str, original_from: str) -> bytes:
    original = make_mail(original_from, "jobs@example.com", "Application: Backend Engineer",
                         "Please find my CV attached.\n", message_id="<cv-neo@applicant.test>")
    outer = (f"From: {sender}\r\nTo: {to}\r\nSubject: Fwd: Application: Backend Engineer\r\n"
             "Message-ID: <fwd-neo@example.com>\r\nMIME-Version: 1.0\r\n"
             'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
             "--b\r\nContent-Type: text/plain\r\n\r\nNew CV for the pipeline.\r\n"
             "--b\r\nContent-Type: message/rfc822\r\n\r\n").encode()
    return outer + crlf(original) + b"\r\n--b--\r\n"


async def test_a_cv_forwarded_to_the_ats_inbox_becomes_a_candidate(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    gateway = await gateway_factory(ats_inbox="ats@example.com")
    raw = forwarded_cv(RECRUITER, "ats@example.com", "Neo Applicant <neo@applicant.test>")
    for _ in range(2):  # a retry creates nothing twice
        assert await send(gateway, raw, RECRUITER, ["ats@example.com"]) == 250
    created = [c for c in await team.candidates() if c.id.startswith("inbox-")]
    assert [(c.name, c.emails) for c in created] == [("Neo Applicant", ["neo@applicant.test"])]
    assert "forwarded to the ATS inbox ats@example.com" in created[0].notices[0][0]
    threads = await team.threads(created[0].id)
    assert [(t.subject, t.message_count) for t in threads] == [
        ("Fwd: Application: Backend Engineer", 1)]
    # Forwarding an existing candidate's CV files it on them instead.
    again = forwarded_cv(RECRUITER, "ats@example.com", f"Ada <{ADA}>").replace(
        b"fwd-neo", b"fwd-ada").replace(b"cv-neo", b"cv-ada")
    assert await send(gateway, again, RECRUITER, ["ats@example.com"]) == 250
    assert len(await team.candidates()) == 3
    assert len(await team.threads("C-1")) == 1


async def test_internationalised_addresses_are_relayed_with_smtputf8(
        relay: Gateway, sink: Sink, team: Store) -> None:
    await team.add_candidate("C-U", "Jürgen", ["jürgen@exämple.test"])
    raw = ("From: jürgen@exämple.test\r\nTo: recruiter@example.com\r\n"
           "Subject: Grüße\r\nMessage-ID: <utf8@exämple.test>\r\n\r\nHallo\r\n").encode()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.relay.port, start_tls=False)
    await client.connect()
    await client.mail("jürgen@exämple.test", options=["SMTPUTF8"], encoding="utf-8")
    await client.rcpt(RECRUITER, encoding="utf-8")
    response = await client.data(raw)
    await client.quit()
    assert response.code == 250
    assert [m.mail_from for m in sink.messages] == ["jürgen@exämple.test"]
    assert [t.subject for t in await team.threads("C-U")] == ["Grüße"]


async def test_null_sender_bounce_is_relayed(relay: Gateway, sink: Sink) -> None:
    raw = make_mail("MAILER-DAEMON@example.com", ADA, "Undelivered Mail Returned to Sender")
    assert await send(relay, raw, "", [ADA]) == 250
    assert sink.messages[0].mail_from == "<>"


async def test_client_hanging_up_mid_data_delivers_and_stores_nothing(
        relay: Gateway, sink: Sink, team: Store) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.relay.port)
    await reader.readline()
    for command in (b"HELO client.test", f"MAIL FROM:<{RECRUITER}>".encode(),
                    f"RCPT TO:<{ADA}>".encode(), b"DATA"):
        writer.write(command + b"\r\n")
        await reader.readline()
    writer.write(b"Subject: half\r\n\r\nonly half of it")
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.2)
    assert sink.messages == []
    assert await team.threads() == []
    assert await send(relay, make_mail(RECRUITER, ADA), RECRUITER, [ADA]) == 250


async def test_client_hanging_up_while_waiting_for_the_answer_cuts_nothing(
        relay: Gateway, sink: Sink, team: Store) -> None:
    sink.data_delay = 0.3
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.relay.port)
    await reader.readline()
    for command in (b"HELO client.test", f"MAIL FROM:<{RECRUITER}>".encode(),
                    f"RCPT TO:<{ADA}>".encode(), b"DATA"):
        writer.write(command + b"\r\n")
        await reader.readline()
    writer.write(crlf(make_mail(RECRUITER, ADA, "Complete")) + b".\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()

    # The upstream got the whole message and answered 250: it is delivered,
    # so the capture stands (the client will retry; the retry is stored once).
    async def captured() -> bool:
        return [t.message_count for t in await team.threads("C-1")] == [1]

    await eventually(captured)
    assert len(sink.messages) == 1


async def test_concurrent_sessions_are_all_captured(relay: Gateway, team: Store) -> None:
    mails = [make_mail(RECRUITER, ADA if i % 2 else GRACE, f"Mail {i}") for i in range(30)]
    codes = await asyncio.gather(*(
        send(relay, raw, RECRUITER, [ADA if i % 2 else GRACE]) for i, raw in enumerate(mails)))
    assert codes == [250] * 30
    assert len(await team.threads("C-1")) == 15
    assert len(await team.threads("C-2")) == 15


async def test_shutdown_lets_the_transaction_in_flight_finish(
        relay: Gateway, sink: Sink, team: Store) -> None:
    sink.data_delay = 0.5
    sending = asyncio.create_task(send(relay, make_mail(RECRUITER, ADA), RECRUITER, [ADA]))
    while not relay.relay.sessions or not any(s.in_transaction for s in relay.relay.sessions):
        await asyncio.sleep(0.01)
    await relay.relay.stop(grace=5)
    assert await sending == 250
    assert len(sink.messages) == 1
    assert len(await team.threads("C-1")) == 1


async def test_every_decision_is_logged_as_one_structured_line(
        relay: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="atsmail.decisions")
    await send(relay, make_mail(RECRUITER, ADA, message_id="<logged@example.com>"),
               RECRUITER, [ADA])
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "atsmail.decisions"]
    assert lines == [{
        "event": "relay", "message_id": "logged@example.com", "from": RECRUITER,
        "size": lines[0]["size"], "verdict": "capture", "candidates": ["C-1"],
        "thread": "new", "direction": "outbound",
        "rules": ["direction", "team-scope", "candidate-match"], "upstream": 250,
    }]


async def test_maildir_upstream_delivers_into_new(
        gateway_factory: GatewayFactory, team: Store, tmp_path: Path) -> None:
    gateway = await gateway_factory(upstream=Upstream("maildir", path=tmp_path / "Maildir"))
    raw = make_mail(RECRUITER, ADA, "To the maildir")
    assert await send(gateway, raw, RECRUITER, [ADA]) == 250
    delivered = list((tmp_path / "Maildir" / "new").iterdir())
    assert len(delivered) == 1
    assert delivered[0].read_bytes() == crlf(raw)
    assert len(await team.threads("C-1")) == 1


async def test_each_connection_gets_a_protocol_of_its_own(relay: Gateway) -> None:
    first, second = relay.relay._protocol(), relay.relay._protocol()
    assert first is not second and first._stream_reader is not second._stream_reader
    # aiosmtpd lengthens the MAIL limit in this dict on each EHLO.
    first.command_size_limits["MAIL"] += 36
    assert second.command_size_limits["MAIL"] == SMTP.command_size_limit
    for protocol in (first, second):
        assert protocol.session is None and protocol.transport is None
        assert all(method.__self__ is protocol for method in protocol._smtp_methods.values())
        builtin = [m.method for m in protocol._auth_methods.values() if m.is_builtin]
        assert builtin and all(getattr(method, "__self__", None) is protocol for method in builtin)
    # Two clients at once, each in its own transaction.
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.relay.port) as a, \
            aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.relay.port) as b:
        await a.mail(RECRUITER)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused, match="need MAIL"):
            await b.rcpt(ADA)  # b has no MAIL of its own
        await b.mail(RECRUITER)
        for client in (a, b):
            await client.rcpt(ADA)
            assert (await client.data(make_mail(RECRUITER, ADA, "Apart", "x"))).code == 250



def with_attachment(raw: bytes, size: int) -> bytes:
    """`raw` with a PDF of `size` random bytes attached (base64)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    message.add_attachment(random.Random(size).randbytes(size), maintype="application",
                           subtype="pdf", filename="cv.pdf")
    return message.as_bytes()


async def test_a_large_message_is_parsed_for_a_forward_only_past_the_header_vetoes(
        relay: Gateway, sink: Sink, team: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Parsing a 1 MB attachment takes the email parser about 16 ms; most
    # company mail never needs it, and no session waits for it: it is not
    # done on the event loop's thread, nor on the store's (a look-up waits).
    parsed = []
    read_forward = message_module._read_forward

    def counted(msg: Any, subject: str) -> Any:
        parsed.append(subject)
        thread = threading.current_thread()
        assert thread is not threading.main_thread(), "read on the event loop's thread"
        assert not thread.name.startswith("atsmail-store"), f"read on {thread.name}"
        return read_forward(msg, subject)

    monkeypatch.setattr(message_module, "_read_forward", counted)
    size = 2 * PARSE_IN_THREAD_ABOVE
    company = with_attachment(make_mail("colleague@example.com", "orders@supplier.test",
                                        "Invoice"), size)
    assert await send(relay, company, "colleague@example.com", ["orders@supplier.test"]) == 250
    assert parsed == []
    # A forward of a candidate's mail with its CV is still read as one.
    forward = with_attachment(make_mail(
        RECRUITER, "hiring.manager@example.com", "Fwd: My CV",
        "Have a look.\n\n---------- Forwarded message ---------\n"
        f"From: Ada Applicant <{ADA}>\nSubject: My CV\nTo: <{RECRUITER}>\n\nMy CV.\n"), size)
    assert await send(relay, forward, RECRUITER, ["hiring.manager@example.com"]) == 250
    assert parsed == ["Fwd: My CV"]
    assert [m.content for m in sink.messages] == [crlf(company), crlf(forward)]
    assert [(t.subject, t.message_count) for t in await team.threads("C-1")] == [
        ("Fwd: My CV", 1)]
