"""A small, strict IMAP client for the mirror, over aioimaplib.

aioimaplib hands back raw response lines; this module turns them into the
few things the mirror needs (folders with their special use, UIDVALIDITY,
UID lists, message bytes by UID) and turns every failure into `ImapError`
or `ImapAuthError`, with every wait bounded by a timeout. aioimaplib has no
STARTTLS, so `starttls` upgrades its transport with asyncio's `start_tls`
after the server agrees. It logs in with a password, or with an OAuth2
access token over SASL XOAUTH2.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from base64 import b64encode
from collections.abc import Iterable, Sequence
from datetime import date
from typing import Any

import aioimaplib

from atsmail.gateway.credentials import Credentials, Login
from atsmail.storage.models import Mailbox

_LIST_LINE = re.compile(rb'^\((?P<flags>[^)]*)\) (?P<delim>"(?:[^"\\]|\\.)*"|NIL) (?P<name>.+)$')
_FETCH_START = re.compile(rb"^\d+ FETCH \(")
_UID = re.compile(rb"UID (\d+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_SPECIAL_USES = ("\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive", "\\All", "\\Flagged")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ImapError(Exception):
    """The server failed, refused a command, or went away."""


class ImapAuthError(ImapError):
    """The server refused the credentials."""


def quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def imap_date(day: date) -> str:
    return f"{day.day:02d}-{_MONTHS[day.month - 1]}-{day.year}"


class _Fetch(aioimaplib.FetchCommand):  # type: ignore[misc]
    """aioimaplib's FETCH, with its check for a complete response kept as it goes.

    aioimaplib asks after every response line whether the last message's
    parentheses are closed, and answers by scanning every line received so
    far: a batch of headers cost time quadratic in its size, more than the
    mirror's whole judging. The same answer is kept here line by line.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        # Parentheses opened and not yet closed since the last "n FETCH (" line.
        self._open = 0
        super().__init__(*args, **kwargs)

    def append_to_resp(self, line: bytes | bytearray, result: str = "Pending") -> None:
        super().append_to_resp(line, result)
        if isinstance(line, bytes):  # literals (bytearray) do not count, as upstream
            if self.FETCH_MESSAGE_DATA_RE.match(line):
                self._open = 0
            self._open += line.count(b"(") - line.count(b")")

    def wait_data(self) -> bool:
        return self._open != 0


