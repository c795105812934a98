"""Mailbox leases: gateways sharing a store split the mailboxes, each held by one mirror,
and those of a mirror that stops renewing move to the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from atsmail.storage import Store
from atsmail.storage.mailboxes import Account, Mailboxes, mirrored_by

TTL = 30.0


def account(address: str) -> Account:
    return Account(address=address, provider="imap", owner=None, shared=True,
                   visible_to=["recruiter@example.com"], imap_host="127.0.0.1", imap_port=143,
                   smtp_host="", smtp_port=0, security="none", username=address,
                   sealed_secret=b"sealed")


@pytest.fixture
async def boxes(team: Store) -> list[str]:
    addresses = [f"jobs{n}@example.com" for n in range(5)]
    for address in addresses:
        await Mailboxes(team.db).connect(account(address))
    await Mailboxes(team.db).set_hosted_identity("recruiter@example.com", "rita@hosted.example")
    await Mailboxes(team.db).connect(account("gone@example.com"))
    await Mailboxes(team.db).disconnect("gone@example.com")
    return addresses


@pytest.fixture
async def other(store_url: str) -> AsyncIterator[Store]:
    """A second gateway's view of the same store."""
    opened = Store.open(store_url)
    yield opened
    await opened.close()


async def holders(store: Store) -> dict[str, str | None]:
    return {box.address: mirrored_by(box) for box in await Mailboxes(store.db).all()
            if box.state != "disconnected"}


async def test_a_lone_mirror_holds_every_connected_mailbox_and_renews_them(
        team: Store, boxes: list[str]) -> None:
    first = await Mailboxes(team.db).hold("a", TTL)
    assert first.held == boxes and first.surplus == []
    again = await Mailboxes(team.db).hold("a", TTL)
    assert again.held == boxes
    assert await holders(team) == dict.fromkeys(boxes, "a")


async def test_a_mirror_that_joins_is_handed_a_fair_share(
        team: Store, other: Store, boxes: list[str]) -> None:
    a, b = Mailboxes(team.db), Mailboxes(other.db)
    assert (await a.hold("a", TTL)).held == boxes
    # The newcomer counts from now on, but everything is still held.
    assert (await b.hold("b", TTL)).held == []
    leases = await a.hold("a", TTL)
    assert leases.held == boxes and leases.surplus == boxes[3:]  # 5 between 2: 3 each at most
    await a.release("a", leases.surplus)
    assert (await b.hold("b", TTL)).held == boxes[3:]
    # Settled: neither takes more nor gives up anything.
    for mailboxes, name, share in ((a, "a", boxes[:3]), (b, "b", boxes[3:])):
        renewed = await mailboxes.hold(name, TTL)
        assert renewed.held == share and renewed.surplus == []
    assert await holders(team) == {**dict.fromkeys(boxes[:3], "a"),
                                   **dict.fromkeys(boxes[3:], "b")}


async def test_mirrors_taking_at_once_never_hold_one_mailbox_together(
        team: Store, other: Store, boxes: list[str]) -> None:
    stores = [team, other, team, other]
    names = ["a", "b", "c", "d"]
    for _ in range(3):
        rounds = await asyncio.gather(*(
            Mailboxes(s.db).hold(n, TTL) for s, n in zip(stores, names, strict=True)))
        held = [address for leases in rounds for address in leases.held]
        assert len(held) == len(set(held))  # nobody's mailbox is anybody else's too
        for store, name, leases in zip(stores, names, rounds, strict=True):
            await Mailboxes(store.db).release(name, leases.surplus)
    found = await holders(team)
    assert sorted(a for a, h in found.items() if h) == boxes
    assert all(list(found.values()).count(n) <= 2 for n in names)  # 5 between 4: 2 at most


async def test_the_mailboxes_of_a_mirror_that_stopped_renewing_move_to_a_survivor(
        team: Store, other: Store, boxes: list[str]) -> None:
    a, b = Mailboxes(team.db), Mailboxes(other.db)
    # Long enough that a loaded machine takes the second look within it.
    await a.hold("a", 1.5)
    assert (await b.hold("b", TTL)).held == []
    await asyncio.sleep(1.6)
    assert (await b.hold("b", TTL)).held == boxes
    # The first one, back from a long pause, finds its leases gone.
    assert (await a.hold("a", TTL)).held == []
    assert await holders(team) == dict.fromkeys(boxes, "b")


async def test_released_leases_are_free_at_once(
        team: Store, other: Store, boxes: list[str]) -> None:
    a, b = Mailboxes(team.db), Mailboxes(other.db)
    await a.hold("a", TTL)
    await b.hold("b", TTL)
    await a.release("a")  # as a gateway that shuts down
    assert await holders(team) == dict.fromkeys(boxes)
    assert (await b.hold("b", TTL)).held == boxes  # the only mirror left


async def test_a_disconnected_mailbox_is_not_held(team: Store, boxes: list[str]) -> None:
    await Mailboxes(team.db).hold("a", TTL)
    await Mailboxes(team.db).disconnect(boxes[0])
    assert (await Mailboxes(team.db).hold("a", TTL)).held == boxes[1:]
    box = next(b for b in await Mailboxes(team.db).all() if b.address == boxes[0])
    assert mirrored_by(box) is None
