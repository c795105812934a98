"""The mirror against a real Dovecot: mail in a mailbox's folders, captured or not.

Each test connects a fresh Dovecot user's mailbox, runs the gateway with the
mirror on, puts mail into folders the way delivery or the user's client
would, and waits (bounded) for what the store then holds.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from atsmail.config import MirrorConfig, OAuthConfig, SecretsConfig
from atsmail.gateway import mirror
from atsmail.gateway.server import Gateway
from atsmail.rules import MessageFacts
from atsmail.secrets import Secrets
from atsmail.storage import Store, mailboxes
from atsmail.storage.capture import Capture, Prepared
from atsmail.storage.mailboxes import Account, Mailboxes
from atsmail.storage.models import Mailbox, utcnow
from tests.conftest import GatewayFactory, Sink, eventually, make_mail, smtp_send
from tests.dovecot import Dovecot
from tests.gateway.test_hostile_input import captured, crlf
from tests.oauth import TokenService

ADA = "ada@applicant.test"
FAST = MirrorConfig(poll_interval=0.5, command_timeout=5, reconnect_max=1)


async def connect(store: Store, secrets: SecretsConfig, dovecot: Dovecot, address: str,
                  password: str, owner: str | None = "recruiter@example.com",
                  security: str = "none") -> None:
    port = dovecot.tls_port if security == "ssl" else dovecot.port
    await Mailboxes(store.db).connect(Account(
        address=address, provider="imap", owner=owner, shared=owner is None,
        visible_to=[] if owner else ["recruiter@example.com"], imap_host="127.0.0.1",
        imap_port=port, smtp_host="", smtp_port=0, security=security,
        username=address, sealed_secret=Secrets.load(secrets).seal(password)))


@pytest.fixture
async def mirrored(gateway_factory: GatewayFactory, team: Store, dovecot: Dovecot,
                   secrets_config: SecretsConfig) -> AsyncIterator[tuple[str, str, Gateway]]:
    """Alice's mailbox, connected and mirrored by a running gateway."""
    address, password = dovecot.add_user("alice")
    await connect(team, secrets_config, dovecot, address, password)
    gateway = await gateway_factory(mirror=FAST, secrets=secrets_config)
    await eventually(lambda: _state_is(team, address, "idle"))
    yield address, password, gateway


async def _state_is(store: Store, address: str, state: str) -> bool:
    box = await Mailboxes(store.db).get(address)
    return box.state == state


async def _threads(store: Store, candidate: str, count: int) -> bool:
    return sum(t.message_count for t in await store.threads(candidate)) >= count


async def test_incoming_candidate_mail_is_captured_and_a_sent_reply_joins_it(
        mirrored: tuple[str, str, Gateway], team: Store, dovecot: Dovecot) -> None:
    alice, password, _ = mirrored
    first = make_mail(ADA, alice, "Application", message_id="<app-1@applicant.test>")
    await asyncio.to_thread(dovecot.deliver, alice, password, first)
    await eventually(lambda: _threads(team, "C-1", 1))

    reply = make_mail(alice, ADA, "Re: Application", message_id="<re-1@example.com>",
                      In_Reply_To="<app-1@applicant.test>", References="<app-1@applicant.test>")
    await asyncio.to_thread(dovecot.deliver, alice, password, reply, "Sent")
    await eventually(lambda: _threads(team, "C-1", 2))

    threads = await team.threads("C-1")
    assert len(threads) == 1
    messages = (await team.thread(threads[0].id)).messages
    assert [(m["direction"], m["source"]) for m in messages] == [
        ("inbound", "mirror"), ("outbound", "mirror")]


async def test_other_folders_and_other_mail_are_not_captured(
        mirrored: tuple[str, str, Gateway], team: Store, dovecot: Dovecot) -> None:
    alice, password, _ = mirrored
    await asyncio.to_thread(dovecot.deliver, alice, password,
                            make_mail(ADA, alice, "Filed away"), "Archive")
    await asyncio.to_thread(dovecot.deliver, alice, password,
                            make_mail("news@shop.test", alice, "Sale", List_Id="<sale.shop>"))
    await asyncio.to_thread(dovecot.deliver, alice, password,
                            make_mail("friend@else.test", alice, "Lunch"))
    marker = make_mail(ADA, alice, "Counted")
    await asyncio.to_thread(dovecot.deliver, alice, password, marker)
    await eventually(lambda: _threads(team, "C-1", 1))
    await asyncio.sleep(0.5)
    assert [t.subject for t in await team.threads()] == ["Counted"]
    folders = {f.name: f.role for f in await Mailboxes(team.db).folders(alice)}
    assert folders == {"INBOX": "incoming", "Sent": "outgoing", "Archive": "none"}


