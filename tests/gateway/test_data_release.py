"""The message goes upstream while it is judged and its copy stored; its end
of data waits for those, and without it the upstream delivers nothing.

Between the relay and the real sink sits a loopback tap that keeps every
byte the relay sends upstream, so a test can see how far a message got.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from atsmail.config import Upstream
from atsmail.gateway.server import Gateway
from atsmail.gateway.upstream import WITHDRAWN, MaildirSession
from atsmail.storage import Store
from tests.conftest import GatewayFactory, Sink, make_mail

RECRUITER = "recruiter@example.com"
ADA = "ada@applicant.test"


@dataclass
class Tap:
    """A loopback TCP forwarder to the sink that records what goes upstream."""

    target: int
    upstream_bytes: bytearray = field(default_factory=bytearray)
    connections: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    _pipes: set[asyncio.Task[None]] = field(default_factory=set)
    _ends: list[asyncio.StreamWriter] = field(default_factory=list)
    # Answered to the relay's DATA command in the upstream's stead, when set.
    refuse_data: bytes | None = None
    refused: int = 0

    def hang_up(self, answer: bytes) -> None:
        """Answer the relay in the upstream's stead and close every connection,
        as an upstream that gives up waiting does."""
        self.say(answer)
        for writer in self._ends:
            writer.close()

    def say(self, answer: bytes) -> None:
        """Answer the relay in the upstream's stead, and go on reading."""
        for writer in self._ends:
            if writer.get_extra_info("peername")[1] != self.target:
                writer.write(answer)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._ends += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       record: bytearray | None) -> None:
            try:
                while chunk := await src.read(65536):
                    if record is not None:
                        record += chunk
                        if self.refuse_data is not None and chunk == b"DATA\r\n":
                            self.refused += 1
                            writer.write(self.refuse_data)
                            continue
                    dst.write(chunk)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        pipes = [asyncio.create_task(pipe(reader, up_writer, self.upstream_bytes)),
                 asyncio.create_task(pipe(up_reader, writer, None))]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in self._pipes:
                task.cancel()
            await asyncio.gather(*self._pipes, return_exceptions=True)
            await self.server.wait_closed()


@pytest.fixture
async def tap(sink: Sink) -> AsyncIterator[Tap]:
    server = Tap(sink.port)
    await server.start()
    yield server
    await server.stop()


def hold(owner: Any, name: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Make `owner`'s coroutine method `name` wait before it runs.

    Returns (reached, go): `reached` is set when it is called, and the real
    method runs once `go` is set.
    """
    reached, go = asyncio.Event(), asyncio.Event()
    method: Callable[..., Awaitable[Any]] = getattr(owner, name)

    async def held(*args: Any) -> Any:
        reached.set()
        await go.wait()
        return await method(*args)

    setattr(owner, name, held)
    return reached, go


def hold_prepare(gateway: Gateway) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the relay's store wait before writing each pending copy."""
    return hold(gateway.writer, "prepare")


async def until(condition: Callable[[], Any]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def test_the_message_is_upstream_before_its_copy_is_stored_and_ends_after(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, tap: Tap) -> None:
    gateway = await gateway_factory(upstream=Upstream("smtp", "127.0.0.1", tap.port))
    reached, go = hold_prepare(gateway)
    body = "".join(f"line {n} of the CV\n" for n in range(5000)) + "The last line.\n"
    raw = make_mail(RECRUITER, ADA, "Overlapped", body)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.relay.port, timeout=30)
    await client.connect()
    sending = asyncio.create_task(client.sendmail(RECRUITER, [ADA], raw))

    try:
        await asyncio.wait_for(reached.wait(), 10)
        # All of it is upstream while the copy waits, all but the end of data.
        await until(lambda: b"The last line.\r\n" in tap.upstream_bytes)
        await asyncio.sleep(0.2)
        assert not tap.upstream_bytes.endswith(b"\r\n.\r\n")
        assert sink.messages == [] and not sending.done()
    finally:
        go.set()  # the relay's stop waits for the message in flight
    await sending
    await client.quit()
    assert tap.upstream_bytes.count(b"The last line.\r\n.\r\n") == 1
    assert [m.content.replace(b"\r\n", b"\n") for m in sink.messages] == [raw]
    assert [(t.subject, t.message_count) for t in await team.threads("C-1")] == [
        ("Overlapped", 1)]


@pytest.mark.parametrize(("answer", "heard"), [
    (b"421 4.4.2 sink.test Error: timeout exceeded\r\n", (421, "timeout exceeded")),
    (b"", (451, "Upstream connection lost")),
    # Not a refusal, but no delivery either: passed on, it would be taken for one.
    (b"221 2.0.0 Bye\r\n", (451, "Upstream connection lost")),
], ids=["421", "hang-up", "221"])
async def test_an_upstream_that_gives_up_while_the_copy_is_stored_is_heard_at_once(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, tap: Tap,
        answer: bytes, heard: tuple[int, str]) -> None:
    gateway = await gateway_factory(upstream=Upstream("smtp", "127.0.0.1", tap.port))
    reached, go = hold_prepare(gateway)
    discarded = []
    discard = gateway.writer.discard

    async def counted(prepared: Any) -> None:
        await discard(prepared)
        discarded.append(prepared)

    gateway.writer.discard = counted  # type: ignore[method-assign]
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.relay.port, timeout=30)
    await client.connect()
    raw = make_mail(RECRUITER, ADA, "Too slow for the upstream", "The last line.\n")
    sending = asyncio.create_task(client.sendmail(RECRUITER, [ADA], raw))
    try:
        await asyncio.wait_for(reached.wait(), 10)
        await until(lambda: b"The last line.\r\n" in tap.upstream_bytes)
        tap.hang_up(answer)
        # The client hears the upstream's answer while the store is still
        # busy with the copy (a locked store may take its busy timeout).
        with pytest.raises(aiosmtplib.SMTPDataError) as error:
            await asyncio.wait_for(sending, 10)
        assert error.value.code == heard[0] and heard[1] in error.value.message
        assert not go.is_set()
    finally:
        go.set()
    # The copy stored after that is withdrawn.
    await until(lambda: discarded)
    await client.quit()
    assert sink.messages == []
    assert await team.threads() == []
    assert await gateway.store.db.run(lambda conn: conn.exec_driver_sql(
        "SELECT count(*) FROM messages").scalar(), write=False) == 0


