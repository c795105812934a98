"""What the rules know about a message, read from its bytes once.

`read_message` turns raw RFC 5322 bytes (plus the SMTP envelope, when there
is one) into `MessageFacts`: plain, immutable values the rules can compare
without touching the `email` package again. Parsing never fails: a broken
header is read leniently or left empty and recorded as a defect, because a
malformed message must still be relayed and judged, not dropped.
"""

from __future__ import annotations

import hashlib
import html
import quopri
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime
from functools import lru_cache
from typing import Any, Generic, TypeVar, overload

from atsmail.rules.addresses import addresses_in_text, try_normalize

# Longer Message-IDs are junk; they are ignored so that stored ids stay
# indexable on every database.
_MSG_ID_MAX = 900
_MSG_ID = re.compile(rf"<([^<>\s\x00-\x1f\x7f]{{1,{_MSG_ID_MAX}}})>")
_REPLY_SUBJECT = re.compile(r"^\s*(?:\[[^\]]*\]\s*)?(?:re|aw|sv|antw|r)\s*:", re.IGNORECASE)
# Only the outermost prefix counts: "Re: Fwd: ..." is a reply to a forward.
FORWARD_SUBJECT = re.compile(r"^\s*(?:\[[^\]]*\]\s*)?(?:fwd?|wg|tr|rv)\s*:", re.IGNORECASE)
# Markers that mail clients put above an inline forwarded message; a quoted
# one (after ">") belongs to a reply. Only forward markers count as a
# forward: "Original Message" and Outlook's line of underscores introduce
# replies too, so they are only read (for the original's addresses) when the
# subject says forward.
_FORWARD_MARKERS = re.compile(
    r"^[ \t]*(?:-{2,}\s*(?:forwarded message|weitergeleitete nachricht|message transf[ée]r[ée]"
    r"|mensaje reenviado|doorgestuurd bericht|messaggio inoltrato)\s*-{2,}"
    r"|begin forwarded message:|anfang der weitergeleiteten nachricht:)",
    re.IGNORECASE | re.MULTILINE,
)
_ORIGINAL_MARKERS = re.compile(
    r"^[ \t]*(?:-{2,}\s*(?:original message|urspr[üu]ngliche nachricht|message d'origine)"
    r"\s*-{2,}|_{10,}[ \t]*$)",
    re.IGNORECASE | re.MULTILINE,
)
# Worth parsing the body for: a forward marker, an attached message (a
# digest's parts are messages by default), or text whose transfer encoding
# or charset could hide a marker. Plain substring tests on the lower-cased
# bytes: far cheaper than a regex over every message the relay sees (each
# costs 0.3 ms a MB). "base64" is said of nearly every attachment too, so
# mail with one is parsed. A NUL is how UTF-16 and UTF-32 write ASCII, by
# whatever name the charset is given.
FORWARD_MARKER_HINTS = (
    b"forwarded message", b"weitergeleitete", b"message transf",
    b"mensaje reenviado", b"doorgestuurd bericht", b"messaggio inoltrato",
)
FORWARD_HINTS = (b"base64", *FORWARD_MARKER_HINTS, b"message/rfc822", b"multipart/digest",
                 b"\x00")
# Uuencode, under the four names `Message.get_payload` decodes it by (uue,
# x-uue, uuencode, x-uuencode), and not where base64 text (a DKIM signature)
# happens to spell uue.
_UUENCODE = re.compile(rb"uue(?:ncode)?(?![\w+/])")
# `binascii.a2b_qp` reads "=" before a bare CR as a soft line break that
# runs to the next LF, however far: then decoding all of a message is not
# decoding each of its parts.
_QP_SKIP = re.compile(rb"=\r(?!\n)")
_BLOCK_ADDRESS_FIELDS = re.compile(
    r"^[ \t>]*\*?(?:from|von|de|da|van|to|an|[àa]|pour|para|aan|cc|kopie)\s*:\*?\s*(.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_BLOCK_FROM = re.compile(r"^[ \t>]*\*?(?:from|von|de|da|van)\s*:\*?\s*(.+)$",
                         re.IGNORECASE | re.MULTILINE)