async def test_mail_older_than_the_backfill_window_is_not_captured(
        gateway_factory: GatewayFactory, team: Store, dovecot: Dovecot,
        secrets_config: SecretsConfig) -> None:
    address, password = dovecot.add_user("old")
    old = make_mail(ADA, address, "Long ago")
    await asyncio.to_thread(dovecot.deliver, address, password, old, "INBOX",
                            time.time() - 30 * 86400)
    recent = make_mail(ADA, address, "Last week")
    await asyncio.to_thread(dovecot.deliver, address, password, recent, "INBOX",
                            time.time() - 7 * 86400)
    await connect(team, secrets_config, dovecot, address, password)
    await gateway_factory(mirror=FAST, secrets=secrets_config)
    await eventually(lambda: _state_is(team, address, "idle"))
    assert [t.subject for t in await team.threads("C-1")] == ["Last week"]


async def test_a_message_the_relay_captured_is_stored_once_and_gains_the_source(
        mirrored: tuple[str, str, Gateway], team: Store, dovecot: Dovecot, sink: Sink) -> None:
    alice, password, gateway = mirrored
    raw = make_mail(alice, ADA, "Through both", message_id="<both@example.com>")
    result = await smtp_send(gateway.relay.port, raw, alice, [ADA])
    assert result.code == 250
    await asyncio.to_thread(dovecot.deliver, alice, password, raw, "Sent")

    async def both() -> bool:
        threads = await team.threads("C-1")
        if not threads:
            return False
        return (await team.thread(threads[0].id)).messages[0]["sources"] == ["mirror", "relay"]

    await eventually(both)
    assert [t.message_count for t in await team.threads("C-1")] == [1]


def inline_forward(sender: str, to: str, subject: str, comment: str,
                   original: str = f"Ada Applicant <{ADA}>") -> bytes:
    """A colleague's mail that forwards `original`'s inline, under a subject of its own."""
    return make_mail(sender, to, subject,
                     f"{comment}\n\n---------- Forwarded message ---------\n"
                     f"From: {original}\nDate: Fri, 27 Nov 2026\n"
                     "Subject: My application\nTo: <recruiter@example.com>\n\n"
                     "I would like to apply.\n")


async def test_a_forward_under_a_subject_of_its_own_is_found_in_its_body(
        mirrored: tuple[str, str, Gateway], team: Store, dovecot: Dovecot) -> None:
    # Mail the company's own server delivers (among colleagues, and from
    # outside) never passes the relay: the mirror alone sees it.
    alice, password, _ = mirrored
    with_cv = inline_forward("recruiter@example.com", alice, "And her CV",
                             "Her CV is attached.")
    message = email.message_from_bytes(with_cv, policy=email.policy.default)
    message.add_attachment(b"%PDF-1.4 " + bytes(range(256)) * 4096, maintype="application",
                           subtype="pdf", filename="cv.pdf")  # 1 MB, after the text
    with_cv = message.as_bytes()
    for raw in (make_mail("recruiter@example.com", alice, "Lunch on Friday?", "At noon?\n"),
                inline_forward("recruiter@example.com", alice, "Your thoughts on this one?",
                               "She looks good for the backend role."),
                inline_forward("recruiter@example.com", alice, "Not one of ours",
                               "A friend's son.", original="Bob <bob@else.test>"),
                with_cv,
                make_mail("sales@supplier.test", alice, "Your order", "Shipped today.\n"),
                inline_forward("anna@agency.test", alice, "A candidate for your backend role",
                               "She wrote to us first."),
                inline_forward("anna@agency.test", alice, "Another one",
                               "Not yours, I think.", original="Bob <bob@else.test>")):
        await asyncio.to_thread(dovecot.deliver, alice, password, raw)
    await eventually(lambda: _threads(team, "C-1", 3))
    await asyncio.sleep(0.5)
    assert sorted(t.subject for t in await team.threads()) == [
        "A candidate for your backend role", "And her CV", "Your thoughts on this one?"]
    # Stored whole, though only the start was read to find the forward.
    assert crlf(with_cv) in [crlf(raw) for raw in await captured(team)]


