"""The SMTP relay: a before-queue proxy that captures candidate mail inline.

Like Postfix's `smtpd_proxy_filter`, the relay keeps no queue. It opens the
upstream session when the client says MAIL FROM, passes each RCPT on in
lockstep so every recipient gets the upstream's own verdict, and answers the
end of DATA only after the upstream has answered it and the capture is
committed. Whatever goes wrong on our side becomes a 4xx, so the sending MTA
keeps the message and retries: the relay never answers 250 for a message it
did not hand on, and never a 5xx for a message it merely failed to handle.

This module stays thin: parse, ask `rules`, hand the decision to `storage`,
map failures to SMTP codes.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Coroutine
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, TypeVar

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from atsmail.config import Config, ConfigError, RelayConfig
from atsmail.gateway.limits import RateLimiter
from atsmail.gateway.upstream import LOST, Reply, UpstreamSession, open_session
from atsmail.rules import Context, Decision, MessageFacts, decide, read_message
from atsmail.rules.addresses import try_normalize
from atsmail.storage import Capture, CaptureWriter, Prepared, Store, lookup
from atsmail.storage.access import relay_logins, token_digest
from atsmail.storage.lookup import Directory, load_directory

T = TypeVar("T")

log = logging.getLogger(__name__)
decisions = logging.getLogger("atsmail.decisions")

# Messages larger than this are parsed in a worker thread, so one big
# message does not stall every other session.
PARSE_IN_THREAD_ABOVE = 256 * 1024

# Tries to confirm (or withdraw) a capture after the upstream's answer.
SETTLE_ATTEMPTS = 4
# How often team members and internal domains are reloaded from the store.
DIRECTORY_REFRESH = 1.0

TEMPFAIL = "451 4.3.0 Temporary failure, try again later"
STORE_UNAVAILABLE = "451 4.3.0 Capture store unavailable, try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
TOO_MANY_MESSAGES = "450 4.7.1 Too many messages from your address this minute, try again later"
TOO_MANY_RECIPIENTS = ("450 4.7.1 Too many recipients from your address this minute, "
                       "try again later")


def _read_fully(raw: bytes, sender: str | None, recipients: list[str]) -> MessageFacts:
    """Headers and, when the rules may want it, the body: for a worker thread."""
    facts = read_message(raw, sender, recipients)
    facts.forward  # noqa: B018 - computed here, off the event loop, and cached
    return facts


class RelaySession(Session):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.upstream: UpstreamSession | None = None
        # The message being handed on, which a client hanging up must not cut.
        self.delivery: asyncio.Task[str] | None = None
        # RCPT commands in the current transaction.
        self.rcpt_attempts = 0


class RelayProtocol(SMTP):
    """aiosmtpd's protocol, with per-session upstream state and tracking."""

    event_handler: Relay

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's parse of a MAIL or RCPT path builds a class on every call;
        # the same parse, remembered (the relay sets no local-part limit).
        return _parse_path(arg)

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        previous = self.session
        super().connection_made(transport)
        if isinstance(previous, RelaySession) and previous is not self.session:
            # STARTTLS starts the session afresh (RFC 3207), the upstream too.
            self.event_handler.close_upstream(previous)
        self.event_handler.sessions.add(self)

    async def _handle_client(self) -> None:
        # Before the greeting: a client over its connection rate gets 421 and
        # nothing else, as RFC 5321 has a server that will not serve say.
        assert self.session is not None
        if self.event_handler.over_limit(self.session, "connections"):
            await self.push(TOO_MANY_CONNECTIONS)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        super().connection_lost(error)
        self.event_handler.sessions.discard(self)
        if isinstance(session, RelaySession):
            self.event_handler.close_upstream(session)

    @property
    def in_transaction(self) -> bool:
        return bool(self.envelope is not None and self.envelope.mail_from)


