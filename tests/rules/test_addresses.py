"""Address spelling, who takes part in a message, and who counts as internal.

Every rule compares addresses as plain strings, so these tables pin down the
one spelling everything is reduced to: lower case, Unicode domains (IDNA
`xn--` labels decoded), display names and RFC 2047 words stripped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from atsmail.rules import Context, read_message
from atsmail.rules.addresses import (
    AddressError,
    addresses_in_text,
    in_domains,
    normalize_address,
    normalize_domain,
    try_normalize,
)

DATA = Path(__file__).parent.parent / "data"

TEAM = frozenset({"recruiter@example.com", "agency.partner@freelance.test"})
DOMAINS = frozenset({"example.com", "exämple.de"})
CTX = Context(internal_domains=DOMAINS, team=TEAM)


def headers(*lines: str, body: str = "Hello.\n") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


# --- one spelling per address ------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("ada@applicant.test", "ada@applicant.test", id="already-normal"),
    pytest.param("Ada@Applicant.TEST", "ada@applicant.test", id="mixed-case"),
    pytest.param("ADA.LOVELACE+cv@MAIL.TEST", "ada.lovelace+cv@mail.test", id="upper-local-part"),
    pytest.param("<ada@applicant.test>", "ada@applicant.test", id="angle-brackets"),
    pytest.param("  ada@applicant.test\t", "ada@applicant.test", id="surrounding-space"),
    pytest.param("ada@applicant.test.", "ada@applicant.test", id="trailing-root-dot"),
    pytest.param("x@xn--bcher-kva.example", "x@bücher.example", id="idna-decoded"),
    pytest.param("x@XN--BCHER-KVA.EXAMPLE", "x@bücher.example", id="idna-upper-case"),
    pytest.param("x@BÜCHER.Example", "x@bücher.example", id="unicode-upper-case"),
    pytest.param("li.ming@xn--fiqs8s.example", "li.ming@中国.example", id="idna-cjk"),
    pytest.param("x@mail.xn--mller-kva.example", "x@mail.müller.example", id="idna-inner-label"),
])
def test_normalize_address(raw: str, expected: str) -> None:
    assert normalize_address(raw) == expected
    assert try_normalize(raw) == expected
    assert normalize_address(expected) == expected, "normalising is idempotent"


@pytest.mark.parametrize("raw", [
    pytest.param("", id="empty"),
    pytest.param("ada", id="no-at"),
    pytest.param("@applicant.test", id="no-local-part"),
    pytest.param("ada@", id="no-domain"),
    pytest.param("ada@.", id="only-dot-domain"),
    pytest.param("ada @applicant.test", id="space-in-local-part"),
    pytest.param("ada@applicant .test", id="space-in-domain"),
    pytest.param("ada@applicant..test", id="empty-label"),
    pytest.param("ada@xn--zz.example", id="bad-idna-label"),
    pytest.param("<>", id="null-sender"),
    # Address literals and specials: no candidate or team member has one.
    pytest.param("ada@[127.0.0.1]", id="address-literal"),
    pytest.param("a,b@applicant.test", id="comma"),
    pytest.param("a\x1b@applicant.test", id="control-character"),
])
def test_not_an_address(raw: str) -> None:
    with pytest.raises(AddressError):
        normalize_address(raw)
    assert try_normalize(raw) is None


@pytest.mark.parametrize(("one", "other"), [
    pytest.param("x@xn--bcher-kva.example", "X@Bücher.Example", id="bücher"),
    pytest.param("x@xn--mller-kva.example", "x@MÜLLER.example", id="müller"),
    pytest.param("x@xn--fiqs8s.example", "x@中国.example", id="cjk"),
    pytest.param("x@xn--exmple-cua.de", "x@exämple.de", id="internal-domain-spelling"),
    pytest.param(
        "x@xn--strae-oqa.de", "x@straße.de", id="idna2008-sharp-s"),
])
def test_idna_and_unicode_spellings_are_equal(one: str, other: str) -> None:
    assert normalize_address(one) == normalize_address(other)


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("example.com", "example.com", id="plain"),
    pytest.param("Example.COM.", "example.com", id="case-and-root-dot"),
    pytest.param("xn--exmple-cua.de", "exämple.de", id="idna"),
    pytest.param("EXÄMPLE.de", "exämple.de", id="unicode-upper"),
])
def test_normalize_domain(raw: str, expected: str) -> None:
    assert normalize_domain(raw) == expected


# --- internal domains --------------------------------------------------------------


@pytest.mark.parametrize(("address", "expected"), [
    pytest.param("a@example.com", "example.com", id="the-domain"),
    pytest.param("a@mail.example.com", "example.com", id="subdomain"),
    pytest.param("a@deep.eu.mail.example.com", "example.com", id="deep-subdomain"),
    pytest.param("a@exämple.de", "exämple.de", id="unicode-domain"),
    pytest.param("a@hr.exämple.de", "exämple.de", id="unicode-subdomain"),
    pytest.param("a@evilexample.com", None, id="look-alike-prefix"),
    pytest.param("a@example.com.evil.test", None, id="look-alike-suffix"),
    pytest.param("a@example.co", None, id="shorter-tld"),
    pytest.param("a@xample.com", None, id="shorter-name"),
    pytest.param("a@example.de", None, id="unrelated-umlaut-free-twin"),
])
def test_in_domains(address: str, expected: str | None) -> None:
    assert in_domains(address, DOMAINS) == expected


@pytest.mark.parametrize(("address", "internal"), [
    pytest.param("recruiter@example.com", True, id="team-member"),
    pytest.param("agency.partner@freelance.test", True, id="team-member-outside-domains"),
    pytest.param("someone.else@freelance.test", False, id="team-member-domain-is-not-internal"),
    pytest.param("bob@example.com", True, id="internal-domain-not-on-team"),
    pytest.param("carol@eu.example.com", True, id="subdomain-of-internal-domain"),
    pytest.param("x@exämple.de", True, id="unicode-internal-domain"),
    pytest.param("eve@evilexample.com", False, id="look-alike-domain"),
    pytest.param("eve@example.com.evil.test", False, id="internal-domain-as-prefix"),
    pytest.param("ada@applicant.test", False, id="candidate"),
])
def test_is_internal(address: str, internal: bool) -> None:
    assert CTX.is_internal(address) is internal


@pytest.mark.parametrize(("from_header", "internal"), [
    pytest.param("Rita <Recruiter@EXAMPLE.COM>", True, id="team-member-any-case"),
    pytest.param("Bob <bob@Mail.Example.Com>", True, id="subdomain-any-case"),
    pytest.param("x@XN--EXMPLE-CUA.de", True, id="idna-spelling-of-internal-domain"),
    pytest.param("=?utf-8?q?Rita_R=C3=A9cruteuse?= <recruiter@example.com>", True,
                 id="rfc2047-name"),
    pytest.param('"recruiter@example.com" <eve@evil.test>', False, id="display-name-spoof"),
    pytest.param("=?utf-8?q?recruiter=40example=2Ecom?= <eve@evil.test>", False,
                 id="encoded-display-name-spoof"),
    pytest.param("Eve <eve@evilexample.com>", False, id="look-alike-domain"),
    pytest.param("Eve <eve@example.com.evil.test>", False, id="internal-domain-as-prefix"),
])
def test_internal_as_read_from_a_header(from_header: str, internal: bool) -> None:
    facts = read_message(headers(f"From: {from_header}", "To: x@elsewhere.test"))
    assert len(facts.from_) == 1
    assert CTX.is_internal(facts.from_[0]) is internal


# --- participants ------------------------------------------------------------------


@pytest.mark.parametrize(("lines", "envelope_sender", "envelope_recipients", "expected"), [
    pytest.param(["From: Ada <ada@applicant.test>"], None, (), ("ada@applicant.test",),
                 id="from"),
    pytest.param(["From: portal@jobs.test", "Sender: ada@applicant.test"], None, (),
                 ("portal@jobs.test", "ada@applicant.test"), id="sender"),
    pytest.param(["From: noreply@jobs.test", "Reply-To: Ada <ada@applicant.test>"], None, (),
                 ("noreply@jobs.test", "ada@applicant.test"), id="reply-to"),
    pytest.param(["From: r@example.com", "To: a@one.test, B <b@two.test>"], None, (),
                 ("r@example.com", "a@one.test", "b@two.test"), id="to-several"),
    pytest.param(["From: r@example.com", "To: a@one.test", "Cc: c@three.test"], None, (),
                 ("r@example.com", "a@one.test", "c@three.test"), id="cc"),
    pytest.param(["From: r@example.com", "To: a@one.test"], "bounces+r@example.com",
                 ("a@one.test", "ada@applicant.test"),
                 ("r@example.com", "a@one.test", "bounces+r@example.com", "ada@applicant.test"),
                 id="envelope-sender-and-bcc-recipient"),
    pytest.param(["From: r@example.com"], None, ("<Ada@Applicant.TEST>", "not an address", ""),
                 ("r@example.com", "ada@applicant.test"), id="envelope-recipients-normalised"),
    pytest.param(["From: r@example.com"], "<>", (), ("r@example.com",), id="null-envelope-sender"),
    pytest.param(["From: Ada <ada@applicant.test>", "Cc: ADA@APPLICANT.TEST"], None,
                 ("Ada@Applicant.test",), ("ada@applicant.test",), id="duplicates-any-case-once"),
    pytest.param(["From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <Juergen@XN--BCHER-KVA.example>"],
                 None, (), ("juergen@bücher.example",), id="rfc2047-name-idna-domain"),
    pytest.param(["From: =?UTF-8?B?5p2O5piO?= <li.ming@xn--fiqs8s.example>"], None, (),
                 ("li.ming@中国.example",), id="rfc2047-base64-name"),
    pytest.param(["From: ada@applicant.test (Ada Applicant)"], None, (),
                 ("ada@applicant.test",), id="comment"),
    pytest.param(["From: r@example.com", "To: Recruiting: a@one.test, b@two.test;"], None, (),
                 ("r@example.com", "a@one.test", "b@two.test"), id="group"),
    pytest.param(["From: r@example.com", "To: undisclosed-recipients:;"], None,
                 ("ada@applicant.test",), ("r@example.com", "ada@applicant.test"),
                 id="undisclosed-recipients-bcc"),
    pytest.param(["From: r@example.com", "To: a@one.test,\r\n\tb@two.test"], None, (),
                 ("r@example.com", "a@one.test", "b@two.test"), id="folded-header"),
    pytest.param(["From: a@one.test", "To: b@two.test", "To: c@three.test"], None, (),
                 ("a@one.test", "b@two.test", "c@three.test"), id="repeated-header"),
    pytest.param(["Subject: no address headers at all"], None, (), (), id="none"),
])
def test_participants(lines: list[str], envelope_sender: str | None,
                      envelope_recipients: tuple[str, ...], expected: tuple[str, ...]) -> None:
    facts = read_message(headers(*lines), envelope_sender, envelope_recipients)
    assert facts.participants == expected


def test_participant_fields_of_an_encoded_message() -> None:
    facts = read_message((DATA / "rfc2047_idna.eml").read_bytes(),
                         "Juergen.Mueller@xn--bcher-kva.example", ["recruiter@example.com"])
    assert facts.from_ == ("juergen.mueller@bücher.example",)
    assert facts.sender == ("assistant@bücher.example",)
    assert facts.reply_to == ("juergen@müller.example",)
    assert facts.to == ("recruiter@example.com",)
    assert facts.cc == ("li.ming@中国.example", "spoof@phish.test")
    assert facts.envelope_sender == "juergen.mueller@bücher.example"
    assert facts.envelope_recipients == ("recruiter@example.com",)
    assert facts.participants == (
        "juergen.mueller@bücher.example", "assistant@bücher.example", "juergen@müller.example",
        "recruiter@example.com", "li.ming@中国.example", "spoof@phish.test")


def test_utf8_address_headers_are_decoded() -> None:
    facts = read_message((DATA / "smtputf8_headers.eml").read_bytes())
    assert facts.from_ == ("jürgen@bücher.example",)
    for address in facts.participants:
        address.encode("utf-8")


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("From: Ada Applicant <ada@applicant.test>", ["ada@applicant.test"],
                 id="header-line"),
    pytest.param("Von: \tAda <ADA@Applicant.Test>", ["ada@applicant.test"], id="tab-and-case"),
    pytest.param("To: <a@one.test>; b@two.test, 'c@three.test'",
                 ["a@one.test", "b@two.test", "c@three.test"], id="separators"),
    pytest.param("mailto:ada@applicant.test", ["ada@applicant.test"], id="mailto"),
    pytest.param("Ada (ada@xn--bcher-kva.example)", ["ada@bücher.example"], id="idna"),
    pytest.param("write to ada at applicant dot test", [], id="obfuscated"),
    pytest.param("@@@ a@b @ ", [], id="junk"),
])
def test_addresses_in_text(text: str, expected: list[str]) -> None:
    assert addresses_in_text(text) == expected
