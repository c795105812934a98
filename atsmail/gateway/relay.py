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
import collections
import functools
import ipaddress
import json
import logging
import math
import re
import socket
import ssl
import types
from collections.abc import Coroutine
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, TypeVar, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from atsmail.config import Config, ConfigError, RelayConfig
from atsmail.gateway.limits import RateLimiter
from atsmail.gateway.upstream import (
    LOST,
    Reply,
    SmtpSession,
    UpstreamSession,
    open_session,
)
from atsmail.rules import Context, Decision, MessageFacts, decide, read_message, vetoed
from atsmail.rules.addresses import in_domains, try_normalize
from atsmail.storage import Capture, CaptureWriter, Prepared, Store, lookup
from atsmail.storage.access import relay_logins, token_digest
from atsmail.storage.lookup import Directory, load_directory

T = TypeVar("T")

log = logging.getLogger(__name__)
decisions = logging.getLogger("atsmail.decisions")

# Messages larger than this are read and judged in a worker thread, so one
# big message does not stall every other session.
PARSE_IN_THREAD_ABOVE = 256 * 1024

# Tries to confirm (or withdraw) a capture after the upstream's answer.
SETTLE_ATTEMPTS = 4
# How often team members and internal domains are reloaded from the store.
DIRECTORY_REFRESH = 1.0
# Upstream connections a client session has finished with are kept for the
# next one, as Postfix's SMTP client keeps them (smtp_connection_cache_time_limit):
# most clients send one message a connection, and a new upstream session
# costs a connect, EHLO and QUIT. At most this many, for this many seconds.
IDLE_UPSTREAMS = 16
IDLE_UPSTREAM_TIME = 5.0

TEMPFAIL = "451 4.3.0 Temporary failure, try again later"
STORE_UNAVAILABLE = "451 4.3.0 Capture store unavailable, try again later"
# A message's facts, the rules' decision and its pending copy (when captured);
# or the refusal to answer instead of the upstream's.
Judged = tuple[MessageFacts, Decision, Prepared | None] | str
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
TOO_MANY_MESSAGES = "450 4.7.1 Too many messages from your address this minute, try again later"
TOO_MANY_RECIPIENTS = ("450 4.7.1 Too many recipients from your address this minute, "
                       "try again later")

BARE_LINE_END = ("550 5.5.2 Message refused: its line ends could hide an end of data "
                 "(bare <CR>, a lone dot after a bare <LF>, or <CR><LF> and bare <LF> mixed)")
LINE_TOO_LONG = "554 5.6.0 Line longer than 1000 bytes refused (RFC 5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 5.3.4 Message larger than the size limit refused"
INTERNAL_SENDER = "550 5.7.1 <{}>: internal sender address refused from outside the company"

# The end of data, with the <CR><LF> that ends the message's last line.
END_OF_DATA = b"\r\n.\r\n"

# A message's data is passed upstream as it arrives, in whole lines, each
# time this much more has come.
PASS_EVERY = 64 * 1024

# The longest line taken, in bytes before its <LF>: aiosmtpd's limit (1001
# with <CR><LF>), one more than RFC 5321's.
MAX_LINE = 1000


# A line holding just a dot, in mail whose lines end in a bare LF.
_LONE_DOT = re.compile(rb"(?:^|\n)\.(?:\n|$)")


