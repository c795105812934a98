"""Two `atsmail serve` processes on one PostgreSQL store, as in production.

Each has its own configuration file and relay port and shares the store, the
upstream and a Dovecot with the other. The connected mailboxes are split
between them (each mirrored by exactly one), mail relayed by either is
captured once, and when one is killed (`kill -9`, no chance to release
anything) its mailboxes move to the survivor, which captures what is
delivered to them afterwards; stopped properly, the survivor releases them.

The leases here last 10 s instead of 25 so the test stays short; the
hand-over time scales with the lease (`test_the_default_lease_moves_a_dead_
gateways_mailboxes_within_30_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from atsmail.config import MirrorConfig, SecretsConfig
from atsmail.gateway.mirror import LEASE_RENEWALS
from atsmail.storage import Store
from atsmail.storage.mailboxes import Mailboxes, mirrored_by
from atsmail.storage.models import CapturedMessage, MessageSource
from tests.conftest import Sink, make_mail, smtp_send
from tests.dovecot import Dovecot, free_port
from tests.gateway.test_mirror import connect, eventually

ADA = "ada@applicant.test"
RECRUITER = "recruiter@example.com"
LEASE = 10.0

CONFIG = """\
[storage]
url = "{url}"

[relay]
listen = "127.0.0.1:{port}"
upstream = "smtp://127.0.0.1:{upstream}"
upstream_timeout = 5
shutdown_grace = 1

[api]
enabled = false

[secrets]
key_file = "{key_file}"
key_env = "ATSMAIL_TEST_NO_KEY"

