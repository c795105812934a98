"""The mirror through an IMAP server's restart and through broken mail.

The restart test runs its own Dovecot, so stopping it leaves the suite's
shared server alone; a second mailbox on that shared server shows that one
server's trouble reaches no other mailbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest

from atsmail.config import SecretsConfig
from atsmail.gateway import mirror
from atsmail.storage import Store
from atsmail.storage.capture import Capture
from atsmail.storage.mailboxes import Mailboxes
from tests.conftest import GatewayFactory, make_mail, require_peer
from tests.dovecot import Dovecot, start_dovecot
from tests.gateway.test_mirror import ADA, FAST, _threads, connect, eventually


@pytest.fixture
def own_dovecot() -> Iterator[Dovecot]:
    server = start_dovecot()
    require_peer(server is not None, "no dovecot on this machine (Debian: dovecot-imapd)")
    assert server is not None
    yield server
    server.stop()


async def _read_up_to(store: Store, address: str, uid: int) -> bool:
    folders = await Mailboxes(store.db).folders(address)
    return any(f.name == "INBOX" and f.last_uid >= uid for f in folders)


def fill(dovecot: Dovecot, address: str, password: str, mails: list[bytes]) -> None:
    client = dovecot.client(address, password)
    try:
        for raw in mails:
            typ, data = client.append("INBOX", None, None, raw)
            assert typ == "OK", data
    finally:
        client.logout()


async def test_an_imap_server_restarted_mid_sync_leaves_no_gap_and_no_duplicate(
        gateway_factory: GatewayFactory, team: Store, dovecot: Dovecot, own_dovecot: Dovecot,
        secrets_config: SecretsConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    address, password = own_dovecot.add_user("restarted")
    # Every tenth message is the candidate's, each a thread of its own.
    mails = [make_mail(ADA if n % 10 == 0 else "friend@else.test", address, f"Mail {n}",
                       message_id=f"<mail-{n}@restart.test>") for n in range(300)]
    await asyncio.to_thread(fill, own_dovecot, address, password, mails)
    bystander, bystander_password = dovecot.add_user("bystander")
    await connect(team, secrets_config, own_dovecot, address, password)
    await connect(team, secrets_config, dovecot, bystander, bystander_password, owner=None)

    # Small batches, and the server restarted right after the fifth one is
    # kept: the watcher is in the middle of the folder when it goes away.
    monkeypatch.setattr(mirror, "BATCH", 20)
    checkpoint = Mailboxes.checkpoint
    restarted_after: list[int] = []

    async def checkpoint_then_restart(self: Mailboxes, box: str, folder: str, uidvalidity: int,
                                      last_uid: int, captures: Sequence[Capture] = ()) -> None:
        await checkpoint(self, box, folder, uidvalidity, last_uid, captures)
        if box == address and last_uid >= 100 and not restarted_after:
            restarted_after.append(last_uid)
            await asyncio.to_thread(own_dovecot.restart)

    monkeypatch.setattr(Mailboxes, "checkpoint", checkpoint_then_restart)
    await gateway_factory(mirror=FAST, secrets=secrets_config)
    await eventually(lambda: _read_up_to(team, address, 300), seconds=30)
    assert restarted_after == [100]

    # Mail arriving after the restart, on both servers, is captured too.
    await asyncio.to_thread(own_dovecot.deliver, address, password,
                            make_mail(ADA, address, "After the restart"))
    await asyncio.to_thread(dovecot.deliver, bystander, bystander_password,
                            make_mail(ADA, bystander, "Elsewhere"))
    await eventually(lambda: _threads(team, "C-1", 32), seconds=30)

    threads = await team.threads("C-1")
    expected = {f"Mail {n}" for n in range(0, 300, 10)} | {"After the restart", "Elsewhere"}
    assert sorted(t.subject for t in threads) == sorted(expected)
    assert all(t.message_count == 1 for t in threads)


async def test_broken_mail_in_a_mailbox_is_read_as_well_as_it_can_be_and_the_folder_goes_on(
        gateway_factory: GatewayFactory, team: Store, dovecot: Dovecot,
        secrets_config: SecretsConfig) -> None:
    alice, password = dovecot.add_user("broken")
    await connect(team, secrets_config, dovecot, alice, password)
    await gateway_factory(mirror=FAST, secrets=secrets_config)
    broken = (b"From: Ada <ada@applicant.test>\r\n"
              b"To: " + alice.encode() + b"\r\n"
              b"Subject: =?x-no-such-charset?q?Broken=FF?= \xff\xfe\r\n"
              b"Date: the day before yesterday\r\n"
              b"Message-ID: <broken@applicant.test>\r\n"
              b"MIME-Version: 1.0\r\n"
              b'Content-Type: multipart/mixed; boundary="never-closed"\r\n'
              b"\r\n"
              b"--never-closed\r\n"
              b"Content-Type: text/plain; charset=x-unknown\r\n"
              b"Content-Transfer-Encoding: base64\r\n"
              b"\r\n"
              b"!!! not base64 \xc3\x28 at all\r\n")
    await asyncio.to_thread(dovecot.deliver, alice, password, broken)
    await asyncio.to_thread(dovecot.deliver, alice, password, make_mail(ADA, alice, "Whole"))
    await eventually(lambda: _read_up_to(team, alice, 2))
    await eventually(lambda: _threads(team, "C-1", 2))
    stored = sorted(m.raw for m in await team.candidate_messages("C-1"))
    # Kept as it came, byte for byte (its line ends were CRLF already).
    assert len(stored) == 2 and broken in stored