class Relay:
    """The aiosmtpd handler and the listening server around it."""

    def __init__(self, config: Config, store: Store, writer: CaptureWriter) -> None:
        self.config = config
        self.relay = config.relay
        self.store = store
        self.writer = writer
        self.hostname = self.relay.hostname or socket.gethostname()
        self.sessions: set[RelayProtocol] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.Server] = []
        self.directory = Directory()
        self._refresher: asyncio.Task[None] | None = None
        self.tls = _server_tls(self.relay)
        # Team members' API tokens (by digest), the relay's SMTP AUTH logins.
        self.logins: dict[str, str] = {}
        self.auth_offered = self.tls is not None or self.relay.auth_without_tls
        self.limits = {
            "connections": RateLimiter(self.relay.rate_limit_connections),
            "messages": RateLimiter(self.relay.rate_limit_messages),
            "recipients": RateLimiter(self.relay.rate_limit_recipients),
        }

    # --- lifecycle -----------------------------------------------------------

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen on `relay.listen`, or accept from `sockets` another process listens on."""
        await self.refresh_directory()
        self._refresher = asyncio.create_task(self._keep_directory_fresh())
        loop = asyncio.get_running_loop()
        if sockets:
            self._servers = [await loop.create_server(self._protocol, sock=s) for s in sockets]
        else:
            self._servers = [await loop.create_server(
                self._protocol, host=self.relay.listen_host, port=self.relay.listen_port,
                reuse_address=True)]

    @property
    def port(self) -> int:
        return int(self._servers[0].sockets[0].getsockname()[1])

    def _protocol(self) -> RelayProtocol:
        return RelayProtocol(
            self,
            data_size_limit=self.relay.max_message_size,
            enable_SMTPUTF8=True,
            hostname=self.hostname,
            ident="atsmail",
            timeout=self.relay.idle_timeout,
            tls_context=self.tls,
            require_starttls=self.relay.require_tls,
            auth_require_tls=not self.relay.auth_without_tls,
            authenticator=self._authenticate,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let transactions in flight finish (bounded), then close."""
        for server in self._servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + (
            self.relay.shutdown_grace if grace is None else grace)
        # Polling keeps the hooks free of shutdown bookkeeping; it runs once.
        while asyncio.get_running_loop().time() < deadline and (  # noqa: ASYNC110
                self._tasks or any(s.in_transaction for s in self.sessions)):
            await asyncio.sleep(0.05)
        for protocol in list(self.sessions):
            if protocol.transport is not None:
                protocol.transport.close()
        if self._tasks:
            await asyncio.wait(self._tasks)
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None

    async def refresh_directory(self) -> None:
        """Reload who is internal; admin changes reach the relay this way."""
        self.directory = await self.store.db.run(load_directory, write=False)
        if self.auth_offered:
            self.logins = await self.store.db.run(relay_logins, write=False)

    async def _keep_directory_fresh(self) -> None:
        while True:
            await asyncio.sleep(DIRECTORY_REFRESH)
            try:
                await self.refresh_directory()
            except Exception:
                log.warning("could not reload team members and internal domains", exc_info=True)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def close_upstream(self, session: RelaySession) -> None:
        upstream, session.upstream = session.upstream, None
        if upstream is None:
            return
        delivery = session.delivery
        if delivery is not None and not delivery.done():
            # Let the upstream answer the message in flight first.
            delivery.add_done_callback(lambda _: self._spawn(upstream.close()))
        else:
            self._spawn(upstream.close())

    # --- the SMTP hooks ------------------------------------------------------

    def _allowed(self, session: Session) -> bool:
        """Whether the client may relay: it logged in, or its network may."""
        return bool(session.authenticated) or self._trusted(session)

    def _trusted(self, session: Session) -> bool:
        address = _peer_address(session)
        if address is None:
            return False
        return any(address in network for network in self.relay.allowed_networks)

    def over_limit(self, session: Session, what: str) -> bool:
        """Count one of `what` for the client; whether that passes its limit.

        Clients in allowed_networks (the company's own MTA) are not limited.
        """
        if self._trusted(session):
            return False
        address = _peer_address(session)
        if self.limits[what].allow(str(address)):
            return False
        log.info("%s over the %s-a-minute limit", address, what)
        return True

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, data: Any) -> AuthResult:
        """SMTP AUTH: a team member's address and one of their API tokens."""
        member = None
        if isinstance(data, LoginPassword):
            login = try_normalize(data.login.decode("utf-8", "replace"))
            owner = self.logins.get(token_digest(data.password.decode("utf-8", "replace")))
            if owner is not None and owner == login:
                member = owner
        if member is None:
            log.warning("failed SMTP AUTH %s from %s", mechanism, _peer_address(session))
            return AuthResult(success=False, handled=False)
        log.info("SMTP AUTH %s as %s from %s", mechanism, member, _peer_address(session))
        return AuthResult(success=True, auth_data=member)

    async def _upstream(self, session: RelaySession) -> UpstreamSession | Reply:
        if session.upstream is not None and session.upstream.usable:
            await session.upstream.reset()
            return session.upstream
        self.close_upstream(session)
        opened = await open_session(self.relay.upstream, self.relay.upstream_timeout,
                                    self.relay.data_timeout, self.hostname)
        if isinstance(opened, Reply):
            return opened
        session.upstream = opened
        return opened

    async def _begin(self, session: RelaySession, sender: str, options: list[str]) -> Reply:
        """Open the upstream transaction (MAIL FROM) for this session."""
        # Twice at most: a kept upstream connection may have been closed by
        # the upstream while the client was idle.
        for _ in range(2):
            upstream = await self._upstream(session)
            if isinstance(upstream, Reply):
                return upstream
            reply = await upstream.mail(sender, options)
            if reply is not LOST:
                return reply
        return reply

    async def handle_MAIL(self, server: SMTP, session: RelaySession, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.over_limit(session, "messages"):
            return TOO_MANY_MESSAGES
        if self._allowed(session):
            reply = await self._begin(session, address, mail_options)
            if not reply.ok:
                return str(reply)
            status = str(reply)
        else:
            # Other clients may only reach hosted identities (the gateway is
            # their MX); anything else is refused per recipient at RCPT, as
            # MTAs expect of a relay.
            self.close_upstream(session)
            status = "250 2.1.0 Ok"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        session.rcpt_attempts = 0
        return status

    async def handle_RCPT(self, server: SMTP, session: RelaySession, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        normalized = try_normalize(address)
        member = self.directory.hosted.get(normalized) if normalized else None
        if member is None and not self._allowed(session):
            return f"554 5.7.1 <{address}>: Relay access denied"
        if self.over_limit(session, "recipients"):
            return TOO_MANY_RECIPIENTS
        # Every attempt counts, accepted or not: no recipient floods or
        # address harvesting through the upstream.
        session.rcpt_attempts += 1
        if session.rcpt_attempts > self.relay.max_recipients:
            return "452 4.5.3 Too many recipients"
        if session.upstream is None or not session.upstream.in_transaction:
            if self._allowed(session):
                return str(Reply(451, "4.4.2 Upstream session lost, try again later"))
            reply = await self._begin(session, str(envelope.mail_from),
                                      list(envelope.mail_options))
            if not reply.ok:
                return str(reply)
        assert session.upstream is not None
        # Mail for a hosted identity is captured and handed on to the team
        # member's own address.
        reply = await session.upstream.rcpt(member or address)
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return str(reply)

    async def handle_DATA(self, server: SMTP, session: RelaySession, envelope: Envelope) -> str:
        upstream = session.upstream
        if upstream is None:
            return str(Reply(451, "4.4.2 Upstream session lost, try again later"))
        # Shielded: a client that hangs up mid-way must not leave a capture
        # half-written or an upstream transaction half-done.
        session.delivery = self._spawn(self._relay_message(upstream, envelope))
        return await asyncio.shield(session.delivery)

    async def handle_RSET(self, server: SMTP, session: RelaySession,
                          envelope: Envelope) -> str:
        if session.upstream is not None:
            await session.upstream.reset()
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: SMTP, session: RelaySession,
                          envelope: Envelope) -> str:
        self.close_upstream(session)
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default is a 500 that leaks internals and bounces mail.
        log.error("unexpected error in an SMTP session", exc_info=error)
        return TEMPFAIL

    # --- one message ---------------------------------------------------------

    async def _relay_message(self, upstream: UpstreamSession, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        sender = envelope.mail_from if envelope.mail_from != "<>" else None
        try:
            facts = await self._read(raw, sender, list(envelope.rcpt_tos))
            decision = await self._decide(facts)
        except Exception:
            log.exception("could not judge a message; deferring it")
            await upstream.reset()
            return STORE_UNAVAILABLE

        prepared: Prepared | None = None
        if decision.capture:
            try:
                prepared = await self.writer.prepare(Capture(facts, decision, raw, "relay"))
            except Exception:
                log.exception("could not store a capture; deferring the message")
                await upstream.reset()
                return STORE_UNAVAILABLE

        reply = await upstream.data(raw)
        if prepared is not None:
            await self._settle(prepared, reply, facts)
        self._log(facts, decision, reply)
        return str(reply)

    async def _decide(self, facts: MessageFacts) -> Decision:
        forwards = self.config.capture.capture_forwards
        inbox = self.config.capture.ats_inbox
        directory = self.directory
        # Most company mail is settled by the headers and the directory alone
        # (bulk, or no team member taking part): no store read for it.
        quick = decide(facts, Context(internal_domains=directory.domains, team=directory.team,
                                      capture_forwards=forwards), stop_at_veto=True)
        if quick.vetoed:
            return quick

        async def full() -> Decision:
            context = await self.store.db.run(lambda conn: lookup.context_for(
                conn, facts, directory, forwards, ats_inbox=inbox), write=False)
            return decide(facts, context)

        decision = await full()
        if decision.intake is not None:
            # A CV forwarded to the ATS inbox: its sender becomes a candidate,
            # then the message is judged again and lands on them.
            address, name = decision.intake
            await self.store.intake_candidate(address, name, inbox,
                                              facts.from_[0] if facts.from_ else "")
            decision = await full()
        return decision

    async def _read(self, raw: bytes, sender: str | None, recipients: list[str]) -> MessageFacts:
        if len(raw) > PARSE_IN_THREAD_ABOVE:
            return await asyncio.to_thread(_read_fully, raw, sender, recipients)
        return read_message(raw, sender, recipients)

    async def _settle(self, prepared: Prepared, reply: Reply, facts: MessageFacts) -> None:
        """Confirm or withdraw the capture, trying a few times before answering.

        The upstream has answered, so a 4xx now would deliver the message
        twice: a store that stays down leaves the copy pending (logged), and
        the answer is the upstream's all the same.
        """
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                if reply.ok:
                    await self.writer.confirm(prepared)
                else:
                    await self.writer.discard(prepared)
                return
            except Exception:
                if attempt == SETTLE_ATTEMPTS - 1:
                    log.exception("could not settle the capture of %s after upstream %d; it "
                                  "stays pending", facts.message_id, reply.code)
                    return
                await asyncio.sleep(0.5 * 2 ** attempt)

    def _log(self, facts: MessageFacts, decision: Decision, reply: Reply) -> None:
        decisions.info(json.dumps({
            "event": "relay",
            "message_id": facts.message_id,
            "from": facts.from_[0] if facts.from_ else facts.envelope_sender,
            "size": facts.size,
            "verdict": "capture" if decision.capture else "pass",
            "candidates": list(decision.candidates),
            "thread": decision.thread,
            "direction": decision.direction,
            "rules": list(decision.deciding_rules),
            "upstream": reply.code,
        }))


@functools.lru_cache(maxsize=4096)
def _parse_path(arg: str) -> tuple[str | None, str | None]:
    """The address in a MAIL or RCPT argument and what follows it, as aiosmtpd parses them."""
    if not arg:
        return "", ""
    try:
        parsed = get_angle_addr(arg) if arg.lstrip().startswith("<") else get_addr_spec(arg)
    except HeaderParseError:
        return None, None
    address, rest = parsed
    return address.addr_spec, rest


def _peer_address(session: Session) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    peer = session.peer
    host = peer[0] if isinstance(peer, tuple) else None
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _server_tls(relay: RelayConfig) -> ssl.SSLContext | None:
    """The context STARTTLS uses: the admin's certificate, no client certificates."""
    if relay.tls_cert_file is None or relay.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(relay.tls_cert_file, relay.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"relay.tls_cert_file: cannot load {relay.tls_cert_file} with "
                          f"{relay.tls_key_file}: {exc}") from None
    return context