async def test_uidvalidity_change_rereads_without_duplicates(
        mirrored: tuple[str, str, Gateway], team: Store, dovecot: Dovecot) -> None:
    alice, password, _ = mirrored
    raw = make_mail(ADA, alice, "Before the reset", message_id="<reset@applicant.test>")
    await asyncio.to_thread(dovecot.deliver, alice, password, raw, "Archive")
    await Mailboxes(team.db).set_role(alice, "Archive", "incoming")
    await eventually(lambda: _threads(team, "C-1", 1))

    def recreate() -> None:
        client = dovecot.client(alice, password)
        try:
            assert client.delete("Archive")[0] == "OK"
            assert client.create("Archive")[0] == "OK"
        finally:
            client.logout()
        dovecot.deliver(alice, password, raw, "Archive")
        dovecot.deliver(alice, password, make_mail(ADA, alice, "After the reset"), "Archive")

    before = {f.name: f.uidvalidity for f in await Mailboxes(team.db).folders(alice)}
    await asyncio.to_thread(recreate)

    async def reread() -> bool:
        folders = {f.name: f.uidvalidity for f in await Mailboxes(team.db).folders(alice)}
        return folders["Archive"] != before["Archive"] and await _threads(team, "C-1", 2)

    await eventually(reread)
    subjects = sorted(t.subject for t in await team.threads("C-1"))
    assert subjects == ["After the reset", "Before the reset"]


async def _checkpoint(store: Store, address: str, folder: str = "INBOX") -> int:
    return next(f.last_uid for f in await Mailboxes(store.db).folders(address)
                if f.name == folder)


