"""The relay when its SQLite store is locked or its disk is full, or its upstream is slow.

Each time the client is told to try again later (4xx), and once the fault
ends the retry is delivered and captured once. The store here lives on a
small file system of its own, so it can be filled.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiosmtplib
import pytest

from atsmail.storage import Store, db
from tests.conftest import GatewayFactory, Sink, make_mail, require_peer, smtp_send

RECRUITER = "recruiter@example.com"
ADA = "ada@applicant.test"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB file system of its own (needs the right to mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0
    require_peer(mounted, "cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
async def store_url(disk: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    # A lock is waited out this long before the message is deferred.
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 1000)
    url = f"sqlite+aiosqlite:///{disk}/atsmail.db"
    store = Store.open(url)
    await store.migrate()
    await store.close()
    yield url


def fill_up(disk: Path) -> Path:
    """Take every free byte of `disk`; delete the file returned to free them."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as out:
        for size in (len(chunk), 4096, 1):
            try:
                while True:
                    out.write(chunk[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def delivered(sink: Sink) -> list[bytes]:
    return [m.content.replace(b"\r\n", b"\n") for m in sink.messages]


def candidate_mail(subject: str) -> bytes:
    # Bigger than anything the store's write-ahead log already holds room for.
    return make_mail(RECRUITER, ADA, subject, "CV attached.\n" + ("x" * 76 + "\n") * 20_000)


async def test_a_full_disk_defers_mail_and_the_retry_is_kept_once_space_is_back(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, disk: Path) -> None:
    gateway = await gateway_factory()
    raw = candidate_mail("While the disk was full")
    filler = await asyncio.to_thread(fill_up, disk)

    result = await smtp_send(gateway.relay.port, raw, RECRUITER, [ADA])
    assert result.code == 451 and "store unavailable" in result.text
    assert sink.messages == []
    # Company mail is not stored, so it still flows.
    other = make_mail("a@example.com", "b@example.com")
    assert (await smtp_send(gateway.relay.port, other, "a@example.com",
                            ["b@example.com"])).code == 250

    os.unlink(filler)
    assert (await smtp_send(gateway.relay.port, raw, RECRUITER, [ADA])).code == 250
    assert delivered(sink) == [other, raw]
    threads = await team.threads("C-1")
    assert [(t.subject, t.message_count) for t in threads] == [("While the disk was full", 1)]


async def _lock(store_url: str) -> sqlite3.Connection:
    """A connection of the test's own, holding the store's write lock.

    It waits for the lock in a thread: a write of the gateway's own may hold
    it for a moment, and finishing that write takes the event loop.
    """
    locker = sqlite3.connect(store_url.partition(":///")[2], isolation_level=None,
                             check_same_thread=False)
    await asyncio.to_thread(locker.execute, "BEGIN EXCLUSIVE")
    return locker


async def test_a_store_locked_longer_than_the_wait_defers_mail_then_it_flows(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, store_url: str) -> None:
    gateway = await gateway_factory()
    raw = make_mail(RECRUITER, ADA, "While the store was locked")
    locker = await _lock(store_url)
    try:
        result = await smtp_send(gateway.relay.port, raw, RECRUITER, [ADA])
        assert result.code == 451 and "store unavailable" in result.text
        assert sink.messages == []

        # A lock released within the wait only delays the answer.
        later = make_mail(RECRUITER, ADA, "Waited for the lock")
        sending = asyncio.create_task(smtp_send(gateway.relay.port, later, RECRUITER, [ADA]))
        await asyncio.sleep(0.3)
        locker.execute("ROLLBACK")
        assert (await sending).code == 250
    finally:
        locker.close()

    assert (await smtp_send(gateway.relay.port, raw, RECRUITER, [ADA])).code == 250
    assert delivered(sink) == [later, raw]
    subjects = sorted((t.subject, t.message_count) for t in await team.threads("C-1"))
    assert subjects == [("Waited for the lock", 1), ("While the store was locked", 1)]


async def test_a_message_deferred_by_a_locked_store_is_withdrawn_and_the_session_goes_on(
        gateway_factory: GatewayFactory, team: Store, sink: Sink, store_url: str) -> None:
    gateway = await gateway_factory()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.relay.port, timeout=30)
    await client.connect()
    deferred = make_mail(RECRUITER, ADA, "Deferred")
    locker = await _lock(store_url)
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as error:
            await client.sendmail(RECRUITER, [ADA], deferred)
        assert error.value.code == 451 and "store unavailable" in error.value.message
    finally:
        locker.close()
    # The upstream had all of it but its end of data, and delivered nothing.
    assert sink.messages == []
    later = make_mail(RECRUITER, ADA, "Same session, store back")
    await client.sendmail(RECRUITER, [ADA], later)
    await client.quit()
    assert delivered(sink) == [later]
    # Over a new upstream connection: the old one was closed to withdraw the message.
    assert sink.sessions == 2
    assert [t.subject for t in await team.threads("C-1")] == ["Same session, store back"]


async def test_an_upstream_too_slow_to_answer_data_defers_mail_and_the_retry_is_kept_once(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    gateway = await gateway_factory(data_timeout=1)
    raw = make_mail(RECRUITER, ADA, "Slow upstream")
    sink.data_delay = 3
    result = await smtp_send(gateway.relay.port, raw, RECRUITER, [ADA])
    assert result.code == 451
    assert await team.threads() == []

    sink.data_delay = 0
    assert (await smtp_send(gateway.relay.port, raw, RECRUITER, [ADA])).code == 250
    assert [(t.subject, t.message_count) for t in await team.threads("C-1")] == [
        ("Slow upstream", 1)]
    # An upstream that goes on to take the first copy after the relay gave
    # up makes the one duplicate inherent in SMTP when an answer is lost
    # (this sink drops it with the connection; a queueing MTA would not).
    await asyncio.sleep(2.5)
    assert delivered(sink) in ([raw], [raw, raw])
