"""`read_message`: the facts the rules see, read once from raw bytes.

Real client output lives in `tests/data/*.eml`; the tables below vary one
thing at a time. Whatever the bytes, `read_message` must return facts (a
malformed message is still relayed and judged), so the robustness table
feeds it the junk a public MTA sees.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import quopri
import threading
from datetime import UTC, datetime, timedelta, timezone
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest

from atsmail.rules import Context, MessageFacts, decide, read_message
from atsmail.rules import message as message_module
from atsmail.rules.message import Forward
from tests.conftest import make_mail

DATA = Path(__file__).parent.parent / "data"


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def mail(*lines: str, body: str = "Hello.\n",
         content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = [*lines, "MIME-Version: 1.0", f"Content-Type: {content_type}"]
    return ("\r\n".join(head) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode("utf-8")


# --- the fixtures, field by field ---------------------------------------------------

ADA_ORIGINAL = ("ada@applicant.test", "jobs@example.com")
NOT_A_FORWARD: dict[str, Any] = {
    "subject_prefix": False, "attached": False, "inline": False,
    "original_addresses": (), "original_message_ids": ()}

FIXTURES = [
    pytest.param("forward_gmail_inline.eml", {
        "message_id": "CAF1xQ9fwd-gmail-0001@mail.gmail.com",
        "subject": "Fwd: Application: Backend Engineer",
        "date": datetime(2026, 11, 27, 10, 15, 2, tzinfo=timezone(timedelta(hours=1))),
        "from_": ("recruiter@example.com",), "to": ("hm@example.com",), "cc": (),
        "forward": {"subject_prefix": True, "attached": False, "inline": True,
                    "original_addresses": ADA_ORIGINAL, "original_message_ids": ()},
    }, id="gmail-inline-forward"),
    pytest.param("forward_attached_rfc822.eml", {
        "message_id": "fwd-attached-0001@example.com",
        "subject": "Please review this applicant",
        "from_": ("recruiter@example.com",), "to": ("hm@example.com",),
        "forward": {"subject_prefix": False, "attached": True, "inline": False,
                    "original_addresses": ADA_ORIGINAL,
                    "original_message_ids": ("ada-application-0001@applicant.test",)},
    }, id="attached-rfc822"),
    pytest.param("forward_apple.eml", {
        "message_id": "5B2C1D0E-7F3A-4E2B-9C1D-0A1B2C3D4E5F@example.com",
        "subject": "Fwd: Application: Backend Engineer",
        "forward": {"subject_prefix": True, "attached": False, "inline": True,
                    "original_addresses": ADA_ORIGINAL, "original_message_ids": ()},
    }, id="apple-begin-forwarded-message"),
    pytest.param("forward_thunderbird_de.eml", {
        "subject": "Fwd: Bewerbung als Backend Engineer",
        "forward": {"subject_prefix": True, "attached": False, "inline": True,
                    "original_addresses": ADA_ORIGINAL, "original_message_ids": ()},
    }, id="thunderbird-weitergeleitete-nachricht"),
    pytest.param("outlook_forward_de.eml", {
        "message_id": "000001d9a1b2$c3d4e5f0$f1e2d3c4@example.com",
        "subject": "WG: Bewerbung als Backend Engineer",
        "date": datetime(2026, 11, 27, 9, 2, 11, tzinfo=timezone(timedelta(hours=1))),
        "forward": {"subject_prefix": True, "attached": False, "inline": False,
                    "original_addresses": ADA_ORIGINAL, "original_message_ids": ()},
    }, id="outlook-de-urspruengliche-nachricht"),
    pytest.param("outlook_forward_modern_de.eml", {
        "subject": "WG: Bewerbung als Backend Engineer",
        # Outlook puts the same line above replies: only the WG: makes it a forward.
        "forward": {"subject_prefix": True, "attached": False, "inline": False,
                    "original_addresses": ADA_ORIGINAL, "original_message_ids": ()},
    }, id="outlook-365-de-underscore-separator"),
    pytest.param("smtputf8_headers.eml", {
        "message_id": "smtputf8-0001@bücher.example",
        "subject": "Bewerbung für die Stelle",
        "to": ("recruiter@example.com",),
    }, id="smtputf8-raw-utf8-headers"),
    pytest.param("rfc2047_idna.eml", {
        "message_id": "rfc2047-idna-0001@xn--bcher-kva.example",
        "subject": "Bewerbung für die Stelle \u2013 Backend",
        "from_": ("juergen.mueller@bücher.example",),
        "to": ("recruiter@example.com",),
        "forward": NOT_A_FORWARD,
    }, id="rfc2047-idna"),
    pytest.param("mailing_list.eml", {
        "message_id": "list-post-0001@applicant.test",
        "subject": "[dev] Proposal: async storage backend",
        "list_id": "Developer discussion <dev.lists.opensource.test>",
        "list_unsubscribe": True, "precedence": "list",
        "sender": ("dev-bounces@lists.opensource.test",),
        "forward": NOT_A_FORWARD,
    }, id="mailing-list"),
    pytest.param("malformed_headers.eml", {
        "message_id": None, "date": None,
        "from_": ("ada@applicant.test",), "to": ("recruiter@example.com",),
        "cc": ("hm@example.com",), "sender": (), "reply_to": (),
        "in_reply_to": (), "references": ("ok-ref-0001@example.com",),
        "forward": NOT_A_FORWARD,
    }, id="malformed-headers"),
    pytest.param("bad_charset.eml", {
        "message_id": "bad-charset-0001@applicant.test",
        "from_": ("ada@applicant.test",), "to": ("recruiter@example.com",),
        "forward": NOT_A_FORWARD,
    }, id="bad-charset-broken-base64"),
    pytest.param("nul_bytes.eml", {
        "message_id": "nul-bytes-0001@applicant.test",
        "from_": ("ada@applicant.test",), "to": ("recruiter@example.com",),
    }, id="nul-bytes"),
]


@pytest.mark.parametrize(("name", "expected"), FIXTURES)
def test_fixture_facts(name: str, expected: dict[str, Any]) -> None:
    raw = fixture(name)
    facts = read_message(raw)
    for key, value in expected.items():
        if key == "forward":
            got = {k: getattr(facts.forward, k) for k in value}
            assert got == value, name
        else:
            assert getattr(facts, key) == value, key
    assert facts.size == len(raw)
    assert facts.content_hash == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("name", [
    "forward_gmail_inline.eml", "forward_attached_rfc822.eml", "forward_apple.eml",
    "forward_thunderbird_de.eml", "outlook_forward_de.eml", "outlook_forward_modern_de.eml",
    "rfc2047_idna.eml", "smtputf8_headers.eml", "mailing_list.eml", "malformed_headers.eml",
    "bad_charset.eml", "nul_bytes.eml"])
def test_line_endings_do_not_change_the_facts(name: str) -> None:
    lf = fixture(name).replace(b"\r\n", b"\n")
    crlf = lf.replace(b"\n", b"\r\n")
    assert _semantic(read_message(lf)) == _semantic(read_message(crlf))


def _semantic(facts: MessageFacts) -> tuple[object, ...]:
    """Everything the rules read, leaving out what depends on the exact bytes."""
    return (facts.message_id, facts.subject, facts.date, facts.participants, facts.from_,
            facts.sender, facts.reply_to, facts.to, facts.cc, facts.in_reply_to,
            facts.references, facts.list_id, facts.list_unsubscribe, facts.precedence,
            facts.forward)


# --- forward signs -------------------------------------------------------------------


@pytest.mark.parametrize(("subject", "prefix"), [
    pytest.param("Fwd: Application", True, id="Fwd"),
    pytest.param("FWD: Application", True, id="FWD"),
    pytest.param("Fw: Application", True, id="Fw"),
    pytest.param("FW: Application", True, id="FW-outlook"),
    pytest.param("WG: Bewerbung", True, id="WG-german"),
    pytest.param("TR: Candidature", True, id="TR-french"),
    pytest.param("RV: Solicitud", True, id="RV-spanish"),
    pytest.param("fwd : spaced colon", True, id="space-before-colon"),
    pytest.param("  Fwd:no space after", True, id="leading-space"),
    pytest.param("[EXT] FW: Application", True, id="tag-before-prefix"),
    pytest.param("=?utf-8?q?WG=3A_Bewerbung_f=C3=BCr_Backend?=", True, id="rfc2047-subject"),
    pytest.param("Re: Application", False, id="reply"),
    pytest.param("AW: Bewerbung", False, id="german-reply"),
    pytest.param("Forward planning", False, id="word-forward"),
    pytest.param("Fwdx: Application", False, id="longer-word"),
    pytest.param("TRAINING: new hires", False, id="tr-word"),
    pytest.param("RVSP: party", False, id="rv-word"),
    pytest.param("Application (Fwd: from Ada)", False, id="prefix-not-at-start"),
    pytest.param("", False, id="empty"),
])
def test_forward_subject_prefix(subject: str, prefix: bool) -> None:
    facts = read_message(mail("From: r@example.com", f"Subject: {subject}"))
    assert facts.forward.subject_prefix is prefix
    assert facts.forward.is_forward is prefix


def test_no_subject_header_is_not_a_forward() -> None:
    facts = read_message(mail("From: r@example.com"))
    assert facts.subject == ""
    assert not facts.forward.is_forward


GMAIL_HTML = (
    '<div dir="ltr">See below<br><br><div class="gmail_quote"><div class="gmail_attr">'
    "---------- Forwarded message ---------<br>From: <strong>Ada Applicant</strong> "
    '&lt;<a href="mailto:ada@applicant.test">ada@applicant.test</a>&gt;<br>'
    "Date: Thu, 26 Nov 2026 at 18:40<br>Subject: Application<br>"
    "To: &lt;<a href=\"mailto:jobs@example.com\">jobs@example.com</a>&gt;<br></div><br><br>"
    "<div>Dear team</div></div></div>\n")


# Thunderbird writes the forwarded header as a table; here without line
# breaks in the source, as HTML is often sent.
THUNDERBIRD_HTML = (
    '<p>Zur Info.</p><div class="moz-forward-container"><br><br>'
    "-------- Weitergeleitete Nachricht --------<table class=\"moz-email-headers-table\">"
    '<tbody><tr><th align="RIGHT">Betreff: </th><td>Bewerbung</td></tr>'
    '<tr><th align="RIGHT">Von: </th><td>Ada Applicant <a href="mailto:ada@applicant.test">'
    "&lt;ada@applicant.test&gt;</a></td></tr>"
    '<tr><th align="RIGHT">An: </th><td><a href="mailto:jobs@example.com">jobs@example.com</a>'
    "</td></tr></tbody></table><br><br><p>Sehr geehrte Damen und Herren,</p></div>\n")
# Outlook draws a rule above the forwarded header (no marker text).
OUTLOOK_HTML = (
    '<div>Your thoughts?</div><hr style="display:inline-block;width:98%" tabindex="-1">'
    '<div id="divRplyFwdMsg" dir="ltr"><font face="Calibri"><b>From:</b> Ada Applicant '
    "&lt;ada@applicant.test&gt;<br><b>Sent:</b> Thursday, November 26, 2026 6:40 PM<br>"
    "<b>To:</b> jobs@example.com &lt;jobs@example.com&gt;<br><b>Subject:</b> Application"
    "</font><div>&nbsp;</div></div><div>Dear team</div>\n")
OUTLOOK_DESKTOP_HTML = (
    '<p class="MsoNormal">Your thoughts?</p><div style="border:none;border-top:solid #E1E1E1 '
    '1.0pt;padding:3.0pt 0cm 0cm 0cm"><p class="MsoNormal"><b>From:</b> Ada Applicant '
    "&lt;ada@applicant.test&gt; <br><b>Sent:</b> Thursday, November 26, 2026 6:40 PM<br>"
    '<b>To:</b> jobs@example.com<br><b>Subject:</b> Application</p></div><p class="MsoNormal">'
    "Dear team</p>\n")


@pytest.mark.parametrize(("subject", "body", "content_type", "inline", "addresses"), [
    pytest.param("x", "See below\n\n---------- Forwarded message ---------\n"
                 "From: Ada Applicant <ada@applicant.test>\nDate: Thu, 26 Nov 2026 at 18:40\n"
                 "Subject: Application\nTo: <jobs@example.com>\n\n\nDear team\n",
                 "text/plain", True, ADA_ORIGINAL, id="gmail"),
    pytest.param("x", GMAIL_HTML, "text/html", True, ADA_ORIGINAL, id="gmail-html-only"),
    pytest.param("x", THUNDERBIRD_HTML, "text/html", True, ADA_ORIGINAL,
                 id="thunderbird-html-table-on-one-line"),
    pytest.param("FW: Application", OUTLOOK_HTML, "text/html", False, ADA_ORIGINAL,
                 id="outlook-html-rule-under-fw-subject"),
    pytest.param("FW: Application", OUTLOOK_DESKTOP_HTML, "text/html", False, ADA_ORIGINAL,
                 id="outlook-desktop-html-border-under-fw-subject"),
    pytest.param("Re: Application", OUTLOOK_HTML, "text/html", False, (),
                 id="outlook-html-reply-is-not-read"),
    pytest.param("x", "FYI\n\nBegin forwarded message:\n\nFrom: Ada <ada@applicant.test>\n"
                 "Subject: Application\nDate: 26 November 2026 at 18:40:00 CET\n"
                 "To: jobs@example.com\n\nDear team\n",
                 "text/plain", True, ADA_ORIGINAL, id="apple"),
    pytest.param("x", "FYI\n\nBegin forwarded message:\n\n> From: Ada <ada@applicant.test>\n"
                 "> Subject: Application\n> To: jobs@example.com\n\nDear team\n",
                 "text/plain", True, ADA_ORIGINAL, id="apple-quoted-block"),
    pytest.param("x", "Zur Info\n\nAnfang der weitergeleiteten Nachricht:\n\n"
                 "Von: Ada <ada@applicant.test>\nBetreff: Bewerbung\nDatum: 26. November 2026\n"
                 "An: jobs@example.com\n\nHallo\n",
                 "text/plain", True, ADA_ORIGINAL, id="apple-german"),
    pytest.param("x", "FYI\n\n-------- Forwarded Message --------\nSubject: \tApplication\n"
                 "Date: \tThu, 26 Nov 2026 18:40:00 +0100\nFrom: \tAda <ada@applicant.test>\n"
                 "To: \tjobs@example.com\n\nDear team\n",
                 "text/plain", True, ADA_ORIGINAL, id="thunderbird-english"),
    pytest.param("x", "Zur Info\n\n-------- Weitergeleitete Nachricht --------\n"
                 "Betreff: \tBewerbung\nVon: \tAda <ada@applicant.test>\nAn: \tjobs@example.com\n"
                 "\nHallo\n",
                 "text/plain", True, ADA_ORIGINAL, id="thunderbird-german"),
    pytest.param("x", "Hola\n\n---------- Mensaje reenviado ---------\n"
                 "De: Ada <ada@applicant.test>\nFecha: jue, 26 nov 2026\nAsunto: Solicitud\n"
                 "Para: <jobs@example.com>\n\nHola\n",
                 "text/plain", True, ADA_ORIGINAL, id="gmail-spanish"),
    pytest.param("x", "Ciao\n\n-------- Messaggio inoltrato --------\n"
                 "Da: Ada <ada@applicant.test>\nA: jobs@example.com\n\nCiao\n",
                 "text/plain", True, ADA_ORIGINAL, id="thunderbird-italian"),
    pytest.param("x", "Hoi\n\n-------- Doorgestuurd bericht --------\n"
                 "Van: Ada <ada@applicant.test>\nAan: jobs@example.com\n\nHoi\n",
                 "text/plain", True, ADA_ORIGINAL, id="thunderbird-dutch"),
    pytest.param("x", "Bonjour\n\n-------- Message transféré --------\nSujet : Candidature\n"
                 "De : Ada <ada@applicant.test>\nPour : jobs@example.com\n\nBonjour\n",
                 "text/plain", True, ADA_ORIGINAL, id="thunderbird-french"),
    pytest.param("x", "Thanks!\n\n> ---------- Forwarded message ---------\n"
                 "> From: Ada <ada@applicant.test>\n> To: jobs@example.com\n>\n> Dear team\n",
                 "text/plain", False, (), id="quoted-marker-belongs-to-a-reply"),
    pytest.param("FW: Application", "See below\n\n-----Original Message-----\n"
                 "From: Ada <ada@applicant.test>\nSent: Thursday, November 26, 2026 6:40 PM\n"
                 "To: jobs@example.com\nSubject: Application\n\nDear team\n",
                 "text/plain", False, ADA_ORIGINAL, id="original-message-under-fw-subject"),
    pytest.param("Re: Application", "Sounds good.\n\n-----Original Message-----\n"
                 "From: Ada <ada@applicant.test>\nTo: jobs@example.com\n\nDear team\n",
                 "text/plain", False, (), id="original-message-in-a-reply-is-not-read"),
    pytest.param("Re: Application", "Sounds good.\n\nOn Thu, 26 Nov 2026, Ada "
                 "<ada@applicant.test> wrote:\n> Dear team\n",
                 "text/plain", False, (), id="quoted-reply"),
    pytest.param("x", "FYI\n\n---------- Forwarded message ---------\n"
                 "From: Vendor <sales@vendor.test>\nTo: jobs@example.com\n\n"
                 "By the way, Ada (ada@applicant.test) says hi.\nFrom: ada@applicant.test\n",
                 "text/plain", True, ("sales@vendor.test", "jobs@example.com"),
                 id="block-ends-at-first-blank-line"),
    pytest.param("x", "Two forwards\n\n---------- Forwarded message ---------\n"
                 "From: Ada <ada@applicant.test>\n\nfirst\n\n"
                 "---------- Forwarded message ---------\nFrom: Grace <grace@candidates.test>\n"
                 "\nsecond\n",
                 "text/plain", True, ("ada@applicant.test", "grace@candidates.test"),
                 id="several-forwarded-blocks"),
])
def test_inline_forward(subject: str, body: str, content_type: str, inline: bool,
                        addresses: tuple[str, ...]) -> None:
    facts = read_message(mail("From: r@example.com", "To: hm@example.com", f"Subject: {subject}",
                              body=body, content_type=f"{content_type}; charset=utf-8"))
    assert facts.forward.inline is inline
    assert facts.forward.original_addresses == addresses
    assert not facts.forward.attached


def test_plain_part_is_read_before_html() -> None:
    body = ("--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nJust a note.\r\n"
            "--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + GMAIL_HTML + "--b--\r\n")
    facts = read_message(mail("From: r@example.com", body=body,
                              content_type='multipart/alternative; boundary="b"'))
    assert not facts.forward.inline
    assert facts.forward.original_addresses == ()


GMAIL_FORWARD = ("See below\n\n---------- Forwarded message ---------\n"
                 "From: Ada Applicant <ada@applicant.test>\nSubject: Application\n"
                 "To: <jobs@example.com>\n\nDear team\n")


def _part(content_type: str | None, body: bytes, encoding: str = "base64",
          lf: bool = False) -> bytes:
    """A MIME part: its fields (Content-Type as given), then `body` so encoded."""
    fields = ([f"Content-Type: {content_type}"] if content_type is not None else []) + [
        f"Content-Transfer-Encoding: {encoding}"]
    encoded = {"base64": base64.encodebytes, "quoted-printable": quopri.encodestring,
               "x-uuencode": _uuencoded, "uue": _uuencoded}.get(encoding, bytes)(body)
    part = "\n".join(fields).encode() + b"\n\n" + encoded
    return part if lf else part.replace(b"\n", b"\r\n")


def _uuencoded(data: bytes) -> bytes:
    lines = [binascii.b2a_uu(data[i:i + 45]) for i in range(0, len(data), 45)]
    return b"begin 644 text.txt\n" + b"".join(lines) + b"`\nend\n"


def _mixed(*parts: bytes, kind: str = "mixed") -> bytes:
    """A mail whose parts are `parts`."""
    body = b"".join(b"--b\r\n" + part + b"\r\n" for part in parts) + b"--b--\r\n"
    return mail("From: r@example.com", "Subject: see below", body="",
                content_type=f'multipart/{kind}; boundary="b"') + body


def _cv(pdf: bytes = b"%PDF-1.7 " * 2000) -> bytes:
    """A CV, in base64."""
    return _part("application/pdf; name=cv.pdf", pdf)


def _with_cv(*parts: bytes, kind: str = "mixed") -> bytes:
    """A mail whose parts are `parts`, then a CV."""
    return _mixed(*parts, _cv(), kind=kind)


FORWARD = GMAIL_FORWARD.encode()
IMAGE = b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n"
# Long HTML lines: a quoted-printable soft line break falls inside the marker.
SPLIT_HTML = quopri.encodestring(("x" * 40 + GMAIL_HTML).encode())
assert b"forwarded message" not in SPLIT_HTML.lower()


@pytest.mark.parametrize("raw", [
    pytest.param(mail("From: r@example.com", "Subject: see below", "Content-Transfer-Encoding: "
                      "base64", body=base64.encodebytes(FORWARD).decode()),
                 id="the message's own text, in base64"),
    pytest.param(_with_cv(_part("text/plain; charset=utf-8", FORWARD)),
                 id="a base64 text part, before a CV"),
    pytest.param(_with_cv(_part(None, FORWARD)), id="a part of no type"),
    pytest.param(_with_cv(_part("Text/HTML", GMAIL_HTML.encode())), id="an HTML part"),
    pytest.param(_with_cv(_part("text/plain", FORWARD, lf=True).replace(
        b"Content-Type: text/plain", b"Content-Type:\n\ttext/plain")),
        id="a folded type, bare line ends"),
    pytest.param(_with_cv(IMAGE, _part("text/plain", FORWARD)), id="a text part after an image"),
    pytest.param(_with_cv(IMAGE, _part("text/plain", FORWARD)).replace(b"\r\n", b"\r"),
                 id="bare <CR> line ends"),
    pytest.param(_with_cv(b"Content-Type: text/html; charset=utf-8\r\n"
                          b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + SPLIT_HTML),
                 id="quoted-printable HTML, the marker split by a soft line break"),
    pytest.param(_with_cv(b"Content-Type: text/plain\r\n"
                          b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                          + FORWARD.replace(b"Forwarded message", b"Forwarded=20message")),
                 id="quoted-printable, a space as =20"),
    pytest.param(_with_cv(_part("text/plain", FORWARD, encoding="x-uuencode")), id="uuencode"),
    pytest.param(_with_cv(_part("text/plain; charset=utf-16", FORWARD.decode().encode("utf-16"),
                                encoding="binary", lf=True)), id="UTF-16"),
    pytest.param(_with_cv(_part("charset=utf-8", FORWARD)), id="a type with no slash"),
    pytest.param(_with_cv(_part("application/pdf/x", FORWARD)), id="a type with two slashes"),
    pytest.param(_with_cv(_part("", FORWARD)), id="an empty type, the next field after it"),
    pytest.param(_with_cv(_part("; charset=utf-8\nContent-Type: application/pdf", FORWARD)),
                 id="two types, the first empty"),
])
def test_a_forward_an_encoding_hides_is_found(raw: bytes) -> None:
    facts = read_message(raw)
    assert facts.forward.inline
    assert facts.forward.original_addresses == ADA_ORIGINAL


def _own_text(part: bytes) -> bytes:
    """A mail whose one part, its own text, is `part`."""
    return b"From: r@example.com\r\nSubject: see below\r\nMIME-Version: 1.0\r\n" + part


# The same disguises with no attachment, whose "base64" would have the mail
# parsed anyway.
@pytest.mark.parametrize("raw", [
    pytest.param(_own_text(b"Content-Type: text/plain\r\n"
                           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                           + FORWARD.replace(b"Forwarded message", b"Forwarded=20message")),
                 id="quoted-printable, a space as =20"),
    pytest.param(_own_text(b"Content-Type: text/plain\r\n"
                           b"Content-Transfer-Encoding: Quoted-Printable\r\n\r\n"
                           + FORWARD.replace(b"Forwarded message", b"Forwar=\r\nded message")),
                 id="quoted-printable, a soft line break in the marker"),
    pytest.param(_own_text(b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
                           b"Content-Type: text/html; charset=utf-8\r\n"
                           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                           + SPLIT_HTML + b"\r\n--b--\r\n"),
                 id="quoted-printable HTML in a multipart"),
    pytest.param(_own_text(_part("text/plain", FORWARD, encoding="x-uuencode")),
                 id="x-uuencode"),
    pytest.param(_own_text(_part("text/plain", FORWARD, encoding="uue")), id="uue"),
    pytest.param(_own_text(_part("text/plain; charset=UTF-16", FORWARD.decode().encode("utf-16"),
                                 encoding="binary", lf=True)), id="UTF-16"),
    pytest.param(_own_text(_part("text/plain; charset=utf_32", FORWARD.decode().encode("utf-32"),
                                 encoding="8bit", lf=True)), id="UTF-32"),
    pytest.param(_own_text(_part("text/plain; charset=UnicodeLittleUnmarked",
                                 FORWARD.decode().encode("utf-16-le"), encoding="binary",
                                 lf=True)),
                 id="UTF-16 under Python's own name"),
    pytest.param(_own_text(_part("text/plain; charset=u16", FORWARD.decode().encode("utf-16"),
                                 encoding="binary", lf=True)), id="UTF-16 as u16"),
    pytest.param(_own_text(_part("text/plain; charset*=''utf%2d16",
                                 FORWARD.decode().encode("utf-16"), encoding="binary", lf=True)),
                 id="UTF-16 as an RFC 2231 value"),
    pytest.param(_own_text(b"Content-Type: text/plain; charset=utf-16\r\n"
                           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                           + quopri.encodestring(FORWARD.decode().encode("utf-16"))),
                 id="quoted-printable UTF-16"),
    # binascii.a2b_qp skips from "=" before a bare CR to the next LF.
    pytest.param(b"Subject: see below\r\nX-Note: ab=\rContent-Transfer-Encoding: "
                 b"quoted-printable\r\r" + FORWARD.split(b"\n\n", 1)[1].replace(
                     b"\n", b"\r\n").replace(b"Forwarded message", b"Forwarded=20message"),
                 id="quoted-printable, an earlier = before a bare CR"),
])
def test_a_forward_an_encoding_hides_is_found_in_mail_without_attachments(raw: bytes) -> None:
    assert b"base64" not in raw.lower()
    facts = read_message(raw)
    assert facts.forward.inline
    assert facts.forward.original_addresses == ADA_ORIGINAL


def test_a_forward_in_text_with_bare_cr_line_ends_is_found() -> None:
    # As old Mac mail has them (found by the mirror: the relay refuses them).
    facts = read_message(_own_text(b"Content-Type: text/plain\r\n\r\n"
                                   + FORWARD.replace(b"\n", b"\r")))
    assert facts.forward.inline
    assert facts.forward.original_addresses == ADA_ORIGINAL


def test_a_quoted_printable_mail_with_no_marker_is_not_parsed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Nearly all HTML mail is quoted-printable: it is decoded to look for a
    # marker, not parsed.
    def parsed(msg: Any, subject: str) -> Forward:
        raise AssertionError("parsed")

    monkeypatch.setattr(message_module, "_read_forward", parsed)
    text = FORWARD.replace(b"Forwarded message", b"Forwarded=20mess")
    facts = read_message(_own_text(b"Content-Type: text/plain\r\n"
                                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + text))
    assert facts.forward == Forward()


# --- mail with attachments: the parse of its first bytes ---------------------------

BIG_CV = _cv(b"%PDF-1.7 " * 100_000)


def _forward_of_whole(raw: bytes) -> Forward:
    """The forward as read from a parse of all the message's first 2 MB."""
    parsed = BytesParser(policy=compat32).parsebytes(raw[:message_module.FORWARD_SCAN_LIMIT])
    return message_module._read_forward(parsed, read_message(raw).subject)


