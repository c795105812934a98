"""One spelling per address, so that comparisons are plain set look-ups.

Mail carries the same address in many spellings: mixed case, IDNA
(`xn--`) or Unicode domains, display names with RFC 2047 words. Everything
that compares addresses (rules, candidate profiles, team members, internal
domains) goes through `normalize_address` / `normalize_domain` first.
"""

from __future__ import annotations

import re
from collections.abc import Collection

# Whitespace, controls and the specials that cannot stand unquoted in an
# address: such text is not an address the gateway deals in.
_NOT_IN_ADDRESS = re.compile(r"[\s\x00-\x1f\x7f,;<>()\[\]\\\"]")
# Bounded and anchored at a separator, so that hostile text cannot make the
# search quadratic.
_LOOSE_ADDRESS = re.compile(
    r"(?<![^\s<>()\[\]\"',;:])[^\s<>()\[\]\"',;:@]{1,64}@"
    r"[^\s<>()\[\]\"',;:@]{1,253}\.[^\s<>()\[\]\"',;:@.]{1,63}")


class AddressError(ValueError):
    """Text that is not a usable mail address."""


def normalize_domain(domain: str) -> str:
    """Lower-case Unicode form of a domain; `xn--` labels are decoded."""
    domain = domain.strip().strip(".").lower()
    if not domain:
        raise AddressError("empty domain")
    labels = []
    for label in domain.split("."):
        if not label:
            raise AddressError(f"empty label in domain {domain!r}")
        if label.startswith("xn--"):
            try:
                # punycode, not the idna codec: that one is IDNA 2003 and
                # refuses names such as straße.de (xn--strae-oqa.de).
                label = label[4:].encode("ascii").decode("punycode")
            except UnicodeError:
                raise AddressError(f"bad IDNA label {label!r} in {domain!r}") from None
        labels.append(label)
    return ".".join(labels)


def normalize_address(address: str) -> str:
    """`Local@Domain` -> `local@domain` with the domain in Unicode form.

    Local parts are compared case-insensitively, as every mail system a
    recruiting team uses treats them that way.
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or _NOT_IN_ADDRESS.search(address):
        raise AddressError(f"not a mail address: {address!r}")
    return f"{local.lower()}@{normalize_domain(domain)}"


def try_normalize(address: str) -> str | None:
    try:
        return normalize_address(address)
    except AddressError:
        return None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def in_domains(address: str, domains: Collection[str]) -> str | None:
    """The internal domain `address` belongs to (itself or as a subdomain), if any."""
    domain = domain_of(address)
    for d in domains:
        if domain == d or domain.endswith("." + d):
            return d
    return None


def addresses_in_text(text: str) -> list[str]:
    """Anything that looks like an address in free text (forwarded blocks)."""
    return [n for n in (try_normalize(m) for m in _LOOSE_ADDRESS.findall(text)) if n]
