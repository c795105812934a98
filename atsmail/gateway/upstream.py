"""Where the relay hands mail on: an SMTP smarthost, or a local Maildir.

An `UpstreamSession` speaks the envelope commands in lockstep with the
client's session, and answers each with a `Reply`: the upstream's own code
and text, or a 4xx of ours when the upstream cannot be reached. It never
raises for an upstream problem, so the relay can pass every answer on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import mailbox
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiosmtplib
from aiosmtplib.email import parse_address
from aiosmtplib.protocol import SMTPProtocol

from atsmail.config import Upstream

log = logging.getLogger(__name__)

# Envelope options the client may send that are passed on when the
# upstream offers the matching extension.
_OPTION_EXTENSIONS = {"SIZE": "size", "BODY": "8bitmime", "SMTPUTF8": "smtputf8"}


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        # One line: a multi-line upstream answer is folded into one.
        return f"{self.code} {' '.join(self.text.split())}".rstrip()


UNAVAILABLE = Reply(451, "4.4.1 Upstream unavailable, try again later")
TLS_FAILED = Reply(451, "4.7.5 Upstream TLS unavailable or untrusted, try again later")
LOST = Reply(451, "4.4.2 Upstream connection lost, try again later")
NO_SMTPUTF8 = Reply(553, "5.6.7 Non-ASCII address, and the upstream does not support SMTPUTF8")
REWRITTEN = Reply(553, "5.1.3 Address not accepted: it would not reach the upstream as written")
# What `data` gives when its `release` held the message back: the upstream
# never got the end of data, so it delivers nothing. A signal for the caller,
# which answers its client with its own reason.
WITHDRAWN = Reply(451, "4.3.0 Message withdrawn before its end of data")

# Awaited before the end of data goes out: whether it may.
Release = Callable[[], Awaitable[bool]]


class UpstreamSession(Protocol):
    @property
    def usable(self) -> bool: ...

    @property
    def in_transaction(self) -> bool:
        """MAIL FROM was accepted and the transaction is not over yet."""
        ...

    async def mail(self, sender: str, options: list[str]) -> Reply: ...

    async def rcpt(self, recipient: str) -> Reply: ...

    async def data(self, content: bytes, release: Release | None = None) -> Reply:
        """Hand the message on; with `release`, all of it but the end of data
        goes out while `release()` is awaited, and the end follows only if it
        gives True (otherwise: WITHDRAWN, and nothing is delivered)."""
        ...

    async def reset(self) -> None: ...

    async def close(self) -> None: ...


async def open_session(upstream: Upstream, command_timeout: float, data_timeout: float,
                       local_hostname: str | None) -> UpstreamSession | Reply:
    """A new session with the upstream, or the 4xx to answer when there is none."""
    if upstream.kind == "maildir":
        assert upstream.path is not None
        return MaildirSession(upstream.path)
    opportunistic = upstream.tls == "opportunistic" and not upstream.implicit_tls
    client = await _connect(upstream, command_timeout, local_hostname,
                            starttls=not upstream.implicit_tls and upstream.tls != "none",
                            validate_certs=not opportunistic)
    if client is TLS_FAILED and opportunistic:
        # As Postfix's `may`: a TLS handshake that fails is retried in the clear.
        client = await _connect(upstream, command_timeout, local_hostname,
                                starttls=False, validate_certs=False)
    if isinstance(client, Reply):
        return client
    return SmtpSession(client, data_timeout)


async def _connect(upstream: Upstream, command_timeout: float, local_hostname: str | None,
                   starttls: bool, validate_certs: bool) -> aiosmtplib.SMTP | Reply:
    client = aiosmtplib.SMTP(
        hostname=upstream.host, port=upstream.port, timeout=command_timeout,
        local_hostname=local_hostname or None, start_tls=False,
        use_tls=upstream.implicit_tls, validate_certs=validate_certs,
        cert_bundle=str(upstream.ca_file) if upstream.ca_file else None)
    secured = upstream.implicit_tls
    upgrading = False
    try:
        await client.connect()
        # Now, not lazily: what the upstream supports decides what is passed on.
        await client.ehlo()
        if starttls and client.supports_extension("starttls"):
            upgrading = True
            await client.starttls()
            # A server that dislikes the handshake may say so only by hanging
            # up here (TLS 1.3).
            await client.ehlo()
            secured = True
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        log.warning("upstream %s unavailable%s: %s", upstream,
                    " (TLS)" if upgrading else "", exc)
        client.close()
        return TLS_FAILED if upgrading or _tls_error(exc) else UNAVAILABLE
    if upstream.tls == "require" and not secured:
        log.warning("upstream %s does not offer STARTTLS, which relay.upstream_tls requires",
                    upstream)
        client.close()
        return TLS_FAILED
    return client


def _tls_error(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it, is a TLS handshake or certificate failure."""
    while exc is not None:
        if isinstance(exc, ssl.SSLError):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