def _parsed_lengths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of each message the forward reader's parser is given from now on."""
    lengths: list[int] = []

    class Parser(BytesParser):
        def parsebytes(self, text: bytes, headersonly: bool = False) -> Message:
            if not headersonly:
                lengths.append(len(text))
            return super().parsebytes(text, headersonly)

    monkeypatch.setattr(message_module, "BytesParser", Parser)
    return lengths


def test_a_cv_mail_is_read_from_the_parse_of_its_first_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = _parsed_lengths(monkeypatch)
    raw = _mixed(_part("text/plain", FORWARD, encoding="7bit"),
                 BIG_CV)
    facts = read_message(raw)
    assert facts.forward.inline
    assert facts.forward.original_addresses == ADA_ORIGINAL
    assert len(lengths) == 1
    assert message_module._TEXT_FIRST - 100 < lengths[0] <= message_module._TEXT_FIRST


@pytest.mark.parametrize("raw", [
    pytest.param(_mixed(_part("text/plain", b"See the attached.\n", encoding="7bit"),
                        BIG_CV,
                        b"Content-Type: message/rfc822\r\n\r\nFrom: Ada <ada@applicant.test>\r\n"
                        b"To: jobs@example.com\r\n\r\nDear team\r\n"),
                 id="a message attached after a CV"),
    pytest.param(_mixed(_part("text/plain", b"See the attached.\n", encoding="7bit"),
                        BIG_CV,
                        b'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\n'
                        b"From: Ada <ada@applicant.test>\r\nTo: jobs@example.com\r\n\r\n"
                        b"Dear team\r\n--d--"),
                 id="a digest after a CV"),
    pytest.param(_mixed(_part("text/html", b"<p>See the attached.</p>", encoding="7bit"),
                        BIG_CV,
                        _part("text/plain", FORWARD, encoding="7bit")),
                 id="the plain text after the CV, HTML before it"),
    pytest.param(_mixed(_part("text/plain", b"x" * 100_000 + b"\n" + FORWARD, encoding="7bit"),
                        BIG_CV),
                 id="a plain text longer than the first bytes"),
    pytest.param(_mixed(_part("image/png", b"\x89PNG" * 25_000),
                        _part("text/plain", FORWARD, encoding="7bit"),
                        BIG_CV),
                 id="the text after a large image"),
    pytest.param(_mixed(b"Content-Type: text/plain\r\nContent-Disposition: attachment; "
                        b"filename=notes.txt\r\n\r\nnotes",
                        b"\r\n" + b"x" * 70_000 + b"\r\n" + FORWARD,
                        BIG_CV),
                 id="an attached text file first, the text longer than the first bytes"),
])
def test_a_forward_beyond_the_first_bytes_is_found(raw: bytes) -> None:
    forward = read_message(raw).forward
    assert forward.is_forward
    assert set(forward.original_addresses) >= {"ada@applicant.test"}
    assert forward == _forward_of_whole(raw)


