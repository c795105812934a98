"""Hostile and broken input through the real relay, byte for byte.

Each case is sent over a plain socket (the exact bytes matter: no client
library normalises them), to the relay in front of a real SMTP sink and a
real store. Each must get its documented answer, and then the gateway must
still serve (a normal candidate mail in the same session and in a new one
gets 250 and is captured) and have lost nothing (what was answered 250
reached the sink; what was captured is byte for byte what the sink got).

The files are in `tests/data/hostile/`; the cases too large to keep as
files are built below. README.md ("Hostile input") lists the answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from atsmail.gateway.relay import normalise_line_ends
from atsmail.gateway.server import Gateway
from atsmail.storage import Store
from atsmail.storage.mailboxes import Mailboxes
from tests.conftest import GatewayFactory, Sink, make_mail, smtp_send

CORPUS = Path(__file__).parent.parent / "data" / "hostile"
RECRUITER = "recruiter@example.com"
ADA = "ada@applicant.test"
OUTSIDER = "127.0.0.2"
ONLY_LOCALHOST = (ipaddress.ip_network("127.0.0.1/32"),)
_serial = itertools.count(1)


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class Wire:
    """An SMTP client that writes exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str | None = None) -> Wire:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0) if source else None, limit=2**20)
        wire = cls(reader, writer)
        assert (await wire.reply()).startswith(b"220")
        assert (await wire.send(b"EHLO client.test\r\n")).startswith(b"250")
        return wire

    async def reply(self) -> bytes:
        """One whole reply (its last line, which carries the code and text)."""
        line = await asyncio.wait_for(self.reader.readline(), 60)
        while line[3:4] == b"-":
            line = await asyncio.wait_for(self.reader.readline(), 60)
        assert line, "the relay closed the connection"
        return line.rstrip(b"\r\n")

    async def send(self, data: bytes) -> bytes:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    async def silent(self, seconds: float = 0.3) -> bool:
        """Whether nothing more is said: no answer to a smuggled command."""
        try:
            await asyncio.wait_for(self.reader.read(1), seconds)
        except TimeoutError:
            return True
        return False

    async def transaction(self, mail_from: str, rcpts: list[str]) -> None:
        """MAIL, RCPT and DATA, each accepted, up to the 354."""
        assert (await self.send(f"MAIL FROM:<{mail_from}>\r\n".encode())).startswith(b"250")
        for rcpt in rcpts:
            assert (await self.send(f"RCPT TO:<{rcpt}>\r\n".encode())).startswith(b"250")
        assert (await self.send(b"DATA\r\n")).startswith(b"354")

    async def close(self) -> None:
        self.writer.write(b"QUIT\r\n")
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def code(reply: bytes) -> int:
    return int(reply[:3])


async def captured(store: Store) -> list[bytes]:
    """The bytes of every captured message."""
    found = []
    for thread in await store.threads():
        for message in (await store.thread(thread.id)).messages:
            found.append((await store.message(message["id"]))[0].raw)
    return found


async def still_serving(port: int, sink: Sink, store: Store, wire: Wire | None = None,
                        source: str | None = None) -> list[bytes]:
    """A normal candidate mail in the session `wire` (if any) and in a new one:
    each 250, delivered and captured. Returns what was delivered."""
    sent = []
    if wire is not None:
        raw = crlf(make_mail(RECRUITER, ADA, f"Same session {next(_serial)}"))
        await wire.transaction(RECRUITER, [ADA])
        assert code(await wire.send(raw + b".\r\n")) == 250
        sent.append(raw)
    sender = RECRUITER if source is None else ADA
    rcpt = ADA if source is None else "rita@hosted.example"
    fresh = make_mail(sender, rcpt, f"New session {next(_serial)}")
    assert (await smtp_send(port, fresh, sender, [rcpt], source=source)).code == 250
    sent.append(crlf(fresh))
    assert [m.content for m in sink.messages[-len(sent):]] == sent
    stored = await captured(store)
    assert all(raw in stored for raw in sent)
    return sent


async def nothing_lost(sink: Sink, store: Store, accepted: list[bytes]) -> None:
    """The sink has exactly what was answered 250; the store only copies of it."""
    assert [m.content for m in sink.messages] == accepted
    for raw in await captured(store):
        assert raw in accepted


