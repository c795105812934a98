"""Shared fixtures: real stores (SQLite and PostgreSQL), a real SMTP sink, the real relay.

A peer this machine lacks (PostgreSQL) skips its tests with the reason,
except under CI (`CI=true`), where a missing peer is a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import asyncpg
import pytest
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session

from atsmail.config import (
    ApiConfig,
    CaptureConfig,
    Config,
    DkimConfig,
    MirrorConfig,
    OAuthClient,
    OAuthConfig,
    RelayConfig,
    SecretsConfig,
    StorageConfig,
    Upstream,
    WebhookConfig,
)
from atsmail.gateway.server import Gateway
from atsmail.secrets import create_key_file
from atsmail.storage import Store
from tests.dovecot import Dovecot, start_dovecot
from tests.oauth import CLIENT_ID, CLIENT_SECRET, TokenService, start_token_service

PG_URL = os.environ.get("ATSMAIL_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"
DATA = Path(__file__).parent / "data"


def require_peer(available: bool, reason: str) -> None:
    if not available:
        if IN_CI:
            pytest.fail(f"{reason}; CI must provide this peer")
        pytest.skip(reason)


# --- stores --------------------------------------------------------------------


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _with_database(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str | None]:
    """A migrated template database; each test gets a fresh copy of it."""
    name = f"atsmail_tpl_{os.getpid()}"

    async def create() -> bool:
        try:
            conn = await asyncpg.connect(_asyncpg_dsn(PG_URL), timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        store = Store.open(_with_database(PG_URL, name))
        try:
            await store.migrate()
        finally:
            await store.close()
        return True

    async def drop() -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(PG_URL))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    available = asyncio.run(create())
    yield name if available else None
    if available:
        asyncio.run(drop())


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path,
                    pg_template: str | None) -> AsyncIterator[str]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/atsmail.db"
        store = Store.open(url)
        await store.migrate()
        await store.close()
        yield url
        return
    require_peer(pg_template is not None, f"no PostgreSQL reachable at {PG_URL}")
    name = f"atsmail_t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_asyncpg_dsn(PG_URL))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    finally:
        await conn.close()
    yield _with_database(PG_URL, name)
    conn = await asyncpg.connect(_asyncpg_dsn(PG_URL))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = Store.open(store_url)
    yield opened
    await opened.close()


@pytest.fixture
async def team(store: Store) -> Store:
    """The usual cast: a recruiting team at example.com and two candidates."""
    await store.add_domain("example.com")
    await store.add_team_member("recruiter@example.com", "Rita Recruiter", "recruiter")
    await store.add_job("J1", "Backend Engineer")
    await store.add_job("J2", "Designer")
    await store.add_candidate("C-1", "Ada Applicant", ["ada@applicant.test"], ["J1"])
    await store.add_candidate("C-2", "Grace Hopper", ["grace@candidates.test"], ["J2"])
    return store


# --- an upstream SMTP sink -----------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    # Whether it came over TLS (STARTTLS or implicit).
    tls: bool = False


@dataclass
class Sink:
    """A real SMTP server standing in for the smarthost; its answers are settable."""

    messages: list[Received] = field(default_factory=list)
    reject_rcpt: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str | None = None
    drop_at_data: bool = False
    data_delay: float = 0.0
    # Close each connection right after answering DATA, as an idle timeout would.
    hang_up_after_data: bool = False
    sessions: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    # Offered as STARTTLS, or from the first byte when `implicit_tls`.
    tls_context: ssl.SSLContext | None = None
    implicit_tls: bool = False
    _protocols: list[SMTP] = field(default_factory=list)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if address in self.reject_rcpt:
            return self.reject_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.drop_at_data:
            assert server.transport is not None
            server.transport.close()
            return "421 closing"
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_reply:
            return self.data_reply
        self.messages.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                      bytes(envelope.original_content or b""),
                                      tls=self.implicit_tls or session.ssl is not None))
        if self.hang_up_after_data and server.transport is not None:
            asyncio.get_running_loop().call_later(0.01, server.transport.close)
        return f"250 2.0.0 Ok: queued as S{len(self.messages)}"

    def _protocol(self) -> SMTP:
        self.sessions += 1
        protocol = SMTP(self, hostname="sink.test", enable_SMTPUTF8=True,
                        tls_context=None if self.implicit_tls else self.tls_context)
        self._protocols.append(protocol)
        return protocol

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._protocol, "127.0.0.1", 0, ssl=self.tls_context if self.implicit_tls else None)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for protocol in self._protocols:
                if protocol.transport is not None:
                    protocol.transport.close()
            await self.server.wait_closed()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    server = Sink()
    await server.start()
    yield server
    await server.stop()


# --- the relay -------------------------------------------------------------------

GatewayFactory = Callable[..., Awaitable[Gateway]]


def relay_config(store_url: str, upstream: Upstream, **relay: Any) -> Config:
    capture_forwards = relay.pop("capture_forwards", True)
    ats_inbox = relay.pop("ats_inbox", "")
    retention_days = relay.pop("retention_days", 0)
    mirror: MirrorConfig = relay.pop("mirror", MirrorConfig(enabled=False))
    secrets: SecretsConfig = relay.pop("secrets", SecretsConfig())
    dkim: DkimConfig = relay.pop("dkim", DkimConfig())
    api: ApiConfig = relay.pop("api", ApiConfig(enabled=False))
    oauth: OAuthConfig = relay.pop("oauth", OAuthConfig())
    webhooks: tuple[WebhookConfig, ...] = relay.pop("webhooks", ())
    return Config(
        storage=StorageConfig(store_url),
        relay=replace(RelayConfig(), listen_host="127.0.0.1", listen_port=0,
                      upstream=upstream, upstream_timeout=5, **relay),
        capture=CaptureConfig(capture_forwards=capture_forwards, ats_inbox=ats_inbox,
                              retention_days=retention_days),
        secrets=secrets,
        mirror=mirror,
        dkim=dkim,
        oauth=oauth,
        api=api,
        webhooks=webhooks,
    )


@pytest.fixture
async def gateway_factory(store_url: str, sink: Sink) -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def make(**relay: Any) -> Gateway:
        upstream = relay.pop("upstream", Upstream("smtp", "127.0.0.1", sink.port))
        gateway = Gateway(relay_config(store_url, upstream, **relay))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.stop(grace=1)


@pytest.fixture
async def relay(gateway_factory: GatewayFactory, team: Store) -> Gateway:
    return await gateway_factory()


# --- a real IMAP server -------------------------------------------------------


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    server = start_dovecot()
    require_peer(server is not None, "no dovecot on this machine (Debian: dovecot-imapd)")
    assert server is not None
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dovecot_tls() -> Iterator[Dovecot]:
    server = start_dovecot(tls=True)
    require_peer(server is not None, "no dovecot on this machine (Debian: dovecot-imapd)")
    assert server is not None
    yield server
    server.stop()


# --- OAuth2: a local provider, and a Dovecot that checks its tokens ------------


@pytest.fixture(scope="session")
def token_service_running() -> Iterator[TokenService]:
    service = start_token_service()
    yield service
    service.stop()


@pytest.fixture
def token_service(token_service_running: TokenService) -> Iterator[TokenService]:
    """The provider, as each test expects to find it: hour-long tokens, none rotated."""
    yield token_service_running
    token_service_running.lifetime = 3600
    token_service_running.rotate = False


@pytest.fixture(scope="session")
def dovecot_oauth(token_service_running: TokenService) -> Iterator[Dovecot]:
    server = start_dovecot(introspection_url=token_service_running.introspection_url)
    require_peer(server is not None, "no dovecot on this machine (Debian: dovecot-imapd)")
    assert server is not None
    yield server
    server.stop()


@pytest.fixture
def oauth_config(token_service: TokenService, monkeypatch: pytest.MonkeyPatch) -> OAuthConfig:
    """The gateway registered as a client of the local provider, for gmail and outlook."""
    monkeypatch.setenv("ATSMAIL_TEST_CLIENT_SECRET", CLIENT_SECRET)
    client = OAuthClient(token_service.token_url, CLIENT_ID,
                         client_secret_env="ATSMAIL_TEST_CLIENT_SECRET")
    return OAuthConfig(gmail=client, outlook=client, timeout=5)


@pytest.fixture
def secrets_config(tmp_path: Path) -> SecretsConfig:
    config = SecretsConfig(key_file=tmp_path / "atsmail.key", key_env="ATSMAIL_TEST_NO_KEY")
    create_key_file(config)
    return config


# --- building and sending mail -------------------------------------------------

_counter = itertools.count(1)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10) -> None:
    """Wait until `check` holds, failing after `seconds`: for what happens after
    an answer, at whatever speed the machine has."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("not reached in time")
        await asyncio.sleep(0.05)