def test_the_first_bytes_read_as_the_whole_wherever_they_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The first bytes end at every point around the end of the text part, in
    # mail of every layout a CV comes in: what is read is what a parse of
    # the whole gives.
    texts = {"a forward": FORWARD, "no forward": b"See the attached.\n",
             "a forward at the end": b"x\n" * 40 + FORWARD.replace(b"\n\nDear team\n", b""),
             # Lines a cut could make a boundary of.
             "lines like a boundary": b"x\n--bx\n--b--x\n--ax\n" + FORWARD}
    cv = _cv(b"%PDF-1.7 " * 300)
    for text in texts.values():
        for raw in (
                _mixed(_part("text/plain", text, encoding="7bit"), cv),
                _mixed(_part("text/plain", text, encoding="quoted-printable"), cv, cv),
                _mixed(b'Content-Type: multipart/alternative; boundary="a"\r\n\r\n--a\r\n'
                       + _part("text/plain", text, encoding="7bit") + b"\r\n--a\r\n"
                       + _part("text/html", b"<p>" + text + b"</p>", encoding="7bit")
                       + b"\r\n--a--", cv),
                _mixed(_part("text/plain", text, encoding="7bit").replace(b"\r\n", b"\n"), cv),
        ):
            end = raw.index(b"Content-Type: application/pdf")
            whole = _forward_of_whole(raw)
            for cut in range(100, end + 200):
                monkeypatch.setattr(message_module, "_TEXT_FIRST", cut)
                assert read_message(raw).forward == whole, (raw[:cut], cut)