# --- the corpus, and the cases built here --------------------------------------------


def many_headers() -> bytes:
    filler = b"".join(b"X-Filler-%05d: header number %d\r\n" % (i, i) for i in range(10_000))
    return (b"From: recruiter@example.com\r\nTo: ada@applicant.test\r\n"
            b"Subject: Ten thousand headers\r\nMessage-ID: <many-headers@example.com>\r\n"
            + filler + b"\r\nHi.\r\n")


def deep_mime(levels: int = 5_000) -> bytes:
    opening = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                       for i in range(levels))
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(levels)))
    return (b"From: recruiter@example.com\r\nTo: ada@applicant.test\r\n"
            b"Subject: Fwd: five thousand levels\r\nMessage-ID: <deep-mime@example.com>\r\n"
            b"MIME-Version: 1.0\r\n" + opening
            + b"Content-Type: text/plain\r\n\r\n---------- Forwarded message ---------\r\n"
              b"From: Ada <ada@applicant.test>\r\n" + closing)


def megabyte_line() -> bytes:
    return (b"From: recruiter@example.com\r\nTo: ada@applicant.test\r\n"
            b"Subject: One long line\r\nMessage-ID: <long-line@example.com>\r\n\r\n"
            + b"x" * 1_000_000 + b"\r\nend\r\n")


def unclosed_html_tag() -> bytes:
    """A forward in HTML whose text is one tag, never closed, 200 KB long and
    full of what marks a rule: read as a pattern would read it, a few seconds."""
    return (b"From: recruiter@example.com\r\nTo: ada@applicant.test\r\n"
            b"Subject: Fwd: one long tag\r\nMessage-ID: <long-tag@example.com>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            b"<div style=\"" + b"border-top:solid 1pt\r\n" * 10_000 + b"\r\n")


def from_corpus(name: str) -> Callable[[], bytes]:
    return lambda: (CORPUS / name).read_bytes()


def with_data_end(raw: bytes) -> bytes:
    """The bytes after DATA, as a client sends them: <CR><LF>.<CR><LF> at the end
    (Python's smtplib adds the <CR><LF> to mail that does not end in one)."""
    return raw + (b"" if raw.endswith(b"\r\n") else b"\r\n") + b".\r\n"


def as_delivered(raw: bytes) -> bytes:
    """What the upstream gets: lines ended by a bare LF become <CR><LF> lines,
    without the client's transparency dot."""
    if raw.endswith(b"\r\n"):
        return raw
    return b"".join((line[1:] if line.startswith(b".") and n else line) + b"\r\n"
                    for n, line in enumerate(raw.split(b"\n")))


# Each case, and the relay's answer: the reply code, and whether it is
# captured (only ever after that reply was 250).
CASES: dict[str, tuple[Callable[[], bytes], int, bool]] = {
    # SMTP smuggling: only <CR><LF>.<CR><LF> ends the data; a message whose
    # line ends could show a server down the line another end is refused
    # whole, so the smuggled MAIL, RCPT and DATA never run and never pass on.
    "smuggle_lf_dot_lf.eml": (from_corpus("smuggle_lf_dot_lf.eml"), 550, False),
    "smuggle_cr_dot_cr.eml": (from_corpus("smuggle_cr_dot_cr.eml"), 550, False),
    "smuggle_lf_dot_crlf.eml": (from_corpus("smuggle_lf_dot_crlf.eml"), 550, False),
    "smuggle_crlf_dot_lf.eml": (from_corpus("smuggle_crlf_dot_lf.eml"), 550, False),
    "smuggle_lf_only.eml": (from_corpus("smuggle_lf_only.eml"), 550, False),
    # Lines that all end in a bare LF are read as <CR><LF> lines.
    "lf_line_ends.eml": (from_corpus("lf_line_ends.eml"), 250, True),
    # Broken content is relayed as it is, and judged by what can be read.
    "bad_transfer_encodings.eml": (from_corpus("bad_transfer_encodings.eml"), 250, True),
    "bad_charsets.eml": (from_corpus("bad_charsets.eml"), 250, True),
    "nul_bytes_everywhere.eml": (from_corpus("nul_bytes_everywhere.eml"), 250, True),
    "nested_comments.eml": (from_corpus("nested_comments.eml"), 250, True),
    "broken_headers.eml": (from_corpus("broken_headers.eml"), 250, True),
    # The email package raises on it (TypeError): its body is not read for a
    # forward, and it is judged by its header.
    "rfc2231_boundary_pieces.eml": (from_corpus("rfc2231_boundary_pieces.eml"), 250, True),
    "broken_mime.eml": (from_corpus("broken_mime.eml"), 250, True),
    "encoded_word_flood.eml": (from_corpus("encoded_word_flood.eml"), 250, True),
    "long_folded_header.eml": (from_corpus("long_folded_header.eml"), 250, True),
    "10,000 headers": (many_headers, 250, True),
    "5,000 MIME levels": (deep_mime, 250, True),
    "an HTML tag of 200 KB": (unclosed_html_tag, 250, True),
    # RFC 5321 4.5.3.1.6: a text line is at most 1,000 bytes.
    "a 1 MB line": (megabyte_line, 554, False),
}