class SmtpSession:
    def __init__(self, client: aiosmtplib.SMTP, data_timeout: float) -> None:
        self.client = client
        self.data_timeout = data_timeout
        self._in_transaction = False
        # DATA was sent and its end of data was not: only closing the
        # connection ends such a transaction (RFC 5321 3.8).
        self._in_data = False
        # The connection the message goes over, from its 354 on: kept, as
        # aiosmtplib forgets it when the upstream hangs up, and the answer
        # it may have sent first is read from it.
        self._data_protocol: SMTPProtocol | None = None
        self._encoding = "ascii"

    @property
    def usable(self) -> bool:
        return self.client.is_connected

    @property
    def in_transaction(self) -> bool:
        return (self._in_transaction or self._in_data) and self.usable

    def _options(self, options: list[str]) -> list[str]:
        passed = []
        for option in options:
            keyword = option.partition("=")[0].upper()
            extension = _OPTION_EXTENSIONS.get(keyword)
            if extension and self.client.supports_extension(extension):
                passed.append(option)
        return passed

    async def _run(self, command: str, call: Awaitable[aiosmtplib.SMTPResponse]) -> Reply:
        """The upstream's answer to `call`, the command `command`."""
        try:
            response = await call
        except aiosmtplib.SMTPServerDisconnected as exc:
            log.warning("upstream dropped the connection during %s: %s", command, exc)
            self.client.close()
            return LOST
        except aiosmtplib.SMTPTimeoutError as exc:
            log.warning("upstream timed out during %s: %s", command, exc)
            self.client.close()
            return LOST
        except aiosmtplib.SMTPResponseException as exc:
            return Reply(exc.code, exc.message)
        except ValueError as exc:  # a command line aiosmtplib will not write
            return Reply(553, f"5.1.3 Address not accepted: {' '.join(str(exc).split())}")
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("upstream %s failed: %s", command, exc)
            self.client.close()
            return LOST
        return Reply(response.code, response.message)

    async def mail(self, sender: str, options: list[str]) -> Reply:
        # Internationalised addresses (RFC 6531) travel as UTF-8, and only to
        # an upstream that says it takes them.
        wants_utf8 = "SMTPUTF8" in (o.upper() for o in options) or not sender.isascii()
        if wants_utf8 and not self.client.supports_extension("smtputf8"):
            return NO_SMTPUTF8
        self._encoding = "utf-8" if wants_utf8 else "ascii"
        # aiosmtpd hands the null reverse-path over as "<>".
        path = "" if sender in ("<>", "") else sender
        refusal = _refusal(path) if path else None
        if refusal is not None:
            return refusal
        try:
            passed = [option.encode("ascii") for option in self._options(options)]
        except UnicodeEncodeError:
            # aiosmtpd reads SIZE= in Arabic-Indic digits as a number.
            return Reply(555, "5.5.4 Parameters not in ASCII are not accepted")
        reply = await self._run("MAIL", self._command(b"MAIL", b"FROM", path, passed))
        self._in_transaction = reply.ok
        return reply

    async def rcpt(self, recipient: str) -> Reply:
        if self._in_data:
            # A DATA still open takes nothing else; only closing ends it.
            await self.reset()
            return LOST
        if not recipient.isascii() and self._encoding != "utf-8":
            return NO_SMTPUTF8
        refusal = _refusal(recipient)
        if refusal is not None:
            return refusal
        return await self._run("RCPT", self._command(b"RCPT", b"TO", recipient, []))

    async def _command(self, verb: bytes, field: bytes, path: str,
                       options: list[bytes]) -> aiosmtplib.SMTPResponse:
        """MAIL or RCPT with `path` as it is written, once `_refusal` passed it:
        what aiosmtplib's `mail` and `rcpt` would write, without their parsing
        the address again."""
        line = b"%s:<%s>" % (field, path.encode(self._encoding))
        return await self.client.execute_command(verb, line, *options)

    async def data(self, content: bytes, release: Release | None = None) -> Reply:
        try:
            return await self._run("DATA", self._send_data(content, release))
        except _Withdrawn:
            return WITHDRAWN

    async def begin_data(self) -> Reply:
        """DATA for a message passed on as it arrives: `send` its pieces, then
        `end_data`. The upstream's 354, or its refusal or our 4xx."""
        return await self._run("DATA", self._begin_data())

    async def send(self, lines: bytes, dotted: bool = True) -> None:
        """More of the message begun by `begin_data`: whole lines, ended by
        <CR><LF>, dot-stuffed here (without `dotted`, only the first may begin
        with a dot). An upstream that hung up or stopped reading is heard at
        `end_data`."""
        try:
            for piece in _stuffed_pieces(lines, end=False, dotted=dotted):
                await self._write(piece)
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("upstream failed while a message was passed on: %s", exc)
            self.client.close()

    async def end_data(self, release: Release) -> Reply:
        """The end of the message begun by `begin_data`, once `release()` allows
        (as `data` with `release`)."""
        try:
            return await self._run("DATA", self._end_data(b".\r\n", release))
        except _Withdrawn:
            return WITHDRAWN

    async def _begin_data(self) -> aiosmtplib.SMTPResponse:
        if self._in_data:
            self.client.close()
            raise aiosmtplib.SMTPServerDisconnected("a DATA from before was still open")
        # In data from the command on: a connection dropped while it is
        # answered is closed, not sent a QUIT the upstream would read as data.
        self._in_data = True
        start = await self.client.execute_command(b"DATA", timeout=self.data_timeout)
        if start.code != 354:
            self._in_data = False
            if start.code < 400:
                # Neither data to come nor a refusal: passed on, a 250 would
                # be taken for a delivery.
                self.client.close()
                raise aiosmtplib.SMTPServerDisconnected(
                    f"the upstream answered DATA with {start.code}")
            # The transaction may still be open upstream: the next reset() ends it.
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        self._in_transaction = False
        protocol = self._data_protocol = self.client.protocol
        assert protocol is not None
        # The upstream may answer as soon as the last piece is out: aiosmtplib
        # drops what arrives while it expects no reply.
        protocol._response_pending = True
        return start

    async def _write(self, piece: bytes | memoryview) -> bool:
        """Write a piece of the message; False, writing nothing, once the
        upstream has answered or hung up: its answer is read at the end, and
        a server that took its answer for the end of the data would read
        what follows as commands."""
        protocol = self._data_protocol
        answer = protocol._response_waiter if protocol is not None else None
        if protocol is None or answer is None or answer.done() or not protocol.is_connected:
            return False
        try:
            # Typed as bytes, but handed to the transport, which takes any buffer.
            protocol.write(piece)  # type: ignore[arg-type]
            # aiosmtplib's flow control: wait while the upstream is not reading.
            await asyncio.wait_for(protocol._drain_helper(), self.data_timeout)
        except TimeoutError:
            raise aiosmtplib.SMTPTimeoutError("upstream stopped reading the message") from None
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
            return False  # it is hanging up: as above
        return True

    async def _send_data(self, content: bytes,
                         release: Release | None) -> aiosmtplib.SMTPResponse:
        """DATA, with the message written in pieces, each dot-stuffed as it goes.

        aiosmtplib's `data` makes three whole copies of a message before
        writing it (line ends, dots, end marker) and hands the transport all of
        it at once; for a 30 MB message that is most of the relay's peak memory.
        `content` has <CR><LF> line ends (the relay sees to that).
        """
        await self._begin_data()
        # With no `release`, the end of data goes out with the last piece.
        written = all([await self._write(piece)
                       for piece in _stuffed_pieces(content, end=release is None)])
        if release is None:
            return await self._end_data(b"", None, early=not written)
        return await self._end_data(_end_of_data(content), release)

    async def _end_data(self, end: bytes, release: Release | None,
                        early: bool = False) -> aiosmtplib.SMTPResponse:
        """The upstream's answer to the end of data: `end` is what is left of
        it to write, once `release()` (if any) allows. `early`: the upstream
        answered before all of the data and its end went out."""
        protocol, self._data_protocol = self._data_protocol, None
        assert protocol is not None
        if release is None:
            response = await protocol.read_response(timeout=self.data_timeout)
            if early and response.code < 400:
                self.client.close()
                raise aiosmtplib.SMTPServerDisconnected(
                    f"the upstream answered {response.code} before the end of data")
        else:
            response = await self._end_when_released(protocol, end, release)
        self._in_data = False
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def _end_when_released(self, protocol: SMTPProtocol, end: bytes,
                                 release: Release) -> aiosmtplib.SMTPResponse:
        """The upstream's answer to the end of data, sent once `release()` allows.

        An upstream that answers first (a 421 when it gives up waiting, or a
        hang-up) is heard at once: `release()` is left to finish on its own.
        """
        # No time limit while held: the upstream keeps its own.
        answer = asyncio.ensure_future(protocol.read_response())
        releasing = asyncio.ensure_future(release())
        # Whichever is not awaited below still has its outcome taken.
        for task in (answer, releasing):
            task.add_done_callback(_outcome_taken)
        try:
            await asyncio.wait((answer, releasing), return_when=asyncio.FIRST_COMPLETED)
            if answer.done():
                # Before its end of data, any answer is a failure, and the
                # transaction cannot go on: nothing was delivered.
                self.client.close()
                early = answer.result()
                if early.code < 400:
                    # Not a refusal (a 250, or a 221 as it hung up): passed
                    # on, the client would take it for a delivery.
                    raise aiosmtplib.SMTPServerDisconnected(
                        f"the upstream answered {early.code} before the end of data")
                return early
            if not releasing.result():
                # A transaction cut off before its end of data delivers nothing
                # (RFC 5321 3.8); there is no other way to abandon DATA (the
                # connection is closed below).
                raise _Withdrawn
            # An upstream that hung up in the same moment: its answer is read.
            if protocol.is_connected:
                protocol.write(end)
            try:
                return await asyncio.wait_for(answer, self.data_timeout)
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response") from None
        except BaseException:
            self.client.close()
            raise
        finally:
            answer.cancel()

    async def reset(self) -> None:
        if self._in_data:
            # Cut off before its end of data, the message is not delivered.
            self.client.close()
        elif self._in_transaction and self.usable:
            await self._run("RSET", self.client.rset())
        self._in_transaction = self._in_data = False
        self._data_protocol = None

    async def close(self) -> None:
        if self.usable and not self._in_data:
            try:
                await asyncio.wait_for(self.client.quit(), 5)
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                pass
        self.client.close()


