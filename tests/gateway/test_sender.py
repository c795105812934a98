"""The sender: outbox → the member's own SMTP server (with AUTH) → Sent folder → capture.

Real peers throughout: an SMTP submission server that insists on AUTH, the
test Dovecot for the Sent folder, the gateway's upstream sink for hosted
identities, and DKIM signatures checked with dkimpy against the public key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from atsmail.config import DkimConfig, OAuthConfig, SecretsConfig
from atsmail.gateway.sender import queue_message
from atsmail.rules import read_message
from atsmail.secrets import Secrets
from atsmail.storage import Store, UserError
from atsmail.storage.mailboxes import Account, Mailboxes
from atsmail.storage.models import OutboxMessage, new_thread_key, our_message_id, thread_key_of
from atsmail.storage.outbox import Outbox
from tests.conftest import GatewayFactory, Sink, make_mail, smtp_send
from tests.dovecot import Dovecot
from tests.gateway.test_mirror import FAST, eventually
from tests.oauth import TokenService, introspect

ADA = "ada@applicant.test"


@dataclass
class SubmissionServer(Sink):
    """A sink that only takes mail after AUTH with the one right password.

    Or with XOAUTH2 and a bearer token the token service vouches for (at
    `introspection_url`) as the user's.
    """

    password: str = ""
    logins: list[str] = field(default_factory=list)
    introspection_url: str = ""
    # XOAUTH2 logins turned down.
    refused_tokens: int = 0

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """SASL XOAUTH2 as Gmail and Outlook answer it."""
        user, token = "", ""
        try:
            for part in base64.b64decode(args[1], validate=True).decode().split("\x01"):
                if part.startswith("user="):
                    user = part.removeprefix("user=")
                elif part.startswith("auth=Bearer "):
                    token = part.removeprefix("auth=Bearer ")
        except (IndexError, ValueError):
            return AuthResult(success=False, handled=False,
                              message="501 5.5.2 Cannot decode the initial response")
        if self.introspection_url and token and user == await asyncio.to_thread(
                introspect, self.introspection_url, token):
            self.logins.append(user)
            return AuthResult(success=True)
        self.refused_tokens += 1
        # The refusal comes as a challenge; the client's empty answer ends it.
        await server.challenge_auth(json.dumps({"status": "401", "schemes": "Bearer"}))
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Username and Password not accepted")

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword) and data.password.decode() == self.password:
            self.logins.append(data.login.decode())
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    def _protocol(self) -> SMTP:
        self.sessions += 1
        with warnings.catch_warnings():
            # aiosmtpd warns of AUTH without TLS: that is this test server's point.
            warnings.simplefilter("ignore")
            protocol = SMTP(self, hostname="submission.test", authenticator=self._authenticate,
                            auth_required=True, auth_require_tls=False)
        self._protocols.append(protocol)
        return protocol


@pytest.fixture
async def submission() -> AsyncIterator[SubmissionServer]:
    server = SubmissionServer()
    await server.start()
    yield server
    await server.stop()


async def queue(store: Store, sender: str, to: list[str], subject: str,
                candidate: str | None = None, **options: Any) -> OutboxMessage:
    return await queue_message(store.db, sender, to, subject, "Dear Ada,\n\nwelcome.\n",
                               candidate, **options)


async def status_of(store: Store, item_id: int) -> OutboxMessage:
    return next(i for i in await Outbox(store.db).all() if i.id == item_id)


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_mail_goes_out_through_the_members_server_is_filed_once_and_captured(
        gateway_factory: GatewayFactory, team: Store, dovecot: Dovecot,
        secrets_config: SecretsConfig, submission: SubmissionServer) -> None:
    alice, password = dovecot.add_user("alice")
    submission.password = password
    await team.add_team_member(alice, "Alice Recruiter")
    await Mailboxes(team.db).connect(Account(
        address=alice, provider="imap", owner=alice, shared=False, visible_to=[],
        imap_host="127.0.0.1", imap_port=dovecot.port, smtp_host="127.0.0.1",
        smtp_port=submission.port, security="none", username=alice,
        sealed_secret=Secrets.load(secrets_config).seal(password),
        signature="Alice Recruiter\nExample Ltd"))
    item = await queue(team, alice, [ADA], "Your interview", candidate="C-1")
    await gateway_factory(mirror=FAST, secrets=secrets_config)

    async def sent() -> bool:
        return (await status_of(team, item.id)).status == "sent"

    await eventually(sent)
    assert submission.logins == [alice]
    assert [(m.mail_from, m.rcpt_tos) for m in submission.messages] == [(alice, [ADA])]
    assert b"-- \r\nAlice Recruiter" in submission.messages[0].content

    def sent_copies() -> int:
        client = dovecot.client(alice, password)
        try:
            client.select("Sent")
            _, data = client.search(None, "HEADER", "Message-ID", item.message_id)
            found = data[0].split()
            for number in found:
                _, flags = client.fetch(number, "(FLAGS)")
                assert b"\\Seen" in flags[0]
            return len(found)
        finally:
            client.logout()

    assert await asyncio.to_thread(sent_copies) == 1

    async def captured_from_both() -> bool:
        threads = await team.threads("C-1")
        if not threads:
            return False
        sources = (await team.thread(threads[0].id)).messages[0]["sources"]
        return sources == ["mirror", "sender"]

    # The mirror then sees the filed copy: still one message, two sources.
    await eventually(captured_from_both)
    assert [t.message_count for t in await team.threads("C-1")] == [1]
    assert await asyncio.to_thread(sent_copies) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_server_that_is_down_is_retried_and_nothing_is_lost(
        gateway_factory: GatewayFactory, team: Store, secrets_config: SecretsConfig,
        submission: SubmissionServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("atsmail.storage.outbox.FIRST_RETRY", 0.2)
    submission.password = "pw"
    down = free_port()
    await Mailboxes(team.db).connect(Account(
        address="recruiter@example.com", provider="imap", owner="recruiter@example.com",
        shared=False, visible_to=[], imap_host="127.0.0.1", imap_port=free_port(),
        smtp_host="127.0.0.1", smtp_port=down, security="none",
        username="recruiter@example.com",
        sealed_secret=Secrets.load(secrets_config).seal("pw")))
    item = await queue(team, "recruiter@example.com", [ADA], "Retried")
    await gateway_factory(secrets=secrets_config)

    async def failed_once() -> bool:
        state = await status_of(team, item.id)
        return state.attempts >= 1 and state.status == "queued" and bool(state.last_error)

    await eventually(failed_once)
    # The server comes back (the mailbox is pointed at it, as an admin would).
    async with team.db.write() as session:
        from atsmail.storage.models import Mailbox
        box = await session.get(Mailbox, "recruiter@example.com")
        assert box is not None
        box.smtp_port = submission.port

    async def sent() -> bool:
        return (await status_of(team, item.id)).status == "sent"

    await eventually(sent)
    assert len(submission.messages) == 1


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_wrong_submission_password_is_shown_not_sent(
        gateway_factory: GatewayFactory, team: Store, secrets_config: SecretsConfig,
        submission: SubmissionServer) -> None:
    submission.password = "the-right-one"
    await Mailboxes(team.db).connect(Account(
        address="recruiter@example.com", provider="imap", owner="recruiter@example.com",
        shared=False, visible_to=[], imap_host="127.0.0.1", imap_port=free_port(),
        smtp_host="127.0.0.1", smtp_port=submission.port, security="none",
        username="recruiter@example.com",
        sealed_secret=Secrets.load(secrets_config).seal("a-wrong-one")))
    item = await queue(team, "recruiter@example.com", [ADA], "Refused")
    await gateway_factory(secrets=secrets_config)

    async def refused() -> bool:
        return "refused the login" in ((await status_of(team, item.id)).last_error or "")

    await eventually(refused)
    assert submission.messages == []


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_hosted_identity_mail_goes_through_the_upstream_dkim_signed(
        gateway_factory: GatewayFactory, team: Store, secrets_config: SecretsConfig,
        sink: Sink, tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    await Mailboxes(team.db).set_hosted_identity("recruiter@example.com",
                                                 "rita@hosted.example")
    item = await queue(team, "recruiter@example.com", [ADA], "From the ATS", candidate="C-1")
    await gateway_factory(secrets=secrets_config, dkim=DkimConfig(
        selector="ats", domain="hosted.example", key_file=key_file))

    async def sent() -> bool:
        return (await status_of(team, item.id)).status == "sent"

    await eventually(sent)
    delivered = sink.messages[0]
    assert delivered.mail_from == "rita@hosted.example"
    assert delivered.content.startswith(b"DKIM-Signature:")

    def dns(name: bytes, timeout: int = 5) -> bytes:
        import base64
        assert name == b"ats._domainkey.hosted.example."
        return b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    assert dkim.verify(delivered.content, dnsfunc=dns)
    threads = await team.threads("C-1")
    assert [t.subject for t in threads] == ["From the ATS"]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_no_route_is_a_clear_error(team: Store, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no connected mailbox and no hosted identity"):
        await Outbox(team.db).route("recruiter@example.com")



async def sent_from_hosted(team: Store, gateway_factory: GatewayFactory,
                           secrets_config: SecretsConfig, **options: Any) -> OutboxMessage:
    """Send for the recruiter's hosted identity through the gateway; wait until sent."""
    await Mailboxes(team.db).set_hosted_identity("recruiter@example.com", "rita@hosted.example")
    if not hasattr(team, "_gateway"):
        team._gateway = await gateway_factory(secrets=secrets_config)
    item = await queue(team, "recruiter@example.com", [ADA], "Your application", **options)

    async def sent_and_captured() -> bool:
        if (await status_of(team, item.id)).status != "sent":
            return False
        details = [await team.thread(t.id) for t in await team.threads()]
        return any(m["message_id"] == item.message_id for d in details for m in d.messages)

    await eventually(sent_and_captured)
    return item


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_reply_from_another_address_finds_the_thread_by_our_message_id(
        gateway_factory: GatewayFactory, team: Store, secrets_config: SecretsConfig,
        sink: Sink) -> None:
    item = await sent_from_hosted(team, gateway_factory, secrets_config, candidate="C-1")
    key = thread_key_of(item.message_id)
    assert key is not None and item.message_id.endswith("@hosted.example")
    [thread] = await team.threads("C-1")
    gateway = team._gateway
    # Ada answers from a private address the ATS does not know, and her
    # client refers to a message of ours in the thread that the store has
    # not kept (here: one that names the thread's key only).
    unknown = our_message_id(key, "hosted.example")
    reply = make_mail("ada.private@elsewhere.test", "rita@hosted.example", "Re: Your application",
                      In_Reply_To=f"<{unknown}>")
    result = await smtp_send(gateway.relay.port, reply, "ada.private@elsewhere.test",
                             ["rita@hosted.example"])
    assert result.code == 250
    [after] = await team.threads("C-1")
    assert (after.id, after.message_count) == (thread.id, 2)
    # A made-up key finds nothing: strangers cannot post into threads.
    forged = make_mail("mallory@elsewhere.test", "rita@hosted.example", "Re: hi",
                       In_Reply_To=f"<{our_message_id(new_thread_key(), 'hosted.example')}>")
    await smtp_send(gateway.relay.port, forged, "mallory@elsewhere.test",
                    ["rita@hosted.example"])
    assert [t.message_count for t in await team.threads("C-1")] == [2]
    assert len(await team.threads()) == 1


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_answering_in_a_thread_refers_to_its_latest_message(
        gateway_factory: GatewayFactory, team: Store, secrets_config: SecretsConfig,
        sink: Sink) -> None:
    first = await sent_from_hosted(team, gateway_factory, secrets_config, candidate="C-1")
    [thread] = await team.threads("C-1")
    # The candidate is taken from the thread when not given.
    second = await sent_from_hosted(team, gateway_factory, secrets_config, thread_id=thread.id)
    assert second.candidate_id == "C-1"
    assert thread_key_of(second.message_id) == thread_key_of(first.message_id)
    headers = read_message(sink.messages[-1].content)
    assert headers.in_reply_to == (first.message_id,)
    assert headers.references == (first.message_id,)
    [after] = await team.threads("C-1")
    assert (after.id, after.message_count) == (thread.id, 2)
    with pytest.raises(UserError, match="does not concern candidate C-2"):
        await queue(team, "recruiter@example.com", [ADA], "x", candidate="C-2",
                    thread_id=thread.id)
    with pytest.raises(UserError, match="unknown thread 999"):
        await queue(team, "recruiter@example.com", [ADA], "x", thread_id=999)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_shared_mailbox_sends_for_its_people_only_with_its_signature(
        team: Store, secrets_config: SecretsConfig) -> None:
    await team.add_team_member("lena@example.com", "Lena Lead", "recruiter")
    await Mailboxes(team.db).connect(Account(
        address="jobs@example.com", provider="imap", owner=None, shared=True,
        visible_to=["recruiter@example.com"], imap_host="127.0.0.1", imap_port=free_port(),
        smtp_host="127.0.0.1", smtp_port=free_port(), security="none",
        username="jobs@example.com", sealed_secret=Secrets.load(secrets_config).seal("pw"),
        signature="The Example Ltd hiring team"))
    item = await queue(team, "recruiter@example.com", [ADA], "Thanks for applying",
                       candidate="C-1", from_address="jobs@example.com")
    assert (item.mailbox, item.from_address) == ("jobs@example.com", "jobs@example.com")
    assert b"-- \r\nThe Example Ltd hiring team" in item.raw
    with pytest.raises(UserError, match=r"may not send from the shared mailbox jobs@example\.com"):
        await queue(team, "lena@example.com", [ADA], "x", from_address="jobs@example.com")
    with pytest.raises(UserError, match=r"no mailbox nobody@example\.com is connected"):
        await queue(team, "recruiter@example.com", [ADA], "x",
                    from_address="nobody@example.com")