# Where HTML text breaks into lines: a table row is one (Thunderbird writes
# a forwarded header block as a table, a field to a row).
_HTML_LINE_END = re.compile(r"<br\s*/?>|</(?:p|div|tr|li|h[1-6]|table)>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^<>]*>")
_HTML_BLOCK = re.compile(r"<(hr|div)\b([^<>]*)>", re.IGNORECASE)
_BORDER_TOP = re.compile(r"border-top\s*:\s*solid", re.IGNORECASE)
# Forwarded blocks read in one message: a bound on hostile input.
_MAX_BLOCKS = 20
# How far below a marker the forwarded header block may reach.
_BLOCK_SPAN = 1500
# Plain text longer than this is not searched for inline forwards.
_TEXT_SCAN_LIMIT = 256 * 1024
# Only the start of a message is read for a forward: its own text and the
# headers of a forwarded message come first, and parsing costs several times
# what it reads (a 30 MB attachment would cost 100 MB to parse).
FORWARD_SCAN_LIMIT = 2 * 1024 * 1024
# How much of a message is parsed first, in the hope that its text is all
# there (`_parse_for_forward`).
_TEXT_FIRST = 64 * 1024
# A body with more multipart boundaries than this is not read for a forward:
# the email parser checks every line against every open boundary, so hostile
# nesting costs it time quadratic in the depth (a second for a 60 KB message
# of 1,000 levels). Real mail has a handful.
_MAX_BOUNDARIES = 100


@dataclass(frozen=True)
class Forward:
    """Signs that a message forwards another, and what the original names."""

    subject_prefix: bool = False
    attached: bool = False
    inline: bool = False
    original_addresses: tuple[str, ...] = ()
    original_message_ids: tuple[str, ...] = ()
    # Who wrote the forwarded original, and the name they gave.
    original_sender: str | None = None
    original_name: str = ""

    @property
    def is_forward(self) -> bool:
        return self.subject_prefix or self.attached or self.inline


T = TypeVar("T")