# --- mail of one part: read as far as its text goes ------------------------------

@pytest.mark.parametrize("encoding", [None, "7bit", "8bit", "binary", "quoted-printable",
                                      "base64"])
def test_a_single_part_is_read_as_far_as_its_text_goes(
        monkeypatch: pytest.MonkeyPatch, encoding: str | None) -> None:
    monkeypatch.setattr(message_module, "_TEXT_SCAN_LIMIT", 600)
    found = set()
    # The marker (and the forwarded header after it) from well before the
    # text's limit to well after it.
    for padding in range(300, 700, 3):
        text = b"x" * (padding - 1) + b"\n" + FORWARD
        field = [f"Content-Transfer-Encoding: {encoding}"] if encoding else []
        raw = mail("From: r@example.com", "Subject: see below", *field, body="")
        raw += {"quoted-printable": quopri.encodestring,
                "base64": base64.encodebytes}.get(encoding or "", bytes)(text)
        forward = read_message(raw).forward
        assert forward == _forward_of_whole(raw), padding
        found.add(forward.inline)
    assert found == {True, False}


def test_a_large_plain_mail_is_read_no_further_than_its_text(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = _parsed_lengths(monkeypatch)
    raw = mail("From: r@example.com", "Subject: see below", body=GMAIL_FORWARD + "x\n" * 500_000)
    facts = read_message(raw)
    assert facts.forward.inline
    assert lengths == [len(message_module.header_block(raw)) + message_module._TEXT_SCAN_LIMIT]


# Its RFC 2231 pieces cannot be put in order: the email package raises TypeError.
UNREADABLE = (b"Content-Type: multipart/alternative; boundary*0=a; boundary*1=lt; "
              b"boundary*=x\r\n\r\n--alt\r\n\r\nhi\r\n--alt--")


@pytest.mark.parametrize(("beyond_the_first_bytes", "read"), [(False, False), (True, True)])
def test_a_boundary_the_email_package_cannot_read_fails_no_message(
        beyond_the_first_bytes: bool, read: bool) -> None:
    text = _part("text/plain", FORWARD, encoding="7bit")
    raw = (_mixed(text, BIG_CV, UNREADABLE) if beyond_the_first_bytes
           else _mixed(text, UNREADABLE, BIG_CV))
    raw = raw.replace(b"Subject: see below", b"Subject: Fwd: see below")
    with pytest.raises(TypeError):
        BytesParser(policy=compat32).parsebytes(raw)
    forward = read_message(raw).forward
    assert forward.subject_prefix
    # Beyond the first bytes, the text before it is still read.
    assert forward.inline is read


def test_a_forwarded_message_in_a_digest_is_found() -> None:
    digest = (b'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\n'
              b"From: Ada <ada@applicant.test>\r\nTo: jobs@example.com\r\n"
              b"Subject: Application\r\n\r\nDear team\r\n--d--\r\n")
    body = (b"--b\r\nContent-Type: text/plain\r\n\r\nSee the attached.\r\n--b\r\n" + digest
            + b"--b--\r\n")
    facts = read_message(mail("From: r@example.com", "Subject: see below", body="",
                              content_type='multipart/mixed; boundary="b"') + body)
    assert facts.forward.attached
    assert facts.forward.original_addresses == ADA_ORIGINAL


@pytest.mark.parametrize("charset", ["unknown-8bit", "x-klingon-8"])
def test_forward_in_a_body_with_an_unknown_charset(charset: str) -> None:
    body = ("Gr\xfc\xdfe\n\n---------- Forwarded message ---------\n"
            "From: Ada <ada@applicant.test>\nTo: jobs@example.com\n\nDear team\n")
    raw = mail("From: r@example.com", "Subject: see below", body="",
               content_type=f"text/plain; charset={charset}")
    raw += body.replace("\n", "\r\n").encode("latin-1")
    facts = read_message(raw)
    assert facts.forward.inline
    assert facts.forward.original_addresses == ADA_ORIGINAL


def _attached(*originals: bytes, subject: str = "Please review") -> bytes:
    parts = [b"--outer\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"]
    parts += [b"--outer\r\nContent-Type: message/rfc822\r\n\r\n" + o + b"\r\n" for o in originals]
    return mail("From: r@example.com", f"Subject: {subject}", body="",
                content_type='multipart/mixed; boundary="outer"') + b"".join(parts) + \
        b"--outer--\r\n"


@pytest.mark.parametrize(("originals", "addresses", "ids"), [
    pytest.param([b"From: Ada <ada@applicant.test>\r\nTo: jobs@example.com\r\n"
                  b"Cc: Grace <grace@candidates.test>\r\nReply-To: ada.private@mail.test\r\n"
                  b"Message-ID: <orig-1@applicant.test>\r\n\r\nHi\r\n"],
                 ("ada@applicant.test", "jobs@example.com", "grace@candidates.test",
                  "ada.private@mail.test"), ("orig-1@applicant.test",), id="all-address-fields"),
    pytest.param([b"From: ada@applicant.test\r\nMessage-ID: <orig-1@applicant.test>\r\n\r\nA\r\n",
                  b"From: grace@candidates.test\r\nMessage-ID: <orig-2@c.test>\r\n\r\nB\r\n"],
                 ("ada@applicant.test", "grace@candidates.test"),
                 ("orig-1@applicant.test", "orig-2@c.test"), id="two-attached-messages"),
    pytest.param([b"From: <<<broken\r\nTo: ,,,\r\nMessage-ID: junk\r\n\r\nA\r\n"],
                 (), (), id="attached-with-broken-headers"),
])
def test_attached_forward(originals: list[bytes], addresses: tuple[str, ...],
                          ids: tuple[str, ...]) -> None:
    facts = read_message(_attached(*originals))
    assert facts.forward.attached
    assert facts.forward.is_forward
    assert facts.forward.original_addresses == addresses
    assert facts.forward.original_message_ids == ids


def test_thread_ids_join_replies_and_forwarded_originals_once() -> None:
    raw = _attached(b"From: ada@applicant.test\r\nMessage-ID: <orig@a.test>\r\n\r\nA\r\n")
    raw = b"In-Reply-To: <p@a.test>\r\nReferences: <r1@a.test> <p@a.test>\r\n" + raw
    facts = read_message(raw)
    assert facts.in_reply_to == ("p@a.test",)
    assert facts.references == ("r1@a.test", "p@a.test")
    assert facts.thread_ids == ("p@a.test", "r1@a.test", "orig@a.test")


# --- threading headers and the capture key ----------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("<abc@host.test>", "abc@host.test", id="plain"),
    pytest.param("  <abc@host.test>  (a comment)", "abc@host.test", id="space-and-comment"),
    pytest.param("<CAF+x/Y=z$1@mail.gmail.com>", "CAF+x/Y=z$1@mail.gmail.com", id="odd-chars"),
    pytest.param("<abc@xn--bcher-kva.example>", "abc@xn--bcher-kva.example", id="kept-verbatim"),
    pytest.param("<MixedCase@Host.Test>", "MixedCase@Host.Test", id="case-kept"),
    pytest.param("abc@host.test", None, id="no-angle-brackets"),
    pytest.param("<>", None, id="empty-brackets"),
    pytest.param("<a b@host.test>", None, id="whitespace-inside"),
    pytest.param("<" + "a" * 893 + "@h.test>", "a" * 893 + "@h.test", id="900-chars-kept"),
    pytest.param("<" + "a" * 894 + "@h.test>", None, id="901-chars-ignored"),
    pytest.param("<" + "a" * 5000 + "@h.test>", None, id="5000-chars-ignored"),
])
def test_message_id(value: str, expected: str | None) -> None:
    facts = read_message(mail("From: r@example.com", f"Message-ID: {value}"))
    assert facts.message_id == expected