async def test_an_unreadable_message_is_skipped_and_logged_and_the_folder_goes_on(
        mirrored: tuple[str, str, Gateway], team: Store, dovecot: Dovecot,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    alice, password, _ = mirrored
    read = mirror.read_message

    def fragile(raw: bytes) -> MessageFacts:
        if b"Unreadable" in raw:
            raise ValueError("a parser bug")
        return read(raw)

    monkeypatch.setattr(mirror, "read_message", fragile)
    for subject in ("Before", "Unreadable", "After"):
        await asyncio.to_thread(dovecot.deliver, alice, password,
                                make_mail(ADA, alice, subject))
    with caplog.at_level(logging.ERROR, logger=mirror.__name__):
        await eventually(lambda: _threads(team, "C-1", 2))
        await eventually(lambda: _checkpoint_is(team, alice, 3))
    assert sorted(t.subject for t in await team.threads("C-1")) == ["After", "Before"]
    assert any("UID 2: unreadable, skipped" in r.getMessage() for r in caplog.records)


async def _checkpoint_is(store: Store, address: str, uid: int) -> bool:
    return await _checkpoint(store, address) >= uid


async def test_a_store_failure_keeps_the_checkpoint_and_the_batch_is_read_again(
        mirrored: tuple[str, str, Gateway], team: Store, dovecot: Dovecot,
        monkeypatch: pytest.MonkeyPatch) -> None:
    alice, password, _ = mirrored
    keep = mailboxes.keep
    failures: list[int] = []
    store_is_broken = True

    def failing(conn: object, captures: list[Capture]) -> list[Prepared]:
        if captures and store_is_broken:
            failures.append(len(captures))
            raise OSError("disk full")
        return keep(conn, captures)  # type: ignore[arg-type]

    monkeypatch.setattr(mailboxes, "keep", failing)
    await asyncio.to_thread(dovecot.deliver, alice, password,
                            make_mail(ADA, alice, "Kept after all"))

    async def errored() -> bool:
        return bool(failures) and (await Mailboxes(team.db).get(alice)).state == "error"

    await eventually(errored)
    # The capture and the checkpoint are one transaction: neither happened.
    assert await _checkpoint(team, alice) == 0
    assert await team.threads("C-1") == []
    store_is_broken = False
    await eventually(lambda: _threads(team, "C-1", 1))
    await eventually(lambda: _checkpoint_is(team, alice, 1))
    assert [t.subject for t in await team.threads("C-1")] == ["Kept after all"]


async def test_wrong_password_is_shown_and_other_mailboxes_carry_on(
        gateway_factory: GatewayFactory, team: Store, dovecot: Dovecot,
        secrets_config: SecretsConfig) -> None:
    good, password = dovecot.add_user("good")
    bad, _ = dovecot.add_user("bad")
    await connect(team, secrets_config, dovecot, good, password)
    await connect(team, secrets_config, dovecot, bad, "not-the-password",
                  owner=None)
    await gateway_factory(mirror=FAST, secrets=secrets_config)
    await asyncio.to_thread(dovecot.deliver, good, password, make_mail(ADA, good, "Still here"))
    await eventually(lambda: _threads(team, "C-1", 1))

    async def failed() -> bool:
        box = await Mailboxes(team.db).get(bad)
        # After a refusal Dovecot slows further logins down, so the error
        # shown may be the refusal or the slowed-down attempt after it.
        return box.state == "error" and "login" in (box.last_error or "")

    await eventually(failed)
    assert (await Mailboxes(team.db).get(good)).last_sync is not None


async def test_passwords_are_encrypted_at_rest(
        team: Store, dovecot: Dovecot, secrets_config: SecretsConfig, store_url: str) -> None:
    address, password = dovecot.add_user("secret")
    await connect(team, secrets_config, dovecot, address, password)
    box = await Mailboxes(team.db).get(address)
    assert password.encode() not in box.secret
    assert Secrets.load(secrets_config).open(box.secret) == password
    if store_url.startswith("sqlite"):
        await team.db.checkpoint()
        path = Path(store_url.partition(":///")[2])
        assert password.encode() not in path.read_bytes()


@pytest.mark.parametrize("security", ["starttls", "ssl"])
@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_tls_mailboxes_are_mirrored_once_the_certificate_is_trusted(
        gateway_factory: GatewayFactory, team: Store, dovecot_tls: Dovecot,
        secrets_config: SecretsConfig, monkeypatch: pytest.MonkeyPatch, security: str) -> None:
    address, password = dovecot_tls.add_user("tls")
    await connect(team, secrets_config, dovecot_tls, address, password, security=security)
    await asyncio.to_thread(dovecot_tls.deliver, address, password,
                            make_mail(ADA, address, f"Over {security}"))
    await gateway_factory(mirror=FAST, secrets=secrets_config)

    async def refused() -> bool:
        box = await Mailboxes(team.db).get(address)
        return box.state == "error" and "CERTIFICATE_VERIFY_FAILED" in (box.last_error or "")

    # A self-signed certificate is refused ...
    await eventually(refused)
    assert await team.threads() == []
    # ... until it is trusted; the watcher's next attempt then gets through.
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot_tls.cert))
    await eventually(lambda: _threads(team, "C-1", 1))
    assert [t.subject for t in await team.threads("C-1")] == [f"Over {security}"]


# --- OAuth2 (XOAUTH2) ---------------------------------------------------------


async def connect_oauth(store: Store, secrets: SecretsConfig, dovecot: Dovecot, address: str,
                        refresh_token: str, provider: str = "gmail",
                        owner: str | None = "recruiter@example.com") -> None:
    """A gmail or outlook mailbox, its servers pointed at the test Dovecot."""
    await Mailboxes(store.db).connect(Account(
        address=address, provider=provider, owner=owner, shared=owner is None,
        visible_to=[] if owner else ["recruiter@example.com"], imap_host="127.0.0.1",
        imap_port=dovecot.port, smtp_host="", smtp_port=0, security="none",
        username=address, sealed_secret=Secrets.load(secrets).seal(refresh_token),
        auth="oauth2"))


@pytest.mark.parametrize("provider", ["gmail", "outlook"])
async def test_oauth_mailboxes_are_mirrored_over_xoauth2(
        gateway_factory: GatewayFactory, team: Store, dovecot_oauth: Dovecot,
        token_service: TokenService, oauth_config: OAuthConfig,
        secrets_config: SecretsConfig, store_url: str, provider: str) -> None:
    address, password = dovecot_oauth.add_user(provider)
    refresh_token = token_service.grant(address)
    await connect_oauth(team, secrets_config, dovecot_oauth, address, refresh_token, provider)
    await asyncio.to_thread(dovecot_oauth.deliver, address, password,
                            make_mail(ADA, address, f"Via {provider}"))
    await gateway_factory(mirror=FAST, secrets=secrets_config, oauth=oauth_config)
    await eventually(lambda: _threads(team, "C-1", 1))
    assert [t.subject for t in await team.threads("C-1")] == [f"Via {provider}"]
    await eventually(lambda: _state_is(team, address, "idle"))
    # Logged in with a token the server checked at the provider, got once.
    assert token_service.refreshes.count(address) == 1
    assert (await Mailboxes(team.db).get(address)).auth == "oauth2"
    if store_url.startswith("sqlite"):
        await team.db.checkpoint()
        stored = Path(store_url.partition(":///")[2]).read_bytes()
        assert refresh_token.encode() not in stored
        assert not any(t.encode() in stored for t in token_service.tokens)


