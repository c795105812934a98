"""The relay's DATA reader: pieces, not lines, with aiosmtpd's rules.

Sent over a plain socket in awkward pieces (one byte at a time, the end
marker split, stuffed dots at the edges of what arrives), to the real relay
in front of a real sink and store: what the sink gets and what is captured
must be the message, byte for byte, without its transparency dots.
"""

from __future__ import annotations

import asyncio
import random
import smtplib
import types

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from atsmail.gateway import relay as relay_module
from atsmail.gateway.relay import (
    BARE_LINE_END,
    MAX_LINE,
    RelayProtocol,
    _line_lengths,
    _unstuffed,
    normalise_line_ends,
    passable_lines,
)
from atsmail.gateway.server import Gateway
from atsmail.gateway.upstream import DATA_PIECE, _end_of_data, _stuffed_pieces
from atsmail.storage import Store
from tests.conftest import GatewayFactory, Sink, make_mail
from tests.gateway.test_hostile_input import (
    ADA,
    RECRUITER,
    Wire,
    captured,
    code,
    crlf,
    still_serving,
)


def stuffed(raw: bytes, end: bool = True) -> bytes:
    """`raw` as a client sends it after DATA: a dot that starts a line doubled,
    and with `end` the end marker added."""
    lines = (b"." if raw.startswith(b".") else b"") + raw.replace(b"\r\n.", b"\r\n..")
    return lines + b".\r\n" if end else lines


def dotted(lines: int = 40_000) -> bytes:
    """A candidate mail of about 2 MB whose lines often start or end with a dot."""
    body = "".join(
        (".leading dot {0}\n" if n % 3 == 0 else "..two dots {0}.\n" if n % 3 == 1
         else "ends with a dot {0}.\n").format(n) + "x" * 30 + "\n" for n in range(lines))
    return crlf(make_mail(RECRUITER, ADA, "Dots", body))


@pytest.mark.parametrize(("unfinished", "piece", "expected"), [
    (0, b"abc", (3, False)),
    (5, b"abc", (8, False)),
    (5, b"ab\r\ncd", (2, False)),
    (0, b"a\n" + b"b" * 2000 + b"\nc", (1, True)),
    (0, b"\n" * 3000, (0, False)),
    (MAX_LINE, b"\r\n", (0, True)),
    (MAX_LINE - 1, b"\r\n", (0, False)),
    (0, b"x" * (MAX_LINE + 1), (MAX_LINE + 1, True)),
])
def test_line_lengths_carry_across_pieces(unfinished: int, piece: bytes,
                                          expected: tuple[int, bool]) -> None:
    assert _line_lengths(unfinished, piece, len(piece)) == expected