async def test_a_maildir_upstream_delivers_only_what_is_released(tmp_path: Path) -> None:
    maildir = MaildirSession(tmp_path / "Maildir")
    raw = make_mail(RECRUITER, ADA, "Held")

    async def refused() -> bool:
        return False

    async def released() -> bool:
        return True

    assert await maildir.data(raw, release=refused) is WITHDRAWN
    assert not (tmp_path / "Maildir").exists()
    assert (await maildir.data(raw, release=released)).ok
    assert [p.read_bytes() for p in (tmp_path / "Maildir" / "new").iterdir()] == [raw]


async def test_no_copy_is_stored_once_the_upstream_has_failed(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, tap: Tap) -> None:
    gateway = await gateway_factory(upstream=Upstream("smtp", "127.0.0.1", tap.port))
    reached, go = hold(gateway.relay, "_decide")
    prepared = []
    prepare = gateway.writer.prepare

    async def counted(capture: Any) -> Any:
        prepared.append(capture)
        return await prepare(capture)

    gateway.writer.prepare = counted  # type: ignore[method-assign]
    tap.refuse_data = b"554 5.5.1 sink.test Error: no valid recipients\r\n"
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.relay.port, timeout=30)
    await client.connect()
    raw = make_mail(RECRUITER, ADA, "Refused upstream")
    sending = asyncio.create_task(client.sendmail(RECRUITER, [ADA], raw))
    try:
        await asyncio.wait_for(reached.wait(), 10)
        # The refusal is passed on while the message is still being judged.
        with pytest.raises(aiosmtplib.SMTPDataError) as error:
            await asyncio.wait_for(sending, 10)
        assert error.value.code == 554 and "no valid recipients" in error.value.message
        assert tap.refused == 1
    finally:
        go.set()
    await until(lambda: not gateway.relay._tasks)  # the judge is done
    # Judged as candidate mail, but its copy would only have been discarded.
    assert prepared == [] and sink.messages == []
    assert await team.threads() == []
    # The upstream connection is still good for the next message.
    tap.refuse_data = None
    await client.sendmail(RECRUITER, [ADA], make_mail(RECRUITER, ADA, "Next"))
    await client.quit()
    assert len(sink.messages) == 1 and tap.connections == 1


async def test_stopping_waits_for_a_copy_settled_after_an_early_answer(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, tap: Tap) -> None:
    gateway = await gateway_factory(upstream=Upstream("smtp", "127.0.0.1", tap.port))
    stored, store = hold_prepare(gateway)
    discarding, discard = hold(gateway.writer, "discard")
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.relay.port, timeout=30)
    await client.connect()
    raw = make_mail(RECRUITER, ADA, "Cut short", "The last line.\n")
    sending = asyncio.create_task(client.sendmail(RECRUITER, [ADA], raw))
    stopping = None
    try:
        await asyncio.wait_for(stored.wait(), 10)
        await until(lambda: b"The last line.\r\n" in tap.upstream_bytes)
        stopping = asyncio.create_task(gateway.relay.stop(grace=0))
        await asyncio.sleep(0.1)
        # The upstream gives up while the relay stops: the message ends, and
        # settling its copy is left to a task of its own.
        tap.hang_up(b"421 4.4.2 sink.test Error: timeout exceeded\r\n")
        await asyncio.sleep(0.1)
        store.set()
        await asyncio.wait_for(discarding.wait(), 10)
        await asyncio.sleep(0.2)
        assert not stopping.done(), "the relay stopped with a copy still being settled"
    finally:
        store.set()
        discard.set()
        if stopping is not None:
            await asyncio.wait_for(stopping, 10)
        with contextlib.suppress(aiosmtplib.SMTPException):
            await sending
    assert sink.messages == []
    assert await gateway.store.db.run(lambda conn: conn.exec_driver_sql(
        "SELECT count(*) FROM messages").scalar(), write=False) == 0
