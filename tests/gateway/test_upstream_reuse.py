"""Upstream connections kept between client sessions, as Postfix's SMTP client keeps them."""

from __future__ import annotations

import asyncio

import pytest

from atsmail.gateway import relay as relay_module
from atsmail.gateway.server import Gateway
from atsmail.storage import Store
from tests.conftest import GatewayFactory, Sink, make_mail, smtp_send
from tests.gateway.test_hostile_input import Wire, code, crlf

RECRUITER = "recruiter@example.com"
ADA = "ada@applicant.test"


def open_at(sink: Sink) -> int:
    """Connections the sink holds open."""
    return sum(1 for p in sink._protocols
               if p.transport is not None and not p.transport.is_closing())


async def send_one(gateway: Gateway, subject: str) -> int:
    raw = make_mail(RECRUITER, ADA, subject)
    return (await smtp_send(gateway.relay.port, raw, RECRUITER, [ADA])).code


async def test_client_sessions_one_after_another_share_one_upstream_connection(
        relay: Gateway, sink: Sink, team: Store) -> None:
    for n in range(3):
        assert await send_one(relay, f"Message {n}") == 250
    assert len(sink.messages) == 3
    assert sink.sessions == 1
    assert [t.message_count for t in await team.threads("C-1")] == [1, 1, 1]


async def test_a_kept_connection_the_upstream_closed_is_replaced(
        relay: Gateway, sink: Sink, team: Store) -> None:
    sink.hang_up_after_data = True
    for n in range(3):
        assert await send_one(relay, f"Message {n}") == 250
        await asyncio.sleep(0.1)
    assert len(sink.messages) == 3
    assert sink.sessions == 3


async def test_a_connection_left_mid_transaction_is_not_kept(
        relay: Gateway, sink: Sink, team: Store) -> None:
    wire = await Wire.open(relay.relay.port)
    await wire.transaction(RECRUITER, [ADA])
    wire.writer.write(crlf(make_mail(RECRUITER, ADA, "Cut off"))[:100])
    await wire.writer.drain()
    wire.writer.close()
    await asyncio.sleep(0.3)
    assert await send_one(relay, "Next") == 250
    assert sink.sessions == 2
    assert [b"Subject: Next" in m.content for m in sink.messages] == [True]


async def test_kept_connections_are_closed_after_a_while_and_when_the_relay_stops(
        gateway_factory: GatewayFactory, sink: Sink, team: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "IDLE_UPSTREAM_TIME", 0.5)
    gateway = await gateway_factory()
    assert await send_one(gateway, "First") == 250
    assert open_at(sink) == 1
    # The relay looks every second.
    for _ in range(40):
        if open_at(sink) == 0:
            break
        await asyncio.sleep(0.1)
    assert open_at(sink) == 0
    # Two at once: both kept, then both closed by stopping.
    wires = [await Wire.open(gateway.relay.port) for _ in range(2)]
    for wire in wires:
        await wire.transaction(RECRUITER, [ADA])
    for n, wire in enumerate(wires):
        assert code(await wire.send(crlf(make_mail(RECRUITER, ADA, f"Two {n}")) + b".\r\n")) == 250
        await wire.close()
    await asyncio.sleep(0.1)
    assert open_at(sink) == 2
    await gateway.stop()
    await asyncio.sleep(0.1)
    assert open_at(sink) == 0
    assert len(sink.messages) == 3


async def test_ehlo_is_answered_in_one_write(relay: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.relay.port)
    await reader.readline()
    writer.write(b"EHLO client.test\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    # Everything the answer holds arrived together, its last line included.
    answer = await reader.read(65536)
    lines = answer.decode().splitlines()
    assert lines[0].startswith("250-") and lines[-1].startswith("250 ")
    assert any(line[4:].startswith("SIZE") for line in lines)
    writer.write(b"MAIL FROM:<x@example.org>\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"250")
    writer.close()