def test_line_lengths_find_every_line_too_long_wherever_it_lies() -> None:
    # Against the plain way (cutting the data into lines), over lines of
    # every length around the limit, at every offset and in every cut.
    rng = random.Random(5)
    for _ in range(3000):
        lengths = [rng.choice([0, 1, 80, MAX_LINE - 1, MAX_LINE, MAX_LINE + 1,
                               rng.randrange(3 * MAX_LINE)]) for _ in range(rng.randrange(1, 8))]
        data = b"\n".join(b"y" * n for n in lengths)
        unfinished = rng.choice([0, 1, MAX_LINE // 2, MAX_LINE])
        end = rng.randrange(len(data) + 1)
        lines = [len(line) for line in data[:end].split(b"\n")]
        lines[0] += unfinished
        assert _line_lengths(unfinished, data, end) == (lines[-1], max(lines) > MAX_LINE), (
            lengths, unfinished, end)


def test_unstuffing_drops_the_dots_that_follow_a_line_end_even_across_pieces() -> None:
    # Against the plain way: the two bytes sent before, then the piece, with
    # every dot after a <CR><LF> removed; the end of data cut off at `end`.
    rng = random.Random(7)
    for _ in range(5000):
        piece = bytes(rng.choice(b"\r\n.a") for _ in range(rng.randrange(12)))
        tail = bytes(rng.choice(b"\r\n.a") for _ in range(2))
        end = rng.randrange(len(piece) + 1)
        expected = (tail + piece[:end]).replace(b"\r\n.", b"\r\n")[2:]
        body, dots = _unstuffed(piece, end, tail)
        assert bytes(body) == expected, (tail, piece, end)
        # A line may begin with a dot only where one was seen (or at the start,
        # where the lines passed on begin: those are looked at anyway).
        assert dots or b"\r\n." not in tail[-1:] + expected, (tail, piece, end)


async def test_the_data_read_ends_where_aiosmtpd_would_end_it_however_it_arrives() -> None:
    # Against the plain way: the data ends at the first <CR><LF>.<CR><LF>,
    # counting the <CR><LF> of the DATA command; what follows stays unread.
    rng = random.Random(11)
    for _ in range(2000):
        stream = bytes(rng.choice(b"\r\n.a") for _ in range(rng.randrange(40))) + b"\r\n.\r\nNOOP"
        whole = b"\r\n" + stream
        end = whole.find(b"\r\n.\r\n")
        # ... with its line ends made <CR><LF>, or refused when they cannot be.
        normalised = normalise_line_ends(whole[:end + 2].replace(b"\r\n.", b"\r\n")[2:])
        expected = (b"", BARE_LINE_END) if normalised is None else (normalised, None)
        reader = asyncio.StreamReader(limit=rng.choice([8, 1001]))
        protocol = types.SimpleNamespace(_reader=reader, data_size_limit=0)

        async def arrive(data: bytes = stream, reader: asyncio.StreamReader = reader) -> None:
            while data:
                cut = rng.randrange(1, 9)
                reader.feed_data(data[:cut])
                data = data[cut:]
                await asyncio.sleep(0)

        feeding = asyncio.create_task(arrive())
        read = RelayProtocol._read_data(protocol)  # type: ignore[arg-type]
        assert await asyncio.wait_for(read, 10) == expected, stream
        await feeding
        assert reader._buffer == stream[end + 3:], stream  # type: ignore[attr-defined]


async def test_what_goes_upstream_as_it_arrives_is_whole_crlf_lines_the_message_begins_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Lines passed on every few bytes (not every 64 KB), by the relay's own
    # choice of lines; mostly <CR><LF> lines, with now and then a bare CR or
    # LF, a dot or an end of data in them.
    monkeypatch.setattr(relay_module, "PASS_EVERY", 8)
    rng = random.Random(17)
    for _ in range(3000):
        stream = b"".join(rng.choices([b"\r\n", b"a", b".", b"\n", b"\r"], [30, 40, 20, 2, 2],
                                      k=rng.randrange(120))) + b"\r\n.\r\nNOOP"
        whole = b"\r\n" + stream
        end = whole.find(b"\r\n.\r\n")
        read = whole[:end + 2].replace(b"\r\n.", b"\r\n")[2:]
        normalised = normalise_line_ends(read)
        expected = (b"", BARE_LINE_END) if normalised is None else (normalised, None)
        reader = asyncio.StreamReader(limit=rng.choice([8, 1001]))
        cuts = sorted(rng.sample(range(1, len(stream)), min(6, len(stream) - 1)))
        for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            reader.feed_data(stream[start:stop])
        went: list[bytes] = []

        async def pass_on(data: bytearray, passed: int, dotted: bool,
                          went: list[bytes] = went, stream: bytes = stream) -> int:
            lines = passable_lines(data, passed)
            if lines is None:
                return -1
            # Said to hold no line that begins with a dot, but the first: then
            # the upstream session does not look for them.
            assert dotted or b"\r\n." not in lines, stream
            went.append(lines)
            return passed + len(lines)

        protocol = types.SimpleNamespace(_reader=reader, data_size_limit=0, _pass_on=pass_on)
        assert await RelayProtocol._read_data(protocol) == expected, stream  # type: ignore[arg-type]
        # Nothing passed on can end the data, or be read otherwise, upstream.
        for lines in went:
            assert lines.endswith(b"\r\n"), stream
            assert lines.count(b"\r") == lines.count(b"\n") == lines.count(b"\r\n"), stream
        assert read.startswith(b"".join(went)), stream


@pytest.mark.parametrize("piece_size", [1, 7, 4096, 1 << 20])
async def test_a_message_sent_in_any_pieces_arrives_whole_and_unstuffed(
        relay: Gateway, sink: Sink, team: Store, piece_size: int) -> None:
    raw = dotted(lines=400 if piece_size < 10 else 40_000)
    wire = await Wire.open(relay.relay.port)
    await wire.transaction(RECRUITER, [ADA])
    data = stuffed(raw)
    for start in range(0, len(data), piece_size):
        wire.writer.write(data[start:start + piece_size])
        if piece_size < 10:
            await asyncio.sleep(0)
    await wire.writer.drain()
    assert code(await wire.reply()) == 250
    assert [m.content for m in sink.messages] == [raw]
    assert await captured(team) == [raw]
    await still_serving(relay.relay.port, sink, team, wire)
    await wire.close()


async def test_the_end_marker_split_at_every_byte_still_ends_the_data(
        relay: Gateway, sink: Sink, team: Store) -> None:
    raw = crlf(make_mail(RECRUITER, ADA, "Split end", "last line.\n"))
    wire = await Wire.open(relay.relay.port)
    for cut in range(1, 5):
        await wire.transaction(RECRUITER, [ADA])
        end = b"\r\n.\r\n"
        wire.writer.write(raw[:-2] + end[:cut])
        await wire.writer.drain()
        await asyncio.sleep(0.05)
        assert await wire.silent(0.1)
        wire.writer.write(end[cut:])
        assert code(await wire.reply()) == 250
    assert [m.content for m in sink.messages] == [raw] * 4
    await wire.close()


async def test_commands_pipelined_after_the_end_of_data_are_answered(
        relay: Gateway, sink: Sink, team: Store) -> None:
    raw = crlf(make_mail(RECRUITER, ADA, "Pipelined"))
    wire = await Wire.open(relay.relay.port)
    await wire.transaction(RECRUITER, [ADA])
    wire.writer.write(raw + b".\r\nRSET\r\nNOOP\r\n")
    assert code(await wire.reply()) == 250
    assert (await wire.reply()).startswith(b"250")
    assert (await wire.reply()).startswith(b"250")
    assert [m.content for m in sink.messages] == [raw]
    await wire.close()


@pytest.mark.parametrize(("sent", "content"), [
    (b".\r\n", b""),
    (b"..\r\n.\r\n", b".\r\n"),
    (b"\r\n.\r\n", b"\r\n"),
    (b"\r\n..\r\n.\r\n", b"\r\n.\r\n"),
], ids=["empty", "a lone dot", "an empty line", "an empty line, then a dot"])
async def test_data_that_ends_or_holds_a_dot_at_once_is_read_as_sent(
        relay: Gateway, sink: Sink, sent: bytes, content: bytes) -> None:
    # Right after the 354: the end of data needs the <CR><LF> of the DATA
    # command, and a first line's dot is a transparency dot.
    wire = await Wire.open(relay.relay.port)
    await wire.transaction(RECRUITER, [ADA])
    assert code(await wire.send(sent)) == 250
    assert [m.content for m in sink.messages] == [content]
    await wire.close()


async def test_lines_that_end_in_a_dot_are_read_in_pieces_not_one_by_one(
        relay: Gateway, sink: Sink, team: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Searched for ".<CR><LF>", each of these lines was a piece of its own
    # read: 100 times the work of plain text, which anyone could send.
    raw = crlf(make_mail(RECRUITER, ADA, "Dot ends", "a.\n" * 50_000))
    wire = await Wire.open(relay.relay.port)
    await wire.transaction(RECRUITER, [ADA])
    (session,) = relay.relay.sessions
    searches = 0
    readuntil = asyncio.StreamReader.readuntil

    async def counted(reader: asyncio.StreamReader, separator: bytes = b"\n") -> bytes:
        nonlocal searches
        searches += reader is session._reader
        return await readuntil(reader, separator)

    monkeypatch.setattr(asyncio.StreamReader, "readuntil", counted)
    assert code(await wire.send(stuffed(raw))) == 250
    assert [m.content for m in sink.messages] == [raw]
    assert await captured(team) == [raw]
    assert 0 < searches < 100, searches
    await wire.close()


async def test_a_line_of_1000_bytes_passes_and_one_of_1001_is_refused_after_the_data(
        relay: Gateway, sink: Sink, team: Store) -> None:
    head = crlf(make_mail(RECRUITER, ADA, "Long lines", ""))
    longest = head + b"y" * (MAX_LINE - 1) + b"\r\n"
    too_long = head + b"y" * MAX_LINE + b"\r\n"
    wire = await Wire.open(relay.relay.port)
    await wire.transaction(RECRUITER, [ADA])
    assert code(await wire.send(longest + b".\r\n")) == 250
    await wire.transaction(RECRUITER, [ADA])
    # Sent in pieces that split the long line: refused only once the data ended.
    for start in range(0, len(too_long), 300):
        wire.writer.write(too_long[start:start + 300])
    reply = await wire.send(b".\r\n")
    assert reply.startswith(b"554 5.6.0")
    assert [m.content for m in sink.messages] == [longest]
    await still_serving(relay.relay.port, sink, team, wire)
    await wire.close()


async def test_oversized_data_is_read_to_its_end_then_refused_with_552_5_3_4(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    gateway = await gateway_factory(max_message_size=100_000)
    raw = crlf(make_mail(RECRUITER, ADA, "Too big", ("z" * 70 + "\n") * 2_000))
    wire = await Wire.open(gateway.relay.port)
    await wire.transaction(RECRUITER, [ADA])
    reply = await wire.send(raw + b".\r\n")
    assert reply.startswith(b"552 5.3.4")
    assert sink.messages == [] and await captured(team) == []
    await still_serving(gateway.relay.port, sink, team, wire)
    await wire.close()


async def test_a_long_message_with_bare_lf_line_ends_is_taken_as_smtplib_sends_it(
        relay: Gateway, sink: Sink, team: Store) -> None:
    # smtplib.sendmail sends bytes as they are: lines ended by a bare LF,
    # its own <CR><LF>.<CR><LF> at the end.
    raw = make_mail(RECRUITER, ADA, "LF lines", ("w" * 70 + "\n") * 2_000)
    assert b"\r" not in raw

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", relay.relay.port, timeout=30) as client:
            return client.sendmail(RECRUITER, [ADA], raw)

    assert await asyncio.to_thread(send) == {}
    # ... and the <CR><LF> smtplib adds makes an empty last line.
    delivered = crlf(raw) + b"\r\n"
    assert [m.content for m in sink.messages] == [delivered]
    assert await captured(team) == [delivered]


async def test_a_client_gone_mid_data_leaves_nothing_behind(
        relay: Gateway, sink: Sink, team: Store) -> None:
    raw = crlf(make_mail(RECRUITER, ADA, "Cut off", ("v" * 70 + "\n") * 5_000))
    wire = await Wire.open(relay.relay.port)
    await wire.transaction(RECRUITER, [ADA])
    wire.writer.write(raw[: len(raw) // 2])
    await wire.writer.drain()
    wire.writer.close()
    await asyncio.sleep(0.3)
    assert sink.messages == [] and await captured(team) == []
    await still_serving(relay.relay.port, sink, team)


# What the upstream gets: the same bytes aiosmtplib would write, in pieces.

def as_aiosmtplib_writes(content: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"


@pytest.mark.parametrize("content", [
    b"Subject: x\r\n\r\nbody\r\n",
    b"Subject: x\r\n\r\nno line end at the end",
    b".starts with a dot\r\n.\r\n..\r\nend\r\n",
    b"x" * 10 + b"\r\n" + (b"." + b"y" * 998 + b"\r\n") * 1_000,
    (b"a" * (DATA_PIECE - 1) + b"\r\n") * 3 + b".edge\r\n",
    b"a" * (DATA_PIECE * 2),
], ids=["plain", "unended", "dots", "dotted-lines", "piece-edges", "one-long-line"])
def test_the_data_written_upstream_is_stuffed_and_ended_in_its_last_piece(
        content: bytes) -> None:
    pieces = [bytes(piece) for piece in _stuffed_pieces(content)]
    assert b"".join(pieces) == as_aiosmtplib_writes(content)
    assert pieces[-1].endswith(b"\r\n.\r\n") and len(pieces[-1]) > 3
    assert all(piece.endswith(b"\r\n") for piece in pieces)  # cut at line ends
    # Held back for a later write, the end of data follows the same pieces.
    held = [bytes(piece) for piece in _stuffed_pieces(content, end=False)]
    assert b"".join(held) + _end_of_data(content) == as_aiosmtplib_writes(content)
    assert held[:-1] == pieces[:-1]


def test_empty_data_is_only_the_end_marker() -> None:
    assert [bytes(piece) for piece in _stuffed_pieces(b"")] == [b".\r\n"]