class _cached(Generic[T]):
    """`functools.cached_property` without its lock.

    In Python 3.11 that lock is one for all instances of a class: a large
    message's forward, read in a worker thread, held up every other
    message's on the event loop for as long. A value computed twice by
    two threads is harmless: each is a pure function of the message.
    """

    def __init__(self, func: Callable[[Any], T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    @overload
    def __get__(self, instance: None, owner: type) -> _cached[T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object, owner: type | None = None) -> T | _cached[T]:
        if instance is None:
            return self
        value = self.func(instance)
        # Seen first from now on, as the instance's own attribute.
        instance.__dict__[self.name] = value
        return value


@dataclass(frozen=True)
class MessageFacts:
    message_id: str | None
    subject: str
    date: datetime | None
    from_: tuple[str, ...]
    sender: tuple[str, ...]
    reply_to: tuple[str, ...]
    to: tuple[str, ...]
    cc: tuple[str, ...]
    envelope_sender: str | None
    envelope_recipients: tuple[str, ...]
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    list_id: str | None
    list_unsubscribe: bool
    precedence: str | None
    size: int
    raw: bytes = field(repr=False)
    defects: tuple[str, ...] = field(default=())
    # How far into `raw` a forward can be read (`_forward_reach`).
    forward_end: int = field(default=FORWARD_SCAN_LIMIT, repr=False)

    @_cached
    def forward(self) -> Forward:
        """Read from the body on first use, and only when a forward is possible."""
        start = self.raw[:self.forward_end]
        lowered = start.lower()
        if not _hinted(self.subject, start, lowered):
            return Forward()
        boundaries = lowered.count(b"boundary")
        if boundaries > _MAX_BOUNDARIES:
            return Forward(subject_prefix=bool(FORWARD_SUBJECT.match(self.subject)))
        try:
            # With no boundary there is one part: the parser reads no
            # multipart without one.
            return _read_forward(_parse_for_forward(start, lowered, boundaries > 0),
                                 self.subject)
        except Exception:
            # The email package fails on some hostile input: RecursionError
            # for deep nesting (it recurses per MIME level), TypeError for
            # RFC 2231 boundary pieces it cannot put in order. Such a body is
            # not read for a forward, rather than failing the message.
            return Forward(subject_prefix=bool(FORWARD_SUBJECT.match(self.subject)))

    @property
    def participants(self) -> tuple[str, ...]:
        """Every address taking part, each once, in header order."""
        seen: dict[str, None] = {}
        for group in (self.from_, self.sender, self.reply_to, self.to, self.cc,
                      (self.envelope_sender,) if self.envelope_sender else (),
                      self.envelope_recipients):
            for address in group:
                seen.setdefault(address, None)
        return tuple(seen)

    @property
    def thread_ids(self) -> tuple[str, ...]:
        """Message-IDs this message points at: replies and forwarded originals."""
        return tuple(dict.fromkeys(
            (*self.in_reply_to, *self.references, *self.forward.original_message_ids)))

    @_cached
    def content_hash(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def is_reply(self) -> bool:
        return bool(self.in_reply_to) or bool(_REPLY_SUBJECT.match(self.subject))

    @property
    def forwards(self) -> bool:
        """A forward: a Fwd-style subject, or forwarded content in a message
        that is not a reply (a reply may quote or attach what it answers)."""
        fwd = self.forward
        return fwd.subject_prefix or ((fwd.attached or fwd.inline) and not self.is_reply)

    @property
    def capture_key(self) -> str:
        """What makes a retried copy the same message: its Message-ID or its bytes."""
        return f"mid:{self.message_id}" if self.message_id else f"sha256:{self.content_hash}"


def read_message(
    raw: bytes,
    envelope_sender: str | None = None,
    envelope_recipients: Iterable[str] = (),
) -> MessageFacts:
    # Headers only: the body is read later, and only when a forward is possible.
    # The parser walks a body line by line even with headersonly, so it gets
    # just the header block.
    header = header_block(raw)
    msg = BytesParser(policy=compat32).parsebytes(header, headersonly=True)
    defects: list[str] = [type(d).__name__ for d in msg.defects]
    reader = _HeaderReader(msg, defects)
    ids = reader.message_ids("Message-ID")
    return MessageFacts(
        message_id=ids[0] if ids else None,
        subject=reader.text("Subject"),
        date=reader.date(),
        from_=reader.addresses("From"),
        sender=reader.addresses("Sender"),
        reply_to=reader.addresses("Reply-To"),
        to=reader.addresses("To"),
        cc=reader.addresses("Cc"),
        envelope_sender=try_normalize(envelope_sender) if envelope_sender else None,
        envelope_recipients=tuple(
            a for a in (try_normalize(r) for r in envelope_recipients) if a),
        in_reply_to=reader.message_ids("In-Reply-To"),
        references=reader.message_ids("References"),
        list_id=reader.text("List-Id") or None,
        list_unsubscribe=bool(reader.text("List-Unsubscribe")),
        precedence=reader.text("Precedence").lower() or None,
        size=len(raw),
        raw=raw,
        defects=tuple(dict.fromkeys(defects)),
        forward_end=_forward_reach(msg, len(header)),
    )


def _forward_reach(header: Message, header_length: int) -> int:
    """How far into a message its forward can be read, by its header.

    The email parser tells by this same header whether a message has parts.
    One that has none, in no transfer encoding, is its own text, and only
    the first `_TEXT_SCAN_LIMIT` bytes of that are read: no sign further on
    counts. Anything else is read as far as `FORWARD_SCAN_LIMIT`.
    """
    encoding = str(header.get("content-transfer-encoding", "")).lower()
    if (header.get_content_maintype() not in ("multipart", "message")
            and encoding in ("", "7bit", "8bit", "binary")):
        return min(header_length + _TEXT_SCAN_LIMIT, FORWARD_SCAN_LIMIT)
    return FORWARD_SCAN_LIMIT


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# MessageError: HeaderParseError, and CharsetError for a charset name that is
# not ASCII.
_UNDECODABLE = (MessageError, LookupError, UnicodeError, ValueError)
# Decoding RFC 2047 words takes time quadratic in the header's length.
_DECODE_LIMIT = 64 * 1024


def header_block(raw: bytes) -> bytes:
    """The bytes up to and including the blank line that ends the header."""
    crlf = raw.find(b"\r\n\r\n")
    # A bare-LF blank line may end the header earlier (or be the only one).
    lf = raw.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(raw))
    if lf >= 0:
        return raw[:lf + 2]
    return raw[:crlf + 4] if crlf >= 0 else raw


def _unescape(value: str) -> str:
    """Header text as Unicode: raw 8-bit bytes (RFC 6532) are read as UTF-8.

    NUL is dropped: no store keeps it in text, and no header needs it.
    """
    if not value.isascii() and any("\udc80" <= c <= "\udcff" for c in value):
        value = value.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    return value.replace("\x00", "")


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded; raises on undecodable ones."""
    return str(make_header(decode_header(value)))


def header_text(name: str, value: str, defects: list[str]) -> str:
    """A header's value as the rules see it: words decoded, controls and runs of
    whitespace gone. Undecodable words are kept as they are and noted in `defects`."""
    value = value[:_DECODE_LIMIT]
    if "=?" in value:
        try:
            value = _decode_words(value)
        except _UNDECODABLE:
            defects.append(f"{name}: undecodable encoded word")
    # Control characters (terminal escapes) never reach a screen or a log.
    return " ".join(_CONTROL.sub("", value).split())


def header_addresses(name: str, values: list[str], defects: list[str]) -> tuple[str, ...]:
    """The normalised addresses in every value of one address header, each once."""
    key = tuple(values)
    parse = _cached_addresses if sum(map(len, key)) <= _CACHED_VALUE_LIMIT else _addresses
    found, problems = parse(key)
    defects.extend(f"{name}: {problem}" for problem in problems)
    return found


def _addresses(values: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The addresses in `values`, and what could not be read of them."""
    try:
        pairs = getaddresses(values)
    except RecursionError:
        # The address parser recurses per nested comment: a few hundred
        # "(" exhaust the stack. What looks like an address still counts.
        loose = addresses_in_text(" ".join(values)[:_DECODE_LIMIT])
        return tuple(dict.fromkeys(loose)), ("unparseable",)
    found: list[str] = []
    problems: list[str] = []
    for _, address in pairs:
        if "=?" in address:
            # Some writers encode the address itself as RFC 2047 words.
            # Only the address part is decoded: an address written in an
            # encoded display name is never a participant (anyone could
            # pose as a candidate or a team member that way).
            try:
                # The decoder puts spaces between encoded and plain runs.
                address = "".join(_decode_words(address[:_DECODE_LIMIT]).split())
            except _UNDECODABLE:
                problems.append("undecodable encoded word")
                continue
        normalized = try_normalize(address) if address else None
        if normalized:
            found.append(normalized)
    return tuple(dict.fromkeys(found)), tuple(problems)


# A mailbox's mail comes from and goes to the same few people over and over:
# parsing their address headers once is a third of judging a message by its
# header. Only short values are kept, so the cache stays small.
_CACHED_VALUE_LIMIT = 1024
_cached_addresses = lru_cache(maxsize=4096)(_addresses)


class _HeaderReader:
    """Header access over the fast `compat32` model that survives malformed headers."""

    def __init__(self, msg: Message, defects: list[str]) -> None:
        self.msg = msg
        self.defects = defects

    def _values(self, name: str) -> list[str]:
        # raw_items: get_all would turn raw UTF-8 (RFC 6532) into U+FFFD.
        wanted = name.lower()
        return [_unescape(v) for k, v in self.msg.raw_items() if k.lower() == wanted]

    def text(self, name: str) -> str:
        values = self._values(name)
        return header_text(name, values[0], self.defects) if values else ""

    def addresses(self, name: str) -> tuple[str, ...]:
        return header_addresses(name, self._values(name), self.defects)

    def message_ids(self, name: str) -> tuple[str, ...]:
        ids: list[str] = []
        for value in self._values(name):
            ids.extend(_MSG_ID.findall(value))
        return tuple(dict.fromkeys(ids))

    def date(self) -> datetime | None:
        value = self.text("Date")
        if not value:
            return None
        try:
            parsed = parsedate_to_datetime(value)
            parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
            # Out-of-range dates (year 9999 at -12:00) cannot be stored in UTC.
            parsed.astimezone(UTC)
        except (TypeError, ValueError, IndexError, OverflowError):
            self.defects.append("Date: unparseable")
            return None
        return parsed


def might_forward(subject: str, raw: bytes) -> bool:
    """Cheap signs that reading the body for a forward is worth it."""
    start = raw[:FORWARD_SCAN_LIMIT]
    return _hinted(subject, start, start.lower())


def _hinted(subject: str, start: bytes, lowered: bytes) -> bool:
    if FORWARD_SUBJECT.match(subject):
        return True
    if any(hint in lowered for hint in FORWARD_HINTS) or _UUENCODE.search(lowered):
        return True
    if b"quoted-printable" not in lowered:
        return False
    if _QP_SKIP.search(start):
        return True
    # Decoding all of it decodes each quoted-printable part the way the
    # email package does (with the same function): the decoding goes line
    # by line, and a part starts on a line of its own.
    decoded = quopri.decodestring(start).lower()
    return any(hint in decoded for hint in (*FORWARD_MARKER_HINTS, b"\x00"))


def _parse_for_forward(start: bytes, lowered: bytes, multipart: bool) -> Message:
    """The message as far as the forward reader needs it.

    Parsing costs some 16 ms a MB, and mail with an attachment is parsed
    (its "base64" is a hint). Its text usually comes first, so the lines in
    the first `_TEXT_FIRST` bytes are parsed alone when that can be enough:
    no part can be an attached message, and they hold the message's own
    text whole, as a plain-text part with a part after it. The email parser
    reads line by line and never looks back, so every part it finished in
    those whole lines is the part it would make of the whole message.
    """
    parse = BytesParser(policy=compat32).parsebytes
    if (multipart and len(start) > _TEXT_FIRST and b"message/rfc822" not in lowered
            and b"multipart/digest" not in lowered):
        # A line cut short could read as a boundary ("--b" of "--bx").
        end = max(start.rfind(b"\n", 0, _TEXT_FIRST), start.rfind(b"\r", 0, _TEXT_FIRST)) + 1
        try:
            head = parse(start[:end])
        except Exception:
            head = None  # the whole may still be readable
        if head is not None:
            leaves = list(_leaf_parts(head))
            text = _own_text(leaves)
            if text is not None and text.get_content_subtype() == "plain" \
                    and text is not leaves[-1]:
                return head
    return parse(start)


def _read_forward(msg: Message, subject: str) -> Forward:
    defects: list[str] = []
    addresses: list[str] = []
    message_ids: list[str] = []
    attached = False
    senders: list[tuple[str, str]] = []
    for original in _attached_messages(msg):
        attached = True
        reader = _HeaderReader(original, defects)
        senders.extend(_named(reader.text("From")))
        for name in ("From", "To", "Cc", "Reply-To"):
            addresses.extend(reader.addresses(name))
        message_ids.extend(reader.message_ids("Message-ID"))

    inline = False
    text = _first_text(msg)
    if text:
        forward_marks = list(_FORWARD_MARKERS.finditer(text))
        inline = bool(forward_marks)
        marks = forward_marks or (
            list(_ORIGINAL_MARKERS.finditer(text)) if FORWARD_SUBJECT.match(subject) else [])
        for mark in marks[:_MAX_BLOCKS]:
            # The forwarded header block ends at its first blank line.
            block = text[mark.end():mark.end() + _BLOCK_SPAN].lstrip("\n").split("\n\n", 1)[0]
            for line in _BLOCK_ADDRESS_FIELDS.findall(block):
                addresses.extend(addresses_in_text(line))
            senders.extend(_named(" ".join(_BLOCK_FROM.findall(block)[:1])))

    return Forward(
        subject_prefix=bool(FORWARD_SUBJECT.match(subject)),
        attached=attached,
        inline=inline,
        original_addresses=tuple(dict.fromkeys(addresses)),
        original_message_ids=tuple(dict.fromkeys(message_ids)),
        original_sender=senders[0][1] if senders else None,
        original_name=senders[0][0] if senders else "",
    )


def _named(text: str) -> list[tuple[str, str]]:
    """(name, address) pairs in a From text, also in Outlook's "Name [mailto:a@b]" form."""
    text = re.sub(r"\[mailto:([^\]]+)\]", r"<\1>", text)
    found = []
    for name, address in getaddresses([text]):
        normalized = try_normalize(address)
        if normalized:
            found.append((" ".join(name.strip(" '\"").split()), normalized))
    return found


def _leaf_parts(msg: Message) -> Iterator[Message]:
    """The parts of a message in order, not descending into attached messages.

    Iterative, so that hostile nesting cannot exhaust the stack.
    """
    stack = [msg]
    while stack:
        part = stack.pop()
        # is_multipart first: get_payload() of a leaf decodes 8-bit text with
        # its charset and lets a codec's own errors ("idna") escape.
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            payload = part.get_payload()
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))
        else:
            yield part