def test_every_file_in_the_corpus_has_an_answer() -> None:
    files = {p.name for p in CORPUS.iterdir()}
    assert files == {name for name in CASES if name.endswith(".eml")}
    for name in files:
        raw = (CORPUS / name).read_bytes()
        # Sent as they are: only the smuggling attempts hold a line of one
        # dot, or a line that starts with one (a client would have doubled it).
        if not name.startswith("smuggle_"):
            assert not raw.startswith(b".") and b"\r\n." not in raw
            assert b"\n.\n" not in raw and b"\n.\r" not in raw


# The line ends of the data after aiosmtpd has read it (it ends the data only
# at <CR><LF>.<CR><LF> and removes a dot that starts a <CR><LF> line).
LINE_ENDS = [
    pytest.param(b"a\r\n.b\r\n\r\n", b"a\r\n.b\r\n\r\n", id="crlf-as-it-is"),
    pytest.param(b"a\nb\n\r\n", b"a\r\nb\r\n\r\n", id="lf-read-as-crlf"),
    pytest.param(b"a\n..\n..b\n\r\n", b"a\r\n.\r\n.b\r\n\r\n", id="lf-dots-unstuffed"),
    pytest.param(b".a\nb\r\n", b".a\r\nb\r\n", id="first-dot-already-unstuffed"),
    pytest.param(b"a\n.\nMAIL FROM:<e@v.l>\n\r\n", None, id="lone-dot-lf-lf"),
    pytest.param(b"a\nb\n.\r\n", None, id="lone-dot-lf-crlf"),
    pytest.param(b"a\r\n\nMAIL FROM:<e@v.l>\r\n", None, id="crlf-dot-lf-after-aiosmtpd"),
    pytest.param(b"a\r\nb\nc\r\n", None, id="crlf-and-lf-mixed"),
    pytest.param(b"a\r.\rMAIL FROM:<e@v.l>\r\n", None, id="bare-cr"),
    pytest.param(b"a\rb\r\n", None, id="any-bare-cr"),
]


@pytest.mark.parametrize(("content", "delivered"), LINE_ENDS)
def test_line_ends_are_read_as_crlf_or_refused(content: bytes, delivered: bytes | None) -> None:
    assert normalise_line_ends(content) == delivered


@pytest.mark.parametrize("case", list(CASES))
async def test_hostile_message_gets_its_answer_and_the_relay_carries_on(
        relay: Gateway, sink: Sink, team: Store, case: str) -> None:
    make, expected, capture = CASES[case]
    raw = make()
    port = relay.relay.port
    wire = await Wire.open(port)
    await wire.transaction(RECRUITER, [ADA])
    reply = await wire.send(with_data_end(raw))
    assert code(reply) == expected, reply
    # One answer for one end of data: nothing smuggled was run.
    assert await wire.silent()
    accepted = [as_delivered(raw)] if expected == 250 else []
    assert [m.content for m in sink.messages] == accepted
    assert (as_delivered(raw) in await captured(team)) == capture
    accepted += await still_serving(port, sink, team, wire)
    await wire.close()
    await nothing_lost(sink, team, accepted)
    assert not any(b"evil" in m.mail_from.encode() or "victim@example.com" in m.rcpt_tos
                   for m in sink.messages)