async def test_a_revoked_refresh_token_is_shown_and_other_mailboxes_carry_on(
        gateway_factory: GatewayFactory, team: Store, dovecot_oauth: Dovecot,
        token_service: TokenService, oauth_config: OAuthConfig,
        secrets_config: SecretsConfig) -> None:
    good, password = dovecot_oauth.add_user("kept")
    revoked, _ = dovecot_oauth.add_user("revoked")
    await connect_oauth(team, secrets_config, dovecot_oauth, good, token_service.grant(good))
    withdrawn = token_service.grant(revoked)
    await connect_oauth(team, secrets_config, dovecot_oauth, revoked, withdrawn, owner=None)
    token_service.revoke(withdrawn)
    await gateway_factory(mirror=FAST, secrets=secrets_config, oauth=oauth_config)
    await asyncio.to_thread(dovecot_oauth.deliver, good, password,
                            make_mail(ADA, good, "Still synced"))
    await eventually(lambda: _threads(team, "C-1", 1))

    async def failed() -> bool:
        box = await Mailboxes(team.db).get(revoked)
        return box.state == "error" and "refused the refresh token" in (box.last_error or "")

    await eventually(failed)
    error = (await Mailboxes(team.db).get(revoked)).last_error or ""
    assert "invalid_grant" in error and "connect the mailbox again" in error
    assert withdrawn not in error
    assert (await Mailboxes(team.db).get(good)).last_sync is not None


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_token_the_server_refuses_is_refreshed_and_the_login_tried_again(
        gateway_factory: GatewayFactory, team: Store, dovecot_oauth: Dovecot,
        token_service: TokenService, oauth_config: OAuthConfig,
        secrets_config: SecretsConfig) -> None:
    address, password = dovecot_oauth.add_user("stale")
    await connect_oauth(team, secrets_config, dovecot_oauth, address, token_service.grant(address))
    await gateway_factory(mirror=FAST, secrets=secrets_config, oauth=oauth_config)
    await eventually(lambda: _state_is(team, address, "idle"))
    assert token_service.refreshes.count(address) == 1
    # The provider ends every token early, and the server drops the session:
    # the watcher's next login is refused, refreshes, and gets in.
    token_service.expire_access_tokens()
    await asyncio.to_thread(dovecot_oauth.kick, address)
    await asyncio.to_thread(dovecot_oauth.deliver, address, password,
                            make_mail(ADA, address, "After the refresh"))
    # The dropped session shows once IDLE times out (command_timeout).
    await eventually(lambda: _threads(team, "C-1", 1), seconds=30)
    assert token_service.refreshes.count(address) == 2


async def test_a_mailbox_whose_lease_another_gateway_took_is_no_longer_watched(
        mirrored: tuple[str, str, Gateway], team: Store, dovecot: Dovecot) -> None:
    """As when this gateway stalled past its lease and another took the mailbox."""
    alice, password, gateway = mirrored
    assert gateway.mirror is not None and list(gateway.mirror.watchers) == [alice]
    async with team.db.write() as session:
        await session.execute(update(Mailbox).where(Mailbox.address == alice).values(
            lease_holder="elsewhere:1:abcdef", lease_until=utcnow() + timedelta(minutes=5)))

    async def dropped() -> bool:
        assert gateway.mirror is not None
        return not gateway.mirror.watchers

    await eventually(dropped)
    await asyncio.to_thread(dovecot.deliver, alice, password,
                            make_mail(ADA, alice, "For the other gateway"))
    await asyncio.sleep(1.5)
    assert await team.threads("C-1") == []
    # Released (the other gateway stopped): taken back, and the mail is captured.
    await Mailboxes(team.db).release("elsewhere:1:abcdef")
    await eventually(lambda: _threads(team, "C-1", 1))