class _Withdrawn(Exception):
    """The message was held back before its end of data."""


def _outcome_taken(task: asyncio.Future[Any]) -> None:
    """Take a finished task's exception, so that none goes unheard in the log."""
    if not task.cancelled():
        task.exception()


# Bytes of a message written to the upstream at a time.
DATA_PIECE = 256 * 1024


def _stuffed_pieces(content: bytes, end: bool = True,
                    dotted: bool = True) -> Iterator[bytes | memoryview]:
    """`content` as the data of an SMTP DATA command, in pieces of about
    DATA_PIECE bytes that end at line ends: each line starting with a dot
    gets another (RFC 5321 4.5.2), and with `end` the end of data, in the
    last piece, ends it. A piece with no such line is not copied. Without
    `dotted`, the caller knows that no line but the first begins with one."""
    start = 0
    whole = memoryview(content)
    while True:
        cut = content.find(b"\r\n", start + DATA_PIECE)
        stop = len(content) if cut < 0 else cut + 2
        piece: bytes | memoryview = whole[start:stop]
        if dotted and content.find(b"\r\n.", start, stop) >= 0:
            piece = content[start:stop].replace(b"\r\n.", b"\r\n..")
        if content[start:start + 1] == b".":
            piece = b"." + piece
        if stop == len(content):
            yield b"".join((piece, _end_of_data(content))) if end else piece
            return
        yield piece
        start = stop