def make_mail(sender: str, to: str | list[str], subject: str = "Hello", body: str = "Hi.\n",
              cc: list[str] | None = None, message_id: str | None = "auto",
              **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to) if isinstance(to, list) else to
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Date"] = "Fri, 27 Nov 2026 10:00:00 +0000"
    if message_id == "auto":
        msg["Message-ID"] = make_msgid(f"t{next(_counter)}", domain="test.example")
    elif message_id:
        msg["Message-ID"] = message_id
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes()


@dataclass
class SmtpResult:
    code: int
    text: str
    rcpt: dict[str, tuple[int, str]]


async def smtp_send(port: int, raw: bytes, mail_from: str, rcpts: list[str],
                    host: str = "127.0.0.1", source: str | None = None) -> SmtpResult:
    """One transaction, step by step, returning the final answer and each RCPT's."""
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30,
                             source_address=(source, 0) if source else None)
    await client.connect()
    try:
        try:
            await client.mail(mail_from)
        except aiosmtplib.SMTPResponseException as exc:
            return SmtpResult(exc.code, exc.message, {})
        answers: dict[str, tuple[int, str]] = {}
        for rcpt in rcpts:
            try:
                response = await client.rcpt(rcpt)
                answers[rcpt] = (response.code, response.message)
            except aiosmtplib.SMTPResponseException as exc:
                answers[rcpt] = (exc.code, exc.message)
        if not any(code < 300 for code, _ in answers.values()):
            first = next(iter(answers.values()), (503, "no recipients"))
            return SmtpResult(first[0], first[1], answers)
        try:
            response = await client.data(raw)
            return SmtpResult(response.code, response.message, answers)
        except aiosmtplib.SMTPResponseException as exc:
            return SmtpResult(exc.code, exc.message, answers)
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()



def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every async test on uvloop, the event loop `atsmail serve` runs on."""
    return {"uvloop": uvloop.new_event_loop}