class ImapSession:
    def __init__(self, client: aioimaplib.IMAP4, timeout: float) -> None:
        self.client = client
        self.timeout = timeout

    @classmethod
    async def for_mailbox(cls, box: Mailbox, credentials: Credentials,
                          command_timeout: float) -> ImapSession:
        """A session logged in to a connected mailbox; a stale access token is refreshed once."""
        return await credentials.attempt(
            box, lambda login: cls.open(box.imap_host, box.imap_port, box.security, login,
                                        command_timeout), ImapAuthError)

    @classmethod
    async def open(cls, host: str, port: int, security: str, login: Login,
                   command_timeout: float) -> ImapSession:
        context = ssl.create_default_context()
        client: aioimaplib.IMAP4
        if security == "ssl":
            client = aioimaplib.IMAP4_SSL(host, port, timeout=command_timeout,
                                          ssl_context=context)
        else:
            client = aioimaplib.IMAP4(host, port, timeout=command_timeout)
        session = cls(client, command_timeout)
        try:
            await session._login(host, port, security, login, context)
        except BaseException:
            # Whatever went wrong (or a cancellation), leave no socket behind.
            session.abort()
            raise
        return session

    async def _login(self, host: str, port: int, security: str, login: Login,
                     context: ssl.SSLContext) -> None:
        try:
            await self.client.wait_hello_from_server()
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            raise ImapError(f"cannot reach {host}:{port}: {_describe(exc)}") from None
        try:
            if security == "starttls":
                await self._starttls(host, context)
            if login.oauth2:
                response = await self._xoauth2(login)
            else:
                response = await self.client.login(login.username, login.secret)
        except TimeoutError:
            # Servers slow down answers after failed logins (Dovecot does).
            raise ImapError(f"{host}:{port}: login timed out") from None
        except (OSError, aioimaplib.AioImapException) as exc:
            raise ImapError(f"{host}:{port}: login failed: {_describe(exc)}") from None
        if response.result != "OK":
            text = _text(response.lines)
            if "[UNAVAILABLE]" in text:  # RFC 5530: the server's trouble, not ours
                raise ImapError(f"login failed for now: {text}")
            raise ImapAuthError(f"login refused: {text}")

    async def _xoauth2(self, login: Login) -> Any:
        """AUTHENTICATE XOAUTH2 with the initial response (SASL-IR).

        Not aioimaplib's `xoauth2`: a refused token is reported in a server
        challenge that the client must answer (with an empty line) before the
        tagged NO comes, and aioimaplib would wait for that NO for ever.
        """
        protocol = self.client.protocol
        if "AUTH=XOAUTH2" not in protocol.capabilities:
            raise ImapAuthError("the server does not offer XOAUTH2 logins")
        initial = b64encode(
            f"user={login.username}\x01auth=Bearer {login.secret}\x01\x01".encode()).decode()
        command = _Authenticate(protocol.transport, "AUTHENTICATE", protocol.new_tag(),
                                "XOAUTH2", initial, loop=protocol.loop)
        async with protocol.state_condition:
            response = await asyncio.wait_for(protocol.execute(command, scrub=initial),
                                              self.timeout)
            if response.result == "OK":
                protocol.state = aioimaplib.AUTH
            protocol.state_condition.notify_all()
        return response

    async def _starttls(self, host: str, context: ssl.SSLContext) -> None:
        protocol = self.client.protocol
        if "STARTTLS" not in protocol.capabilities:
            raise ImapError("the server does not offer STARTTLS")
        tag = protocol.new_tag()
        command = aioimaplib.Command("STARTTLS", tag, loop=protocol.loop)
        response = await asyncio.wait_for(protocol.execute(command), self.timeout)
        if response.result != "OK":
            raise ImapError(f"STARTTLS refused: {_text(response.lines)}")
        loop = asyncio.get_running_loop()
        transport = await asyncio.wait_for(loop.start_tls(
            protocol.transport, protocol, context, server_hostname=host), self.timeout)
        protocol.transport = transport
        # Capabilities may change once the connection is private.
        await asyncio.wait_for(protocol.capability(), self.timeout)

    async def _run(self, command: str, *args: str) -> list[bytes | bytearray]:
        try:
            if command == "uid":
                response = await asyncio.wait_for(self.client.uid(*args), self.timeout)
            elif command == "fetch":
                protocol = self.client.protocol
                # No timeout on the command itself: aioimaplib would re-arm
                # its timer for every response line, a sixth of a header
                # fetch's time; wait_for bounds the whole command instead.
                response = await asyncio.wait_for(protocol.execute(_Fetch(
                    protocol.new_tag(), *args, prefix="UID", loop=protocol.loop,
                    timeout=None)), self.timeout)
            elif command == "uid_search":
                response = await self.client.uid_search(*args, charset=None)
            else:
                response = await getattr(self.client, command)(*args)
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            raise ImapError(f"{command} failed: {_describe(exc)}") from None
        if response.result != "OK":
            raise ImapError(f"{command} {' '.join(args)[:80]} refused: {_text(response.lines)}")
        return list(response.lines)

    async def capabilities(self) -> set[str]:
        # Asked again after LOGIN: some servers only then show SPECIAL-USE.
        try:
            await asyncio.wait_for(self.client.protocol.capability(), self.timeout)
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            raise ImapError(f"CAPABILITY failed: {_describe(exc)}") from None
        return set(self.client.protocol.capabilities)

    async def folders(self) -> list[tuple[str, str]]:
        """(name, special use) of every selectable folder."""
        found = []
        for line in await self._run("list", '""', '"*"'):
            match = _LIST_LINE.match(bytes(line))
            if not match:
                continue
            flags = match["flags"].decode(errors="replace").split()
            if any(f.lower() == "\\noselect" or f.lower() == "\\nonexistent" for f in flags):
                continue
            special = next((u for u in _SPECIAL_USES if u.lower() in
                            (f.lower() for f in flags)), "")
            found.append((_unquote(match["name"].decode(errors="replace")), special))
        return found

    async def select(self, folder: str) -> int:
        """Select `folder`; returns its UIDVALIDITY."""
        for line in await self._run("select", quote(folder)):
            match = _UIDVALIDITY.search(bytes(line))
            if match:
                return int(match[1])
        raise ImapError(f"{folder}: the server sent no UIDVALIDITY")

    async def search(self, criteria: str) -> list[int]:
        lines = await self._run("uid_search", criteria)
        uids = [int(n) for n in bytes(lines[0]).split() if n.isdigit()] if lines else []
        return sorted(set(uids))

    async def uids_after(self, last_uid: int) -> list[int]:
        # `UID n:*` always returns the highest UID, even one below n.
        return [u for u in await self.search(f"UID {last_uid + 1}:*") if u > last_uid]

    async def fetch(self, uids: Sequence[int], part: str) -> dict[int, bytes]:
        """`part` (e.g. BODY.PEEK[]) of each UID still there; expunged ones are absent."""
        if not uids:
            return {}
        lines = await self._run("fetch", _uid_set(uids), f"(UID {part})")
        found: dict[int, bytes] = {}
        for i, line in enumerate(lines):
            if isinstance(line, bytearray) or not _FETCH_START.match(line):
                continue
            literal = lines[i + 1] if i + 1 < len(lines) else None
            if not isinstance(literal, bytearray):
                continue
            uid = _UID.search(line) or (
                _UID.search(bytes(lines[i + 2])) if i + 2 < len(lines) else None)
            if uid:
                found[int(uid[1])] = bytes(literal)
        return found

    async def file(self, folder: str, raw: bytes, message_id: str) -> bool:
        """Put `raw` into `folder` as read, unless a copy is already there.

        Returns False when it was there: a retried filing adds no duplicate.
        """
        await self.select(folder)
        if message_id and await self.search(f"HEADER Message-ID {quote('<' + message_id + '>')}"):
            return False
        try:
            response = await self.client.append(raw, mailbox=quote(folder), flags="(\\Seen)")
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            raise ImapError(f"APPEND failed: {_describe(exc)}") from None
        if response.result != "OK":
            raise ImapError(f"APPEND to {folder} refused: {_text(response.lines)}")
        return True

    async def wait_for_news(self, seconds: float) -> bool:
        """IDLE for up to `seconds`; True when the server announced a change."""
        try:
            idle = await asyncio.wait_for(self.client.idle_start(timeout=seconds), self.timeout)
            try:
                push = await self.client.wait_server_push(timeout=seconds + self.timeout)
            finally:
                self.client.idle_done()
                await asyncio.wait_for(idle, self.timeout)
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            raise ImapError(f"IDLE failed: {_describe(exc)}") from None
        if self.client.protocol.state == "LOGOUT":
            raise ImapError("the server ended the session")
        return any(b"stop_wait_server_push" not in bytes(line) for line in push)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.logout(), 5)
        except (OSError, TimeoutError, aioimaplib.AioImapException):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once."""
        transport = getattr(self.client.protocol, "transport", None)
        if transport is not None:
            transport.close()
        task = getattr(self.client, "_client_task", None)
        if task is not None and not task.done():
            task.cancel()


class _Authenticate(aioimaplib.Command):  # type: ignore[misc]  # aioimaplib is untyped
    """AUTHENTICATE that answers each server challenge with an empty response.

    Under XOAUTH2 the only challenge is the server's error report; an empty
    answer ends the exchange (RFC 7628 section 3.2.3).
    """

    def __init__(self, transport: asyncio.WriteTransport, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._transport = transport

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        if line.startswith(b"+"):
            self._transport.write(b"\r\n")
        super().append_to_resp(line, result=result)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _uid_set(uids: Iterable[int]) -> str:
    return ",".join(str(u) for u in uids)


def _unquote(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return re.sub(r"\\(.)", r"\1", name[1:-1])
    return name


def _text(lines: Sequence[bytes | bytearray]) -> str:
    return " ".join(bytes(line).decode(errors="replace") for line in lines)[:300]