def normalise_line_ends(raw: bytes) -> bytes | None:
    """The message with every line ended by <CR><LF>; None when its line ends
    could show a server down the line an end of data that the relay did not see.

    aiosmtpd ends the data only at <CR><LF>.<CR><LF>. Mail whose lines all
    end in a bare LF (Python's smtplib.sendmail sends bytes so) is read as
    <CR><LF> lines, each with its transparency dot removed, as Postfix's
    `smtpd_forbid_bare_newline = normal` does; so what is judged and captured
    is what the upstream gets. Refused (SMTP smuggling): a bare CR, bare LF
    and <CR><LF> line ends in one message, and a line of just a dot ended by
    a bare LF, which only an attempt to end the data can mean.
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf:
        return None
    if raw.count(b"\n") == crlf:
        return raw
    # The last line end is the client's own <CR><LF> before the final dot.
    lines = raw.removesuffix(b"\r\n")
    if b"\r" in lines or _LONE_DOT.search(lines):
        return None
    return lines.replace(b"\n.", b"\n").replace(b"\n", b"\r\n") + b"\r\n"


class RelaySession(Session):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.upstream: UpstreamSession | None = None
        # The message being handed on, which a client hanging up must not cut.
        self.delivery: asyncio.Task[str] | None = None
        # The upstream's answer to a DATA sent while the client's data was
        # still arriving (354: its data is being passed on as it comes).
        self.passed: Reply | None = None
        # RCPT commands in the current transaction.
        self.rcpt_attempts = 0
        # Whether the client's address is in allowed_networks, once it is known.
        self.trusted = False


class RelayProtocol(SMTP):
    """aiosmtpd's protocol, with per-session upstream state and tracking."""

    event_handler: Relay

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's parse of a MAIL or RCPT path builds a class on every call;
        # the same parse, remembered (the relay sets no local-part limit).
        return _parse_path(arg)

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def fresh(self) -> RelayProtocol:
        """A protocol for a new connection, made from this one, which has none.

        aiosmtpd's constructor finds the commands, hooks and AUTH mechanisms
        by introspection, a third of a millisecond for each connection (and an
        MTA often sends one message a connection). They are the same every
        time: only what a connection changes is made anew, and the methods
        are bound to the new protocol.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        # aiosmtpd keeps these in one dict for all connections, emptied by each
        # new one and lengthened by each EHLO: each connection has its own.
        new.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        asyncio.StreamReaderProtocol.__init__(
            new, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=new._cb_client_connected, loop=self.loop)
        new._smtp_methods = {name: types.MethodType(method.__func__, new)
                             for name, method in self._smtp_methods.items()}
        new._auth_methods = {
            name: mechanism._replace(method=types.MethodType(
                cast(types.MethodType, mechanism.method).__func__, new))
            if mechanism.is_builtin else mechanism
            for name, mechanism in self._auth_methods.items()}
        return new

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        previous = self.session
        super().connection_made(transport)
        assert isinstance(self.session, RelaySession)
        self.session.trusted = self.event_handler.trusted_peer(self.session)
        if isinstance(previous, RelaySession) and previous is not self.session:
            # STARTTLS starts the session afresh (RFC 3207), the upstream too.
            self.event_handler.close_upstream(previous)
        self.event_handler.sessions.add(self)

    async def _handle_client(self) -> None:
        # Before the greeting: a client over its connection rate gets 421 and
        # nothing else, as RFC 5321 has a server that will not serve say.
        assert isinstance(self.session, RelaySession)
        if self.event_handler.over_limit(self.session, "connections"):
            await self.push(TOO_MANY_CONNECTIONS)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the message in pieces rather than line by line.

        aiosmtpd keeps every line as an object of its own and joins them at the
        end: for a 30 MB message, that is 400,000 objects and three times its size
        in memory, and most of the relay's time for a large one. The same rules
        here: the data ends at <CR><LF>.<CR><LF> only, a line's leading dot is
        removed, and a message that is too large or has too long a line is read
        to its end before it is refused.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        assert isinstance(self.session, RelaySession)
        self.session.passed = None
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            data, refusal = await self._read_data()
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError):
            log.info("connection lost during DATA")
            self._writer.close()
            raise
        if refusal is not None:
            if refusal is BARE_LINE_END:
                log.warning("refused a message from %s whose line ends could hide an end of "
                            "data", self.envelope.mail_from)
            if self.session.passed is not None and self.session.upstream is not None:
                await self.session.upstream.reset()  # what was passed on is not delivered
            await self.push(refusal)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = self.envelope.original_content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    async def _read_data(self) -> tuple[bytes, str | None]:
        """The message up to the end of data, with <CR><LF> line ends
        (`normalise_line_ends`), and the refusal to answer instead."""
        reader = self._reader
        limit = self.data_size_limit
        # The <CR><LF> that ended the DATA command is put back in front of the
        # data: then every end of data, an empty message's too, is a whole
        # <CR><LF>.<CR><LF> in what is read, and the message comes in the
        # pieces that arrive. Searched for ".<CR><LF>" instead, each line that
        # ends in a dot is a piece of its own: a message of lines "a." cost
        # nearly 200 times the work of plain text. asyncio's reader cannot
        # put bytes back; aiosmtpd reaches into its buffer too (to drop what
        # came before STARTTLS).
        reader._buffer[:0] = b"\r\n"  # type: ignore[attr-defined]
        # One buffer, not a list of pieces: freed, a buffer this large goes
        # back to the system at once; thousands of pieces would stay in the heap.
        data = bytearray()
        size = -2  # without the <CR><LF> put back
        line = 0  # bytes in the line read so far
        refusal: str | None = None
        # The last two bytes read: a <CR><LF> that ends one piece makes a dot
        # that begins the next a transparency dot.
        tail = b""
        # How much of `data` went upstream as it arrived; -1: no more will.
        passed = 2
        # Whether what arrived since may hold a line that begins with a dot.
        dotted = False
        while True:
            try:
                piece = await reader.readuntil(END_OF_DATA)
                end, ended = len(piece) - 3, True
            except asyncio.LimitOverrunError as overrun:
                # Not in what has arrived yet: take what cannot be part of it.
                piece = await reader.readexactly(overrun.consumed)
                end, ended = len(piece), False
            size += end
            line, too_long = _line_lengths(line, piece, end)
            if refusal is None and limit and size > limit:
                refusal = TOO_MUCH_DATA
            elif refusal is None and too_long:
                refusal = LINE_TOO_LONG
            if refusal is None:
                body, dots = _unstuffed(piece, end, tail)
                data += body
                dotted = dotted or dots
                if passed >= 0 and (len(data) - passed >= PASS_EVERY or (ended and passed > 2)):
                    passed = await self._pass_on(data, passed, dotted)
                    dotted = False
            else:
                del data[:]
            tail = (tail + piece[-2:])[-2:]
            if ended:
                # All of it passed on: its lines are known to end in <CR><LF>.
                crlf_lines = passed == len(data)
                del data[:2]  # the <CR><LF> put back
                message = bytes(data)
                if refusal is None and not crlf_lines:
                    normalised = normalise_line_ends(message)
                    if normalised is None:
                        message, refusal = b"", BARE_LINE_END
                    else:
                        message = normalised
                return message, refusal

    async def _pass_on(self, data: bytearray, passed: int, dotted: bool) -> int:
        """Pass the whole lines of `data` after `passed` upstream, before the
        rest of the message arrives; how far it is passed on, or -1 when no
        more of it will be. Without `dotted`, no line but the first of them
        begins with a dot.

        Only lines ended by <CR><LF> go: a message with other line ends is
        taken whole (or refused, once it has lines of both kinds), and
        nothing in what goes can end the data upstream. Whatever comes
        after, the upstream gets its end of data only once the whole
        message was read and judged.
        """
        session = self.session
        assert isinstance(session, RelaySession)
        upstream = session.upstream
        lines = passable_lines(data, passed)
        # Only an SMTP upstream has a transfer to make at the same time; a
        # Maildir takes the message whole.
        if lines is None or not isinstance(upstream, SmtpSession):
            return -1
        if session.passed is None:
            if not upstream.in_transaction:
                return -1
            session.passed = await upstream.begin_data()
        if session.passed.code != 354:
            return -1  # answered at the end of data
        await upstream.send(lines, dotted)
        return passed + len(lines)

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
        # Upstream sessions at rest, and since when (newest last).
        self._idle: list[tuple[float, UpstreamSession]] = []
        self._stopping = False
        # What each connection's protocol is made from (RelayProtocol.fresh).
        self._prototype: RelayProtocol | None = None
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
        self._stopping = False
        self._prototype = None  # made again on this event loop
        self._refresher = asyncio.create_task(self._every_second())
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
        if self._prototype is None:
            self._prototype = RelayProtocol(
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
        return self._prototype.fresh()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let transactions in flight finish (bounded), then close."""
        self._stopping = True
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
        self._let_idle_go(everyone=True)
        # Including what those tasks spawn as they end (a copy settled
        # after the upstream's early answer, say).
        while self._tasks:
            await asyncio.wait(set(self._tasks))
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

    async def _every_second(self) -> None:
        while True:
            await asyncio.sleep(DIRECTORY_REFRESH)
            self._let_idle_go()
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
        """The session is done with its upstream connection: keep it for another, or close it."""
        upstream, session.upstream = session.upstream, None
        if upstream is None:
            return
        delivery = session.delivery
        if delivery is not None and not delivery.done():
            # Let the upstream answer the message in flight first.
            delivery.add_done_callback(lambda _: self._rest(upstream))
        else:
            self._rest(upstream)

    def _rest(self, upstream: UpstreamSession) -> None:
        if (upstream.usable and not upstream.in_transaction and not self._stopping
                and len(self._idle) < IDLE_UPSTREAMS):
            self._idle.append((asyncio.get_running_loop().time(), upstream))
        else:
            self._spawn(upstream.close())

    def _rested(self) -> UpstreamSession | None:
        """The upstream connection that rested least, if one is still good."""
        self._let_idle_go()
        while self._idle:
            _, upstream = self._idle.pop()
            if upstream.usable:
                return upstream
        return None

    def _let_idle_go(self, everyone: bool = False) -> None:
        """Close the upstream connections that rested too long (or all of them)."""
        cutoff = math.inf if everyone else asyncio.get_running_loop().time() - IDLE_UPSTREAM_TIME
        while self._idle and self._idle[0][0] <= cutoff:
            self._spawn(self._idle.pop(0)[1].close())

    # --- the SMTP hooks ------------------------------------------------------

    def _allowed(self, session: RelaySession) -> bool:
        """Whether the client may relay: it logged in, or its network may."""
        return bool(session.authenticated) or session.trusted

    def trusted_peer(self, session: Session) -> bool:
        """Whether the client's address is in allowed_networks."""
        address = _peer_address(session)
        if address is None:
            return False
        return any(address in network for network in self.relay.allowed_networks)

    def over_limit(self, session: RelaySession, what: str) -> bool:
        """Count one of `what` for the client; whether that passes its limit.

        Clients in allowed_networks (the company's own MTA) are not limited.
        """
        if session.trusted:
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
        opened = self._rested() or await open_session(
            self.relay.upstream, self.relay.upstream_timeout, self.relay.data_timeout,
            self.hostname)
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
            # MTAs expect of a relay. Nobody out there may pose as the company.
            if self._internal(address):
                return INTERNAL_SENDER.format(address)
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
        session.delivery = self._spawn(self._relay_message(
            upstream, envelope, trusted=self._allowed(session), passed=session.passed))
        return await asyncio.shield(session.delivery)

    async def handle_EHLO(self, server: SMTP, session: RelaySession, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # Commands are read and answered one at a time, in order, whatever
        # came with them (RFC 2920): a client such as Postfix may then send
        # MAIL, RCPT and DATA at once. What a client sent along with STARTTLS
        # is dropped, as RFC 3207 requires (aiosmtpd does).
        responses.insert(1, "250-PIPELINING")
        # One write for the whole answer: aiosmtpd writes each line on its own.
        return ["\r\n".join(responses)]

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

    async def _relay_message(self, upstream: UpstreamSession, envelope: Envelope,
                             trusted: bool, passed: Reply | None = None) -> str:
        """Judge the message and hand it on; the answer to give. `passed`: the
        upstream's answer to a DATA sent while the message was arriving."""
        sender = envelope.mail_from if envelope.mail_from != "<>" else None
        raw = envelope.original_content or b""
        # The message goes out to the upstream while it is read, judged and
        # its copy stored; only its end of data waits for those.
        answered = asyncio.Event()
        judging = self._spawn(self._judge(raw, sender, list(envelope.rcpt_tos), trusted,
                                          answered))
        # One turn of the loop first: a message refused on its headers alone
        # (a forged sender) is refused before any of it goes upstream, which
        # keeps the upstream connection (unless it was `passed` on as it
        # arrived: then the reset closes the connection, ending its DATA).
        await asyncio.sleep(0)
        if judging.done() and isinstance(refusal := judging.result(), str):
            await upstream.reset()
            return refusal

        async def released() -> bool:
            return not isinstance(await judging, str)

        try:
            if passed is None:
                reply = await upstream.data(raw, release=released)
            elif passed.code == 354:
                assert isinstance(upstream, SmtpSession)
                reply = await upstream.end_data(released)
            else:
                reply = passed
        except BaseException:
            # Not an upstream failure (those are replies): nothing is answered
            # from here, so a copy the judge stores is withdrawn.
            self._spawn(self._withdraw(judging))
            raise
        finally:
            answered.set()
        if not judging.done():
            # The upstream gave up before the end of data: its answer goes
            # back now, and the judge's copy, if it stores one, is withdrawn.
            self._spawn(self._conclude(judging, reply))
            return str(reply)
        return await self._conclude(judging, reply)

    async def _conclude(self, judging: asyncio.Task[Judged], reply: Reply) -> str:
        """Settle the message's copy by the upstream's answer; the answer to give."""
        judged = await judging
        if isinstance(judged, str):
            return judged
        facts, decision, prepared = judged
        if prepared is not None:
            await self._settle(prepared, reply, facts)
        self._log(facts, decision, reply)
        return str(reply)

    async def _judge(self, raw: bytes, sender: str | None, recipients: list[str],
                     trusted: bool, answered: asyncio.Event) -> Judged:
        """The message's facts, the rules' decision and its stored pending copy
        (when captured); or the refusal to answer instead of the upstream.

        No copy is stored once the upstream has `answered`: before its end
        of data, an answer is a failure, and the copy would only be discarded.
        """
        try:
            facts = await self._read(raw, sender, recipients)
        except Exception:
            log.exception("could not read a message; deferring it")
            return TEMPFAIL
        forged = None if trusted else next(
            (a for a in (*facts.from_, *facts.sender) if self._internal(a)), None)
        if forged is not None:
            log.warning("refused a message from outside with the internal sender %s", forged)
            return INTERNAL_SENDER.format(forged)
        try:
            decision = await self._decide(facts)
        except Exception:
            log.exception("could not judge a message; deferring it")
            return STORE_UNAVAILABLE
        if not decision.capture or answered.is_set():
            return facts, decision, None
        try:
            prepared = await self.writer.prepare(Capture(facts, decision, raw, "relay"))
        except Exception:
            log.exception("could not store a capture; deferring the message")
            return STORE_UNAVAILABLE
        return facts, decision, prepared

    async def _withdraw(self, judging: asyncio.Task[Judged]) -> None:
        """Discard the copy stored for a message that gets no answer from here."""
        try:
            judged = await judging
        except Exception:
            return  # it stored nothing (and the error reached the session already)
        if not isinstance(judged, str) and judged[2] is not None:
            await self.writer.discard(judged[2])

    def _internal(self, address: str) -> bool:
        """A team member's address, or one in an internal domain."""
        normalized = try_normalize(address)
        directory = self.directory
        return normalized is not None and (
            normalized in directory.team or in_domains(normalized, directory.domains) is not None)

    async def _decide(self, facts: MessageFacts) -> Decision:
        forwards = self.config.capture.capture_forwards
        inbox = self.config.capture.ats_inbox
        directory = self.directory
        # Most company mail is settled by the headers and the directory alone
        # (bulk, or no team member taking part): no store read for it, and
        # its body, attachments and all, is never parsed (the rules read it
        # only past those vetoes, for a forward).
        quick = vetoed(facts, Context(internal_domains=directory.domains, team=directory.team,
                                      capture_forwards=forwards))
        if quick is not None:
            return quick

        async def full() -> Decision:
            if facts.size > PARSE_IN_THREAD_ABOVE:
                # The body is read for a forward (the look-up wants its
                # addresses), not on the loop's thread nor the store's.
                await asyncio.to_thread(getattr, facts, "forward")
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
            return await asyncio.to_thread(read_message, raw, sender, recipients)
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


# A line longer than MAX_LINE holds a whole block of this many bytes, however
# the data is cut into such blocks: looking for a <LF> in each block finds
# the lines worth measuring without cutting the data into lines.
_LINE_BLOCK = MAX_LINE // 2


def _line_lengths(unfinished: int, piece: bytes, end: int) -> tuple[int, bool]:
    """Given `unfinished` bytes of a line before `piece[:end]`: the bytes of the
    line it leaves unfinished, and whether it has a line longer than MAX_LINE
    (counted up to its <LF>)."""
    first = piece.find(b"\n", 0, end)
    if first < 0:
        line = unfinished + end
        return line, line > MAX_LINE
    last = piece.rfind(b"\n", 0, end)
    rest = end - last - 1
    if unfinished + first > MAX_LINE or rest > MAX_LINE:
        return rest, True
    for block in range(first + 1, last - _LINE_BLOCK + 1, _LINE_BLOCK):
        if piece.find(b"\n", block, block + _LINE_BLOCK) < 0:
            start = piece.rfind(b"\n", first, block)
            if piece.find(b"\n", block, last + 1) - start - 1 > MAX_LINE:
                return rest, True
    return rest, False


def passable_lines(data: bytearray, passed: int) -> bytes | None:
    """The whole lines of `data` after `passed`, if they may go upstream before
    the rest arrives: each ended by <CR><LF>, with no other CR or LF."""
    with memoryview(data) as view:  # one copy, not two
        lines = bytes(view[passed:data.rfind(b"\r\n", passed) + 2])
    crlf = lines.count(b"\r\n")
    if not crlf or lines.count(b"\r") != crlf or lines.count(b"\n") != crlf:
        return None
    return lines


def _unstuffed(piece: bytes, end: int, tail: bytes) -> tuple[bytes | memoryview, bool]:
    """`piece[:end]` without its transparency dots: those after a <CR><LF>,
    including one that `tail`, the two bytes sent before it, begins; and
    whether a line in it may still begin with a dot (none can without one).

    Most mail has none, and then nothing is copied.
    """
    body: bytes | memoryview = piece
    dots = piece.find(b"\r\n.", 0, end) >= 0
    if dots:
        body = piece[:end].replace(b"\r\n.", b"\r\n")
    elif end < len(piece):
        body = memoryview(piece)[:end]
    head = piece[:min(end, 2)]
    if tail == b"\r\n" and head[:1] == b".":
        return body[1:], True
    if tail[-1:] == b"\r" and head == b"\n.":
        return b"\n" + body[2:], True
    return body, dots


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