async def test_a_deeply_nested_message_does_not_hold_up_other_sessions(
        relay: Gateway, sink: Sink, team: Store) -> None:
    loop = asyncio.get_running_loop()
    stalls: list[float] = []

    async def heartbeat() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            stalls.append(loop.time() - before)

    beat = asyncio.create_task(heartbeat())
    try:
        raw = deep_mime()
        result = await smtp_send(relay.relay.port, raw, RECRUITER, [ADA])
    finally:
        beat.cancel()
    assert result.code == 250
    # Parsing happens off the event loop: no session waits for it.
    assert max(stalls) < 0.5, max(stalls)


# --- the envelope ----------------------------------------------------------------------


async def test_100000_recipients_get_452_past_the_limit_and_the_session_carries_on(
        relay: Gateway, sink: Sink, team: Store) -> None:
    limit = relay.relay.relay.max_recipients
    wire = await Wire.open(relay.relay.port)
    assert code(await wire.send(f"MAIL FROM:<{RECRUITER}>\r\n".encode())) == 250
    rcpts = [f"r{i}@example.com" for i in range(100_000)]
    # Pipelined, as a flooding client would: the answers are read as they come.
    wire.writer.write(b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts))
    answers = [await wire.reply() for _ in rcpts]
    assert [code(a) for a in answers[:limit]] == [250] * limit
    assert {a for a in answers[limit:]} == {b"452 4.5.3 Too many recipients"}
    raw = crlf(make_mail(RECRUITER, rcpts[:3], "To many"))
    assert code(await wire.send(b"DATA\r\n")) == 354
    assert code(await wire.send(raw + b".\r\n")) == 250
    assert [(m.rcpt_tos, m.content) for m in sink.messages] == [(rcpts[:limit], raw)]
    accepted = [raw, *await still_serving(relay.relay.port, sink, team, wire)]
    await wire.close()
    await nothing_lost(sink, team, accepted)


# Control characters in MAIL FROM and RCPT TO, where a line break would start
# a command (or a header) of the client's choosing down the line. Nothing of
# them reaches the upstream: aiosmtpd refuses the syntax (501), the relay an
# address that would reach the upstream as another or with a control
# character in it (553), and a parameter not in ASCII (555). A CR that
# aiosmtpd reads as blank space inside <...> leaves a clean address, which
# is taken.
INJECTIONS = [
    pytest.param(f"MAIL FROM:<{RECRUITER}>\rRCPT TO:<victim@example.com>", 501,
                 id="bare-CR-after-MAIL-FROM"),
    pytest.param(f"MAIL FROM:<{RECRUITER}> SIZE=100\rX-Injected: yes", 501,
                 id="bare-CR-in-a-MAIL-parameter"),
    pytest.param(f"MAIL FROM:<{RECRUITER}\r>", 250, id="bare-CR-before-the-bracket"),
    pytest.param(f"MAIL FROM:<{RECRUITER}\x00victim@example.com>", 553, id="NUL-in-the-sender"),
    pytest.param('MAIL FROM:<"rita\rRCPT TO: victim@example.com"@example.com>', 553,
                 id="bare-CR-in-a-quoted-sender"),
    pytest.param(f"MAIL FROM:<{RECRUITER}> SIZE=\u0661\u0660\u0660", 555,
                 id="a-parameter-not-in-ASCII"),
    pytest.param(f"RCPT TO:<{ADA}>\rDATA", 555, id="bare-CR-after-RCPT-TO"),
    pytest.param('RCPT TO:<"ada\rBcc: victim@example.com"@applicant.test>', 553,
                 id="bare-CR-in-a-quoted-recipient"),
    pytest.param(f"RCPT TO:<{ADA}\x00victim@example.com>", 553, id="NUL-in-the-recipient"),
    pytest.param('MAIL FROM:<"rita\x01"@example.com>', 553, id="control-in-a-quoted-sender"),
    pytest.param("MAIL FROM:<rita\x7f@example.com>", 553, id="DEL-in-the-sender"),
    pytest.param('RCPT TO:<"ada\x1f"@applicant.test>', 553, id="control-in-a-quoted-recipient"),
    pytest.param(b"MAIL FROM:<rita\xff@example.com>", 553, id="a-sender-not-in-UTF-8"),
    pytest.param(b"RCPT TO:<ada\xff@applicant.test>", 553, id="a-recipient-not-in-UTF-8"),
    pytest.param("RCPT TO:<ada@applicant.test\x1b[2J>", 501, id="escape-in-the-recipient"),
]


