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
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

from atsmail.rules.addresses import addresses_in_header, addresses_in_text, try_normalize

# Longer Message-IDs are junk; they are ignored so that stored ids stay
# indexable on every database.
_MSG_ID_MAX = 900
_MSG_ID = re.compile(rf"<([^<>\s]{{1,{_MSG_ID_MAX}}})>")
_FORWARD_SUBJECT = re.compile(
    r"^\s*(?:\[[^\]]*\]\s*)?(?:(?:re|aw|sv|antw)\s*:\s*)*(?:fwd?|wg|tr|rv)\s*:", re.IGNORECASE
)
# Markers that mail clients put above an inline forwarded message. Only
# forward markers count as a forward; "Original Message" also introduces
# quoted replies, so it is only read for the original's addresses.
_FORWARD_MARKERS = re.compile(
    r"^[ \t>]*(?:-{2,}\s*(?:forwarded message|weitergeleitete nachricht|message transf[ée]r[ée]"
    r"|mensaje reenviado|doorgestuurd bericht|messaggio inoltrato)\s*-{2,}"
    r"|begin forwarded message:|anfang der weitergeleiteten nachricht:)",
    re.IGNORECASE | re.MULTILINE,
)
_ORIGINAL_MARKERS = re.compile(
    r"^[ \t>]*-{2,}\s*(?:original message|urspr[üu]ngliche nachricht)\s*-{2,}",
    re.IGNORECASE | re.MULTILINE,
)
_BLOCK_ADDRESS_FIELDS = re.compile(
    r"^[ \t>]*\*?(?:from|von|de|da|van|to|an|[àa]|para|aan|cc|kopie)\s*:\*?\s*(.+)$",
    re.IGNORECASE | re.MULTILINE,
)
# How far below a marker the forwarded header block may reach.
_BLOCK_SPAN = 1500
# Plain text longer than this is not searched for inline forwards.
_TEXT_SCAN_LIMIT = 256 * 1024


@dataclass(frozen=True)
class Forward:
    """Signs that a message forwards another, and what the original names."""

    subject_prefix: bool = False
    attached: bool = False
    inline: bool = False
    original_addresses: tuple[str, ...] = ()
    original_message_ids: tuple[str, ...] = ()

    @property
    def is_forward(self) -> bool:
        return self.subject_prefix or self.attached or self.inline


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
    forward: Forward
    content_hash: str
    size: int
    defects: tuple[str, ...] = field(default=())

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

    @property
    def capture_key(self) -> str:
        """What makes a retried copy the same message: its Message-ID or its bytes."""
        return f"mid:{self.message_id}" if self.message_id else f"sha256:{self.content_hash}"


def read_message(
    raw: bytes,
    envelope_sender: str | None = None,
    envelope_recipients: Iterable[str] = (),
) -> MessageFacts:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    defects: list[str] = [type(d).__name__ for d in msg.defects]
    reader = _HeaderReader(msg, defects)
    ids = reader.message_ids("Message-ID")
    precedence = reader.text("Precedence").strip().lower() or None
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
        list_id=reader.text("List-Id").strip() or None,
        list_unsubscribe=bool(reader.text("List-Unsubscribe").strip()),
        precedence=precedence,
        forward=_read_forward(msg, reader.text("Subject"), defects),
        content_hash=hashlib.sha256(raw).hexdigest(),
        size=len(raw),
        defects=tuple(dict.fromkeys(defects)),
    )


class _HeaderReader:
    """Header access that survives malformed headers."""

    def __init__(self, msg: Message, defects: list[str]) -> None:
        self.msg = msg
        self.defects = defects

    def _values(self, name: str) -> list[object]:
        try:
            return list(self.msg.get_all(name) or [])
        except Exception as exc:  # the header parser has known crashes on junk
            self.defects.append(f"{name}: {type(exc).__name__}")
            raw = [v for k, v in self.msg.raw_items() if k.lower() == name.lower()]
            return list(raw)

    def text(self, name: str) -> str:
        values = self._values(name)
        if not values:
            return ""
        return " ".join(str(values[0]).split())

    def addresses(self, name: str) -> tuple[str, ...]:
        found: list[str] = []
        for value in self._values(name):
            try:
                found.extend(addresses_in_header(value))
            except Exception as exc:
                self.defects.append(f"{name}: {type(exc).__name__}")
                found.extend(addresses_in_text(str(value)))
        return tuple(dict.fromkeys(found))

    def message_ids(self, name: str) -> tuple[str, ...]:
        ids: list[str] = []
        for value in self._values(name):
            ids.extend(_MSG_ID.findall(str(value)))
        return tuple(dict.fromkeys(ids))

    def date(self) -> datetime | None:
        value = self.text("Date")
        if not value:
            return None
        try:
            parsed = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            self.defects.append("Date: unparseable")
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _read_forward(msg: EmailMessage, subject: str, defects: list[str]) -> Forward:
    addresses: list[str] = []
    message_ids: list[str] = []
    attached = False
    for original in _attached_messages(msg):
        attached = True
        reader = _HeaderReader(original, defects)
        for name in ("From", "To", "Cc", "Reply-To"):
            addresses.extend(reader.addresses(name))
        message_ids.extend(reader.message_ids("Message-ID"))

    inline = False
    text = _first_text(msg, defects)
    if text:
        forward_marks = list(_FORWARD_MARKERS.finditer(text))
        inline = bool(forward_marks)
        marks = forward_marks or (
            list(_ORIGINAL_MARKERS.finditer(text)) if _FORWARD_SUBJECT.match(subject) else [])
        for mark in marks:
            # The forwarded header block ends at its first blank line.
            block = text[mark.end():mark.end() + _BLOCK_SPAN].lstrip("\n").split("\n\n", 1)[0]
            for line in _BLOCK_ADDRESS_FIELDS.findall(block):
                addresses.extend(addresses_in_text(line))

    return Forward(
        subject_prefix=bool(_FORWARD_SUBJECT.match(subject)),
        attached=attached,
        inline=inline,
        original_addresses=tuple(dict.fromkeys(addresses)),
        original_message_ids=tuple(dict.fromkeys(message_ids)),
    )


def _attached_messages(msg: EmailMessage) -> Iterator[Message]:
    for part in msg.walk():
        if part.get_content_type() == "message/rfc822" and part is not msg:
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                yield payload[0]


def _first_text(msg: EmailMessage, defects: list[str]) -> str:
    try:
        part = msg.get_body(preferencelist=("plain", "html"))
        if part is None:
            return ""
        content = part.get_content()
    except Exception as exc:  # unknown charsets, broken transfer encodings
        defects.append(f"body: {type(exc).__name__}")
        return ""
    if not isinstance(content, str):
        return ""
    text = content[:_TEXT_SCAN_LIMIT].replace("\r\n", "\n")
    if part.get_content_subtype() == "html":
        text = re.sub(r"<br\s*/?>|</(?:p|div)>", "\n", text, flags=re.IGNORECASE)
        text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return text
