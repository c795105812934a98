"""A cheap first look at a message's raw header: mail the rules can never capture.

A mailbox's back-fill is mostly newsletters and colleagues' mail, and
parsing each message's header and running the whole rule table costs more
than fetching it. `never_captured` answers from the raw bytes for the
plainest of that mail (bulk mail, and mail among internal addresses that
is no forward) and says "judge it" for everything else.

It may only pass over mail that the rules would not capture whatever the
store holds, so it reads a header only when every line of it is one the
email parser reads the same way (printable ASCII fields and folds), then
uses the very functions `read_message` uses on those values and the same
notion of internal as the rules. `tests/rules/test_prefilter.py` checks it
against the rules, table-driven.
"""

from __future__ import annotations

import re

from atsmail.rules.context import Context
from atsmail.rules.message import header_addresses, header_block, header_text, might_forward
from atsmail.rules.table import BULK_PRECEDENCE

# A header of plain fields and folds, to the blank line that ends it: field
# names as the email parser knows them (RFC 5322 ftext, here never empty,
# where the parser would accept ":value"), and printable ASCII and tab only,
# with CRLF or LF line ends. No bare CR, NUL, 8-bit byte or control, which
# the parser (or `read_message`) would treat in ways of their own.
_PLAIN_HEADER = re.compile(
    rb"(?:[\x21-\x39\x3b-\x7e]+:[\x20-\x7e\t]*\r?\n(?:[ \t][\x20-\x7e\t]*\r?\n)*)*(?:\r?\n)?")
# One field of such a header: its value is what the compat32 parser stores,
# the first line's text after the colon and its blanks, and its folds with
# their line ends, with trailing line ends dropped.
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+):[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
                    re.MULTILINE)
_PARTICIPANT_FIELDS = ("from", "sender", "reply-to", "to", "cc")


def never_captured(raw: bytes, ctx: Context) -> bool:
    """True only when the rules would capture this message in no store.

    `ctx` needs just the internal domains and the team. False means nothing
    either way: the message must be judged by the rules.
    """
    return passed_over(raw, ctx) is not None


def passed_over(raw: bytes, ctx: Context) -> str | None:
    """Why the rules would capture this message in no store (`never_captured`):
    "bulk", or "internal" for mail among internal addresses with no sign of a
    forward in `raw`, which a forward's body can still change when `raw` is
    only the header. None: it must be judged."""
    fields = _plain_fields(header_block(raw))
    if fields is None:
        return None
    noted: list[str] = []  # defects are the rules' business, not this look's

    def first(name: str) -> str:
        values = fields.get(name)
        return header_text(name, values[0], noted) if values else ""

    # The bulk rule's veto, read from the same first values it reads.
    if first("list-id") or first("list-unsubscribe") or (
            first("precedence").lower() in BULK_PRECEDENCE):
        return "bulk"
    # A forward may name a candidate in its body: those are judged.
    if might_forward(first("subject"), raw):
        return None
    # Without an outside participant, no rule but the forward ones can
    # capture: thread links and candidate matches need one.
    if all(ctx.is_internal(address)
           for name in _PARTICIPANT_FIELDS
           for address in header_addresses(name, fields.get(name, []), noted)):
        return "internal"
    return None


def _plain_fields(header: bytes) -> dict[str, list[str]] | None:
    """Each field's values by lower-cased name, exactly as the compat32 parser
    stores them; None when a line is not plainly a field or a fold."""
    if not _PLAIN_HEADER.fullmatch(header):
        return None
    fields: dict[str, list[str]] = {}
    for name, value in _FIELD.findall(header):
        fields.setdefault(name.decode("ascii").lower(), []).append(value.decode("ascii"))
    return fields