def _attached_messages(msg: Message) -> Iterator[Message]:
    for part in _leaf_parts(msg):
        if part.get_content_type() == "message/rfc822" and part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                yield payload[0]


def _is_text(part: Message, subtype: str) -> bool:
    """A part of the message's own text of `subtype`, not an attached file."""
    return (part.get_content_type() == f"text/{subtype}"
            and not str(part.get("Content-Disposition", "")).lower().startswith("attachment"))


def _own_text(leaves: list[Message]) -> Message | None:
    """The part that is the message's own text: its first plain-text part,
    else its first HTML part, that is not an attached file."""
    return next((p for subtype in ("plain", "html") for p in leaves if _is_text(p, subtype)),
                None)


def _first_text(msg: Message) -> str:
    """The message's own text (plain preferred, else HTML stripped of tags)."""
    part = _own_text(list(_leaf_parts(msg)))
    if part is None:
        return ""
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = data[:_TEXT_SCAN_LIMIT].decode(charset, "replace")
    except (LookupError, ValueError):
        # An unknown charset, a codec that is no charset ("idna" and
        # "punycode" raise whatever the error handler says; UnicodeError is
        # a ValueError), or a name with a NUL in it.
        text = data[:_TEXT_SCAN_LIMIT].decode("utf-8", "replace")
    # Lines end as the email parser ends them: at CRLF, LF or a bare CR.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if part.get_content_subtype() == "html":
        text = _HTML_BLOCK.sub(_ruled, text)
        text = _HTML_LINE_END.sub("\n", text)
        text = html.unescape(_HTML_TAG.sub("", text))
    return text


def _ruled(tag: re.Match[str]) -> str:
    """A rule above a block as the line of underscores plain text has there
    (Outlook's forwarded header, drawn as <hr> or as a border atop a <div>);
    another <div> as it was. (The border is looked for in each tag alone:
    one pattern for both would take time quadratic in a hostile tag.)"""
    if tag[1].lower() == "hr" or _BORDER_TOP.search(tag[2]):
        return "\n" + "_" * 32 + "\n"
    return tag[0]