@pytest.mark.parametrize(("lines", "key"), [
    pytest.param(["Message-ID: <abc@host.test>"], "mid:abc@host.test", id="message-id"),
    pytest.param([], "sha256", id="missing"),
    pytest.param(["Message-ID:"], "sha256", id="empty"),
    pytest.param(["Message-ID: <" + "x" * 1000 + "@h.test>"], "sha256", id="overlong"),
    pytest.param(["Message-ID: <first@h.test>", "Message-ID: <second@h.test>"],
                 "mid:first@h.test", id="duplicate-header-first-wins"),
])
def test_capture_key(lines: list[str], key: str) -> None:
    raw = mail("From: r@example.com", *lines)
    facts = read_message(raw)
    expected = f"sha256:{hashlib.sha256(raw).hexdigest()}" if key == "sha256" else key
    assert facts.capture_key == expected


def test_capture_key_without_message_id_tells_copies_apart() -> None:
    one = read_message(mail("From: r@example.com", body="one\n"))
    again = read_message(mail("From: r@example.com", body="one\n"))
    other = read_message(mail("From: r@example.com", body="two\n"))
    assert one.capture_key == again.capture_key
    assert one.capture_key != other.capture_key


@pytest.mark.parametrize(("lines", "in_reply_to", "references"), [
    pytest.param(["In-Reply-To: <p@a.test>"], ("p@a.test",), (), id="in-reply-to"),
    pytest.param(["In-Reply-To: <p@a.test> (Ada's message of Thursday)"], ("p@a.test",), (),
                 id="in-reply-to-comment"),
    pytest.param(["In-Reply-To: Ada's message <p@a.test> of Thursday"], ("p@a.test",), (),
                 id="in-reply-to-obsolete-phrase"),
    pytest.param(["References: <r1@a.test>\r\n <r2@a.test>\r\n\t<r3@a.test>"], (),
                 ("r1@a.test", "r2@a.test", "r3@a.test"), id="folded-references"),
    pytest.param(["References: <r1@a.test> <r2@a.test> <r1@a.test>"], (),
                 ("r1@a.test", "r2@a.test"), id="duplicates-once-in-order"),
    pytest.param(["References: <r1@a.test><r2@a.test>"], (), ("r1@a.test", "r2@a.test"),
                 id="no-space-between"),
    pytest.param(["References: junk <r1@a.test> <broken <r2@a.test>"], (),
                 ("r1@a.test", "r2@a.test"), id="junk-between"),
    pytest.param(["In-Reply-To: <unterminated@a.test", "References: nothing here"], (), (),
                 id="nothing-usable"),
])
def test_threading_headers(lines: list[str], in_reply_to: tuple[str, ...],
                           references: tuple[str, ...]) -> None:
    facts = read_message(mail("From: r@example.com", *lines))
    assert facts.in_reply_to == in_reply_to
    assert facts.references == references