def _end_of_data(content: bytes) -> bytes:
    """<CR><LF>.<CR><LF>, less the <CR><LF> that `content` ends with."""
    return b".\r\n" if not content or content.endswith(b"\r\n") else b"\r\n.\r\n"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@functools.lru_cache(maxsize=4096)
def _refusal(address: str) -> Reply | None:
    """Why `address` may not go upstream as it is written, or None.

    Refused: a control character, even quoted (down the line it may end the
    command or a header); bytes that are not UTF-8 (aiosmtpd hands them over
    as they came); what aiosmtplib's check refuses, an address that could
    add parameters or commands to a command line; and an address its parse
    reads as another (`"x<CR>Bcc: y@z"@d` as `y@z`), which down the line may
    be read as that other, not the one the relay judged.
    """
    if _CONTROL.search(address):
        return Reply(553, "5.1.3 Address not accepted: it holds a control character")
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return Reply(553, "5.1.3 Address not accepted: it is not valid UTF-8")
    try:
        written = parse_address(address)
    except ValueError as exc:
        return Reply(553, f"5.1.3 Address not accepted: {' '.join(str(exc).split())}")
    return None if written == address else REWRITTEN


class MaildirSession:
    """Delivers each accepted message into one Maildir, flushed to disk first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.in_transaction = False

    @property
    def usable(self) -> bool:
        return True

    async def mail(self, sender: str, options: list[str]) -> Reply:
        self.in_transaction = True
        return Reply(250, "2.1.0 Ok")

    async def rcpt(self, recipient: str) -> Reply:
        return Reply(250, "2.1.5 Ok")

    async def data(self, content: bytes, release: Release | None = None) -> Reply:
        try:
            if release is not None and not await release():
                return WITHDRAWN
            key = await asyncio.to_thread(self._deliver, content)
        except OSError as exc:
            log.error("cannot deliver into %s: %s", self.path, exc)
            return Reply(451, "4.3.0 Local delivery failed, try again later")
        finally:
            self.in_transaction = False
        return Reply(250, f"2.0.0 Ok: delivered as {key}")

    def _deliver(self, content: bytes) -> str:
        key = mailbox.Maildir(self.path, create=True).add(content)
        # mailbox writes without fsync; a message is ours to lose until both
        # the file and its directory entry are on disk.
        for target, flags in ((self.path / "new" / key, os.O_RDONLY),
                              (self.path / "new", os.O_RDONLY | os.O_DIRECTORY)):
            fd = os.open(target, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return key

    async def reset(self) -> None:
        self.in_transaction = False

    async def close(self) -> None:
        pass