[mirror]
poll_interval = 1
command_timeout = 5
reconnect_max = 1
lease = {lease}
"""


@dataclass
class Serving:
    """One `atsmail serve` process."""

    process: asyncio.subprocess.Process
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


async def start_serving(root: Path, url: str, upstream: int,
                        secrets: SecretsConfig) -> Serving:
    root.mkdir()
    port = free_port()
    config = root / "atsmail.toml"
    config.write_text(CONFIG.format(url=url, port=port, upstream=upstream,
                                    key_file=secrets.key_file, lease=LEASE))
    log = root / "serve.log"
    with log.open("wb") as out:
        # The environment as it is (PYTHONPATH included): the code under test.
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "atsmail", "--config", str(config), "serve",
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            env=os.environ.copy())
    return Serving(process, port, log)


async def listening(serving: Serving, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if serving.process.returncode is not None:
            raise AssertionError(f"serve exited:\n{serving.output()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", serving.port)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not listen:\n{serving.output()}") from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def stop(serving: Serving) -> None:
    if serving.process.returncode is None:
        serving.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(serving.process.wait(), 15)
        except TimeoutError:
            serving.process.kill()
            await serving.process.wait()


async def held_by(store: Store) -> dict[str, int | None]:
    """Each connected mailbox, and the pid of the gateway whose lease on it is live."""
    return {box.address: int(holder.split(":")[1]) if (holder := mirrored_by(box)) else None
            for box in await Mailboxes(store.db).all() if box.state != "disconnected"}


async def captured(store: Store) -> Counter[str]:
    """How many stored copies each Message-ID has."""
    async with store.db.read() as session:
        return Counter(await session.scalars(select(CapturedMessage.message_id)))


async def sources(store: Store, message_id: str) -> set[tuple[str, str]]:
    async with store.db.read() as session:
        rows = await session.execute(
            select(MessageSource.source, MessageSource.mailbox)
            .join(CapturedMessage, CapturedMessage.id == MessageSource.message_pk)
            .where(CapturedMessage.message_id == message_id))
        return {(source, mailbox) for source, mailbox in rows}


@contextlib.asynccontextmanager
async def _gateways(store_url: str, tmp_path: Path, sink: Sink,
                    secrets: SecretsConfig) -> AsyncIterator[list[Serving]]:
    """Two gateways serving (their relays listening), stopped afterwards."""
    started: list[Serving] = []
    try:
        for name in ("one", "two"):
            started.append(await start_serving(tmp_path / name, store_url, sink.port, secrets))
        for serving in started:
            await listening(serving)
        yield started
    finally:
        for serving in started:
            await stop(serving)


def test_the_default_lease_moves_a_dead_gateways_mailboxes_within_30_seconds() -> None:
    # A lease runs out at most `lease` after its last renewal; the survivor
    # takes it at its next renewal, at most a renewal interval later.
    lease = MirrorConfig().lease
    assert lease + lease / LEASE_RENEWALS <= 30


@pytest.mark.processes
@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_two_gateways_split_the_mailboxes_and_a_survivor_takes_over(
        team: Store, store_url: str, dovecot: Dovecot, secrets_config: SecretsConfig,
        sink: Sink, tmp_path: Path) -> None:
    users = [dovecot.add_user("shared") for _ in range(4)]
    for address, password in users:
        await connect(team, secrets_config, dovecot, address, password)
    passwords = dict(users)
    async with _gateways(store_url, tmp_path, sink, secrets_config) as gateways:
        pids = {g.pid for g in gateways}

        # Split: every mailbox held, each by exactly one gateway, two each.
        async def split() -> bool:
            holders = Counter((await held_by(team)).values())
            return holders == Counter(dict.fromkeys(pids, 2))

        await eventually(split, 30)

        async def all_idle() -> bool:
            return all(b.state == "idle" for b in await Mailboxes(team.db).all())

        await eventually(all_idle, 20)

        # And at the IMAP server: one session per mailbox, a single mirror's
        # (a session the other mirror gave up may take a moment to close).
        async def one_session_each() -> bool:
            open_ = await asyncio.to_thread(dovecot.sessions)
            return {a: open_.get(a, 0) for a, _ in users} == {a: 1 for a, _ in users}

        await eventually(one_session_each, 10)

        # Relayed by either gateway, or by both (an MTA trying its second
        # smarthost after losing the first one's answer): captured once.
        relayed = []
        for n, gateway in enumerate(gateways):
            raw = make_mail(RECRUITER, ADA, f"Relayed {n}",
                            message_id=f"<relayed-{n}@example.com>")
            assert (await smtp_send(gateway.port, raw, RECRUITER, [ADA])).code == 250
            relayed.append(f"relayed-{n}@example.com")
        twice = make_mail(RECRUITER, ADA, "Twice", message_id="<twice@example.com>")
        results = await asyncio.gather(*(smtp_send(g.port, twice, RECRUITER, [ADA])
                                          for g in gateways))
        assert [r.code for r in results] == [250, 250]
        relayed.append("twice@example.com")
        # Mail delivered to each mailbox: captured once, by whichever mirrors it.
        delivered = []
        for n, (address, password) in enumerate(users):
            message_id = f"inbox-{n}@applicant.test"
            await asyncio.to_thread(dovecot.deliver, address, password, make_mail(
                ADA, address, f"Application {n}", message_id=f"<{message_id}>"))
            delivered.append(message_id)

        async def all_captured() -> bool:
            return set(await captured(team)) >= {*relayed, *delivered}

        await eventually(all_captured, 20)
        counts = await captured(team)
        assert all(counts[m] == 1 for m in [*relayed, *delivered]), counts
        assert await sources(team, "twice@example.com") == {("relay", "")}
        for n, (address, _) in enumerate(users):
            assert await sources(team, f"inbox-{n}@applicant.test") == {("mirror", address)}

        # kill -9: no shutdown, no release; its leases have to run out.
        victim, survivor = gateways
        orphaned = [a for a, pid in (await held_by(team)).items() if pid == victim.pid]
        victim.process.kill()
        await victim.process.wait()
        killed = time.monotonic()

        async def moved() -> bool:
            return set((await held_by(team)).values()) == {survivor.pid}

        await eventually(moved, 30)
        took = time.monotonic() - killed
        assert took <= LEASE + LEASE / LEASE_RENEWALS + 3, took

        late = []
        for n, address in enumerate(orphaned):
            message_id = f"late-{n}@applicant.test"
            await asyncio.to_thread(dovecot.deliver, address, passwords[address], make_mail(
                ADA, address, f"After the fall {n}", message_id=f"<{message_id}>"))
            late.append(message_id)
        after = make_mail(RECRUITER, ADA, "Still relaying", message_id="<after@example.com>")
        assert (await smtp_send(survivor.port, after, RECRUITER, [ADA])).code == 250

        async def late_captured() -> bool:
            return set(await captured(team)) >= {*late, "after@example.com"}

        await eventually(late_captured, 20)
        counts = await captured(team)
        assert all(n == 1 for n in counts.values()), counts
        assert survivor.process.returncode is None, survivor.output()

        # A gateway that is stopped (SIGTERM) releases its leases on the way out.
        await stop(survivor)
        assert survivor.process.returncode == 0, survivor.output()
        assert set((await held_by(team)).values()) == {None}