@pytest.mark.parametrize(("lines", "list_id", "unsubscribe", "precedence"), [
    pytest.param(["List-Id: Dev <dev.lists.test>"], "Dev <dev.lists.test>", False, None,
                 id="list-id"),
    pytest.param(["List-Id:   Dev\r\n  <dev.lists.test>  "], "Dev <dev.lists.test>", False, None,
                 id="list-id-folded"),
    pytest.param(["List-Unsubscribe: <mailto:leave@lists.test>"], None, True, None,
                 id="list-unsubscribe"),
    pytest.param(["List-Unsubscribe:"], None, False, None, id="empty-list-unsubscribe"),
    pytest.param(["Precedence: Bulk"], None, False, "bulk", id="precedence-lower-cased"),
    pytest.param(["Precedence:  junk "], None, False, "junk", id="precedence-stripped"),
    pytest.param(["Precedence:"], None, False, None, id="empty-precedence"),
    pytest.param([], None, False, None, id="none"),
])
def test_list_and_bulk_headers(lines: list[str], list_id: str | None, unsubscribe: bool,
                               precedence: str | None) -> None:
    facts = read_message(mail("From: r@example.com", *lines))
    assert (facts.list_id, facts.list_unsubscribe, facts.precedence) == (
        list_id, unsubscribe, precedence)