# --- OAuth2 (XOAUTH2) ---------------------------------------------------------


async def connect_outlook(store: Store, secrets: SecretsConfig, dovecot: Dovecot,
                          submission: SubmissionServer, address: str,
                          refresh_token: str) -> None:
    """An Outlook mailbox with OAuth2; its servers are the test Dovecot and submission."""
    await store.add_team_member(address, "Olga Outlook")
    await Mailboxes(store.db).connect(Account(
        address=address, provider="outlook", owner=address, shared=False, visible_to=[],
        imap_host="127.0.0.1", imap_port=dovecot.port, smtp_host="127.0.0.1",
        smtp_port=submission.port, security="none", smtp_security="none", username=address,
        sealed_secret=Secrets.load(secrets).seal(refresh_token), auth="oauth2"))


async def sent_and_filed(store: Store, dovecot: Dovecot, address: str, password: str,
                         item: OutboxMessage) -> None:
    async def sent() -> bool:
        state = await status_of(store, item.id)
        assert state.status != "failed", state.last_error
        return state.status == "sent"

    await eventually(sent)
    assert (await status_of(store, item.id)).last_error is None  # filed in Sent, too

    def filed() -> int:
        client = dovecot.client(address, password)
        try:
            client.select("Sent")
            return len(client.search(None, "HEADER", "Message-ID", item.message_id)[1][0].split())
        finally:
            client.logout()

    assert await asyncio.to_thread(filed) == 1


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_mail_is_submitted_and_filed_over_xoauth2(
        gateway_factory: GatewayFactory, team: Store, dovecot_oauth: Dovecot,
        token_service: TokenService, oauth_config: OAuthConfig,
        secrets_config: SecretsConfig, submission: SubmissionServer) -> None:
    submission.introspection_url = token_service.introspection_url
    olga, password = dovecot_oauth.add_user("olga")
    await connect_outlook(team, secrets_config, dovecot_oauth, submission, olga,
                          token_service.grant(olga))
    item = await queue(team, olga, [ADA], "Your interview", candidate="C-1")
    await gateway_factory(secrets=secrets_config, oauth=oauth_config)
    await sent_and_filed(team, dovecot_oauth, olga, password, item)
    assert submission.logins == [olga] and submission.refused_tokens == 0
    assert [(m.mail_from, m.rcpt_tos) for m in submission.messages] == [(olga, [ADA])]
    # SMTP and IMAP logged in with the one token, refreshed once.
    assert token_service.refreshes.count(olga) == 1
    assert [t.subject for t in await team.threads("C-1")] == ["Your interview"]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_an_expired_or_refused_access_token_is_refreshed(
        gateway_factory: GatewayFactory, team: Store, dovecot_oauth: Dovecot,
        token_service: TokenService, oauth_config: OAuthConfig,
        secrets_config: SecretsConfig, submission: SubmissionServer) -> None:
    submission.introspection_url = token_service.introspection_url
    olga, password = dovecot_oauth.add_user("olga")
    await connect_outlook(team, secrets_config, dovecot_oauth, submission, olga,
                          token_service.grant(olga))
    await gateway_factory(secrets=secrets_config, oauth=oauth_config)
    first = await queue(team, olga, [ADA], "First")
    await sent_and_filed(team, dovecot_oauth, olga, password, first)
    assert token_service.refreshes.count(olga) == 1

    # Ended early by the provider, the token is refused, refreshed, and the
    # login tried again once.
    token_service.expire_access_tokens()
    token_service.lifetime = 3
    second = await queue(team, olga, [ADA], "Second")
    await sent_and_filed(team, dovecot_oauth, olga, password, second)
    assert submission.refused_tokens == 1
    assert token_service.refreshes.count(olga) == 2

    # Past its expiry a token is refreshed before use: no server refuses it.
    await asyncio.sleep(3)
    third = await queue(team, olga, [ADA], "Third")
    await sent_and_filed(team, dovecot_oauth, olga, password, third)
    assert token_service.refreshes.count(olga) == 3
    assert submission.refused_tokens == 1
    assert len(submission.messages) == 3


async def test_two_gateways_on_one_store_send_each_message_once(
        gateway_factory: GatewayFactory, team: Store, secrets_config: SecretsConfig,
        sink: Sink) -> None:
    await Mailboxes(team.db).set_hosted_identity("recruiter@example.com", "rita@hosted.example")
    items = [await queue(team, "recruiter@example.com", [ADA], f"Interview {n}", candidate="C-1")
             for n in range(16)]
    for _ in range(2):
        await gateway_factory(secrets=secrets_config)

    async def all_sent() -> bool:
        return all(i.status == "sent" for i in await Outbox(team.db).all())

    await eventually(all_sent, 20)
    ids = [read_message(m.content).message_id for m in sink.messages]
    assert sorted(ids) == sorted(i.message_id for i in items)  # each once
    assert {i.attempts for i in await Outbox(team.db).all()} == {1}
    assert sum(t.message_count for t in await team.threads("C-1")) == len(items)
