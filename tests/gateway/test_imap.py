"""The mirror's IMAP client where it departs from aioimaplib's own code."""

from __future__ import annotations

import aioimaplib

from atsmail.gateway.imap import _Fetch

# A FETCH response as aioimaplib hands it on: lines as bytes, literals as bytearray.
RESPONSE: list[bytes | bytearray] = [
    b"1 FETCH (UID 7 BODY[HEADER.FIELDS (FROM)] {20}",
    bytearray(b"From: a (x) ((\r\n\r\n"),
    b")",
    b"2 FETCH (UID 8 FLAGS (\\Seen) BODY[] {5}",
    bytearray(b"((((("),
    b" INTERNALDATE \"x\")",
    b"* 3 EXISTS",
    b"3 FETCH (UID 9 BODY[] {3}",
    bytearray(b")))"),
    b"",
    b")",
]


async def test_a_fetch_knows_it_is_complete_as_aioimaplib_does() -> None:
    ours = _Fetch("A1", "1:*", "(UID BODY[])", prefix="UID")
    theirs = aioimaplib.FetchCommand("A2", "1:*", "(UID BODY[])", prefix="UID")
    for line in RESPONSE:
        ours.append_to_resp(line)
        theirs.append_to_resp(line)
        assert ours.wait_data() == theirs.wait_data(), line
    for command in (ours, theirs):
        command.close(b"A OK done", "OK")