@pytest.mark.parametrize(("value", "expected", "defect"), [
    pytest.param("Fri, 27 Nov 2026 10:00:00 +0100",
                 datetime(2026, 11, 27, 9, 0, tzinfo=UTC), False, id="rfc5322"),
    pytest.param("27 Nov 2026 10:00:00 GMT", datetime(2026, 11, 27, 10, 0, tzinfo=UTC), False,
                 id="obsolete-zone-name"),
    pytest.param("Fri, 27 Nov 2026 10:00:00 -0000", datetime(2026, 11, 27, 10, 0, tzinfo=UTC),
                 False, id="unknown-zone-is-utc"),
    pytest.param("Fri, 27 Nov 2026 10:00:00", datetime(2026, 11, 27, 10, 0, tzinfo=UTC), False,
                 id="no-zone-is-utc"),
    pytest.param("Blursday, 32 Smarch 20261 25:61:61 +9999", None, True, id="garbage"),
    pytest.param("Fri, 31 Feb 2026 10:00:00 +0000", None, True, id="no-such-day"),
    pytest.param("Fri, 27 Nov 99999 10:00:00 +0000", None, True, id="year-out-of-range"),
    pytest.param("0", None, True, id="a-number"),
    pytest.param("", None, False, id="empty"),
])
def test_date(value: str, expected: datetime | None, defect: bool) -> None:
    facts = read_message(mail("From: r@example.com", f"Date: {value}"))
    assert facts.date == expected
    if expected is not None:
        assert facts.date is not None and facts.date.utcoffset() is not None
    assert ("Date: unparseable" in facts.defects) is defect


# --- bad input never raises -------------------------------------------------------------

HEAD = b"From: Ada <ada@applicant.test>\r\nTo: recruiter@example.com\r\nSubject: Hi\r\n"


def _deep_multipart(levels: int, subject: bytes = b"Hi") -> bytes:
    body = b"Content-Type: text/plain\r\n\r\nthe innermost part\r\n"
    for level in range(levels):
        b = b"b%d" % level
        body = (b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n--' + b + b"\r\n"
                + body + b"\r\n--" + b + b"--\r\n")
    return HEAD.replace(b"Subject: Hi", b"Subject: " + subject) + b"MIME-Version: 1.0\r\n" + body


def _deep_rfc822(levels: int) -> bytes:
    body = b"From: ada@applicant.test\r\nContent-Type: text/plain\r\n\r\ninnermost\r\n"
    for _ in range(levels):
        body = b"From: r@example.com\r\nContent-Type: message/rfc822\r\n\r\n" + body
    return HEAD + b"MIME-Version: 1.0\r\n" + body


def _many_addresses(count: int) -> bytes:
    to = b",\r\n ".join(b"User %d <u%d@host%d.test>" % (i, i, i % 7) for i in range(count))
    return b"From: Ada <ada@applicant.test>\r\nTo: " + to + b"\r\nSubject: Hi\r\n\r\nHi\r\n"


BROKEN: list[Any] = [
    pytest.param(lambda: fixture("malformed_headers.eml"), id="malformed-headers-fixture"),
    pytest.param(lambda: fixture("bad_charset.eml"), id="bad-charset-fixture"),
    pytest.param(lambda: fixture("nul_bytes.eml"), id="nul-bytes-fixture"),
    pytest.param(lambda: b"", id="empty"),
    pytest.param(lambda: b"\r\n\r\n", id="only-blank-lines"),
    pytest.param(lambda: b"just a body, no headers at all\r\n", id="no-headers"),
    pytest.param(lambda: bytes(range(256)) * 64, id="binary-junk"),
    pytest.param(lambda: HEAD.replace(b"\r\n", b"\r") + b"\rbody\r", id="bare-cr"),
    pytest.param(lambda: HEAD.replace(b"\r\n", b"\n") + b"\nbody\n", id="bare-lf"),
    pytest.param(lambda: HEAD + b"X-NUL: a\x00b\r\nMessage-ID: <a\x00b@x.test>\r\n\r\n\x00\x00",
                 id="nul-in-headers-and-body"),
    pytest.param(lambda: HEAD + b"Date: Blursday\r\n\r\nHi\r\n", id="unparseable-date"),
    pytest.param(lambda: HEAD.replace(b"Subject: Hi", b"Subject: =?x-unknown?q?abc?= and "
                                      b"=?utf-8?b?!!!?= and =?utf-8?q?unterminated")
                 + b"\r\nHi\r\n", id="bad-encoded-words"),
    pytest.param(lambda: HEAD + b"Content-Type: text/plain; charset=x-unknown-9\r\n\r\n\xff\xfe",
                 id="unknown-charset"),
    pytest.param(lambda: HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\n\xff\xfe\xc3",
                 id="invalid-utf8-body"),
    pytest.param(lambda: HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: "
                 b"base64\r\n\r\n!!!not base64***=\r\nYWJj=ZGVm\r\n", id="broken-base64"),
    pytest.param(lambda: HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: "
                 b"quoted-printable\r\n\r\n=ZZ=\r\n=", id="broken-quoted-printable"),
    pytest.param(lambda: HEAD + b"Content-Transfer-Encoding: x-uuencode\r\n\r\nabc\r\n",
                 id="unknown-transfer-encoding"),
    pytest.param(lambda: HEAD + b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",
                 id="multipart-without-boundary"),
    pytest.param(lambda: HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
                 b"Content-Type: text/plain\r\n\r\nnever closed", id="unterminated-multipart"),
    pytest.param(lambda: HEAD + b"Content-Type: ;;;===\r\n\r\nHi\r\n", id="junk-content-type"),
    pytest.param(lambda: HEAD + b"Content-Type: message/rfc822\r\n\r\nnot a message\r\n",
                 id="rfc822-part-that-is-not-a-message"),
    pytest.param(lambda: b"From: <<<\r\nTo: ,,,;;;@@@\r\nCc: \"unclosed\r\nSender: (\r\n"
                 b"Reply-To: @:;\r\n\r\nHi\r\n", id="malformed-address-headers"),
    pytest.param(lambda: HEAD + b"X-8bit: \xff\xfe\xfd\xe4\r\n\r\nHi\r\n", id="8bit-header"),
    pytest.param(lambda: HEAD + b": no name\r\n\r\nHi\r\n", id="header-without-name"),
    pytest.param(lambda: HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
                 + b"\r\nHi\r\n", id="10000-headers"),
    pytest.param(lambda: HEAD + b"X-Long: " + b"a" * 1_000_000 + b"\r\n\r\nHi\r\n",
                 id="1mb-header-line"),
    pytest.param(lambda: HEAD.replace(b"Subject: Hi", b"Subject: " + b"word " * 4000)
                 + b"\r\nHi\r\n", id="20kb-subject"),
    pytest.param(lambda: HEAD + b"\r\n" + b"b" * 2_000_000 + b"\r\n", id="2mb-body-line"),
    pytest.param(lambda: HEAD + b"\r\n" + b"---------- Forwarded message ---------\r\n"
                 + b"From: " + b"x" * 300_000 + b"\r\n", id="overlong-forwarded-block"),
    pytest.param(lambda: _deep_multipart(200), id="200-nested-multiparts"),
    pytest.param(lambda: _deep_multipart(200, b"Fwd: x"), id="200-nested-multiparts-fwd"),
    pytest.param(lambda: _deep_rfc822(200), id="200-nested-rfc822"),
    pytest.param(lambda: _deep_multipart(1000), id="1000-nested-multiparts"),
    pytest.param(lambda: _deep_multipart(1000, b"Fwd: x"), id="1000-nested-multiparts-fwd"),
    pytest.param(lambda: _deep_rfc822(1000), id="1000-nested-rfc822"),
    pytest.param(lambda: _deep_multipart(5000, b"Fwd: x"), id="5000-nested-multiparts-fwd"),
    pytest.param(lambda: _codec_charset(b"idna"), id="idna-charset"),
    pytest.param(lambda: _codec_charset(b"punycode"), id="punycode-charset"),
    pytest.param(lambda: _codec_charset(b'"ut\x00f-8"'), id="nul-in-the-charset-name"),
    pytest.param(lambda: _nested_comments(b"To"), id="5000-nested-comments-in-to"),
    pytest.param(lambda: _nested_comments(b"From"), id="5000-nested-comments-in-from"),
    pytest.param(lambda: HEAD.replace(b"Subject: Hi", b"Subject: =?u\xfftf-8?q?abc?=")
                 + b"To: =?\xc3\xa4?q?ada?=@applicant.test\r\n\r\nHi\r\n",
                 id="non-ascii-charset-name-in-encoded-words"),
    pytest.param(lambda: fixture("hostile/bad_charsets.eml"), id="hostile-bad-charsets"),
    pytest.param(lambda: fixture("hostile/nested_comments.eml"), id="hostile-nested-comments"),
]


