"""The relay's doors: STARTTLS with the admin's certificate, SMTP AUTH with a
team member's token (only over TLS unless allowed), TLS to the upstream when
required, and rate limits per client; each tried from another loopback
address, as a client outside `allowed_networks` would come."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import ssl
from pathlib import Path

import aiosmtplib
import pytest

from atsmail.config import Upstream
from atsmail.storage import Store
from atsmail.storage.access import Access
from atsmail.storage.mailboxes import Mailboxes
from tests.conftest import GatewayFactory, Sink, make_mail, smtp_send
from tests.dovecot import self_signed

RECRUITER = "recruiter@example.com"
ADA = "ada@applicant.test"
OUTSIDER = "127.0.0.2"
ONLY_LOCALHOST = (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path)


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


async def token_for(store: Store, email: str) -> tuple[int, str]:
    return await Access(store.db).create_token(email, "test")


def client(port: int, **kw: object) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10,
                           source_address=(OUTSIDER, 0), **kw)  # type: ignore[arg-type]


# --- STARTTLS and AUTH ------------------------------------------------------------


async def test_a_member_logs_in_after_starttls_and_may_relay_from_outside(
        gateway_factory: GatewayFactory, team: Store, sink: Sink,
        certificate: tuple[Path, Path]) -> None:
    _, token = await token_for(team, RECRUITER)
    cert, key = certificate
    gateway = await gateway_factory(allowed_networks=ONLY_LOCALHOST, tls_cert_file=cert,
                                    tls_key_file=key)
    smtp = client(gateway.relay.port, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    # Offered, but no AUTH before TLS: a password is never sent in the clear.
    assert smtp.supports_extension("starttls")
    assert not smtp.supports_extension("auth")
    response = await smtp.execute_command(b"AUTH", b"PLAIN", b"AHgAeQ==")
    assert response.code == 538
    await smtp.starttls(cert_bundle=str(cert))
    await smtp.ehlo()
    assert {"plain", "login"} <= set(smtp.server_auth_methods)
    await smtp.login(RECRUITER, token)
    errors, _ = await smtp.sendmail(RECRUITER, [ADA], make_mail(RECRUITER, ADA, "Interview"))
    assert errors == {}
    await smtp.quit()
    assert [(m.mail_from, m.rcpt_tos) for m in sink.messages] == [(RECRUITER, [ADA])]
    assert [t.subject for t in await team.threads("C-1")] == ["Interview"]


async def test_commands_sent_along_with_starttls_are_dropped_not_run_under_tls(
        gateway_factory: GatewayFactory, sink: Sink, certificate: tuple[Path, Path]) -> None:
    # A man in the middle can add plain-text commands after STARTTLS, which a
    # server that kept them would run inside the TLS session (CVE-2011-0411).
    cert, key = certificate
    gateway = await gateway_factory(tls_cert_file=cert, tls_key_file=key)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.relay.port)
    assert (await reader.readline()).startswith(b"220")
    writer.write(b"EHLO client.test\r\n")
    while (await reader.readline())[3:4] == b"-":
        pass
    writer.write(f"STARTTLS\r\nEHLO injected.test\r\nMAIL FROM:<{RECRUITER}>\r\n".encode())
    assert (await reader.readline()).startswith(b"220")
    trusting = ssl.create_default_context(cafile=str(cert))
    trusting.check_hostname = False
    await writer.start_tls(trusting)
    writer.write(f"RCPT TO:<{ADA}>\r\n".encode())
    # Had they run, the injected EHLO and MAIL would be answered first, and
    # the RCPT accepted.
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"503")
    writer.write(b"QUIT\r\n")
    writer.close()
    assert sink.sessions == 0


async def test_wrong_and_revoked_tokens_are_refused_and_relay_stays_closed(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    token_id, token = await token_for(team, RECRUITER)
    _, other = await token_for(team, RECRUITER)
    await team.add_team_member("sam@example.com", "Sam", "recruiter")
    gateway = await gateway_factory(allowed_networks=ONLY_LOCALHOST, auth_without_tls=True)
    await Access(team.db).revoke_token(token_id, "test")
    await gateway.relay.refresh_directory()
    attempts = [(RECRUITER, "atsm_not-a-token"), (RECRUITER, token),
                ("sam@example.com", other), ("", other), ("\xff\xfe", other),
                (RECRUITER, other + "\x00x"), (RECRUITER, "\xff" + other)]
    for login, password in attempts:
        smtp = client(gateway.relay.port, start_tls=False)
        await smtp.connect()
        await smtp.ehlo()
        blob = b"\0" + login.encode("latin-1") + b"\0" + password.encode("latin-1")
        response = await smtp.execute_command(b"AUTH", b"PLAIN", base64.b64encode(blob))
        assert response.code in (535, 501), (login, password, response)
        # Still not allowed to relay.
        await smtp.mail("someone@outside.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as denied:
            await smtp.rcpt(ADA)
        assert denied.value.code == 554
        smtp.close()
    assert sink.messages == []


async def test_auth_login_in_the_clear_only_when_allowed(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    _, token = await token_for(team, RECRUITER)
    closed = await gateway_factory(allowed_networks=ONLY_LOCALHOST)
    smtp = client(closed.relay.port, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    assert not smtp.supports_extension("auth")
    response = await smtp.execute_command(b"AUTH", b"LOGIN")
    assert response.code == 538
    smtp.close()

    opened = await gateway_factory(allowed_networks=ONLY_LOCALHOST, auth_without_tls=True)
    smtp = client(opened.relay.port, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.auth_login(RECRUITER, token)
    errors, _ = await smtp.sendmail(RECRUITER, [ADA], make_mail(RECRUITER, ADA, "Hello"))
    assert errors == {}
    await smtp.quit()
    assert len(sink.messages) == 1


async def test_require_tls_refuses_mail_before_starttls(
        gateway_factory: GatewayFactory, team: Store, sink: Sink,
        certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    gateway = await gateway_factory(tls_cert_file=cert, tls_key_file=key, require_tls=True)
    plain = await smtp_send(gateway.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
    assert plain.code == 530
    assert sink.messages == []
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.relay.port, timeout=10,
                           start_tls=True, cert_bundle=str(cert))
    await smtp.connect()
    errors, _ = await smtp.sendmail(RECRUITER, [ADA], make_mail(RECRUITER, ADA, "Secure"))
    assert errors == {}
    await smtp.quit()
    assert len(sink.messages) == 1


async def test_an_unusable_certificate_stops_the_gateway_with_a_clear_error(
        gateway_factory: GatewayFactory, team: Store, tmp_path: Path,
        certificate: tuple[Path, Path]) -> None:
    from atsmail.config import ConfigError
    cert, _ = certificate
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"relay\.tls_cert_file: cannot load"):
        await gateway_factory(tls_cert_file=cert, tls_key_file=garbage)


# --- rate limits ------------------------------------------------------------------


async def greeting(port: int, source: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    await writer.wait_closed()
    return line


async def test_connections_over_the_limit_get_421_and_allowed_networks_are_exempt(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    gateway = await gateway_factory(allowed_networks=ONLY_LOCALHOST, rate_limit_connections=3)
    port = gateway.relay.port
    answers = [await greeting(port, OUTSIDER) for _ in range(5)]
    assert [a[:3] for a in answers] == [b"220"] * 3 + [b"421"] * 2
    assert b"Too many connections" in answers[3]
    # Another client is counted on its own, and the company's MTA never.
    assert (await greeting(port, "127.0.0.3")).startswith(b"220")
    for _ in range(5):
        assert (await greeting(port, "127.0.0.1")).startswith(b"220")
    # The gateway still relays.
    result = await smtp_send(port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
    assert result.code == 250


async def test_messages_and_recipients_over_the_limit_get_450_and_nothing_is_lost(
        gateway_factory: GatewayFactory, team: Store, sink: Sink) -> None:
    await Mailboxes(team.db).set_hosted_identity(RECRUITER, "rita@hosted.example")
    gateway = await gateway_factory(allowed_networks=ONLY_LOCALHOST, rate_limit_messages=2,
                                    rate_limit_recipients=3)
    port = gateway.relay.port
    # Mail from the Internet for a hosted identity: the relay is its MX.
    results = [await smtp_send(port, make_mail(ADA, "rita@hosted.example", f"Reply {i}"), ADA,
                               ["rita@hosted.example"], source=OUTSIDER) for i in range(3)]
    assert [r.code for r in results[:2]] == [250, 250]
    assert results[2].code == 450 and "Too many messages" in results[2].text
    # Recipients: three a minute, whatever the transactions.
    await team.add_team_member("sam@example.com", "Sam", "recruiter")
    await Mailboxes(team.db).set_hosted_identity("sam@example.com", "sam@hosted.example")
    limited = await gateway_factory(allowed_networks=ONLY_LOCALHOST, rate_limit_messages=0,
                                    rate_limit_recipients=3)
    both = ["rita@hosted.example", "sam@hosted.example"]
    await limited.relay.refresh_directory()
    first = await smtp_send(limited.relay.port, make_mail(ADA, both, "A"), ADA, both,
                            source=OUTSIDER)
    second = await smtp_send(limited.relay.port, make_mail(ADA, both, "B"), ADA, both,
                             source=OUTSIDER)
    assert first.code == 250 and second.code == 250
    assert second.rcpt["rita@hosted.example"][0] == 250
    assert second.rcpt["sam@hosted.example"][0] == 450
    third = await smtp_send(limited.relay.port, make_mail(ADA, both, "C"), ADA, both,
                            source=OUTSIDER)
    assert third.code == 450 and "Too many recipients" in third.text
    # Everything answered 250 reached the upstream; nothing deferred did.
    assert [m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages] == [
        b"Reply 0", b"Reply 1", b"A", b"B"]


# --- TLS to the upstream ----------------------------------------------------------


async def tls_sink(certificate: tuple[Path, Path], implicit: bool = False,
                   client_certificate_required: bool = False) -> Sink:
    context = server_context(certificate)
    if client_certificate_required:
        # A handshake this relay cannot complete: it has no client certificate.
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certificate[0])
    sink = Sink(tls_context=context, implicit_tls=implicit)
    await sink.start()
    return sink


async def test_upstream_starttls_is_used_when_offered(
        gateway_factory: GatewayFactory, team: Store, certificate: tuple[Path, Path]) -> None:
    sink = await tls_sink(certificate)
    try:
        # Opportunistic (the default): encrypted, the certificate not checked.
        gateway = await gateway_factory(upstream=Upstream("smtp", "127.0.0.1", sink.port))
        result = await smtp_send(gateway.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
        assert result.code == 250
        # Required, and checked against the admin's CA file.
        checked = await gateway_factory(upstream=Upstream(
            "smtp", "127.0.0.1", sink.port, tls="require", ca_file=certificate[0]))
        result = await smtp_send(checked.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
        assert result.code == 250
        assert [m.tls for m in sink.messages] == [True, True]
    finally:
        await sink.stop()


async def test_required_upstream_tls_that_is_missing_or_untrusted_defers_mail(
        gateway_factory: GatewayFactory, team: Store, sink: Sink,
        certificate: tuple[Path, Path]) -> None:
    # The usual sink offers no STARTTLS.
    gateway = await gateway_factory(upstream=Upstream("smtp", "127.0.0.1", sink.port,
                                                      tls="require"))
    result = await smtp_send(gateway.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
    assert result.code == 451 and "4.7.5" in result.text
    assert sink.messages == []
    # A certificate no configured CA vouches for.
    untrusted = await tls_sink(certificate)
    try:
        gateway = await gateway_factory(upstream=Upstream("smtp", "127.0.0.1", untrusted.port,
                                                          tls="require"))
        result = await smtp_send(gateway.relay.port, make_mail(RECRUITER, ADA), RECRUITER,
                                 [ADA])
        assert result.code == 451 and "4.7.5" in result.text
        assert untrusted.messages == []
    finally:
        await untrusted.stop()
    # Nothing was captured for mail that was not handed on.
    assert await team.threads("C-1") == []


async def test_opportunistic_tls_falls_back_to_plain_when_the_handshake_fails(
        gateway_factory: GatewayFactory, team: Store, certificate: tuple[Path, Path]) -> None:
    sink = await tls_sink(certificate, client_certificate_required=True)
    try:
        gateway = await gateway_factory(upstream=Upstream("smtp", "127.0.0.1", sink.port))
        result = await smtp_send(gateway.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
        assert result.code == 250
        assert [m.tls for m in sink.messages] == [False]
    finally:
        await sink.stop()


async def test_implicit_tls_upstream(gateway_factory: GatewayFactory, team: Store,
                                     certificate: tuple[Path, Path]) -> None:
    sink = await tls_sink(certificate, implicit=True)
    try:
        gateway = await gateway_factory(upstream=Upstream(
            "smtp", "127.0.0.1", sink.port, implicit_tls=True, ca_file=certificate[0]))
        result = await smtp_send(gateway.relay.port, make_mail(RECRUITER, ADA), RECRUITER, [ADA])
        assert result.code == 250
        assert [m.tls for m in sink.messages] == [True]
        assert [t.subject for t in await team.threads("C-1")] == ["Hello"]
    finally:
        await sink.stop()
