"""A large message goes upstream as it arrives, in whole <CR><LF> lines; its
end of data goes only once all of it was read and judged.

What has not arrived yet cannot be judged, so each way the rest of a message
can be refused must leave the upstream without an end of data: nothing
delivered, nothing captured, no command smuggled into the data read by the
upstream, and the client's session still good for the next message.
Between the relay and the real sink sits the loopback tap that keeps every
byte sent upstream.
"""

from __future__ import annotations

import asyncio

import pytest

from atsmail.config import Upstream
from atsmail.gateway.relay import PASS_EVERY
from atsmail.gateway.server import Gateway
from atsmail.gateway.upstream import LOST, SmtpSession, open_session
from atsmail.storage import Store
from atsmail.storage.mailboxes import Mailboxes
from tests.conftest import GatewayFactory, Sink, make_mail
from tests.gateway.test_data_reader import stuffed
from tests.gateway.test_data_release import Tap, tap, until
from tests.gateway.test_hostile_input import (
    ADA,
    ONLY_LOCALHOST,
    OUTSIDER,
    RECRUITER,
    Wire,
    captured,
    code,
    crlf,
    still_serving,
)

__all__ = ["tap"]  # the fixture, used by name

HOSTED = "rita@hosted.example"


def candidate_mail(subject: str = "Passed on", sender: str = RECRUITER,
                   to: str = ADA) -> bytes:
    """About four times PASS_EVERY of lines, many of them starting with a dot."""
    body = "".join(f".{n} a line that starts with a dot\n..{n} and two\nplain {n}\n"
                   for n in range(PASS_EVERY * 4 // 60))
    return crlf(make_mail(sender, to, subject, body))


def split(raw: bytes) -> tuple[bytes, bytes]:
    """`raw` cut at the first line end after twice PASS_EVERY."""
    cut = raw.index(b"\r\n", 2 * PASS_EVERY) + 2
    return raw[:cut], raw[cut:]


async def upstream_tapped(gateway_factory: GatewayFactory, tap: Tap, **relay: object) -> Gateway:
    return await gateway_factory(upstream=Upstream("smtp", "127.0.0.1", tap.port), **relay)


async def send_first_part(port: int, tap: Tap, raw: bytes, source: str | None = None,
                          sender: str = RECRUITER, rcpt: str = ADA) -> Wire:
    """A session whose message's first part has been sent, and has gone upstream."""
    wire = await Wire.open(port, source)
    await wire.transaction(sender, [rcpt])
    wire.writer.write(stuffed(split(raw)[0], end=False))
    await wire.writer.drain()
    await passing_began(tap, raw)
    return wire


async def passing_began(tap: Tap, raw: bytes) -> None:
    """Wait until the message's first PASS_EVERY bytes (bar a line) are upstream."""
    await until(lambda: stuffed(raw[:PASS_EVERY - 1000], end=False) in tap.upstream_bytes)


async def test_a_large_message_goes_upstream_as_it_arrives_and_ends_after(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, tap: Tap) -> None:
    gateway = await upstream_tapped(gateway_factory, tap)
    raw = candidate_mail()
    wire = await send_first_part(gateway.relay.port, tap, raw)
    # No end of data before the client sent its own.
    assert b"\r\n.\r\n" not in tap.upstream_bytes and sink.messages == []
    assert code(await wire.send(stuffed(split(raw)[1]))) == 250
    assert [m.content for m in sink.messages] == [raw]
    assert await captured(team) == [raw]
    assert tap.upstream_bytes.count(b"\r\n.\r\n") == 1
    await still_serving(gateway.relay.port, sink, team, wire)
    assert tap.connections == 2  # the next message in the session used the same one
    await wire.close()


SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n")


@pytest.mark.parametrize(("rest", "answer"), [
    (b"a line with a bare LF\nand more\r\n", b"550 5.5.2"),
    (b"a bare CR\rhere\r\n", b"550 5.5.2"),
    (b"x\n.\r\n" + SMUGGLED, b"550 5.5.2"),
    (b"x\r\n.\n" + SMUGGLED, b"550 5.5.2"),
    (b"x\r.\r\n" + SMUGGLED, b"550 5.5.2"),
    (b"x\n.\n" + SMUGGLED, b"550 5.5.2"),
    (b"x\r\n.\r" + SMUGGLED, b"550 5.5.2"),
    (b"y" * 1001 + b"\r\n", b"554 5.6.0"),
    ((b"z" * 70 + b"\r\n") * 10_000, b"552 5.3.4"),
], ids=["bare-lf", "bare-cr", "lf-dot-crlf", "crlf-dot-lf", "cr-dot-crlf", "lf-dot-lf",
        "crlf-dot-cr", "line-too-long", "too-large"])
async def test_the_rest_refused_leaves_the_upstream_without_an_end_of_data(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, tap: Tap,
        rest: bytes, answer: bytes) -> None:
    raw = candidate_mail()
    gateway = await upstream_tapped(gateway_factory, tap,
                                    max_message_size=len(split(raw)[0]) + 50_000)
    wire = await send_first_part(gateway.relay.port, tap, raw)
    assert (await wire.send(rest + b"the end\r\n.\r\n")).startswith(answer)
    await still_serving(gateway.relay.port, sink, team, wire)
    # Only the two messages of still_serving were delivered, and nothing
    # after a smuggled end reached the upstream.
    assert len(sink.messages) == 2 and len(await captured(team)) == 2
    assert b"evil@attacker.test" not in tap.upstream_bytes
    assert b"the end\r\n" not in tap.upstream_bytes
    await wire.close()


async def test_a_forged_sender_seen_only_at_the_end_leaves_nothing_upstream(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, tap: Tap) -> None:
    # From outside the company, with a team member in the From header: refused
    # once the message is read, though it was being passed on.
    await Mailboxes(team.db).set_hosted_identity(RECRUITER, HOSTED)
    gateway = await upstream_tapped(gateway_factory, tap, allowed_networks=ONLY_LOCALHOST)
    raw = candidate_mail(sender=RECRUITER, to=HOSTED)
    wire = await send_first_part(gateway.relay.port, tap, raw, source=OUTSIDER,
                                 sender=ADA, rcpt=HOSTED)
    reply = await wire.send(stuffed(split(raw)[1]))
    assert reply.startswith(b"550 5.7.1") and RECRUITER.encode() in reply
    assert sink.messages == [] and await captured(team) == []
    # A candidate's own mail still arrives, in the same session and a new one.
    await wire.transaction(ADA, [HOSTED])
    own = crlf(make_mail(ADA, HOSTED, "My application"))
    assert code(await wire.send(own + b".\r\n")) == 250
    assert [m.content for m in sink.messages] == [own]
    await wire.close()
    await still_serving(gateway.relay.port, sink, team, source=OUTSIDER)


async def test_a_client_gone_after_its_first_part_leaves_nothing_upstream(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, tap: Tap) -> None:
    gateway = await upstream_tapped(gateway_factory, tap)
    wire = await send_first_part(gateway.relay.port, tap, candidate_mail())
    wire.writer.close()
    await until(lambda: not gateway.relay.sessions)
    await until(lambda: all(end.is_closing() for end in tap._ends))
    assert sink.messages == [] and await captured(team) == []
    await still_serving(gateway.relay.port, sink, team)


@pytest.mark.parametrize(("upstream", "answer", "reply"), [
    ("refuses", b"554 5.5.1 sink.test Error: no valid recipients",
     b"554 5.5.1 sink.test Error: no valid recipients"),
    ("gives-up", b"421 4.4.2 sink.test Error: timeout exceeded",
     b"421 4.4.2 sink.test Error: timeout exceeded"),
    # Neither data to come nor a refusal: a 250 passed on would be taken
    # for a delivery.
    ("answers-250", b"250 2.0.0 Ok", str(LOST).encode()),
])
async def test_the_upstream_refusing_the_data_is_answered_after_the_client_sent_it(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, tap: Tap,
        upstream: str, answer: bytes, reply: bytes) -> None:
    gateway = await upstream_tapped(gateway_factory, tap)
    raw = candidate_mail()
    wire = await Wire.open(gateway.relay.port)
    await wire.transaction(RECRUITER, [ADA])
    first, rest = split(raw)
    if upstream == "gives-up":
        wire.writer.write(stuffed(first, end=False))
        await passing_began(tap, raw)
        tap.hang_up(answer + b"\r\n")
    else:
        tap.refuse_data = answer + b"\r\n"
        wire.writer.write(stuffed(first, end=False))
        await until(lambda: tap.refused == 1)
    assert await wire.send(stuffed(rest)) == reply
    assert sink.messages == [] and await captured(team) == []
    tap.refuse_data = None
    await still_serving(gateway.relay.port, sink, team, wire)
    await wire.close()


async def test_nothing_more_is_passed_on_once_the_upstream_has_answered(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, tap: Tap) -> None:
    # An upstream that refuses before the end of data but goes on reading:
    # a server that took its answer for the end of the data would read the
    # rest as commands.
    gateway = await upstream_tapped(gateway_factory, tap)
    raw = candidate_mail()
    wire = await send_first_part(gateway.relay.port, tap, raw)
    tap.say(b"552 5.3.4 sink.test Error: message too big\r\n")
    await asyncio.sleep(0.3)
    before = len(tap.upstream_bytes)
    rest = split(raw)[1]
    assert len(rest) > 2 * PASS_EVERY
    assert await wire.send(stuffed(rest)) == b"552 5.3.4 sink.test Error: message too big"
    assert len(tap.upstream_bytes) - before < PASS_EVERY
    assert b"\r\n.\r\n" not in tap.upstream_bytes
    assert sink.messages == [] and await captured(team) == []
    await still_serving(gateway.relay.port, sink, team, wire)
    await wire.close()


@pytest.mark.parametrize("command", ["RCPT", "DATA"])
async def test_a_data_left_open_takes_no_other_command_and_is_closed(
        sink: Sink, tap: Tap, command: str) -> None:
    # The relay never asks this of its upstream session; should a bug do so,
    # the command must not be written into the data, where the upstream
    # would read it as part of the message, and the message must not end.
    session = await open_session(Upstream("smtp", "127.0.0.1", tap.port), 5, 5, None)
    assert isinstance(session, SmtpSession)
    assert (await session.mail(RECRUITER, [])).ok and (await session.rcpt(ADA)).ok
    assert (await session.begin_data()).code == 354
    await session.send(b"Subject: left open\r\n\r\nThe first line.\r\n")
    await until(lambda: tap.upstream_bytes.endswith(b"The first line.\r\n"))
    second = session.rcpt(HOSTED) if command == "RCPT" else session.begin_data()
    assert await second == LOST
    assert not session.usable and not session.in_transaction
    await asyncio.sleep(0.3)
    assert tap.upstream_bytes.endswith(b"DATA\r\nSubject: left open\r\n\r\nThe first line.\r\n")
    assert sink.messages == []