def _codec_charset(charset: bytes) -> bytes:
    """A forward whose text names a codec that is no charset: "idna" and
    "punycode" raise whatever error handler they are given."""
    return (HEAD.replace(b"Subject: Hi", b"Subject: Fwd: CV") + b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=" + charset + b"\r\n\r\n"
            b"---------- Forwarded message ---------\r\nFrom: Ada <ada@applicant.test>\r\n"
            b"\xff\xfe\r\n")


def _nested_comments(name: bytes, depth: int = 5000) -> bytes:
    """An address header whose comments nest deeper than the parser's stack."""
    return HEAD.replace(name + b": ", name + b": " + b"(" * depth + b" ", 1) + b"\r\nHi\r\n"


@pytest.mark.parametrize("make", BROKEN)
def test_bad_input_never_raises(make: Any) -> None:
    raw = make()
    facts = read_message(raw, "<ada@applicant.test>", ["recruiter@example.com", "junk"])
    assert isinstance(facts, MessageFacts)
    assert facts.size == len(raw)
    assert facts.envelope_sender == "ada@applicant.test"
    assert facts.envelope_recipients == ("recruiter@example.com",)
    assert facts.capture_key
    # and the rules can judge whatever came out
    decision = decide(facts, Context(internal_domains=frozenset({"example.com"}),
                                     team=frozenset({"recruiter@example.com"})))
    assert not decision.capture


@pytest.mark.parametrize(("make", "check"), [
    pytest.param(lambda: _many_addresses(10_000),
                 lambda f: len(f.to) == 10_000 and f.to[-1] == "u9999@host3.test",
                 id="10000-addresses-all-read"),
    pytest.param(lambda: HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
                 + b"Message-ID: <late@h.test>\r\n\r\nHi\r\n",
                 lambda f: f.message_id == "late@h.test" and f.from_ == ("ada@applicant.test",),
                 id="header-after-10000-headers"),
    pytest.param(lambda: _deep_multipart(200), lambda f: f.from_ == ("ada@applicant.test",),
                 id="200-nested-multiparts-headers-read"),
    pytest.param(lambda: _deep_rfc822(200), lambda f: f.forward.attached,
                 id="200-nested-rfc822-is-an-attached-forward"),
    pytest.param(lambda: _codec_charset(b"idna"),
                 lambda f: f.forward.inline and f.forward.original_sender == "ada@applicant.test",
                 id="idna-charset-read-as-utf8"),
    pytest.param(lambda: _nested_comments(b"From"),
                 lambda f: f.from_ == ("ada@applicant.test",) and "From: unparseable" in f.defects,
                 id="nested-comments-address-still-found"),
    pytest.param(lambda: _deep_multipart(5000, b"Fwd: x"),
                 lambda f: f.forward.subject_prefix and not f.forward.inline,
                 id="5000-nested-multiparts-body-not-read"),
    pytest.param(lambda: _deep_multipart(50, b"Fwd: x").replace(
                     b"the innermost part", b"---------- Forwarded message ---------\r\n"
                     b"From: grace@candidates.test"),
                 lambda f: f.forward.inline and "grace@candidates.test" in f.thread_ids + (
                     f.forward.original_addresses), id="50-nested-multiparts-still-read"),
    pytest.param(lambda: fixture("malformed_headers.eml"),
                 lambda f: "Date: unparseable" in f.defects, id="defects-recorded"),
    pytest.param(lambda: fixture("bad_charset.eml"),
                 lambda f: f.subject == "tlhIngan Hol application" or "application" in f.subject,
                 id="unknown-charset-subject-kept"),
    pytest.param(lambda: HEAD.replace(b"Subject: Hi", b"Subject: " + b"word " * 4000)
                 + b"\r\nHi\r\n", lambda f: f.subject == " ".join(["word"] * 4000),
                 id="long-subject-kept-whole"),
])
def test_bad_input_keeps_what_is_readable(make: Any, check: Any) -> None:
    assert check(read_message(make()))


# PostgreSQL rejects NUL in text: a fact carrying one could never be stored.
@pytest.mark.parametrize("name", ["nul_bytes.eml", "nul-in-message-id"])
def test_facts_carry_no_nul(name: str) -> None:
    raw = (fixture(name) if name.endswith(".eml")
           else HEAD + b"Message-ID: <a\x00b@x.test>\r\n\r\nHi\r\n")
    facts = read_message(raw)
    texts = [facts.subject, facts.message_id or "", *facts.participants,
             *facts.references, *facts.in_reply_to]
    assert not any("\x00" in t for t in texts)


@pytest.mark.parametrize("padding", [0, 2000], ids=["kept", "too long to keep"])
def test_an_address_header_read_again_gives_the_same_addresses_and_defects(padding: int) -> None:
    # Address headers are parsed once and remembered while short: a value
    # seen again must still say what was wrong with it.
    to = ("=?utf-8?b?not base64?=@example.com, Ann <ANN@Example.com>, "
          + ", ".join(f"a{n}@example.org" for n in range(padding // 16)))
    raw = mail("From: a@example.com", f"To: {to}", "Subject: x")
    first, again = read_message(raw), read_message(raw)
    assert first.to == again.to
    assert "ann@example.com" in again.to
    assert first.defects == again.defects
    assert any("undecodable" in d for d in again.defects)


def test_a_forward_read_in_one_thread_holds_up_no_other_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The relay reads a large message's forward in a worker thread while the
    # event loop judges other mail.
    entered, release = threading.Event(), threading.Event()
    read_forward = message_module._read_forward

    def slow(msg: Any, subject: str) -> Any:
        if subject == "Fwd: large":
            entered.set()
            release.wait(10)
        return read_forward(msg, subject)

    monkeypatch.setattr(message_module, "_read_forward", slow)
    large, small = (read_message(make_mail("r@example.com", "x@else.test", f"Fwd: {name}"))
                    for name in ("large", "small"))
    reading = threading.Thread(target=lambda: large.forward)
    reading.start()
    try:
        assert entered.wait(10)
        other = threading.Thread(target=lambda: small.forward)
        other.start()
        other.join(5)
        assert not other.is_alive(), "the other message's forward waited"
        assert small.forward.subject_prefix
    finally:
        release.set()
        reading.join()
    assert large.forward.subject_prefix