@pytest.mark.parametrize(("command", "expected"), INJECTIONS)
async def test_header_and_command_injection_in_addresses_never_reaches_the_upstream(
        relay: Gateway, sink: Sink, team: Store, command: str | bytes, expected: int) -> None:
    line = command if isinstance(command, bytes) else command.encode()
    wire = await Wire.open(relay.relay.port)
    if line.startswith(b"RCPT"):
        assert code(await wire.send(f"MAIL FROM:<{RECRUITER}>\r\n".encode())) == 250
    reply = await wire.send(line + b"\r\n")
    assert code(reply) == expected, reply
    assert await wire.silent()
    assert code(await wire.send(b"RSET\r\n")) == 250
    assert sink.messages == []
    accepted = await still_serving(relay.relay.port, sink, team, wire)
    await wire.close()
    await nothing_lost(sink, team, accepted)


async def test_an_overlong_command_line_gets_500_and_the_session_goes_on(
        relay: Gateway, sink: Sink, team: Store) -> None:
    wire = await Wire.open(relay.relay.port)
    assert code(await wire.send(f"MAIL FROM:<{RECRUITER}>\r\n".encode())) == 250
    # RFC 5321 4.5.3.1.4: 500 is the answer to a command line too long; aiosmtpd
    # reads it to its end in bounded pieces and drops it.
    reply = await wire.send(b"RCPT TO:<" + b"a" * 1_000_000 + b"@applicant.test>\r\n")
    assert reply == b"500 Command line too long"
    assert await wire.silent()
    assert code(await wire.send(b"RSET\r\n")) == 250
    accepted = await still_serving(relay.relay.port, sink, team, wire)
    await wire.close()
    await nothing_lost(sink, team, accepted)


# --- posing as the company from outside ------------------------------------------------


async def test_an_internal_sender_from_outside_is_refused(
        gateway_factory: GatewayFactory, sink: Sink, team: Store) -> None:
    await Mailboxes(team.db).set_hosted_identity(RECRUITER, "rita@hosted.example")
    gateway = await gateway_factory(allowed_networks=ONLY_LOCALHOST)
    port = gateway.relay.port
    wire = await Wire.open(port, source=OUTSIDER)
    # The envelope sender: a team member's, or any in an internal domain.
    for sender in (RECRUITER, "ceo@example.com", "someone@sub.example.com"):
        reply = await wire.send(f"MAIL FROM:<{sender}>\r\n".encode())
        assert code(reply) == 550 and b"5.7.1" in reply, reply
    # The From header, under an outside envelope sender.
    await wire.transaction(ADA, ["rita@hosted.example"])
    forged = crlf(make_mail(f"Rita <{RECRUITER}>", "rita@hosted.example", "Offer withdrawn"))
    reply = await wire.send(forged + b".\r\n")
    assert code(reply) == 550 and b"5.7.1" in reply and RECRUITER.encode() in reply, reply
    assert sink.messages == []
    assert await captured(team) == []
    # A candidate's own mail from outside still arrives and is captured, in
    # the same session (over the same upstream connection: the refusal came
    # before any of the message went upstream) and in a new one.
    await wire.transaction(ADA, ["rita@hosted.example"])
    own = crlf(make_mail(ADA, "rita@hosted.example", "My application"))
    assert code(await wire.send(own + b".\r\n")) == 250
    assert [m.content for m in sink.messages] == [own]
    assert sink.sessions == 1
    await wire.close()
    accepted = await still_serving(port, sink, team, source=OUTSIDER)
    await nothing_lost(sink, team, [own, *accepted])


async def test_the_company_network_may_use_internal_senders(
        gateway_factory: GatewayFactory, sink: Sink, team: Store) -> None:
    gateway = await gateway_factory(allowed_networks=ONLY_LOCALHOST)
    result = await smtp_send(gateway.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
    assert result.code == 250
    assert len(await captured(team)) == 1
