"""A captured message's content for people: text, safe HTML, attachments, exports.

The API and the review pages show what the store keeps as raw bytes. Parsing
is the standard library's (`email` with `policy.default`), and it never
fails a page: a part that cannot be decoded is shown as what could be read.
HTML is cleaned with nh3 (the ammonia sanitiser) down to formatting and
links: no scripts, no styles, no images or other remote content.
"""

from __future__ import annotations

import io
import mailbox
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from pathlib import Path

import nh3

# Formatting a mail client would show; nothing that loads or runs anything.
_SAFE_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "caption", "cite", "code", "dd", "del", "div",
    "dl", "dt", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "ins", "kbd", "li",
    "ol", "p", "pre", "q", "s", "small", "span", "strong", "sub", "sup", "table", "tbody",
    "td", "tfoot", "th", "thead", "tr", "u", "ul",
}
_SAFE_ATTRIBUTES = {"a": {"href", "title"}, "td": {"colspan", "rowspan"},
                    "th": {"colspan", "rowspan"}, "abbr": {"title"}}


@dataclass(frozen=True)
class Attachment:
    index: int
    filename: str
    content_type: str
    data: bytes


def parse(raw: bytes) -> EmailMessage:
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _decoded(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except (LookupError, ValueError, AssertionError, KeyError):
        # An unknown charset or broken transfer encoding: show what can be read.
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return content if isinstance(content, str) else ""


def _body_part(msg: EmailMessage, kind: str) -> Message | None:
    try:
        return msg.get_body(preferencelist=(kind,))
    except (KeyError, ValueError, AssertionError):
        return None


def text(msg: EmailMessage) -> str:
    """The message as plain text: its text part, else its HTML part stripped of markup."""
    part = _body_part(msg, "plain")
    if part is not None:
        return _decoded(part)
    part = _body_part(msg, "html")
    if part is not None:
        return nh3.clean(_decoded(part), tags=set()).strip()
    return ""


def safe_html(msg: EmailMessage) -> str | None:
    """The HTML part, cleaned so it can be shown inside our own page; None if there is none."""
    part = _body_part(msg, "html")
    if part is None:
        return None
    return nh3.clean(_decoded(part), tags=_SAFE_TAGS, attributes=_SAFE_ATTRIBUTES,
                     url_schemes={"http", "https", "mailto"}, link_rel="noopener noreferrer",
                     strip_comments=True)


def attachments(msg: EmailMessage) -> list[Attachment]:
    found = []
    try:
        parts = list(msg.iter_attachments())
        for part in msg.walk():  # attachments nested in multipart/mixed inside alternatives
            if part not in parts and part.get_content_disposition() == "attachment":
                parts.append(part)
    except (KeyError, ValueError, AssertionError):
        parts = []
    for index, part in enumerate(parts):
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            data = payload
        else:  # an attached message
            data = part.as_bytes() if isinstance(part, Message) else b""
        found.append(Attachment(index, part.get_filename() or f"attachment-{index}",
                                part.get_content_type(), data))
    return found


@dataclass(frozen=True)
class Exported:
    """One message to export: its bytes, and what names it."""

    raw: bytes
    sender: str
    date: datetime | None
    name: str


def mbox(messages: Iterable[Exported]) -> bytes:
    """An mbox file (the standard library's mboxo, with From_ lines quoted)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "export.mbox"
        box = mailbox.mbox(path, create=True)
        try:
            box.lock()
            for item in messages:
                entry = mailbox.mboxMessage(item.raw)
                entry.set_from(item.sender or "MAILER-DAEMON",
                               item.date.utctimetuple() if item.date else None)
                box.add(entry)
            box.flush()
        finally:
            box.unlock()
            box.close()
        return path.read_bytes()


def eml_zip(messages: Iterable[Exported]) -> bytes:
    """A zip with one .eml file per message, byte for byte as captured."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for item in messages:
            archive.writestr(f"{item.name}.eml", item.raw)
    return buffer.getvalue()


def export(messages: Iterable[Exported], format: str, name: str) -> tuple[bytes, str, str]:
    """A candidate's mail as mbox or a zip of .eml files: (bytes, media type, file name)."""
    data, kind = ((mbox(messages), "application/mbox") if format == "mbox"
                  else (eml_zip(messages), "application/zip"))
    return data, kind, safe_filename(f"{name}.{format}")


def safe_filename(name: str) -> str:
    """A file name fit for a Content-Disposition header."""
    cleaned = "".join(c if c.isalnum() or c in "._- " else "_" for c in name)[:150]
    return cleaned.strip(" .") or "file"
